"""Throws malformed and hostile ``ipam`` gossip at a running agent; run inside a lab namespace by the tests.

    python fuzz_ipam.py HOST PORT SECRET_FILE CONTEXT_JSON N_SMALL N_HUGE SEED

It connects as a peer holding the mesh secret (a real handshake), then sends N_SMALL small messages on the
``ipam`` channel (gossip, broadcasts and unicasts: garbage, truncated and malformed updates, and well-formed
updates the agent must refuse: another range, another seed, a ring that takes the agent's allocated addresses at
high versions) and N_HUGE large ones (token lists over the limit, a ring of the most tokens allowed in reverse
order over the agent's allocations, vote lists of many megabytes). CONTEXT_JSON names what the hostile updates
aim at: {"start", "end", "seed", "target", "allocated", "peers"} (the range as integers, the seed's names, the
agent's name, its allocated addresses, other real peers' names).

Prints a JSON summary: how many messages should count as decode errors (kind ipam), how many as refusals per
reason, how many should be ignored without a count, and the time spent.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from weft.ipam.wire import MAX_TOKENS
from weft.mesh.codec import pack
from weft.mesh.handshake import frame, handshake
from weft.mesh.peer import PeerInfo

FUZZER = 0x02FFFFFF0002
BIG_VERSION = 1 << 40


class Maker:
    """Builds one message at a time and records what the agent should make of it."""

    def __init__(self, ctx: dict, rng: random.Random) -> None:
        self.start, self.end = ctx["start"], ctx["end"]
        self.seed = sorted(ctx["seed"])
        self.target = ctx["target"]
        self.allocated = sorted(ctx["allocated"])
        self.peers = ctx["peers"]
        self.rng = rng
        self.expect: Counter[str] = Counter()  # "decode", "refused:<reason>", "ignored"
        self.kinds: Counter[str] = Counter()

    # -- building blocks -------------------------------------------------------------------------------------

    def fake_name(self) -> int:
        return self.rng.randrange(1, 1 << 48)

    def update(self, **override: object) -> dict:
        """A well-formed update for the agent's range and seed, with no tokens."""
        body: dict = {"r": [self.start, self.end], "s": list(self.seed), "e": [], "c": False, "f": FUZZER, "v": []}
        body.update(override)
        return body

    def grabbing_tokens(self) -> list[list[int]]:
        """Tokens, at high versions and owned by someone else, whose ranges hold the agent's allocated addresses."""
        owner = self.rng.choice([*self.peers, self.fake_name()])
        addresses = self.rng.sample(self.allocated, self.rng.randint(1, min(3, len(self.allocated))))
        tokens = sorted({a - self.rng.randrange(0, 3) for a in addresses} | {a for a in addresses})
        tokens = sorted({max(self.start, t) for t in tokens})
        version = self.rng.choice([BIG_VERSION, (1 << 63) - 1, self.rng.randrange(BIG_VERSION, 1 << 62)])
        return [[t, version, owner, self.rng.randrange(0, 4)] for t in tokens]

    def envelope(self, body: bytes, kind: str | None = None) -> dict:
        kind = kind or self.rng.choice(["g", "gb"])
        if kind == "g":
            return {"t": "g", "ch": "ipam", "d": body}
        if kind == "gb":
            return {"t": "gb", "ch": "ipam", "src": self.rng.choice([FUZZER, self.fake_name()]), "d": body}
        return {"t": "gu", "ch": "ipam", "src": FUZZER, "dst": self.target, "d": body}

    def counted(self, what: str, kind: str, body: bytes, envelope: str | None = None) -> dict:
        self.expect[what] += 1
        self.kinds[kind] += 1
        return self.envelope(body, envelope)

    # -- small messages ----------------------------------------------------------------------------------------

    def small(self) -> dict:
        rng = self.rng
        choice = rng.randrange(100)
        if choice < 12:
            return self.counted("decode", "random_bytes", rng.randbytes(rng.randrange(0, 300)))
        if choice < 20:
            value = rng.choice([1, -7, "x", [1, 2], None, 3.5, b"\x00", True, {"r": "x"}, {}])
            return self.counted("decode", "wrong_type", pack(value))
        if choice < 32:
            whole = pack(self.update(e=self.grabbing_tokens(), c=rng.random() < 0.5))
            return self.counted("decode", "truncated", whole[: rng.randrange(0, len(whole) - 1)])
        if choice < 55:
            name, body = rng.choice(self.malformed_updates())
            return self.counted("decode", f"malformed:{name}", pack(body))
        if choice < 63:
            body = rng.choice(
                [
                    rng.randbytes(rng.randrange(0, 100)),
                    pack({"k": "zz", "id": 1}),
                    pack({"k": "req", "id": -1, "span": [1, 2]}),
                    pack({"k": "req", "id": 1, "span": [9, 3]}),
                    pack({"k": "grant", "id": 1, "ring": b"\x93\x01"}),
                    pack({"k": "grant", "id": 1, "ring": pack(self.update(r=[5, 5]))}),
                    pack({"k": "deny", "id": 1, "why": 7}),
                    pack({"id": 1}),
                ]
            )
            return self.counted("decode", "unicast_malformed", body, "gu")
        if choice < 70:  # another range: refused whatever else it holds
            lo = rng.choice([0x0A300000, 0x0A200000 + 256, 0x0A000000])
            hi = rng.choice([lo + 256, lo + (1 << 20), lo + (1 << 12)])
            body = self.update(r=[lo, hi], e=[[lo, BIG_VERSION, self.fake_name(), 1]])
            return self.counted("refused:range", "other_range", pack(body))
        if choice < 77:  # our range, another seed
            seed = sorted({self.fake_name() for _ in range(rng.randint(1, 4))})
            body = self.update(s=seed, e=self.grabbing_tokens(), c=rng.random() < 0.5)
            return self.counted("refused:seed", "other_seed", pack(body))
        if choice < 92:  # our ring, taking what we allocated
            body = self.update(e=self.grabbing_tokens(), c=rng.random() < 0.5, f=rng.choice([FUZZER, *self.peers]))
            return self.counted("refused:conflict", "grab_allocated", pack(body))
        if choice < 96:  # the same as the answer to a space request nobody made
            grant = pack(self.update(e=self.grabbing_tokens()))
            return self.counted(
                "refused:conflict", "grant_grabbing", pack({"k": "grant", "id": 99, "ring": grant}), "gu"
            )
        # Well-formed and harmless: no tokens, votes while a ring exists, a denial nobody waits for.
        body, envelope = rng.choice(
            [
                (pack(self.update()), None),
                (pack(self.update(v=[[FUZZER, [3, FUZZER], [0, 0], []]])), None),
                (pack({"k": "deny", "id": 12345, "why": "x" * 5000}), "gu"),
            ]
        )
        return self.counted("ignored", "harmless", body, envelope)

    def malformed_updates(self) -> list[tuple[str, dict]]:
        s, e = self.start, self.end
        ok = [s, 1, FUZZER, 1]
        return [
            ("range_empty", self.update(r=[s, s])),
            ("range_reversed", self.update(r=[e, s])),
            ("range_three", self.update(r=[s, e, e])),
            ("range_too_big", self.update(r=[s, 1 << 32])),
            ("range_negative", self.update(r=[-1, e])),
            ("range_missing", {k: v for k, v in self.update().items() if k != "r"}),
            ("token_outside", self.update(e=[[e, 1, FUZZER, 1]])),
            ("token_below", self.update(e=[[s - 1, 1, FUZZER, 1]])),
            ("token_repeated", self.update(e=[ok, ok])),
            ("token_short", self.update(e=[[s, 1, FUZZER]])),
            ("token_long", self.update(e=[[s, 1, FUZZER, 1, 1]])),
            ("token_not_list", self.update(e=[s])),
            ("version_negative", self.update(e=[[s, -1, FUZZER, 1]])),
            ("version_too_big", self.update(e=[[s, 1 << 63, FUZZER, 1]])),
            ("version_float", self.update(e=[[s, 1.5, FUZZER, 1]])),
            ("owner_zero", self.update(e=[[s, 1, 0, 1]])),
            ("owner_too_big", self.update(e=[[s, 1, 1 << 48, 1]])),
            ("free_over_size", self.update(e=[[s, 1, FUZZER, e - s + 1]])),
            ("free_bool", self.update(e=[[s, 1, FUZZER, True]])),
            ("seed_unsorted", self.update(s=[5, 3])),
            ("seed_repeat", self.update(s=[3, 3])),
            ("seed_zero", self.update(s=[0, 3])),
            ("seed_not_list", self.update(s=3)),
            ("entries_not_list", self.update(e={"a": 1})),
            ("complete_not_bool", self.update(c=1)),
            ("sender_missing", {k: v for k, v in self.update().items() if k != "f"}),
            ("sender_zero", self.update(f=0)),
            ("vote_short", self.update(v=[[FUZZER, [1, 1]]])),
            ("vote_node_zero", self.update(v=[[0, [1, 1], [0, 0], []]])),
            ("vote_round_huge", self.update(v=[[FUZZER, [1 << 32, 1], [0, 0], []]])),
            ("vote_value_zero", self.update(v=[[FUZZER, [1, 1], [1, 1], [0]]])),
        ]

    # -- huge messages -----------------------------------------------------------------------------------------

    def huge(self, i: int) -> dict:
        kind = ["too_many_tokens", "most_tokens_reversed", "huge_votes"][i % 3]
        step = (self.end - self.start) // MAX_TOKENS
        if kind == "too_many_tokens":
            tokens = [[self.start + j * step // 2, 1, FUZZER, 0] for j in range(MAX_TOKENS + 1)]
            return self.counted("decode", kind, pack(self.update(e=tokens)))
        if kind == "most_tokens_reversed":
            # Every token the limit allows, at the highest version, in reverse order, the first over our allocations.
            owner = self.fake_name()
            tokens = [[self.start + j * step, (1 << 63) - 1, owner, 0] for j in reversed(range(MAX_TOKENS))]
            return self.counted("refused:conflict", kind, pack(self.update(e=tokens, c=True)))
        # Thousands of votes of hundreds of names (12 MB), the last vote naming the reserved peer 0.
        names = list(range(FUZZER, FUZZER + 400))  # 48-bit names: 9 bytes each
        votes = [[FUZZER + j, [1, FUZZER], [1, FUZZER], names] for j in range(3000)]
        votes.append([0, [0, 0], [0, 0], []])
        return self.counted("decode", kind, pack(self.update(v=votes)))


async def main() -> None:
    host, port, secret_file, ctx_file, n_small, n_huge, seed = sys.argv[1:8]
    rng = random.Random(int(seed))
    secret = Path(secret_file).read_bytes().strip() if secret_file != "-" else None
    maker = Maker(json.loads(Path(ctx_file).read_text()), rng)
    reader, writer = await asyncio.open_connection(host, int(port))
    me = PeerInfo(FUZZER, "ipam-fuzzer", rng.getrandbits(63) + 1)
    session = await handshake(
        reader, writer, outbound=True, ourself=me, secrets=[secret] if secret else [], port=6783, advertise=None
    )
    seal: Callable[[bytes], bytes] = session.sealer.seal if session.sealer is not None else (lambda b: b)

    async def discard() -> None:  # what the agent sends us (its state, heartbeats) is read and dropped
        while await reader.read(65536):
            pass

    reading = asyncio.ensure_future(discard())
    began = time.monotonic()
    for i in range(int(n_small)):
        writer.write(frame(seal(pack(maker.small()))))
        if i % 200 == 0:
            writer.write(frame(seal(pack({"t": "hb"}))))
            await writer.drain()
    await writer.drain()
    small_done = time.monotonic()
    for i in range(int(n_huge)):
        writer.write(frame(seal(pack(maker.huge(i)))))
        await writer.drain()
    # Done: the agent reads what is buffered, then sees the end of the stream and closes its side.
    writer.write_eof()
    await asyncio.wait_for(reading, 300)
    writer.close()
    summary = {
        "sent": int(n_small) + int(n_huge),
        "expect": dict(maker.expect),
        "kinds": dict(sorted(maker.kinds.items())),
        "small_seconds": round(small_done - began, 2),
        "seconds": round(time.monotonic() - began, 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())

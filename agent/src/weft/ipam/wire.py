"""The ``ipam`` gossip channel's messages, and their total decoding (anything malformed is a DecodeError).

Gossip carries a :class:`RingUpdate`: the range and seed it belongs to, tokens (all of them on connect and in
anti-entropy, only the changed ones otherwise) and, before a ring exists, the consensus votes. Unicasts carry space
requests and their answers. docs/protocol.md describes the fields.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

from weft.ipam.consensus import Vote
from weft.ipam.ring import Entry, Ring
from weft.mesh.codec import DecodeError, expect, expect_uint, pack, unpack
from weft.mesh.peer import NAME_BITS

KIND = "ipam"
MAX_TOKENS = 1 << 17  # far above any real ring (a token per donation), far below what would hurt to hold
MAX_SEED = 4096
MAX_VOTES = 4096
MAX_VOTE_NAMES = 65536  # in all the votes of one message: each names at most every voter, and voters are few
MAX_REASON = 300
SEED_DIGEST_BYTES = 8


@lru_cache(maxsize=4)
def seed_digest(seed: tuple[int, ...]) -> bytes:
    """What a delta carries instead of the seed: at 1,000 seed peers the list is 7 KB, eight bytes tell two apart."""
    return hashlib.blake2b(pack(list(seed)), digest_size=SEED_DIGEST_BYTES).digest()


@dataclass(slots=True)
class RingUpdate:
    """Gossip data of the ``ipam`` channel. ``complete`` says it holds every token its sender knew."""

    start: int = 0
    end: int = 0
    seed: tuple[int, ...] = ()
    entries: dict[int, Entry] = field(default_factory=dict)
    complete: bool = False
    sender: int = 0
    votes: dict[int, Vote] = field(default_factory=dict)
    digest: bytes = b""  # of the seed; all a decoded delta knows of it (its ``seed`` is empty)

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = seed_digest(self.seed)

    @classmethod
    def of(cls, ring: Ring, sender: int, tokens: dict[int, Entry] | None = None) -> RingUpdate:
        """The whole ring, or only ``tokens`` of it."""
        return cls(
            ring.start,
            ring.end,
            ring.seed,
            dict(ring.entries if tokens is None else tokens),
            tokens is None and not ring.empty,
            sender,
        )

    def merge(self, other: RingUpdate) -> None:
        """Pending gossip for one connection merges: tokens by the ring's rule, votes by their own."""
        if not self.end:
            self.start, self.end, self.seed, self.sender = other.start, other.end, other.seed, other.sender
            self.digest = other.digest
        elif other.seed and not self.seed:  # votes (no ring, no seed), then the ring they chose: its seed goes along
            self.seed, self.digest = other.seed, other.digest
        for token, entry in other.entries.items():
            mine = self.entries.get(token)
            if mine is None or entry > mine:
                self.entries[token] = entry
        self.complete = self.complete or other.complete
        for node, vote in other.votes.items():
            mine_vote = self.votes.get(node)
            if mine_vote is None or vote.newer_than(mine_vote):
                self.votes[node] = vote

    def ring(self) -> Ring:
        ring = Ring(self.start, self.end, self.seed)
        # In token order: put() inserts into a sorted list, and tokens a peer sent in reverse order made that
        # quadratic (2.8 s of event loop for the 131,072 tokens one message may carry).
        for token, entry in sorted(self.entries.items()):
            ring.put(token, entry)
        return ring

    def encode(self) -> bytes:
        body: dict = {"r": [self.start, self.end]}
        if self.complete or not self.entries:
            body["s"] = list(self.seed)
        else:  # a delta: the receiver has the ring (it ignores deltas otherwise), so the seed's digest is enough
            body["sd"] = self.digest
        body.update(
            {
                "e": [[t, e.version, e.owner, e.free] for t, e in sorted(self.entries.items())],
                "c": self.complete,
                "f": self.sender,
                "v": [v.to_wire() for v in self.votes.values()],
            }
        )
        return pack(body)

    @classmethod
    def decode(cls, payload: bytes) -> RingUpdate:
        raw = unpack(payload, KIND)
        expect(raw, dict, KIND, "update")
        span = _list(raw, "r", 2, 2)
        start, end = (expect_uint(v, 32, KIND, "range") for v in span)
        if start >= end or end > 1 << 32:
            raise DecodeError(KIND, "range is empty")
        seed = tuple(_name(v, "seed peer") for v in _list(raw, "s", 0, MAX_SEED))
        if list(seed) != sorted(set(seed)):
            raise DecodeError(KIND, "seed must be sorted and without repeats")
        update = cls(start, end, seed, complete=expect(raw.get("c", False), bool, KIND, "complete"))
        if "sd" in raw:
            if seed or update.complete:
                raise DecodeError(KIND, "a seed digest goes only in a delta, instead of the seed")
            digest = expect(raw["sd"], bytes, KIND, "seed digest")
            if len(digest) != SEED_DIGEST_BYTES:
                raise DecodeError(KIND, f"seed digest of {len(digest)} bytes, expected {SEED_DIGEST_BYTES}")
            update.digest = digest
        update.sender = _name(raw.get("f"), "sender")
        size = end - start
        for item in _list(raw, "e", 0, MAX_TOKENS):
            expect(item, list, KIND, "token")
            if len(item) != 4:
                raise DecodeError(KIND, f"token has {len(item)} fields, expected 4")
            token = expect_uint(item[0], 32, KIND, "token")
            if not start <= token < end:
                raise DecodeError(KIND, "token outside the range")
            if token in update.entries:
                raise DecodeError(KIND, "token repeated")
            version = expect_uint(item[1], 63, KIND, "version")
            owner = _name(item[2], "owner")
            free = expect_uint(item[3], 32, KIND, "free count")
            if free > size:
                raise DecodeError(KIND, "free count larger than the range")
            update.entries[token] = Entry(version, owner, free)
        names = 0
        for item in _list(raw, "v", 0, MAX_VOTES):
            vote = Vote.from_wire(item, KIND)
            names += len(vote.value)
            if names > MAX_VOTE_NAMES:
                raise DecodeError(KIND, f"votes name more than {MAX_VOTE_NAMES} peers in all")
            update.votes[vote.node] = vote
        return update


def _list(raw: dict, key: str, least: int, most: int) -> list:
    value = expect(raw.get(key, []), list, KIND, key)
    if not least <= len(value) <= most:
        raise DecodeError(KIND, f"{key}: {len(value)} items, expected {least}..{most}")
    return value


def _name(value: object, what: str) -> int:
    name = expect_uint(value, NAME_BITS, KIND, what)
    if name == 0:
        raise DecodeError(KIND, f"{what}: name 0 is reserved")
    return name


# -- unicasts: space requests ------------------------------------------------------------------------------------------

REQUEST = "req"
GRANT = "grant"
DENY = "deny"


@dataclass(frozen=True, slots=True)
class SpaceMessage:
    """A request for space in ``[lo, hi)``, or its answer (a grant carries the ring's changed tokens)."""

    kind: str
    request_id: int
    lo: int = 0
    hi: int = 0
    reason: str = ""
    grant: RingUpdate | None = None

    def encode(self) -> bytes:
        body: dict = {"k": self.kind, "id": self.request_id}
        if self.kind == REQUEST:
            body["span"] = [self.lo, self.hi]
        elif self.kind == DENY:
            body["why"] = self.reason
        elif self.grant is not None:
            body["ring"] = self.grant.encode()
        return pack(body)

    @classmethod
    def decode(cls, payload: bytes) -> SpaceMessage:
        raw = unpack(payload, KIND)
        expect(raw, dict, KIND, "space message")
        kind = expect(raw.get("k"), str, KIND, "kind")
        request_id = expect_uint(raw.get("id"), 64, KIND, "request id")
        if kind == REQUEST:
            span = _list(raw, "span", 2, 2)
            lo, hi = (expect_uint(v, 33, KIND, "span") for v in span)
            if lo >= hi:
                raise DecodeError(KIND, "empty span")
            return cls(kind, request_id, lo, hi)
        if kind == DENY:
            reason = expect(raw.get("why", ""), str, KIND, "reason")[:MAX_REASON]
            return cls(kind, request_id, reason=reason)
        if kind == GRANT:
            return cls(kind, request_id, grant=RingUpdate.decode(expect(raw.get("ring"), bytes, KIND, "ring")))
        raise DecodeError(KIND, f"unknown space message kind {kind[:20]!r}")

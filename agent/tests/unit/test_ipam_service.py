"""IPAM on the simulated mesh (weft.sim): the real router, gossip and IPAM service in virtual time. Exhaustion, space
moving between peers, partitions, rmpeer, consensus, peers that disagree on the range or the seed, and hostile
input."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable

import pytest

from weft import sim
from weft.ipam.bootstrap import parse_range
from weft.ipam.consensus import Vote
from weft.ipam.ring import Entry
from weft.ipam.service import SPACE_TIMEOUT, Ipam, IpamError
from weft.ipam.space import Subnet
from weft.ipam.wire import DENY, GRANT, MAX_TOKENS, REQUEST, RingUpdate, SpaceMessage
from weft.mesh.codec import DecodeError, pack
from weft.mesh.gossip import BROADCAST, GOSSIP, UNICAST
from weft.mesh.peer import format_name
from weft.sim import SimNetwork, SimPeer, add_ipam, chain_of_strangers

RANGE = "10.32.0.0/26"
FULL = "no free address in 10.32.0.0/26: all 62 are in use"

# -- harness ---------------------------------------------------------------------------------------------------------


def run(net: SimNetwork, done: Callable[[], bool], seconds: float) -> bool:
    return net.scheduler.run_until(done, net.scheduler.now() + seconds, resolution=0.01)


def settle(net: SimNetwork, seconds: float = 1.0) -> None:
    net.scheduler.call_later(seconds, lambda: None)
    net.scheduler.run_until(lambda: False, net.scheduler.now() + seconds)


def full_mesh(net: SimNetwork) -> bool:
    return all(len(p.router.connections) == len(net.peers) - 1 for p in net.peers)


def rings_agree(ipams: list[Ipam]) -> bool:
    rings = [i.alloc.ring for i in ipams]
    return all(r is not None for r in rings) and all(r.entries == rings[0].entries for r in rings)  # type: ignore[union-attr]


def mesh(n: int, universe: str = RANGE, init: str | None = None, seed: int = 1) -> tuple[SimNetwork, list[Ipam]]:
    """``n`` peers that find each other (discovery), each running IPAM over ``universe``, seeded by all of them."""
    net = chain_of_strangers(n, seed=seed, discovery=True)
    ipams = add_ipam(net, universe, init)
    assert run(net, lambda: net.converged() and full_mesh(net) and rings_agree(ipams), 30.0)
    settle(net)
    return net, ipams


def start_ipam(
    net: SimNetwork, peer: SimPeer, universe: str = RANGE, init: str | None = None, peers: int | None = None
) -> Ipam:
    """IPAM on one peer, as weft.sim.add_ipam starts it on all (``init`` None: consensus among the targets)."""
    return sim.start_ipam(net, peer, universe, init or "consensus", peers)


class Outcome:
    """What one allocation's ``done`` was called with (and how often: exactly once, always)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, str | None]] = []

    def __call__(self, cidr: str | None, reason: str | None) -> None:
        self.calls.append((cidr, reason))

    @property
    def done(self) -> bool:
        return bool(self.calls)

    @property
    def cidr(self) -> str | None:
        assert len(self.calls) == 1, self.calls
        return self.calls[0][0]

    @property
    def reason(self) -> str | None:
        assert len(self.calls) == 1, self.calls
        return self.calls[0][1]


def allocate(net: SimNetwork, ipam: Ipam, key: str, seconds: float = 10.0, subnet: Subnet | None = None) -> Outcome:
    outcome = Outcome()
    ipam.allocate(key, subnet, key, outcome)
    assert run(net, lambda: outcome.done, seconds), f"allocation {key} still waiting after {seconds} s"
    return outcome


def everything_allocated(ipams: list[Ipam]) -> list[int]:
    return [a for i in ipams for a in i.alloc.space.allocations]


def owned_by(ipam: Ipam, peer: int) -> int:
    assert ipam.alloc.ring is not None
    return sum(hi - lo for lo, hi in ipam.alloc.ring.owned_by(peer))


def counter(ipam: Ipam, metric: str, **labels: str) -> float:
    return ipam.metrics.registry.get_sample_value(metric, labels) or 0.0


def refused(ipam: Ipam, reason: str) -> float:
    return counter(ipam, "weft_ipam_refused_updates_total", reason=reason)


def host(cidr: str | None) -> int:
    assert cidr is not None
    return int(ipaddress.IPv4Interface(cidr).ip)


# -- exhaustion and space moving -------------------------------------------------------------------------------------


def test_a_26_over_three_peers_gives_62_addresses_wherever_asked_then_says_why_not() -> None:
    net, ipams = mesh(3)
    rng = random.Random(7)
    got = [allocate(net, rng.choice(ipams), f"c{i}").cidr for i in range(62)]

    assert None not in got
    assert sorted(host(c) for c in got) == [int(ipaddress.IPv4Address("10.32.0.0")) + i for i in range(1, 63)]
    assert all(c.endswith("/26") for c in got)  # type: ignore[union-attr]
    for ipam in ipams:  # the 63rd fails on every peer, at once, with the reason in one line
        start = net.scheduler.now()
        outcome = allocate(net, ipam, "one-too-many")
        assert outcome.calls == [(None, FULL)]
        assert net.scheduler.now() - start < 1.0
    settle(net)
    assert rings_agree(ipams)
    assert all(e.free == 0 for e in ipams[0].alloc.ring.entries.values())  # type: ignore[union-attr]


@pytest.mark.parametrize("seed", [11, 13, 23, 26, 35])  # 13...35: a peer said no while the space was moving
def test_62_allocations_asked_all_at_once_on_several_peers_all_succeed(seed: int) -> None:
    net, ipams = mesh(3 + seed % 3, seed=seed)
    rng = random.Random(seed)
    outcomes = []
    for i in range(62):
        outcome = Outcome()
        rng.choice(ipams).allocate(f"c{i}", None, f"c{i}", outcome)
        outcomes.append(outcome)
    assert run(net, lambda: all(o.done for o in outcomes), 20.0)
    reasons = [o.reason for o in outcomes if o.reason]
    assert reasons == []
    assert len({o.cidr for o in outcomes}) == 62
    settle(net, 2.0)
    assert all(len(o.calls) == 1 for o in outcomes)  # done is called once
    assert rings_agree(ipams)
    assert allocate(net, ipams[1], "one-too-many").calls == [(None, FULL)]


def test_a_full_subnet_is_reported_at_once_though_the_range_has_room() -> None:
    net, ipams = mesh(3, universe="10.32.0.0/24")
    small = parse_range("10.32.0.16/28")
    outcomes = []
    for i in range(15):
        outcome = Outcome()
        ipams[i % 3].allocate(f"c{i}", small, f"c{i}", outcome)
        outcomes.append(outcome)
    assert run(net, lambda: all(o.done for o in outcomes), 10.0)
    assert sorted(host(o.cidr) for o in outcomes if o.cidr) == list(range(small.lo + 1, small.hi - 1))
    [failed] = [o for o in outcomes if not o.cidr]
    assert failed.reason == "no free address in 10.32.0.16/28: all 14 are in use"
    start = net.scheduler.now()
    assert allocate(net, ipams[2], "one-more", subnet=small).calls == [(None, failed.reason)]
    assert net.scheduler.now() - start < 1.0
    assert not small.contains(host(allocate(net, ipams[2], "one-more").cidr))  # the rest of the range is not full


def test_space_moves_to_the_peer_that_allocates() -> None:
    net, ipams = mesh(3)
    me = ipams[0].me
    assert owned_by(ipams[0], me) == 21

    got = [allocate(net, ipams[0], f"c{i}").cidr for i in range(50)]

    assert None not in got and len(set(got)) == 50
    assert run(net, lambda: rings_agree(ipams), 2.0)
    assert all(owned_by(i, me) >= 51 for i in ipams)  # every peer sees it: 50 allocated, 1 network address
    assert counter(ipams[0], "weft_ipam_space_requests_total", result="sent") >= 2
    granted = sum(counter(i, "weft_ipam_space_requests_total", result="granted") for i in ipams[1:])
    assert granted >= 2
    rows = {r["name"]: r for r in ipams[2].status()["peers"]}
    assert rows[format_name(me)]["in_use"] == 50
    # Freeing gives the addresses back to this peer's own pool, and the others learn its free count.
    assert len(ipams[0].free("c3")) == 1
    assert run(net, lambda: rings_agree(ipams), 2.0)
    assert rows[format_name(me)]["free"] + 1 == next(
        r["free"] for r in ipams[2].status()["peers"] if r["name"] == format_name(me)
    )


# -- partitions ------------------------------------------------------------------------------------------------------


def test_allocations_on_both_sides_of_a_partition_never_collide_after_healing() -> None:
    net, ipams = mesh(5, seed=2)
    left, right = [0, 1], [2, 3, 4]
    net.partition([left, right])
    names = {i: net.peers[i].info.name for i in range(5)}
    assert run(net, lambda: not any(ipams[0].reachable(names[i]) for i in right), 10.0)
    rng = random.Random(3)

    # Each side allocates what it owns (2/5 and 3/5 of the range), asking its own side for space.
    left_got = [allocate(net, ipams[rng.choice(left)], f"l{i}").cidr for i in range(24)]
    right_got = [allocate(net, ipams[rng.choice(right)], f"r{i}").cidr for i in range(36)]
    assert None not in left_got + right_got
    # More than a side owns: the reason names the other side's peers, unreachable, after the promised wait.
    start = net.scheduler.now()
    outcome = allocate(net, ipams[0], "l-extra")
    assert outcome.reason is not None and outcome.reason.startswith(
        "no free address in 10.32.0.0/26: the 3 peer(s) with free space are unreachable ("
    )
    assert "weft rmpeer them if they are gone" in outcome.reason
    assert SPACE_TIMEOUT <= net.scheduler.now() - start <= SPACE_TIMEOUT + 1

    net.heal()
    assert run(net, lambda: net.converged() and full_mesh(net) and rings_agree(ipams), 60.0)
    allocated = everything_allocated(ipams)
    assert len(allocated) == len(set(allocated)) == 60
    assert sum(refused(i, reason) for i in ipams for reason in ("conflict", "range", "seed")) == 0
    # Healed, the rest of the range is anyone's: two more, then it is full.
    assert allocate(net, ipams[0], "l-extra").cidr is not None
    assert allocate(net, ipams[1], "l-extra2").cidr is not None
    assert allocate(net, ipams[4], "r-extra").calls == [(None, FULL)]
    assert run(net, lambda: rings_agree(ipams), 5.0)
    allocated = everything_allocated(ipams)
    assert len(allocated) == len(set(allocated)) == 62


# -- rmpeer ----------------------------------------------------------------------------------------------------------


def isolate(net: SimNetwork, ipams: list[Ipam], gone: int) -> None:
    others = [i for i in range(len(net.peers)) if i != gone]
    net.partition([others, [gone]])
    name = net.peers[gone].info.name
    assert run(net, lambda: not any(ipams[i].reachable(name) for i in others), 10.0)


def test_rmpeer_of_an_unreachable_peer_gives_its_ranges_to_the_reclaimer_on_every_peer() -> None:
    net, ipams = mesh(4)
    gone = net.peers[3].info.name
    ranges = ipams[0].alloc.ring.owned_by(gone)  # type: ignore[union-attr]
    isolate(net, ipams, 3)

    result = ipams[1].rmpeer(["sim3"])  # by nickname, remembered from the topology

    assert result == {format_name(gone): sum(hi - lo for lo, hi in ranges)}
    assert run(net, lambda: rings_agree(ipams[:3]), 2.0)
    reclaimer = ipams[1].me
    for ipam in ipams[:3]:
        ring = ipam.alloc.ring
        assert ring is not None and ring.owned_by(gone) == []
        assert all(ring.owner_of(a) == reclaimer for lo, hi in ranges for a in range(lo, hi))
        assert ipam.unreachable_ratio() == 0.0
    # The reclaimed space serves allocations at once.
    got = [allocate(net, ipams[0], f"c{i}").cidr for i in range(62)]
    assert None not in got
    # The peer comes back with nothing allocated: it takes the reclaim as it is.
    net.heal()
    assert run(net, lambda: net.converged() and full_mesh(net) and rings_agree(ipams), 60.0)
    assert ipams[3].alloc.owned() == 0


def test_rmpeer_of_a_reachable_peer_is_refused_unless_forced() -> None:
    net, ipams = mesh(3)
    target = format_name(net.peers[2].info.name)
    before = dict(ipams[0].alloc.ring.entries)  # type: ignore[union-attr]
    with pytest.raises(IpamError, match=r"is reachable: rmpeer is for peers that are gone for good"):
        ipams[0].rmpeer([target])
    with pytest.raises(IpamError, match="names this peer itself"):
        ipams[0].rmpeer([format_name(ipams[0].me)])
    with pytest.raises(IpamError, match="no peer named or nicknamed 'nobody'"):
        ipams[0].rmpeer(["nobody"])
    assert ipams[0].alloc.ring.entries == before  # type: ignore[union-attr]
    ours, theirs = ipams[0].alloc.owned(), owned_by(ipams[0], net.peers[2].info.name)

    assert ipams[0].rmpeer([target], force=True) == {target: theirs}

    assert run(net, lambda: rings_agree(ipams) and ipams[2].alloc.owned() == 0, 2.0)
    assert owned_by(ipams[2], ipams[0].me) == ours + theirs


def test_two_concurrent_rmpeers_of_one_peer_end_with_one_owner_everywhere() -> None:
    net, ipams = mesh(5)
    gone = net.peers[4].info.name
    ranges = ipams[0].alloc.ring.owned_by(gone)  # type: ignore[union-attr]
    isolate(net, ipams, 4)

    ipams[0].rmpeer([format_name(gone)])  # at the same virtual instant, before either hears of the other
    ipams[2].rmpeer([format_name(gone)])

    live = ipams[:4]
    assert run(net, lambda: rings_agree(live), 5.0)
    winner = max(ipams[0].me, ipams[2].me)
    for ipam in live:
        assert all(ipam.alloc.ring.owner_of(a) == winner for lo, hi in ranges for a in range(lo, hi))  # type: ignore[union-attr]
    assert sum(refused(i, "conflict") for i in live) == 0
    got = [allocate(net, ipams[i % 4], f"c{i}").cidr for i in range(62)]
    assert None not in got and len(set(got)) == 62


# -- consensus -------------------------------------------------------------------------------------------------------


def test_consensus_waits_for_a_quorum_then_completes_what_was_asked_meanwhile() -> None:
    net = chain_of_strangers(1)
    [first] = add_ipam(net, RANGE, "consensus=3")
    settle(net, 10.0)
    assert first.alloc.ring is None
    assert first.state() == "awaiting consensus: 1 of 2 peers"
    waiting = Outcome()
    first.allocate("early", None, "early", waiting)
    settle(net, 5.0)
    assert not waiting.done
    assert first.status()["pending"] == 1

    second = start_ipam(net, net.add_peer(["sim0:6783"]), init="consensus=3", peers=3)

    assert run(net, lambda: rings_agree([first, second]) and waiting.done, 20.0)
    assert waiting.cidr == "10.32.0.1/26"
    ring = first.alloc.ring
    assert ring is not None and ring.seed == tuple(sorted((first.me, second.me)))
    assert first.state() == second.state() == "ready"
    assert allocate(net, second, "later").cidr is not None


def test_an_allocation_without_a_ring_fails_after_the_ring_timeout_with_the_state() -> None:
    net = chain_of_strangers(1)
    [alone] = add_ipam(net, RANGE, "consensus=3")
    outcome = allocate(net, alone, "early", seconds=60.0)
    assert outcome.calls == [(None, "no address yet: awaiting consensus: 1 of 2 peers")]


# -- peers that disagree ---------------------------------------------------------------------------------------------


def test_a_peer_with_another_range_is_refused_and_counted() -> None:
    net = chain_of_strangers(3, discovery=True)
    seed = "seed=" + ",".join(format_name(p.info.name) for p in net.peers)
    ipams = [
        start_ipam(net, p, universe=u, init=seed)
        for p, u in zip(net.peers, [RANGE, RANGE, "10.40.0.0/26"], strict=True)
    ]
    assert run(net, lambda: net.converged() and full_mesh(net), 30.0)
    # Peers that met through others exchange whole rings at the next anti-entropy round (30 s +- 20%).
    assert run(net, lambda: all(refused(i, "range") >= 1 for i in ipams), 2 * net.gossip_interval)
    assert rings_agree(ipams[:2])
    assert "its ipalloc_range 10.40.0.0/26 differs from ours 10.32.0.0/26" in ipams[0].refusals[-1]
    assert ipams[2].alloc.ring.start == int(ipaddress.IPv4Address("10.40.0.0"))  # type: ignore[union-attr]
    assert ipams[0].alloc.ring.start == int(ipaddress.IPv4Address("10.32.0.0"))  # type: ignore[union-attr]


def test_a_peer_with_another_seed_is_refused_and_counted() -> None:
    net = chain_of_strangers(3, discovery=True)
    a, b, c = (format_name(p.info.name) for p in net.peers)
    inits = [f"seed={a},{b}", f"seed={a},{b}", f"seed={c}"]
    ipams = [start_ipam(net, p, init=i) for p, i in zip(net.peers, inits, strict=True)]
    assert run(net, lambda: net.converged() and full_mesh(net), 30.0)
    assert run(net, lambda: all(refused(i, "seed") >= 1 for i in ipams), 2 * net.gossip_interval)
    assert rings_agree(ipams[:2])
    assert f"it was seeded by {c}, ours by {a},{b}" in ipams[0].refusals[-1]
    assert ipams[2].alloc.ring.owners() == {net.peers[2].info.name}  # type: ignore[union-attr]


def test_a_change_carries_the_seeds_digest_not_its_list_and_a_change_from_another_seed_is_refused() -> None:
    """On a ring seeded by 1,000 peers, an allocation's delta stays a few dozen bytes (the list would be 7 KB);
    a delta made on a ring of another seed is still told apart, and refused."""
    net, ipams = mesh(3)
    ring = ipams[1].alloc.ring
    assert ring is not None
    token, entry = next(iter(ring.entries.items()))
    big_seed = tuple(range(1, 1001))
    delta = RingUpdate(ring.start, ring.end, big_seed, {token: entry}, sender=ipams[1].me).encode()
    assert len(delta) < 80
    whole = RingUpdate(ring.start, ring.end, big_seed, {token: entry}, complete=True, sender=ipams[1].me).encode()
    assert RingUpdate.decode(whole).seed == big_seed
    with pytest.raises(DecodeError, match="seed digest goes only in a delta"):
        RingUpdate.decode(pack({"r": [ring.start, ring.end], "sd": b"12345678", "c": True, "f": ipams[1].me}))

    target = ipams[0]
    before = dict(target.alloc.ring.entries)  # type: ignore[union-attr]
    other = RingUpdate(ring.start, ring.end, big_seed, {token: Entry(entry.version + 5, ipams[1].me, 0)})
    other.sender = ipams[1].me
    conn = net.peers[0].router.connections[ipams[1].me]
    net.peers[0].router.handle_message(conn, {"t": BROADCAST, "ch": "ipam", "src": ipams[1].me, "d": other.encode()})
    assert refused(target, "seed") == 1
    assert "seeded by another list (a change sent without it)" in target.refusals[-1]
    assert target.alloc.ring.entries == before  # type: ignore[union-attr]


# -- hostile input ---------------------------------------------------------------------------------------------------


class Hostile:
    """Builds malformed and hostile ``ipam`` messages for one target and says how each must be counted."""

    def __init__(self, target: Ipam, sender: int, rng: random.Random) -> None:
        ring = target.alloc.ring
        assert ring is not None
        self.ring = ring
        self.target = target
        self.sender = sender
        self.rng = rng
        self.allocated = sorted(target.alloc.space.allocations)
        self.valid = RingUpdate.of(ring, sender).encode()
        self.huge_sent = 0
        # A list of tokens just over the limit, built once (it is large).
        self.huge = pack(
            {
                "r": [ring.start, ring.end],
                "s": list(ring.seed),
                "e": [[ring.start, 1, sender, 0]] * (MAX_TOKENS + 1),
                "f": sender,
            }
        )

    def update(self, entries: dict[int, Entry], **overrides: object) -> bytes:
        body = {
            "r": [self.ring.start, self.ring.end],
            "s": list(self.ring.seed),
            "e": [[t, e.version, e.owner, e.free] for t, e in sorted(entries.items())],
            "c": False,
            "f": self.sender,
        }
        body.update(overrides)
        return pack(body)

    def taking(self) -> dict[int, Entry]:
        """Tokens that give at least one of the target's allocated addresses to the sender, at a high version."""
        address = self.rng.choice(self.allocated)
        token = self.rng.choice([address, self.ring.token_at(address)])
        assert token is not None
        version = self.rng.choice([10**6, (1 << 63) - 1, self.ring.entries.get(token, Entry(0, 0, 0)).version + 1])
        return {token: Entry(version, self.sender, self.rng.randrange(5))}

    def make(self) -> tuple[str, bytes, str]:
        """(message type, payload, expected: "decode" / "refused:<reason>" / "ignored")."""
        r = self.rng
        kind = r.randrange(14)
        if kind == 1:  # truncated
            cut = r.randrange(1, len(self.valid))
            return r.choice([GOSSIP, BROADCAST]), self.valid[:cut], "decode"
        if kind == 2 and self.huge_sent < 5:  # each costs tens of ms to decode: a few are enough
            self.huge_sent += 1
            return r.choice([GOSSIP, BROADCAST]), self.huge, "decode"
        if kind in (0, 2):
            return r.choice([GOSSIP, BROADCAST, UNICAST]), r.randbytes(r.randrange(0, 64)), "decode"
        if kind == 3:  # a token outside the range
            outside = r.choice([self.ring.end, self.ring.end + 5, self.ring.start - 1, 0])
            return GOSSIP, self.update({outside: Entry(5, self.sender, 0)}), "decode"
        if kind == 4:  # wrong shapes
            payload = pack(
                r.choice(
                    [
                        [],
                        7,
                        {"r": "10.32.0.0/26"},
                        {"r": [self.ring.end, self.ring.start], "f": self.sender},
                        {"r": [self.ring.start, self.ring.end], "f": 0},
                        {"r": [self.ring.start, self.ring.end], "f": self.sender, "e": [[1, 2, 3]]},
                        {"r": [self.ring.start, self.ring.end], "f": self.sender, "s": [3, 2]},
                        {"r": [self.ring.start, self.ring.end], "f": self.sender, "e": [[self.ring.start, -1, 5, 0]]},
                        {
                            "r": [self.ring.start, self.ring.end],
                            "f": self.sender,
                            "e": [[self.ring.start, 1, 5, 1 << 40]],
                        },
                        {"r": [self.ring.start, self.ring.end], "f": self.sender, "e": [[self.ring.start, 1, 0, 0]]},
                        {"r": [self.ring.start, self.ring.end], "f": self.sender, "v": [[1, [1], [0, 0], []]]},
                        {"r": [self.ring.start, self.ring.end], "f": self.sender, "c": "yes"},
                    ]
                )
            )
            return r.choice([GOSSIP, BROADCAST]), payload, "decode"
        if kind == 5:  # a repeated token
            token = self.ring.start
            payload = self.update({}, e=[[token, 9, self.sender, 0], [token, 9, self.sender, 0]])
            return GOSSIP, payload, "decode"
        if kind in (6, 7, 8):  # well-formed, but takes addresses the target has allocated
            entries = self.taking()
            if kind == 8:  # hidden among harmless tokens
                entries.update({t: e for t, e in self.ring.entries.items() if t not in entries})
            return r.choice([GOSSIP, BROADCAST]), self.update(entries, c=r.random() < 0.5), "refused:conflict"
        if kind == 9:  # another range
            return GOSSIP, self.update({}, r=[self.ring.start + 64, self.ring.end + 64]), "refused:range"
        if kind == 10:  # another seed
            entries = self.taking()
            return BROADCAST, self.update(entries, s=[self.sender]), "refused:seed"
        if kind == 11:  # a grant, answering nothing, that takes allocated addresses
            grant = RingUpdate(self.ring.start, self.ring.end, self.ring.seed, self.taking(), sender=self.sender)
            return UNICAST, SpaceMessage(GRANT, r.randrange(1 << 64), grant=grant).encode(), "refused:conflict"
        if kind == 12:  # unicasts that are malformed
            payload = r.choice(
                [
                    pack({"k": REQUEST, "id": 1, "span": [5, 5]}),
                    pack({"k": REQUEST, "id": -1, "span": [5, 6]}),
                    pack({"k": "steal", "id": 1}),
                    pack({"k": GRANT, "id": 1, "ring": b"\x93"}),
                    pack({"k": GRANT, "id": 1}),
                    pack({"k": DENY, "id": 1, "why": 5}),
                    r.randbytes(20),
                ]
            )
            return UNICAST, payload, "decode"
        # A denial nobody asked for, with a long reason: nothing to count, nothing happens.
        return UNICAST, SpaceMessage(DENY, r.randrange(1 << 64), reason="x" * 10_000).encode(), "ignored"


def test_hostile_ipam_input_is_counted_and_dropped_and_allocations_stay() -> None:
    net, ipams = mesh(3)
    target, peer = ipams[0], ipams[1]
    got = [allocate(net, target, f"c{i}").cidr for i in range(8)]
    assert None not in got
    settle(net)
    allocations = dict(target.alloc.space.allocations)
    ring = dict(target.alloc.ring.entries)  # type: ignore[union-attr]
    router = net.peers[0].router
    conn = router.connections[peer.me]
    hostile = Hostile(target, peer.me, random.Random(5))
    expected: dict[str, int] = {}

    for _ in range(10_000):
        kind, payload, outcome = hostile.make()
        msg = {"t": kind, "ch": "ipam", "d": payload}
        if kind == BROADCAST:
            msg["src"] = peer.me
        elif kind == UNICAST:
            msg.update(src=peer.me, dst=target.me)
        router.handle_message(conn, msg)  # nothing may escape
        expected[outcome] = expected.get(outcome, 0) + 1

    assert counter(target, "weft_decode_errors_total", kind="ipam") == expected["decode"]
    for reason in ("conflict", "range", "seed"):
        assert refused(target, reason) == expected[f"refused:{reason}"], reason
    assert target.alloc.space.allocations == allocations
    assert target.alloc.ring.entries == ring  # type: ignore[union-attr]
    # Logged at most once a minute per peer and reason, not 10,000 times.
    assert len(target.refusals) <= 3
    # The mesh goes on: gossip flows, allocations work, the rings agree.
    settle(net, 2.0)
    assert allocate(net, target, "after").cidr is not None
    assert allocate(net, peer, "after").cidr is not None
    assert run(net, lambda: rings_agree(ipams), 2.0)


def test_forged_votes_that_choose_no_peers_do_not_escape_the_router() -> None:
    """A peer still voting (consensus, no ring yet) gets votes from two made-up peers that accepted an empty value:
    not a ring anybody can make, so it is dropped, not raised into the connection's read loop."""
    net = chain_of_strangers(2, discovery=True)
    ipams = add_ipam(net, RANGE, "consensus=5")  # a quorum of 3: two peers alone never decide
    assert run(net, lambda: net.converged() and full_mesh(net), 10.0)
    settle(net, 1.0)
    target = ipams[0]
    assert target.alloc.ring is None
    conn = net.peers[0].router.connections[ipams[1].me]
    forged = RingUpdate(
        target.universe.lo,
        target.universe.hi,
        sender=ipams[1].me,
        votes={n: Vote(n, (99, 0x0A), (99, 0x0A), ()) for n in (0x0A, 0x0B, 0x0C)},
    )
    net.peers[0].router.handle_message(conn, {"t": GOSSIP, "ch": "ipam", "d": forged.encode()})
    assert target.alloc.ring is None
    assert refused(target, "consensus") == 1
    assert target.refusals[-1] == (
        "IPAM: cannot make the ring the consensus chose (0 peers): a seed needs at least one peer"
    )


def test_a_consensus_of_more_peers_than_the_range_has_addresses_makes_no_ring_and_says_why() -> None:
    net = chain_of_strangers(5, discovery=True)
    ipams = add_ipam(net, "10.32.0.0/30", "consensus=5")
    assert run(net, lambda: all(refused(i, "consensus") for i in ipams), 30.0)
    settle(net, 5.0)
    assert all(i.alloc.ring is None for i in ipams)
    assert "a range of 4 addresses cannot be shared among 5 peers" in ipams[0].refusals[-1]


def test_an_update_that_would_grow_the_ring_past_what_peers_decode_is_refused() -> None:
    """A peer sends as many new tokens as one message may carry, inside another peer's range (no allocation of
    ours is touched): merged, our ring could no longer be sent whole to anyone. It is refused and counted, the ring
    keeps its size, and its full state still decodes."""
    net, ipams = mesh(3, "10.32.0.0/12")
    target, sender = ipams[0], ipams[1]
    ring = target.alloc.ring
    assert ring is not None
    lo, hi = ring.owned_by(ipams[2].me)[0]
    before = dict(ring.entries)
    flood = RingUpdate(
        ring.start,
        ring.end,
        ring.seed,
        {lo + 1 + i: Entry(1, sender.me, 0) for i in range(MAX_TOKENS - len(ring.entries) + 1)},
        sender=sender.me,
    )
    assert hi - lo > len(flood.entries)
    conn = net.peers[0].router.connections[sender.me]
    net.peers[0].router.handle_message(conn, {"t": GOSSIP, "ch": "ipam", "d": flood.encode()})
    assert refused(target, "size") == 1
    assert target.alloc.ring is not None and target.alloc.ring.entries == before
    assert RingUpdate.decode(RingUpdate.of(target.alloc.ring, target.me).encode()).entries == before


def test_votes_naming_more_peers_than_any_mesh_has_are_a_decode_error() -> None:
    """Thousands of votes each naming thousands of peers (megabytes, a second of decoding each) are refused as
    malformed before they are built into votes."""
    net = chain_of_strangers(2, discovery=True)
    ipams = add_ipam(net, RANGE, "consensus=5")
    assert run(net, lambda: net.converged() and full_mesh(net), 10.0)
    target = ipams[0]
    conn = net.peers[0].router.connections[ipams[1].me]
    names = list(range(1, 4097))
    votes = [[n, [1, n], [0, 0], names] for n in range(1, 18)]  # 17 x 4,096 names: past 65,536
    payload = pack({"r": [target.universe.lo, target.universe.hi], "f": ipams[1].me, "v": votes})
    net.peers[0].router.handle_message(conn, {"t": GOSSIP, "ch": "ipam", "d": payload})
    assert counter(target, "weft_decode_errors_total", kind="ipam") == 1
    assert set(target.consensus.votes) <= {i.me for i in ipams}  # type: ignore[union-attr]

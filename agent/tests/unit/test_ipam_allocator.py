"""The allocator (weft.ipam.allocator) over the space: a few peers allocating, claiming, freeing and giving each other
space in any order never hand out an address twice, a reserved one, or one outside what was asked; the ring's free
counts follow; and everything survives a restart from the state database."""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from weft.ipam.allocator import Allocator, ClaimRefused
from weft.ipam.persist import IpamStore
from weft.ipam.ring import Ring
from weft.ipam.space import Allocation, Space, Subnet
from weft.store import Store


def subnet(text: str) -> Subnet:
    return Subnet.parse(ipaddress.IPv4Network(text))


def ip(address: int) -> str:
    return str(ipaddress.IPv4Address(address))


UNIVERSE = subnet("10.32.0.0/26")
SUBNETS = [UNIVERSE, subnet("10.32.0.0/28"), subnet("10.32.0.16/28"), subnet("10.32.0.48/28"), subnet("10.32.0.32/30")]
PEERS = (0x020000000001, 0x020000000002, 0x020000000003)
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None  # many small transactions: keep them off the disk
KEYS = ("web1", "web2", "db", "cache", "pid:4242", "host")


class Peer:
    """One peer's allocator, kept in its own state database (as the agent does)."""

    def __init__(self, name: int, state_dir: Path) -> None:
        self.name = name
        self.state_dir = state_dir
        self.store = Store(state_dir)
        self.ipam_store = IpamStore(self.store)
        self.ipam_store.reset(UNIVERSE.lo, UNIVERSE.hi)
        self.alloc = Allocator(name, UNIVERSE, self.ipam_store)

    def reopen(self) -> None:
        """What a restart does: a new allocator from what the database kept (weft.ipam.service.Ipam.start)."""
        self.store.close()
        self.store = Store(self.state_dir)
        self.ipam_store = IpamStore(self.store)
        saved = self.ipam_store.load()
        self.alloc = Allocator(self.name, UNIVERSE, self.ipam_store)
        self.alloc.ring = saved.ring
        for address, allocation in saved.allocations.items():
            self.alloc.space.add(address, allocation)


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="weft-ipam-", dir=SCRATCH))
        self.peers = [Peer(name, self.tmp / str(i)) for i, name in enumerate(PEERS)]
        seeded = Ring.seeded(UNIVERSE.lo, UNIVERSE.hi, PEERS)
        counted = {peer.name: peer.alloc.adopt(seeded) for peer in self.peers}  # their own free counts, re-counted
        for peer in self.peers:
            self.gossip(peer, counted[peer.name])
        # What each allocate() gave: (peer, key, subnet) -> address; the subnet it was asked in.
        self.given: dict[tuple[int, str, Subnet], int] = {}

    def teardown(self) -> None:
        for peer in self.peers:
            peer.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------------------------------

    def gossip(self, source: Peer, changed: dict) -> None:
        """Deliver a change to every other peer as weft.ipam.service does with what arrives: check, merge, recount."""
        if not changed:
            return
        assert source.alloc.ring is not None
        for peer in self.peers:
            if peer is source:
                continue
            ring = peer.alloc.ring
            assert ring is not None
            update = source.alloc.ring.subset(changed)
            assert peer.alloc.conflicts(update) == []
            merged = peer.alloc.merge(update)
            peer.alloc.recount({t for token in merged for t in (token, ring.token_at(token - 1))})

    def free_addresses(self, peer: Peer, within: Subnet) -> list[int]:
        """By brute force: the addresses of ``within`` that ``peer`` owns, that nobody holds and nobody may get."""
        ring = peer.alloc.ring
        assert ring is not None
        reserved = set(UNIVERSE.reserved()) | set(within.reserved())
        return [
            a
            for a in range(within.lo, within.hi)
            if ring.owner_of(a) == peer.name and a not in reserved and a not in peer.alloc.space.allocations
        ]

    # -- rules ---------------------------------------------------------------------------------------------------------

    @rule(p=st.integers(0, 2), key=st.sampled_from(KEYS), s=st.sampled_from(SUBNETS))
    def allocate(self, p: int, key: str, s: Subnet) -> None:
        peer = self.peers[p]
        before = peer.alloc.held(key, s)
        candidates = self.free_addresses(peer, s)
        got = peer.alloc.allocate(key, s, f"label-{key}")
        if before:  # idempotent: the holder's address in that subnet, again, and nothing changes
            assert got == (before[0], {})
            return
        if got is None:
            assert candidates == [], f"allocate found nothing in {s} though {[ip(a) for a in candidates]} are free"
            return
        address, changed = got
        assert address == min(candidates)  # the lowest free address of ours
        self.given[(p, key, s)] = address
        assert peer.alloc.space.allocations[address] == Allocation(key, s.prefixlen, f"label-{key}")
        self.gossip(peer, changed)

    @rule(
        p=st.integers(0, 2), key=st.sampled_from(KEYS), offset=st.integers(0, 63), prefixlen=st.sampled_from([26, 28])
    )
    def claim(self, p: int, key: str, offset: int, prefixlen: int) -> None:
        peer = self.peers[p]
        address = UNIVERSE.lo + offset
        holder = peer.alloc.space.allocations.get(address)
        owned = peer.alloc.ring is not None and peer.alloc.ring.owner_of(address) == peer.name
        try:
            changed = peer.alloc.claim(key, address, prefixlen, f"label-{key}")
        except ClaimRefused as exc:
            if holder is not None:
                assert holder.key != key
                assert str(exc) == f"{ip(address)} is already held by label-{holder.key} on this host"
            else:
                assert address in UNIVERSE.reserved()
                assert "network or broadcast address of the range 10.32.0.0/26" in str(exc)
            return
        assert address not in UNIVERSE.reserved()
        if holder is not None:
            assert holder.key == key and changed == {}
        elif not owned:
            assert changed is None  # not ours to give: the service asks the owner
            assert address not in peer.alloc.space.allocations
        else:
            assert changed is not None
            assert peer.alloc.space.allocations[address].key == key
            self.gossip(peer, changed)

    @rule(p=st.integers(0, 2), key=st.sampled_from(KEYS), everything=st.booleans())
    def free(self, p: int, key: str, everything: bool) -> None:
        peer = self.peers[p]
        held = peer.alloc.held(key)
        some = None if everything or not held else held[:1]
        gone, changed = peer.alloc.free(key, some)
        assert sorted(gone) == sorted(held if some is None else some)
        assert all(a not in peer.alloc.space.allocations for a in gone)
        assert peer.alloc.held(key) == ([] if some is None else held[1:])
        self.given = {k: a for k, a in self.given.items() if not (k[0] == p and a in gone)}
        self.gossip(peer, changed)

    @rule(donor=st.integers(0, 2), to=st.integers(0, 2), s=st.sampled_from(SUBNETS))
    def transfer(self, donor: int, to: int, s: Subnet) -> None:
        """A space request: the donor gives the top half of its largest free run in the subnet."""
        if donor == to:
            return
        giver, taker = self.peers[donor], self.peers[to]
        ranges = giver.alloc.our_ranges()
        given = giver.alloc.space.donation(ranges, s)
        free_before = self.free_addresses(giver, s)
        if given is None:
            assert free_before == []
            return
        lo, hi = given
        assert all(a in free_before for a in range(lo, hi))  # nothing held, nothing reserved
        owned_before = taker.alloc.owned()
        changed = giver.alloc.grant(lo, hi, taker.name)
        self.gossip(giver, changed)
        assert taker.alloc.owned() == owned_before + hi - lo
        assert all(taker.alloc.ring.owner_of(a) == taker.name for a in range(lo, hi))  # type: ignore[union-attr]

    @rule(p=st.integers(0, 2))
    def restart(self, p: int) -> None:
        peer = self.peers[p]
        ring, allocations = peer.alloc.ring, dict(peer.alloc.space.allocations)
        assert ring is not None
        peer.reopen()
        assert peer.alloc.ring is not None
        assert peer.alloc.ring.entries == ring.entries
        assert peer.alloc.ring.seed == ring.seed == PEERS
        assert peer.alloc.space.allocations == allocations
        assert peer.alloc.recount() == {}  # the counts it kept are the counts of what it kept

    # -- invariants ----------------------------------------------------------------------------------------------------

    @invariant()
    def every_ring_is_the_same(self) -> None:
        rings = [peer.alloc.ring.entries for peer in self.peers]  # type: ignore[union-attr]
        assert all(r == rings[0] for r in rings)

    @invariant()
    def addresses_are_owned_unreserved_and_unique(self) -> None:
        everywhere: dict[int, int] = {}
        for i, peer in enumerate(self.peers):
            for address in peer.alloc.space.allocations:
                assert address not in everywhere, f"{ip(address)} is allocated on peers {everywhere[address]} and {i}"
                everywhere[address] = i
                assert peer.alloc.ring.owner_of(address) == peer.name  # type: ignore[union-attr]
                assert address not in UNIVERSE.reserved()

    @invariant()
    def allocations_lie_in_the_subnet_asked(self) -> None:
        for (p, key, s), address in self.given.items():
            allocation = self.peers[p].alloc.space.allocations.get(address)
            assert allocation is not None and allocation.key == key
            assert s.contains(address)
            assert address not in s.reserved()
            assert allocation.prefixlen == s.prefixlen

    @invariant()
    def free_counts_in_the_ring_are_those_of_the_space(self) -> None:
        for peer in self.peers:
            ring = peer.alloc.ring
            assert ring is not None
            for lo, hi, token, entry in ring.ranges():
                if entry.owner == peer.name:
                    assert entry.free == peer.alloc.space.free_count(lo, hi), f"token {ip(token)}"

    @invariant()
    def the_peers_own_the_range_between_them(self) -> None:
        assert sum(peer.alloc.owned() for peer in self.peers) == UNIVERSE.hi - UNIVERSE.lo


AllocatorMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_allocator_state_machine = AllocatorMachine.TestCase


# -- examples ----------------------------------------------------------------------------------------------------------


def test_a_subnet_runs_out_with_its_usable_addresses_given_once_each() -> None:
    alloc = Allocator(PEERS[0], UNIVERSE, None)
    alloc.adopt(Ring.seeded(UNIVERSE.lo, UNIVERSE.hi, PEERS[:1]))
    s = subnet("10.32.0.16/28")
    got = [alloc.allocate(f"c{i}", s, "")[0] for i in range(14)]  # type: ignore[index]
    assert [ip(a) for a in got] == [f"10.32.0.{i}" for i in range(17, 31)]
    assert alloc.allocate("one-more", s, "") is None
    # The whole range still has room; the /28 does not.
    assert alloc.allocate("one-more", UNIVERSE, "")[0] == UNIVERSE.lo + 1  # type: ignore[index]


def test_free_counts_leave_out_the_range_network_and_broadcast() -> None:
    space = Space(UNIVERSE)
    assert space.free_count(UNIVERSE.lo, UNIVERSE.hi) == 62
    assert space.free_count(UNIVERSE.lo + 1, UNIVERSE.hi - 1) == 62
    space.add(UNIVERSE.lo + 5, Allocation("k", 26))
    assert space.free_count(UNIVERSE.lo, UNIVERSE.lo + 8) == 6


def test_a_restarted_allocator_has_the_same_ring_and_allocations(tmp_path: Path) -> None:
    peer = Peer(PEERS[0], tmp_path / "state")
    peer.alloc.adopt(Ring.seeded(UNIVERSE.lo, UNIVERSE.hi, PEERS))
    a, _ = peer.alloc.allocate("web1", UNIVERSE, "web1")  # type: ignore[misc]
    b, _ = peer.alloc.allocate("db", subnet("10.32.0.16/28"), "db")  # type: ignore[misc]
    peer.alloc.claim("host", UNIVERSE.lo + 10, 26, "host")
    peer.alloc.free("web1")
    peer.alloc.attached("db", "vethwe-db")
    peer.alloc.grant(UNIVERSE.lo + 12, UNIVERSE.lo + 16, PEERS[1])
    ring = peer.alloc.ring.copy()  # type: ignore[union-attr]
    allocations = dict(peer.alloc.space.allocations)

    peer.reopen()

    assert peer.alloc.ring is not None
    assert peer.alloc.ring.entries == ring.entries
    assert peer.alloc.ring.seed == PEERS
    assert peer.alloc.space.allocations == allocations
    assert sorted(allocations) == [UNIVERSE.lo + 10, b]
    assert allocations[b] == Allocation("db", 28, "db", "vethwe-db")
    assert a not in allocations
    # The reopened allocator goes on where it left off: web1's old address is the lowest free one again.
    assert peer.alloc.allocate("web3", UNIVERSE, "web3")[0] == a  # type: ignore[index]
    peer.store.close()


def test_the_database_keeps_what_was_done_before_a_crash(tmp_path: Path) -> None:
    """Every operation is its own committed transaction: another connection sees it at once, no close needed."""
    peer = Peer(PEERS[0], tmp_path / "state")
    peer.alloc.adopt(Ring.seeded(UNIVERSE.lo, UNIVERSE.hi, PEERS))
    address, _ = peer.alloc.allocate("web1", UNIVERSE, "web1")  # type: ignore[misc]
    other = Store(tmp_path / "state")  # as if the agent had died here and started again
    saved = IpamStore(other).load()
    assert saved.allocations == {address: Allocation("web1", 26, "web1")}
    assert saved.ring is not None and saved.ring.entries == peer.alloc.ring.entries  # type: ignore[union-attr]
    other.close()
    peer.store.close()


def test_a_claim_of_an_address_another_holder_has_is_refused_with_its_name() -> None:
    alloc = Allocator(PEERS[0], UNIVERSE, None)
    alloc.adopt(Ring.seeded(UNIVERSE.lo, UNIVERSE.hi, PEERS[:1]))
    alloc.claim("pid:1", UNIVERSE.lo + 9, 26, "web1")
    with pytest.raises(ClaimRefused, match=r"^10\.32\.0\.9 is already held by web1 on this host$"):
        alloc.claim("pid:2", UNIVERSE.lo + 9, 26, "web2")
    with pytest.raises(ClaimRefused, match=r"^10\.32\.0\.63 is the network or broadcast address of the range"):
        alloc.claim("pid:2", UNIVERSE.hi - 1, 26, "web2")
    assert alloc.claim("pid:1", UNIVERSE.lo + 9, 26, "web1") == {}

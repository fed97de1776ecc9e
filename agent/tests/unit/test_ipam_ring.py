"""The ring CRDT (weft.ipam.ring): merge is a join, seeded rings agree, and replicas of owners that grant, report free
counts and reclaim in any message order never disagree on who owns an address."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.ipam.ring import RECLAIM_VERSION_STEP, Entry, Ring

START, END = 1000, 1064  # a small ring, so random tokens collide and ties happen
PEERS = (11, 22, 33, 44, 55)


def entries_strategy(owners: tuple[int, ...] = (1, 2, 3)) -> st.SearchStrategy[dict[int, Entry]]:
    entry = st.builds(Entry, st.integers(1, 4), st.sampled_from(owners), st.integers(0, 8))
    return st.dictionaries(st.integers(START, END - 1), entry, max_size=12)


def ring_of(entries: dict[int, Entry]) -> Ring:
    ring = Ring(START, END)
    for token, entry in entries.items():
        ring.put(token, entry)
    return ring


def merged(*rings: Ring) -> Ring:
    out = rings[0].copy()
    for ring in rings[1:]:
        out.merge(ring)
    return out


def owners_by_address(ring: Ring) -> dict[int, int | None]:
    return {a: ring.owner_of(a) for a in range(ring.start, ring.end)}


# -- merge is a join ---------------------------------------------------------------------------------------------------


@given(entries_strategy(), entries_strategy())
def test_merge_is_commutative(a: dict[int, Entry], b: dict[int, Entry]) -> None:
    ab, ba = merged(ring_of(a), ring_of(b)), merged(ring_of(b), ring_of(a))
    assert ab.entries == ba.entries
    assert ab.tokens() == ba.tokens() == sorted(ab.entries)


@given(entries_strategy(), entries_strategy(), entries_strategy())
def test_merge_is_associative(a: dict[int, Entry], b: dict[int, Entry], c: dict[int, Entry]) -> None:
    left = merged(merged(ring_of(a), ring_of(b)), ring_of(c))
    right = merged(ring_of(a), merged(ring_of(b), ring_of(c)))
    assert left.entries == right.entries
    assert left.tokens() == right.tokens()


@given(entries_strategy(), entries_strategy())
def test_merge_is_idempotent_and_reports_only_what_changed(a: dict[int, Entry], b: dict[int, Entry]) -> None:
    ring = ring_of(a)
    first = ring.merge(ring_of(b))
    after_once = dict(ring.entries)
    assert ring.merge(ring_of(b)) == {}  # the same update twice changes nothing the second time
    assert ring.entries == after_once
    assert ring.merge(ring) == {}
    # What merge says changed is exactly what differs from before.
    assert first == {t: e for t, e in after_once.items() if a.get(t) != e}


@given(entries_strategy(), entries_strategy())
def test_merge_keeps_the_winner_of_every_token(a: dict[int, Entry], b: dict[int, Entry]) -> None:
    ring = merged(ring_of(a), ring_of(b))
    for token in set(a) | set(b):
        assert ring.entries[token] == max(e for e in (a.get(token), b.get(token)) if e is not None)


@given(entries_strategy(), entries_strategy())
def test_merged_with_leaves_the_ring_alone(a: dict[int, Entry], b: dict[int, Entry]) -> None:
    ring = ring_of(a)
    result, changed = ring.merged_with(ring_of(b))
    assert ring.entries == a
    assert result.entries == merged(ring_of(a), ring_of(b)).entries
    assert changed == {t: e for t, e in result.entries.items() if a.get(t) != e}


# -- seeded rings ------------------------------------------------------------------------------------------------------


@given(st.lists(st.integers(1, 2**48 - 1), min_size=1, max_size=40, unique=True), st.randoms(use_true_random=False))
def test_seeded_is_the_same_ring_for_the_same_peers_in_any_order(peers: list[int], rnd: random.Random) -> None:
    shuffled = list(peers)
    rnd.shuffle(shuffled)
    one = Ring.seeded(START, END, peers)
    two = Ring.seeded(START, END, shuffled + shuffled[:3])  # repeats do not count
    assert one.entries == two.entries
    assert one.seed == two.seed == tuple(sorted(peers))


@given(st.lists(st.integers(1, 2**48 - 1), min_size=1, max_size=64, unique=True))
def test_seeded_covers_the_range_exactly_once_in_near_equal_parts(peers: list[int]) -> None:
    ring = Ring.seeded(START, END, peers)
    assert ring.tokens()[0] == START
    owners = owners_by_address(ring)
    assert None not in owners.values()
    sizes = [sum(hi - lo for lo, hi in ring.owned_by(p)) for p in peers]
    assert sum(sizes) == END - START
    assert max(sizes) - min(sizes) <= 1
    # Each peer gets one consecutive part, in name order, and its free count is the part's size.
    assert [ring.entries[t].owner for t in ring.tokens()] == sorted(peers)
    for lo, hi, _token, entry in ring.ranges():
        assert entry.free == hi - lo
        assert entry.version == 1


def test_seeded_refuses_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="at least one peer"):
        Ring.seeded(START, END, [])
    with pytest.raises(ValueError, match="cannot be shared among 65 peers"):
        Ring.seeded(START, END, range(1, 66))
    with pytest.raises(ValueError, match="non-empty range"):
        Ring(5, 5)


# -- grant and take_over -----------------------------------------------------------------------------------------------


def test_grant_of_the_middle_of_a_range_splits_it_in_three() -> None:
    ring = Ring.seeded(0, 64, [1, 2])  # 1: [0, 32), 2: [32, 64)
    changed = ring.grant(8, 16, to=2, by=1, free=lambda lo, hi: hi - lo)
    assert ring.owned_by(1) == [(0, 8), (16, 32)]
    assert ring.owned_by(2) == [(8, 16), (32, 64)]
    assert set(changed) == {0, 8, 16}
    assert changed[8] == Entry(1, 2, 8)
    assert changed[0].version == 2 and changed[0].free == 8
    # What it sent is all another replica needs to agree.
    other = Ring.seeded(0, 64, [1, 2])
    other.merge(ring.subset(changed))
    assert other.entries == ring.entries


def test_grant_refuses_a_range_the_granter_does_not_own() -> None:
    ring = Ring.seeded(0, 64, [1, 2])
    free = lambda lo, hi: hi - lo  # noqa: E731
    with pytest.raises(ValueError):
        ring.grant(40, 48, to=1, by=1, free=free)  # 2's
    with pytest.raises(ValueError):
        ring.grant(24, 40, to=2, by=1, free=free)  # crosses into 2's
    with pytest.raises(ValueError):
        ring.grant(8, 8, to=2, by=1, free=free)  # empty
    assert ring.entries == Ring.seeded(0, 64, [1, 2]).entries


def test_grant_of_the_top_of_a_range_tells_the_grantee_where_it_ends() -> None:
    """The grantee learns its new range from the grant alone (the reply to its space request). When the part given
    ends where the granter's range ends, at a token the grantee may not have heard of yet (say, a grant the granter
    made a moment earlier), the grantee must not take the addresses past it for its own."""
    ring = Ring.seeded(0, 64, [1, 2, 3])  # 1: [0, 21), 2: [21, 42), 3: [42, 64)
    stale = ring.copy()  # 3's view: it missed what follows
    free = lambda lo, hi: hi - lo  # noqa: E731
    ring.grant(10, 21, to=2, by=1, free=free)  # 1 gives [10, 21) to 2 ...
    second = ring.grant(5, 10, to=3, by=1, free=free)  # ... and then [5, 10) to 3, up to that new boundary
    stale.merge(ring.subset(second))  # 3 hears of the second grant first
    assert stale.owned_by(3) == [(5, 10), (42, 64)]
    assert stale.owner_of(10) != 3


def test_a_grant_next_to_an_earlier_one_the_grantee_never_heard_of_says_where_that_one_ends() -> None:
    """A donor answers a request twice (the first answer timed out, the requester asked again): the first grant's
    answer is lost, the second's range ends where the first's begins. The grantee, told only of the second, must not
    take the donor's addresses above the first for its own."""
    a, b, c, d = 1, 2, 3, 4
    donor = Ring.seeded(0, 1 << 16, (a, b, c))
    grantee = donor.copy()  # the seeded ring, as the observer d joined it
    lo, hi = donor.owned_by(b)[0]
    donor.grant(lo + 128, lo + 255, d, b, lambda x, y: y - x)  # its answer never reaches d
    second = donor.grant(lo + 65, lo + 128, d, b, lambda x, y: y - x)
    grantee.merge(donor.subset(second))
    for address in (lo + 70, lo + 200, lo + 255, lo + 300, hi - 1):
        assert grantee.owner_of(address) in (donor.owner_of(address), None), address
    assert grantee.owner_of(lo + 300) == b


def test_take_over_gives_every_range_of_the_dead_peer_to_the_reclaimer() -> None:
    ring = Ring.seeded(0, 64, [1, 2, 3])
    ring.grant(30, 42, to=1, by=2, free=lambda lo, hi: hi - lo)  # 2 keeps [21, 30) ...
    ring.grant(10, 21, to=2, by=1, free=lambda lo, hi: hi - lo)  # ... and gets [10, 21): two tokens
    before = ring.owned_by(2)
    changed = ring.take_over(2, by=3)
    assert ring.owned_by(2) == []
    assert set(changed) == {t for t, e in ring.entries.items() if e.owner == 3 and t < 42}
    assert [r for r in ring.owned_by(3) if r[0] < 42] == before
    assert all(e.version > RECLAIM_VERSION_STEP for t, e in changed.items())


def test_two_concurrent_reclaims_of_one_peer_end_with_one_owner_everywhere() -> None:
    base = Ring.seeded(0, 64, [1, 2, 3, 4])
    base.grant(5, 10, to=3, by=1, free=lambda lo, hi: hi - lo)
    replicas = {p: base.copy() for p in (1, 2, 3, 4)}
    # 1 dies; 2 and 3 reclaim it at the same time, each unaware of the other.
    by2 = replicas[2].subset(replicas[2].take_over(1, by=2))
    by3 = replicas[3].subset(replicas[3].take_over(1, by=3))
    assert replicas[2].owned_by(2) == [(0, 5), (10, 32)]
    assert replicas[3].owned_by(3) == [(0, 16), (32, 48)]  # they disagree until they hear of each other
    for p, ring in replicas.items():
        for delta in [by2, by3] if p % 2 else [by3, by2]:
            ring.merge(delta)
    entries = [r.entries for r in replicas.values()]
    assert all(e == entries[0] for e in entries)
    ring = replicas[4]
    assert ring.owned_by(1) == []
    assert ring.owned_by(3) == [(0, 16), (32, 48)]  # the higher name wins the tie: all of 1's old range
    assert ring.owned_by(2) == [(16, 32)]


def test_a_reclaim_beats_the_dead_peers_last_changes_in_flight() -> None:
    ring = Ring.seeded(0, 64, [1, 2])
    dead_view = ring.copy()
    for i in range(RECLAIM_VERSION_STEP - 1):  # the dead peer's last busy moments, unheard of
        dead_view.set_free(0, i % 2)
    assert dead_view.entries[0].version == RECLAIM_VERSION_STEP
    reclaim = ring.take_over(1, by=2)
    dead_view.merge(ring.subset(reclaim))
    ring.merge(dead_view)
    assert ring.owned_by(2) == dead_view.owned_by(2) == [(0, 64)]


# -- replicas under any order of messages ------------------------------------------------------------------------------


def mask(lo: int, hi: int) -> int:
    """Addresses ``[lo, hi)`` as bits of an int (bit 0: START)."""
    return ((1 << (hi - lo)) - 1) << (lo - START)


@dataclass
class Message:
    id: int
    source: int
    dest: int
    ring: Ring
    after: frozenset[int]  # what the source had seen when it sent this
    reply: bool = False  # the answer to a space request: a unicast, on a path of its own


@dataclass
class Mesh:
    """One ring replica per peer. Every change is a delta broadcast to every other replica (a grant is also sent to
    the grantee as the reply to its request, which travels by another path); anti-entropy sends a whole ring.

    Messages arrive in any order but two: one peer's broadcasts reach another in the order it sent them (they follow
    one tree), and what a peer passes on does not reach a third peer before what it passed on reached it from the
    source (``after``). Replies to space requests are bound by neither: they overtake any broadcast, but not an earlier
    reply of the same peer to the same peer (they all follow one unicast route).
    """

    peers: tuple[int, ...]
    replicas: dict[int, Ring] = field(default_factory=dict)
    inbox: list[Message] = field(default_factory=list)
    seen: dict[int, set[int]] = field(default_factory=dict)  # per peer: the ids of the messages it has merged or sent
    dead: set[int] = field(default_factory=set)
    attributed: dict[int, int] = field(default_factory=dict)  # per peer: every address any replica ever gave it
    sent: list[Ring] = field(default_factory=list)

    def __post_init__(self) -> None:
        seeded = Ring.seeded(START, END, self.peers)
        self.replicas = {p: seeded.copy() for p in self.peers}
        self.seen = {p: set() for p in self.peers}
        self.sent = [seeded.copy()]
        self.attributed = dict.fromkeys(self.peers, 0)
        self.note_owners()

    def own_view(self, peer: int) -> int:
        bits = 0
        for lo, hi in self.replicas[peer].owned_by(peer):
            bits |= mask(lo, hi)
        return bits

    def note_owners(self) -> None:
        for ring in self.replicas.values():
            for lo, hi, _token, entry in ring.ranges():
                self.attributed[entry.owner] |= mask(lo, hi)

    def _post(self, source: int, dest: int, ring: Ring, reply: bool = False) -> None:
        message = Message(len(self.sent) - 1, source, dest, ring, frozenset(self.seen[source]), reply)
        self.inbox.append(message)

    def send(self, peer: int, changed: dict, grantee: int | None = None) -> None:
        if not changed:
            return
        delta = self.replicas[peer].subset(changed)
        self.sent.append(delta)
        for other in self.peers:
            if other != peer:
                self._post(peer, other, delta)
        if grantee is not None:
            self._post(peer, grantee, delta, reply=True)
        self.seen[peer].add(len(self.sent) - 1)

    def sync(self, source: int, dest: int) -> None:
        """Anti-entropy: the whole ring of ``source``, sent to ``dest``."""
        self.sent.append(self.replicas[source].copy())
        self._post(source, dest, self.sent[-1])
        self.seen[source].add(len(self.sent) - 1)

    def deliverable(self) -> list[Message]:
        pending: dict[int, set[int]] = {}
        for m in self.inbox:
            pending.setdefault(m.dest, set()).add(m.id)
        replies = {(m.source, m.dest): m.id for m in reversed(self.inbox) if m.reply}  # the first of each path
        out = []
        for m in self.inbox:
            if (
                replies.get((m.source, m.dest)) == m.id
                if m.reply
                else not (m.after - self.seen[m.dest]) & pending[m.dest]
            ):
                out.append(m)
        return out

    def deliver(self, message: Message) -> None:
        self.inbox.remove(message)
        self.replicas[message.dest].merge(message.ring)
        self.seen[message.dest].add(message.id)

    def live(self) -> list[int]:
        return [p for p in self.peers if p not in self.dead]

    def check_one_owner_per_address(self) -> None:
        """Every replica gives every address one owner, and no two live peers each think an address is theirs
        (addresses any replica gave a dead peer are out of this: two reclaims of one peer race, and a reclaim races
        what the dead peer did last, by design; the higher version, then the higher name, wins)."""
        for ring in self.replicas.values():
            assert ring.tokens()[0] == START  # ranges run from each token to the next: one owner for every address
        tainted = 0
        for d in self.dead:
            tainted |= self.attributed[d]
        claimed = 0
        for p in self.live():
            mine = self.own_view(p) & ~tainted
            both = claimed & mine
            if both:
                address = START + (both & -both).bit_length() - 1
                others = [q for q in self.live() if q != p and self.own_view(q) >> (address - START) & 1]
                raise AssertionError(f"{address} is owned by both {others} and {p} in their views")
            claimed |= mine


def pick(data: st.DataObject, items: list, label: str):  # type: ignore[no-untyped-def]
    return items[data.draw(st.integers(0, len(items) - 1), label)]


EXAMPLES = int(os.environ.get("WEFT_RING_EXAMPLES", "200"))  # more for a long search: WEFT_RING_EXAMPLES=20000


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 5), data=st.data())
def test_replicas_never_give_an_address_two_owners_and_converge(n: int, data: st.DataObject) -> None:
    """Peers grant parts of their ranges, report free counts, sync whole rings, and once two reclaim a dead peer at
    the same time; after every step no two live peers both think an address is theirs, and once every message has
    arrived every replica holds the same tokens (the join of all that was sent)."""
    mesh = Mesh(PEERS[:n])
    reclaimed = False
    for _step in range(data.draw(st.integers(0, 40), "steps")):
        live = mesh.live()
        op = data.draw(st.sampled_from("dgfsr"), "op")
        if op == "g":  # a live peer gives part of one of its ranges (as it sees them) to another peer
            peer = data.draw(st.sampled_from(live), "granter")
            ring = mesh.replicas[peer]
            ranges = [(lo, hi) for lo, hi, _t, e in ring.ranges() if e.owner == peer]
            if not ranges:
                continue
            lo, hi = data.draw(st.sampled_from(ranges), "range")
            a = data.draw(st.integers(lo, hi - 1), "lo")
            b = data.draw(st.integers(a + 1, hi), "hi")
            to = data.draw(st.sampled_from([p for p in live if p != peer]), "grantee")
            free = data.draw(st.integers(0, b - a), "free")
            mesh.send(peer, ring.grant(a, b, to, peer, lambda lo, hi, free=free: min(free, hi - lo)), grantee=to)
        elif op == "f":  # an owner reports a new free count
            peer = data.draw(st.sampled_from(live), "peer")
            ring = mesh.replicas[peer]
            mine = sorted(t for t, e in ring.entries.items() if e.owner == peer)
            if mine:
                token = data.draw(st.sampled_from(mine), "token")
                entry = ring.set_free(token, data.draw(st.integers(0, ring.token_end(token) - token), "free"))
                mesh.send(peer, {token: entry} if entry else {})
        elif op == "d" and mesh.inbox:  # a message arrives
            mesh.deliver(pick(data, mesh.deliverable(), "message"))
        elif op == "s":  # anti-entropy
            a, b = data.draw(st.permutations(mesh.peers), "sync")[:2]
            mesh.sync(a, b)
        elif op == "r" and not reclaimed and len(live) >= 3:  # one peer dies, two others reclaim it at once
            reclaimed = True
            dead, r1, r2 = data.draw(st.permutations(live), "dead, reclaimers")[:3]
            mesh.dead.add(dead)
            mesh.send(r1, mesh.replicas[r1].take_over(dead, r1))
            mesh.send(r2, mesh.replicas[r2].take_over(dead, r2))
        mesh.note_owners()
        mesh.check_one_owner_per_address()

    while mesh.inbox:  # what is still in flight arrives
        mesh.deliver(pick(data, mesh.deliverable(), "message"))
        mesh.note_owners()
        mesh.check_one_owner_per_address()

    # Every update merged everywhere: every replica holds the join of all that was ever sent.
    expected = merged(*mesh.sent)
    for ring in mesh.replicas.values():
        assert ring.entries == expected.entries
        assert ring.tokens() == expected.tokens()

"""The topology CRDT: newest-wins merges, deltas, restart detection, garbage collection and its wire codec."""

from __future__ import annotations

import collections
import random

import pytest

from weft.mesh import topology as topology_module
from weft.mesh.codec import DecodeError, pack, unpack
from weft.mesh.peer import PeerInfo
from weft.mesh.topology import ConnectionSummary, PeerEntry, Topology, TopologyUpdate

ME = PeerInfo(0x020000000001, "me", 1000)


def conn(peer: int, established: bool = True) -> ConnectionSummary:
    return ConnectionSummary(peer, f"10.0.0.{peer & 0xFF}:6783", True, established)


def entry(name: int, version: int, uid: int = 7, peers: tuple[int, ...] = ()) -> PeerEntry:
    return PeerEntry(name, f"peer{name & 0xFF}", uid, version, tuple(conn(p) for p in peers))


def update(*entries: PeerEntry) -> TopologyUpdate:
    result = TopologyUpdate()
    for e in entries:
        result.merge(TopologyUpdate({e.name: e}))
    return result


A, B, C, D = (0x020000000000 + i for i in range(2, 6))


# -- merging -----------------------------------------------------------------------------------------


def test_newer_version_wins_whatever_the_order() -> None:
    old, new = entry(A, 3, peers=(B,)), entry(A, 4, peers=(C,))
    for first, second in ((old, new), (new, old)):
        topology = Topology(ME)
        topology.merge(update(first))
        topology.merge(update(second))
        assert topology.peers[A] == new


def test_equal_versions_are_decided_by_uid() -> None:
    low, high = entry(A, 5, uid=10, peers=(B,)), entry(A, 5, uid=11, peers=(C,))
    for first, second in ((low, high), (high, low)):
        topology = Topology(ME)
        topology.merge(update(first))
        topology.merge(update(second))
        assert topology.peers[A] == high
        merged = update(first)
        merged.merge(update(second))
        assert merged.entries[A] == high


def test_delta_holds_only_what_was_new() -> None:
    topology = Topology(ME)
    delta, _ = topology.merge(update(entry(A, 1), entry(B, 1)))
    assert set(delta.entries) == {A, B}

    delta, _ = topology.merge(update(entry(A, 1), entry(B, 2, peers=(A,)), entry(C, 1), entry(D, 0)))
    assert delta.entries == {B: entry(B, 2, peers=(A,)), C: entry(C, 1), D: entry(D, 0)}

    # Hearing the same (or older) news again produces nothing to pass on.
    delta, _ = topology.merge(update(entry(A, 1), entry(B, 1), entry(C, 1)))
    assert delta.entries == {}


def test_our_own_entry_is_never_taken_from_gossip_nor_passed_on() -> None:
    topology = Topology(ME)
    topology.set_local_connections([conn(A)])
    ours = topology.our_entry
    stale = PeerEntry(ME.name, "impostor", ME.uid, ours.version + 5, ())
    delta, reannounce = topology.merge(update(stale))
    assert delta.entries == {}
    assert not reannounce
    assert delta.entries == {}
    assert topology.our_entry == ours


def _random_entries(rng: random.Random, names: list[int], count: int) -> list[PeerEntry]:
    return [
        entry(
            rng.choice(names),
            rng.randrange(1, 6),
            uid=rng.randrange(1, 4),
            peers=tuple(rng.sample(names, rng.randrange(0, 3))),
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize("seed", range(6))
def test_merge_is_commutative_and_idempotent(seed: int) -> None:
    rng = random.Random(seed)
    names = [0x020000000000 + i for i in range(2, 10)]
    entries = _random_entries(rng, names, 40)
    # The expected outcome, per the rule: for each peer the entry with the greatest (version, uid).
    expected: dict[int, PeerEntry] = {}
    for e in entries:
        if e.name not in expected or (e.version, e.uid) > (expected[e.name].version, expected[e.name].uid):
            expected[e.name] = e
    # Ties on (version, uid) with different content cannot happen for one live peer; drop them from the pool.
    entries = [e for e in entries if (e.version, e.uid) != (expected[e.name].version, expected[e.name].uid)]
    entries += list(expected.values())

    results = []
    for _ in range(5):
        shuffled = entries[:]
        rng.shuffle(shuffled)
        # Random batching into updates, merged into a topology one by one.
        topology = Topology(ME)
        announced: dict[int, PeerEntry] = {}
        while shuffled:
            cut = rng.randrange(1, 6)
            batch, shuffled = shuffled[:cut], shuffled[cut:]
            delta, _ = topology.merge(update(*batch))
            announced.update(delta.entries)
        del topology.peers[ME.name]
        results.append(topology.peers)
        # What was passed on, merged, ends up in the same state too.
        assert announced == expected
    for peers in results:
        assert peers == expected

    # Merging updates into each other: a.merge(b) == b.merge(a), and merging again changes nothing.
    half = len(entries) // 2
    ab, ba = update(*entries[:half]), update(*entries[half:])
    ab.merge(update(*entries[half:]))
    ba.merge(update(*entries[:half]))
    assert ab.entries == ba.entries == expected
    ab.merge(ba)
    assert ab.entries == expected

    topology = Topology(ME)
    topology.merge(update(*entries))
    delta, _ = topology.merge(update(*entries))
    assert delta.entries == {}


# -- restarts ----------------------------------------------------------------------------------------


def test_gossip_about_ourself_with_another_uid_jumps_our_version_past_it() -> None:
    topology = Topology(ME)
    topology.set_local_connections([conn(A)])
    before = topology.our_entry
    remembered = PeerEntry(ME.name, "me", ME.uid + 1, 40, (conn(B),))  # what a previous run announced

    delta, reannounce = topology.merge(update(remembered))

    assert reannounce
    assert delta.entries == {}
    ours = topology.our_entry
    assert ours.uid == ME.uid
    assert ours.version > remembered.version
    assert ours.connections == before.connections

    # Elsewhere, our re-announced entry replaces the remembered one.
    other = Topology(PeerInfo(A, "a", 5))
    other.merge(update(remembered))
    delta, _ = other.merge(update(ours))
    assert other.peers[ME.name] == ours
    assert delta.entries == {ME.name: ours}


def test_gossip_about_an_older_run_that_we_already_beat_changes_nothing() -> None:
    topology = Topology(ME)
    for _ in range(5):
        topology.set_local_connections([conn(A)])
    ours = topology.our_entry
    delta, reannounce = topology.merge(update(PeerEntry(ME.name, "me", ME.uid + 1, ours.version - 1, ())))
    assert not reannounce
    assert delta.entries == {}
    assert topology.our_entry == ours


# -- garbage collection -----------------------------------------------------------------------------


def collect(topology: Topology) -> set[int]:
    """One garbage collection: forget every peer we cannot reach; the names forgotten."""
    return {e.name for e in topology.forget(topology.unreachable())}


def test_garbage_collection_forgets_peers_unreachable_over_reported_connections() -> None:
    topology = Topology(ME)
    topology.set_local_connections([conn(A)])
    topology.merge(
        update(entry(A, 1, peers=(ME.name, B)), entry(B, 1, peers=(A,)), entry(C, 1, peers=(D,)), entry(D, 1))
    )

    assert topology.unreachable() == {C, D}
    assert collect(topology) == {C, D}
    assert set(topology.peers) == {ME.name, A, B}
    assert collect(topology) == set()

    # A drops its connection to B: B is now out of reach.
    topology.merge(update(entry(A, 2, peers=(ME.name,))))
    assert collect(topology) == {B}
    assert set(topology.peers) == {ME.name, A}

    # We drop A: we are alone, but never forget ourselves.
    topology.set_local_connections([])
    assert collect(topology) == {A}
    assert set(topology.peers) == {ME.name}
    assert topology.forget({ME.name}) == []
    assert set(topology.peers) == {ME.name}


def test_reachability_follows_reported_connections_of_reached_peers_only() -> None:
    # C reports a connection to us, but nobody we reach reports C: C is not reachable.
    topology = Topology(ME)
    topology.set_local_connections([conn(A)])
    topology.merge(update(entry(A, 1, peers=(ME.name,)), entry(C, 1, peers=(ME.name, A))))
    assert topology.unreachable() == {C}


def test_a_forgotten_peer_is_learned_again_from_fresh_gossip() -> None:
    topology = Topology(ME)
    topology.merge(update(entry(A, 3)))
    assert collect(topology) == {A}
    delta, _ = topology.merge(update(entry(A, 3)))
    assert delta.entries == {A: entry(A, 3)}


# -- wire codec ---------------------------------------------------------------------------------------


def test_update_round_trips_through_the_wire() -> None:
    original = update(
        PeerEntry(
            (1 << 48) - 1,
            "höst-ü",
            (1 << 64) - 1,
            (1 << 64) - 1,
            (ConnectionSummary(A, "[fd00::1]:6783", True, False), ConnectionSummary(B, "h:1", False, True)),
        ),
        entry(A, 1, peers=(B,)),
        entry(B, 0),
    )
    decoded = TopologyUpdate.decode(original.encode())
    assert decoded.entries == original.entries
    assert TopologyUpdate.decode(TopologyUpdate().encode()).entries == {}


def _wire(**changes: object) -> list:
    """One valid entry on the wire, with fields replaced."""
    raw = {"name": A, "nick": "a", "uid": 5, "version": 2, "conns": [[B, "h:6783", True, True]]}
    raw.update(changes)
    return [raw["name"], raw["nick"], raw["uid"], raw["version"], raw["conns"]]


MALFORMED = {
    "not a list": {"x": 1},
    "an int": 5,
    "bytes": b"abc",
    "entry not a list": [{"name": A}],
    "entry too short": [_wire()[:4]],
    "entry too long": [[*_wire(), 1]],
    "name is a string": [_wire(name="02:00:00:00:00:02")],
    "name is bool": [_wire(name=True)],
    "name is negative": [_wire(name=-1)],
    "name is 2**48": [_wire(name=1 << 48)],
    "name is 0": [_wire(name=0)],
    "name is a float": [_wire(name=2.0)],
    "nickname is bytes": [_wire(nick=b"a")],
    "nickname is None": [_wire(nick=None)],
    "uid is bool": [_wire(uid=False)],
    "uid is a float": [_wire(uid=1.5)],
    "uid is negative": [_wire(uid=-5)],
    "version is a string": [_wire(version="2")],
    "version is bool": [_wire(version=True)],
    "connections not a list": [_wire(conns={"a": 1})],
    "connection not a list": [_wire(conns=[B])],
    "connection too short": [_wire(conns=[[B, "h:1", True]])],
    "connection too long": [_wire(conns=[[B, "h:1", True, True, 0]])],
    "connection peer is bool": [_wire(conns=[[True, "h:1", True, True]])],
    "connection peer is 2**48": [_wire(conns=[[1 << 48, "h:1", True, True]])],
    "connection peer is a string": [_wire(conns=[["b", "h:1", True, True]])],
    "address is an int": [_wire(conns=[[B, 6783, True, True]])],
    "address too long": [_wire(conns=[[B, "h" * 301, True, True]])],
    "outbound is an int": [_wire(conns=[[B, "h:1", 1, True]])],
    "established is None": [_wire(conns=[[B, "h:1", True, None]])],
    "second entry bad": [_wire(), _wire(name=A + 1, uid="x")],
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_decode_rejects_malformed_updates(raw: object) -> None:
    with pytest.raises(DecodeError) as info:
        TopologyUpdate.decode(pack(raw))
    assert info.value.kind == "topology"


def test_decode_rejects_non_msgpack() -> None:
    for payload in (b"", b"\xc1", b"\x92\x01", pack([_wire()]) + b"\x00"):
        with pytest.raises(DecodeError):
            TopologyUpdate.decode(payload)


def test_decode_rejects_every_truncation_of_a_valid_update() -> None:
    payload = update(entry(A, 3, peers=(B, C)), entry(B, 1, peers=(A,))).encode()
    for cut in range(len(payload)):
        with pytest.raises(DecodeError):
            TopologyUpdate.decode(payload[:cut])


def test_decode_of_random_or_corrupted_bytes_raises_only_decode_error() -> None:
    rng = random.Random(42)
    valid = update(entry(A, 3, peers=(B, C)), entry(B, 1, peers=(A,))).encode()
    decoded = 0
    for i in range(5000):
        if i % 2:
            payload = rng.randbytes(rng.randrange(1, 64))
        else:
            corrupted = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                corrupted[rng.randrange(len(corrupted))] = rng.randrange(256)
            payload = bytes(corrupted)
        try:
            result = TopologyUpdate.decode(payload)
        except DecodeError:
            continue
        decoded += 1
        # Whatever decodes is well-formed: it encodes and decodes to itself.
        assert TopologyUpdate.decode(result.encode()).entries == result.entries
    assert decoded < 5000


# -- full states that are mostly known ----------------------------------------------------------------


def test_a_full_state_skips_what_the_view_knows_and_merges_the_rest_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries the view already has as new are skipped before their connections are read; the merge comes out the
    same as reading them all, and gossip about another run of ourselves still makes us announce past it."""
    monkeypatch.setattr(topology_module, "MEMO_MAX_BYTES", 0)  # a full state: too big to be kept whole
    ours = Topology(ME)
    ours.set_local_connections([conn(A)])
    ours.merge(update(entry(A, 5, peers=(ME.name, B)), entry(B, 3, peers=(A,))))
    payload = update(
        entry(A, 5, peers=(ME.name, B)),  # known: skipped
        entry(B, 4, peers=(A, C)),  # newer: read
        entry(C, 1, peers=(B,)),  # new: read
        PeerEntry(ME.name, "me", ME.uid + 1, 40, ()),  # another run of ours: read
    ).encode()
    seen: list[int] = []

    def known(name: int, uid: int, version: int) -> bool:
        seen.append(name)
        return ours.knows(name, uid, version)

    skipping, reading = TopologyUpdate.decode(payload, known), TopologyUpdate.decode(payload)
    assert set(skipping.entries) == {B, C, ME.name} and sorted(seen) == sorted([A, B, C, ME.name])
    delta, reannounce = ours.merge(skipping)
    assert set(delta.entries) == {B, C} and reannounce
    assert {n: reading.entries[n] for n in skipping.entries} == skipping.entries


def test_a_known_header_does_not_let_a_malformed_entry_through_unread() -> None:
    view = Topology(ME)
    view.merge(update(entry(A, 5)))
    for bad in ([A, "a", True, 5, []], [A, "a", 7, -1, []], [A, "a", 7]):
        with pytest.raises(DecodeError):
            TopologyUpdate.decode(pack([bad]), view.knows)


def _reading_all_then_skipping(payload: bytes, known) -> dict:
    """What decoding a full state means: read it whole, skip the entries ``known`` has, check and keep the rest."""
    raw = unpack(payload, "topology")
    if not isinstance(raw, list):
        raise DecodeError("topology", "not a list")
    entries: dict = {}
    for item in raw:
        if topology_module._known(item, known):
            continue
        e = PeerEntry.from_wire(item)
        if e.name not in entries or e.beats(entries[e.name]):
            entries[e.name] = e
    return entries


def test_a_full_state_read_as_a_stream_takes_and_refuses_exactly_what_reading_it_whole_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full state is read entry by entry, and a known entry's connections are skipped unread. Over malformed
    updates, every truncation and thousands of corruptions of a real one, the outcome (the entries, or a DecodeError)
    is the one reading the whole payload first gives, with one difference: what is well-formed msgpack but cannot be
    made into Python values (text that is not UTF-8, a map keyed by a list) inside a known entry's connections is
    skipped with them (their structure is still checked), where the whole read refused it."""
    monkeypatch.setattr(topology_module, "MEMO_MAX_BYTES", 0)  # every payload is a full state
    view = Topology(ME)
    view.merge(update(entry(A, 5, peers=(ME.name, B)), entry(B, 3, peers=(A,))))
    valid = update(
        entry(A, 5, peers=(ME.name, B)), entry(B, 4, peers=(A, C)), entry(C, 1, peers=(B,)), entry(A, 2)
    ).encode()
    rng = random.Random(7)
    payloads = [pack(raw) for raw in MALFORMED.values()] + [valid[:cut] for cut in range(len(valid) + 1)]
    payloads += [b"", b"\xc1", b"\x92\x01", valid + b"\x00", pack({"a": 1}), pack([[A, "a", 7, 5, [1, 2]], 5])]
    for _ in range(5000):
        corrupted = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            corrupted[rng.randrange(len(corrupted))] = rng.randrange(256)
        payloads.append(bytes(corrupted))
    outcomes = collections.Counter()
    for payload in payloads:
        try:
            expected = _reading_all_then_skipping(payload, view.knows)
        except DecodeError as whole:
            try:
                streamed = TopologyUpdate.decode(payload, view.knows)
            except DecodeError:
                outcomes["refused"] += 1
                continue
            assert "UnicodeDecodeError" in str(whole) or "TypeError" in str(whole), (payload, whole)
            assert A not in streamed.entries
            outcomes["known text skipped"] += 1
            continue
        assert TopologyUpdate.decode(payload, view.knows).entries == expected, payload
        outcomes["taken"] += 1
    assert outcomes["refused"] > 100 and outcomes["taken"] > 100, outcomes
    assert set(TopologyUpdate.decode(valid, view.knows).entries) == {B, C}


def test_a_connection_read_before_is_taken_as_it_was_and_a_look_alike_is_still_checked() -> None:
    """A new version of an entry repeats almost all its connections: those are not checked and built again. But only
    exactly the same values are taken so: 1 for True, or a changed address, is read (and refused) as any other."""
    conns = tuple(ConnectionSummary(0x0200000000A0 + i, f"10.99.0.{i}:6783", i % 2 == 0, True) for i in range(99))
    first = PeerEntry.from_wire(PeerEntry(5, "h5", 7, 9, conns).to_wire())
    newer = PeerEntry(5, "h5", 7, 10, (*conns, ConnectionSummary(0x0200000000FF, "10.99.0.200:6783", True, False)))
    second = PeerEntry.from_wire(newer.to_wire())
    assert second == newer and all(a is b for a, b in zip(first.connections, second.connections[:99], strict=True))
    wire = newer.to_wire()
    wire[4][0] = [wire[4][0][0], wire[4][0][1], 1, 1]  # ints where the seen connection had booleans
    with pytest.raises(DecodeError, match="outbound"):
        PeerEntry.from_wire(wire)
    wire = newer.to_wire()
    wire[4][1] = [wire[4][1][0], "10.99.0.1:6783\x1b[2J", False, True]  # a terminal escape after a seen address
    with pytest.raises(DecodeError, match="control"):
        PeerEntry.from_wire(wire)


def test_made_up_connections_cannot_grow_the_memory_of_seen_ones_without_bound() -> None:
    for k in range(5):
        many = [[0x020000010000 + k * 20_000 + i, f"10.1.{i >> 8}.{i & 255}:6783", True, True] for i in range(20_000)]
        PeerEntry.from_wire([0x020000000005, "h5", 7, 9 + k, many])
        assert len(topology_module._SEEN_CONNECTIONS) <= topology_module.SEEN_CONNECTIONS_MAX
    # Nor can long addresses make each remembered one large: those are read every time, never remembered.
    topology_module._SEEN_CONNECTIONS.clear()
    long = [[0x020000030000 + i, "x" * 250 + f"{i}:6783", True, True] for i in range(1000)]
    entry = PeerEntry.from_wire([0x020000000005, "h5", 7, 20, long])
    assert len(entry.connections) == 1000 and not topology_module._SEEN_CONNECTIONS

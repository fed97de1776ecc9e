"""What the topology keeps up to date instead of recomputing (reachability, decoded deltas) answers exactly what a
fresh computation would, whatever the order of merges, restarts, lost connections and garbage collection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.mesh.codec import DecodeError, pack
from weft.mesh.peer import PeerInfo
from weft.mesh.topology import ConnectionSummary, PeerEntry, Topology, TopologyUpdate

ME = PeerInfo(0x020000000001, "me", 1000)
NAMES = [ME.name + i for i in range(1, 8)]  # a small mesh, so random connections often join it up


def walked(topology: Topology) -> set[int]:
    """Unreachable peers by a fresh walk from us over every reported connection (the definition)."""
    reached, stack = {ME.name}, [ME.name]
    while stack:
        for c in topology.peers[stack.pop()].connections:
            if c.peer not in reached and c.peer in topology.peers:
                reached.add(c.peer)
                stack.append(c.peer)
    return set(topology.peers) - reached


links = st.lists(st.tuples(st.sampled_from([ME.name, *NAMES]), st.booleans()), max_size=4)
steps = st.lists(
    st.one_of(
        # a peer's entry: name, version, uid (two runs), its connections
        st.tuples(st.just("merge"), st.sampled_from(NAMES), st.integers(1, 6), st.integers(1, 2), links),
        st.tuples(st.just("local"), links),
        st.tuples(st.just("collect")),
        st.tuples(st.just("forget"), st.sampled_from(NAMES)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_reachability_kept_up_to_date_is_what_a_fresh_walk_finds(script: list[tuple]) -> None:
    topology = Topology(ME)
    for step in script:
        if step[0] == "merge":
            _, name, version, uid, peers = step
            conns = tuple(ConnectionSummary(p, "h:1", True, up) for p, up in peers)
            topology.merge(TopologyUpdate({name: PeerEntry(name, "p", uid, version, conns)}))
        elif step[0] == "local":
            topology.set_local_connections(ConnectionSummary(p, "h:1", True, up) for p, up in step[1] if p != ME.name)
        elif step[0] == "collect":
            topology.forget(topology.unreachable())
        else:
            topology.forget({step[1]})
        assert topology.unreachable() == walked(topology)


def test_an_entry_derives_its_edges_from_its_connections() -> None:
    entry = PeerEntry(
        NAMES[0],
        "p",
        1,
        1,
        (ConnectionSummary(NAMES[1], "a:1", True, True), ConnectionSummary(NAMES[2], "b:1", False, False)),
    )
    assert entry.edges == {(NAMES[1], True), (NAMES[2], False)}
    assert entry.established == {NAMES[1]}
    # Derived fields are not part of what an entry is: equal entries are equal, whatever was derived.
    assert entry == PeerEntry(NAMES[0], "p", 1, 1, entry.connections)
    assert "edges" not in repr(entry)


def test_a_delta_decoded_again_is_a_fresh_update_with_the_same_entries() -> None:
    entry = PeerEntry(NAMES[0], "p", 1, 1, (ConnectionSummary(NAMES[1], "a:1", True, True),))
    payload = TopologyUpdate({entry.name: entry}).encode()
    first, second = TopologyUpdate.decode(payload), TopologyUpdate.decode(payload)
    assert first.entries == second.entries == {entry.name: entry}
    first.entries.clear()  # a merge may change what it was given: the next decode is not affected
    assert TopologyUpdate.decode(payload).entries == {entry.name: entry}
    # Bad input is refused every time, not remembered as anything.
    for _ in range(2):
        with pytest.raises(DecodeError):
            TopologyUpdate.decode(payload[:-1])


@pytest.mark.parametrize("size", [0, 1, 15, 16, 65535, 65536])  # where msgpack's array header changes form
def test_an_update_encodes_to_the_bytes_of_its_entries_packed_whole(size: int) -> None:
    entries = {
        n: PeerEntry(n, f"p{n}", n, 1, (ConnectionSummary(n + 1, f"10.0.{n % 250}.1:6783", True, True),))
        for n in range(1, size + 1)
    }
    update = TopologyUpdate(entries)
    whole = pack([e.to_wire() for e in entries.values()])
    assert update.encode() == whole
    assert update.encode() == whole  # again, from the entries' remembered encodings
    assert TopologyUpdate.decode(whole).entries == entries

"""What a forming or large mesh gossips: announcements within a budget, passes over the graph paced by its size,
digests for a peer new to us, and a repair's news passed on down trees rather than to every neighbour.

The real router, topology and gossip in the simulator (virtual time). A hundred agents forming a full mesh on two
cores spent most of their CPU decoding topology gossip and walking the graph; these are the rules that bound it.
"""

from __future__ import annotations

import itertools

import pytest

from weft.mesh import router as router_module
from weft.mesh.clock import VirtualScheduler
from weft.mesh.gossip import BROADCAST, DIGEST, GOSSIP
from weft.mesh.peer import PeerInfo
from weft.mesh.router import ANNOUNCE_BUDGET, TOPOLOGY
from weft.mesh.routes import MAX_WALK_SPACING, WALK_RATE, Routes
from weft.mesh.topology import ConnectionSummary, PeerEntry, Topology, TopologyUpdate
from weft.sim import SimConn, SimNetwork, SimPeer, chain_of_strangers


def full_mesh(net: SimNetwork) -> bool:
    want = len(net.peers) - 1
    return all(len(p.router.connections) == want for p in net.peers)


def settled(n: int) -> SimNetwork:
    net = chain_of_strangers(n, discovery=True)
    assert net.scheduler.run_until(lambda: full_mesh(net) and net.converged(exact=True), 30.0, resolution=0.01)
    net.scheduler.run_until(lambda: False, net.scheduler.now() + 5.0)  # the last announcements land
    return net


def announcements(peer: SimPeer, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When ``peer`` announces its entry from now on."""
    times: list[float] = []
    original = router_module.Router._announce

    def counting(router: router_module.Router) -> None:
        if router is peer.router:
            times.append(router.scheduler.now())
        original(router)

    monkeypatch.setattr(router_module.Router, "_announce", counting)
    return times


def run(net: SimNetwork, seconds: float) -> None:
    """``seconds`` of virtual time pass (the clock otherwise stops at the last callback before the deadline)."""
    net.scheduler.call_later(seconds, lambda: None)
    net.scheduler.run_until(lambda: False, net.scheduler.now() + seconds)


def test_in_a_large_mesh_a_burst_of_changes_is_announced_once_per_budgeted_spacing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """50 peers in full mesh: a peer's entry is 1.2 KB, and its announcements, to every peer, are spaced so that all
    peers' together stay within the budget; the last change still reaches everyone."""
    net = settled(50)
    peer = net.peers[7]
    spacing = peer.router.announce_spacing()
    entry_bytes = len(peer.router.topology.our_entry.packed())
    assert spacing == pytest.approx(50 * entry_bytes / ANNOUNCE_BUDGET)
    assert spacing > peer.router.announce_interval, "a mesh this size is past the fixed interval"
    times = announcements(peer, monkeypatch)
    for _ in range(100):  # a change every 0.1 s for 10 s
        peer.router._local_connections_changed()
        run(net, 0.1)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 10 / spacing - 1, f"announcements starved: {times}"
    assert min(gaps) >= spacing - 1e-6, f"announced {min(gaps):.2f} s apart, spacing {spacing:.2f} s"
    assert net.scheduler.run_until(lambda: net.converged(exact=True), net.scheduler.now() + spacing + 1.0)


def test_a_lost_connection_is_announced_at_the_fixed_interval_whatever_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Routes must stop using a connection that ended: its announcement does not wait for the budget."""
    net = settled(50)
    peer = net.peers[7]
    times = announcements(peer, monkeypatch)
    peer.router._local_connections_changed()
    run(net, 0.1)
    assert len(times) == 1  # announced at once after a quiet spell; the next may wait for the budget
    other = next(iter(peer.router.connections.values()))
    lost_at = net.scheduler.now()
    other.close("cut for the test")
    run(net, peer.router.announce_interval + 0.1)
    assert len(times) == 2, "the lost connection waited for the budget"
    assert times[1] - times[0] <= peer.router.announce_interval + 1e-6
    assert times[1] - lost_at < peer.router.announce_spacing()


def _full_mesh_topology(n: int) -> Topology:
    infos = [PeerInfo(0x020000000000 + i + 1, f"p{i}", i + 1) for i in range(n)]
    topology = Topology(infos[0])
    entries = {}
    for info in infos:
        conns = tuple(
            ConnectionSummary(o.name, f"10.0.0.{k}:6783", True, True) for k, o in enumerate(infos) if o != info
        )
        entries[info.name] = PeerEntry(info.name, info.nickname, info.uid, 2, conns)
    topology.merge(TopologyUpdate(entries))
    topology.set_local_connections(entries[infos[0].name].connections)  # ours is ours to set, not merged
    return topology


def test_routes_are_recalculated_less_often_the_more_links_a_mesh_has() -> None:
    """100 peers in full mesh: 9,900 links, walked at most WALK_RATE a second; graph changes every 10 ms for 5 s."""
    topology = _full_mesh_topology(100)
    scheduler = VirtualScheduler()
    routes = Routes(topology, scheduler, interval=0.1)
    routes._on_timer()  # the tables (and their count of links) of this view
    assert routes.spacing() == pytest.approx(9900 / WALK_RATE)
    assert routes.spacing(0.05) == routes.spacing()
    assert Routes(_full_mesh_topology(10), VirtualScheduler(), interval=0.1).spacing() == 0.1  # small: the interval
    before = routes.recalculations
    entry = topology.peers[0x020000000000 + 2]
    for version in range(3, 503):
        # One peer's connections come and go: each change is a change of the graph.
        conns = entry.connections[: 1 + version % 2 * 97]
        topology.merge(TopologyUpdate({entry.name: PeerEntry(entry.name, entry.nickname, entry.uid, version, conns)}))
        scheduler.call_later(0.01, lambda: None)
        scheduler.run_until(lambda: False, scheduler.now() + 0.01)
    done = routes.recalculations - before
    assert done <= 5.0 / routes.spacing() + 2, f"{done} recalculations in 5 s"
    assert done >= 5.0 / routes.spacing() - 2, f"routes starved: {done} recalculations in 5 s"


def _sent_to(net: SimNetwork, sender: SimPeer) -> list[dict]:
    """Every message ``sender`` sends from now on, as its neighbours receive it."""
    seen: list[dict] = []
    for peer in net.peers:
        conn = peer.router.connections.get(sender.info.name)
        if isinstance(conn, SimConn):

            def deliver(messages: list[dict], original=conn.deliver) -> None:  # type: ignore[no-untyped-def]
                seen.extend(messages)
                original(messages)

            conn.deliver = deliver  # type: ignore[method-assign]
    return seen


def test_two_meshes_joined_by_one_connection_exchange_digests_and_converge_at_once() -> None:
    """Two stars of 10 with no discovery, joined by one connection between their hubs: each hub is new to the other,
    so each sends a digest, not its full state; each side then learns the other's peers before any anti-entropy
    round (the hubs pass what they learned down the other side's trees)."""
    net = SimNetwork(seed=3)
    hub_a = net.add_peer([], discovery=False)
    side_a = [hub_a] + [net.add_peer([hub_a.address], discovery=False) for _ in range(9)]
    hub_b = net.add_peer([], discovery=False)
    side_b = [hub_b] + [net.add_peer([hub_b.address], discovery=False) for _ in range(9)]
    run(net, 3.0)
    assert all(len(p.router.topology.peers) == 10 for p in side_a + side_b)
    from_b: list[dict] = []
    original = SimConn.deliver

    def deliver(conn: SimConn, messages: list[dict]) -> None:
        if conn.owner is hub_a and conn.remote == hub_b.info:
            from_b.extend(messages)
        original(conn, messages)

    SimConn.deliver = deliver  # type: ignore[method-assign]
    joined_at = net.scheduler.now()
    hub_a.maker.connect([hub_b.address])
    try:
        assert net.scheduler.run_until(lambda: net.converged(exact=True), joined_at + 5.0, resolution=0.01)
    finally:
        SimConn.deliver = original  # type: ignore[method-assign]
    assert net.scheduler.now() - joined_at < 5.0  # anti-entropy runs every 24 s at the soonest
    to_a = [m for m in from_b if m.get("ch") == TOPOLOGY]
    # What hub_b sent its new neighbour: no full state taken for new (a digest first, then repairs)
    assert next(m["t"] for m in to_a if m["t"] in (GOSSIP, DIGEST)) == DIGEST
    assert not [m for m in to_a if m["t"] == GOSSIP and m.get("rp") is not True]


def test_in_a_full_mesh_what_a_repair_brings_is_not_passed_on_to_every_neighbour() -> None:
    """20 peers in full mesh; one misses three peers' announcements and is repaired by digests. It is a leaf of every
    other peer's tree, so it passes none of those entries on (each had gone to every neighbour from it before)."""
    net = settled(20)
    deaf = net.peers[4]
    conns = [c for c in deaf.router.connections.values() if isinstance(c, SimConn)]
    for conn in conns:

        def deliver(messages: list[dict], original=conn.deliver) -> None:  # type: ignore[no-untyped-def]
            original([m for m in messages if m["t"] != BROADCAST])

        conn.deliver = deliver  # type: ignore[method-assign]
    bumped = [net.peers[i] for i in (1, 9, 15)]
    for peer in bumped:
        peer.router._local_connections_changed()
    run(net, 1.0)
    for conn in conns:
        del conn.deliver  # type: ignore[attr-defined]  # back to the class's
    assert not net.converged(exact=True)
    sent = _sent_to(net, deaf)
    assert net.scheduler.run_until(lambda: net.converged(exact=True), net.scheduler.now() + 40.0, resolution=0.1)
    names = {p.info.name for p in bumped}
    passed_on = [
        m
        for m in sent
        if m["ch"] == TOPOLOGY and m["t"] == BROADCAST and names & set(TopologyUpdate.decode(m["d"]).entries)
    ]
    assert not passed_on, f"{len(passed_on)} broadcasts of the repaired entries"


def test_a_neighbour_that_floods_our_view_with_fake_peers_cannot_stall_our_announcements_or_keep_them() -> None:
    """An authenticated neighbour sends a full state of 20,000 made-up peers that link to nothing (600 KB, a fraction
    of one frame). They are unreachable: they must not count towards the announcement budget (that would space our
    announcements an hour apart), and must be forgotten within a bounded grace, as before."""
    net = settled(20)
    peer, liar = net.peers[3], net.peers[4]
    fakes = {0x030000000000 + i: PeerEntry(0x030000000000 + i, f"f{i}", i + 1, 1, ()) for i in range(20_000)}
    sent = _sent_to(net, peer)
    liar.router.connections[peer.info.name].sender.send(TOPOLOGY, TopologyUpdate(fakes))
    run(net, 0.1)
    # Passed on as it came, in one message a neighbour: not one for each made-up peer
    assert len([m for m in sent if m["ch"] == TOPOLOGY]) <= 2 * (len(net.peers) - 1)
    assert len(peer.router.topology.peers) > 20_000  # taken in, for now: unreachable is not proof of a lie
    assert peer.router.announce_spacing() <= router_module.MAX_ANNOUNCE_SPACING
    assert peer.router.announce_spacing() < 1.0  # it counts the 20 peers that hear it
    assert peer.router.routes.spacing() <= MAX_WALK_SPACING
    run(net, 2 * router_module.MAX_ANNOUNCE_SPACING + 1.0)
    assert len(peer.router.topology.peers) == 20, "the fake peers are still held"

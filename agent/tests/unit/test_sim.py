"""The whole control plane in the simulator: convergence, discovery, partitions and restarts."""

from __future__ import annotations

import random

import pytest

from weft.mesh.connection_maker import ConnectionMaker
from weft.mesh.peer import PeerInfo
from weft.mesh.router import Router
from weft.metrics import Metrics
from weft.sim import SimNetwork, SimPeer, chain_of_strangers


def full_mesh(net: SimNetwork) -> bool:
    want = len(net.peers) - 1
    return all(len(p.router.connections) == want for p in net.peers)


def views_are(net: SimNetwork, groups: list[list[int]]) -> bool:
    """Each peer's view holds exactly the peers of its own group."""
    for group in groups:
        names = {net.peers[i].info.name for i in group}
        for i in group:
            if set(net.peers[i].router.topology.peers) != names:
                return False
    return True


def run(net: SimNetwork, done, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    return net.scheduler.run_until(done, net.scheduler.now() + seconds, resolution=0.01)


def settle(net: SimNetwork, seconds: float = 1.0) -> None:
    """Let virtual time pass with nothing new happening (routes may be recomputed lazily, on a timer)."""
    net.scheduler.call_later(seconds, lambda: None)
    net.scheduler.run_until(lambda: False, net.scheduler.now() + seconds)


@pytest.mark.slow  # seconds of CPU: in `make test`, not in `make unit`
def test_a_chain_of_1000_strangers_converges() -> None:
    net = chain_of_strangers(1000)
    # Well inside the first anti-entropy round (30 s): deltas alone carry the view across the mesh.
    assert run(net, net.converged, 5.0), "1000 peers did not converge within 5 virtual seconds"
    # Every peer has a route to every other.
    settle(net)
    for peer in net.peers[::50]:
        assert len(peer.router.routes.reachable()) == 999
    # No discovery: only the configured connections exist (one per peer but the first).
    assert sum(len(p.router.connections) for p in net.peers) == 2 * 999


@pytest.mark.slow  # seconds of CPU: in `make test`, not in `make unit`
def test_discovery_builds_a_full_mesh_of_50() -> None:
    net = chain_of_strangers(50, discovery=True)
    assert run(net, lambda: full_mesh(net), 20.0)
    assert net.converged()
    settle(net)
    for peer in net.peers:
        assert set(peer.router.routes.neighbours()) == {p.info.name for p in net.peers} - {peer.info.name}
        assert all(t["state"] == "connected" for t in peer.maker.status())


@pytest.mark.slow  # seconds of CPU: in `make test`, not in `make unit`
def test_a_partitioned_mesh_splits_in_two_and_merges_again_after_healing() -> None:
    net = chain_of_strangers(40, discovery=True, seed=3)
    assert run(net, lambda: full_mesh(net), 20.0)
    left, right = list(range(20)), list(range(20, 40))

    net.partition([left, right])

    assert run(net, lambda: views_are(net, [left, right]), 120.0), "halves did not forget each other"
    settle(net)
    for i in left:
        assert len(net.peers[i].router.connections) == 19
        assert len(net.peers[i].router.routes.reachable()) == 19
    assert not net.converged()
    # Dialling across keeps failing but never stops for configured targets.
    assert any(t["state"] in ("retrying", "failed") for i in right for t in net.peers[i].maker.status())

    net.heal()

    assert run(net, lambda: net.converged() and full_mesh(net), 20.0), "halves did not merge after healing"
    settle(net)
    for peer in net.peers:
        assert len(peer.router.routes.reachable()) == 39


def restart(net: SimNetwork, index: int, *, crash: bool) -> SimPeer:
    """Replace a peer with a fresh run of itself: same name and address, new UID, empty state.

    ``crash``: the old run vanishes without closing anything, so its neighbours still hold the old
    connections; otherwise its connections are closed (a clean stop).
    """
    old = net.peers[index]
    targets = [a for a, t in old.maker.targets.items() if t.origin == "config"]
    old.maker.discovery = False
    old.maker.targets.clear()
    old.maker.stop()
    for conn in list(old.router.connections.values()):
        if crash:
            conn.closed = True  # type: ignore[attr-defined]
        else:
            conn.close("restarting")
    old.router.stop()

    info = PeerInfo(old.info.name, old.info.nickname, old.info.uid + 1_000_003)
    router = Router(info, net.scheduler, Metrics(), gossip_interval=net.gossip_interval, conn_limit=1000)
    router.rng = random.Random(index)
    maker = ConnectionMaker(router, net.scheduler, lambda a: net._dial(index, a), rng=random.Random(index))
    peer = SimPeer(info, old.address, router, maker)
    net.peers[index] = peer
    router.start()
    maker.set_origin_targets("config", targets)
    return peer


def _restart_and_check(crash: bool) -> None:
    net = chain_of_strangers(16, discovery=True, seed=5)
    assert run(net, lambda: net.converged() and full_mesh(net), 20.0)
    index = 9
    name = net.peers[index].info.name
    old_versions = [p.router.topology.peers[name].version for p in net.peers if p.info.name != name]
    # Make the old run's entry the newest anyone has seen, so the new run must jump past it.
    for _ in range(30):
        net.peers[index].router.topology.set_local_connections(net.peers[index].router.topology.our_entry.connections)
    net.peers[index].router._announce()
    assert run(net, lambda: all(p.router.topology.peers[name].version > max(old_versions) + 20 for p in net.peers), 5)
    remembered = max(p.router.topology.peers[name].version for p in net.peers)

    new = restart(net, index, crash=crash)

    assert run(net, lambda: net.converged() and full_mesh(net), 20.0), "the restarted peer was not re-admitted"
    for peer in net.peers:
        entry = peer.router.topology.peers[name]
        assert entry.uid == new.info.uid
        assert entry.version > remembered
        if peer is not new:
            assert peer.router.connections[name].remote.uid == new.info.uid


def test_a_peer_that_restarts_cleanly_is_readmitted_with_its_new_uid() -> None:
    _restart_and_check(crash=False)


def test_a_peer_that_crashes_and_restarts_replaces_its_old_connections() -> None:
    _restart_and_check(crash=True)


def test_a_random_partition_of_a_chain_lets_virtual_time_move_on() -> None:
    """Peers cut off are forgotten after the grace and the clock moves on: the garbage collection timer, set for the
    moment a peer's grace ends, used to fire a float's hair before it and set itself again, forever, at one instant."""
    net = chain_of_strangers(60, seed=9)
    assert run(net, net.converged, 5.0)
    rng = random.Random(9)
    groups: list[list[int]] = [[], []]
    for i in range(60):
        groups[rng.randrange(2)].append(i)
    net.partition(groups)
    start = net.scheduler.now()
    settle(net, 5.0)
    assert net.scheduler.now() >= start + 5.0
    for peer in net.peers:
        # Each peer's view holds at most the peers it still reaches; the rest were forgotten.
        assert set(peer.router.topology.peers) == {peer.info.name, *peer.router.routes.reachable()}

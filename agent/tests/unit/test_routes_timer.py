"""Routes on a timer: a churning graph is recalculated at most once per interval, gossip follows the last trees
instead of flooding, and forming a dense mesh sends each announcement across about one link per peer."""

from __future__ import annotations

import itertools
import random

import pytest

from weft.mesh import router as router_module
from weft.mesh.clock import VirtualScheduler
from weft.mesh.peer import PeerInfo
from weft.mesh.routes import Routes
from weft.mesh.topology import ConnectionSummary, PeerEntry, Topology, TopologyUpdate
from weft.sim import SimNetwork

BASE = 0x020000000000


def name(i: int) -> int:
    return BASE + i


def entry(p: int, peers: set[int], version: int) -> PeerEntry:
    conns = tuple(ConnectionSummary(q, f"h{q - BASE}:6783", p < q, True) for q in sorted(peers))
    return PeerEntry(p, f"p{p - BASE}", p * 7, version, conns)


class Mesh:
    """Peer 0's view of peers that report symmetric links to each other, changed one report at a time."""

    def __init__(self, n: int) -> None:
        self.reports: dict[int, set[int]] = {name(i): set() for i in range(n)}
        self.version = 1
        self.topology = Topology(PeerInfo(name(0), "p0", name(0) * 7))
        self.topology.merge(TopologyUpdate({p: entry(p, set(), 1) for p in self.reports if p != name(0)}))

    def link(self, a: int, b: int, up: bool = True) -> None:
        for x, y in ((a, b), (b, a)):
            if up:
                self.reports[name(x)].add(name(y))
            else:
                self.reports[name(x)].discard(name(y))
            self.version += 1
            new = entry(name(x), self.reports[name(x)], self.version)
            if x == 0:
                self.topology.set_local_connections(new.connections)
            else:
                self.topology.merge(TopologyUpdate({new.name: new}))

    def fresh(self) -> Routes:
        """Routes computed from scratch on the same graph (no scheduler: current at once)."""
        topology = Topology(PeerInfo(name(0), "p0", name(0) * 7))
        topology.set_local_connections(entry(name(0), self.reports[name(0)], 1).connections)
        topology.merge(TopologyUpdate({p: entry(p, r, 1) for p, r in self.reports.items() if p != name(0)}))
        return Routes(topology)


def advance(clock: VirtualScheduler, until: float) -> None:
    """Run the callbacks due up to ``until``, and move the clock there even if none is."""
    clock.call_later(until - clock.now(), lambda: None)
    clock.run_until(lambda: False, until)


def test_a_burst_of_changes_is_recalculated_at_most_once_per_interval() -> None:
    clock = VirtualScheduler()
    mesh = Mesh(30)
    routes = Routes(mesh.topology, clock, interval=0.1)
    told: list[float] = []
    routes.listeners.append(lambda: told.append(clock.now()))
    rng = random.Random(3)
    before = routes.recalculations
    # 200 link changes over one second: a mesh forming.
    for k in range(200):
        a, b = rng.sample(range(30), 2)
        clock.call_later(k * 0.005, lambda a=a, b=b: mesh.link(a, b, up=rng.random() < 0.8))
    advance(clock, 2.0)
    recalculations = routes.recalculations - before
    assert recalculations <= 12, f"{recalculations} recalculations for 1 s of churn at an interval of 0.1 s"
    assert len(told) == recalculations
    assert all(b - a >= 0.1 - 1e-9 for a, b in itertools.pairwise(told))
    fresh = mesh.fresh()
    assert routes.reachable() == fresh.reachable()
    assert routes.neighbours() == fresh.neighbours()


def test_a_change_after_a_quiet_spell_is_taken_at_once() -> None:
    clock = VirtualScheduler()
    mesh = Mesh(4)
    routes = Routes(mesh.topology, clock, interval=0.5)
    advance(clock, 5.0)
    mesh.link(0, 1)
    mesh.link(1, 2)
    advance(clock, clock.now())  # the callbacks due now, no later
    assert routes.unicast(name(2)) == name(1)


def test_while_the_graph_churns_broadcasts_follow_the_last_trees() -> None:
    """Between recalculations a relay gets the tree of the last one, never "not sure" (which meant a flood)."""
    clock = VirtualScheduler()
    mesh = Mesh(6)
    routes = Routes(mesh.topology, clock, interval=0.1)
    for a, b in ((0, 1), (1, 2), (2, 3), (0, 4), (4, 5)):
        mesh.link(a, b)
    advance(clock, 1.0)
    assert routes.broadcast(name(2)) == [name(4)]  # p2's tree: p2 -> p1 -> p0 -> p4
    mesh.link(2, 5)  # p5 is now one hop from p2: p0 is no longer p4's parent... once routes are recalculated
    assert routes.broadcast(name(2)) == [name(4)]
    advance(clock, 1.2)
    assert routes.broadcast(name(2)) == []


def forming_cost(n: int, dial_spread: float, seed: int, monkeypatch: pytest.MonkeyPatch) -> tuple[SimNetwork, float]:
    """``n`` peers told of the first one, discovery on, until the mesh is full and quiet: all topology bytes sent,
    over the least that telling every other peer each announcement once costs."""
    announced: list[int] = []
    original = router_module.Router._announce

    def counting(router: router_module.Router) -> None:
        ours = router.topology.our_entry
        announced.append(len(TopologyUpdate({ours.name: ours}).encode()))
        original(router)

    monkeypatch.setattr(router_module.Router, "_announce", counting)
    net = SimNetwork(latency=0.002, seed=seed, gossip_interval=1e6)  # no anti-entropy: deltas alone
    if dial_spread:
        rng = random.Random(seed)

        def dial(index: int, address: str) -> None:  # handshakes that take up to dial_spread seconds
            net.scheduler.call_later(rng.uniform(0.005, dial_spread), lambda: net._connect(index, address))

        monkeypatch.setattr(net, "_dial", dial)
    for i in range(n):
        net.add_peer([] if i == 0 else ["sim0:6783"], discovery=True)
    net.scheduler.run_until(lambda: False, 10.0)
    return net, net.gossip_bytes_out() / (sum(announced) * (n - 1))


@pytest.mark.parametrize("dial_spread", [0.0, 1.0])
def test_forming_a_full_mesh_sends_each_announcement_about_once_per_peer(
    dial_spread: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flooding while the graph churned cost 23-36 times the least possible here (each announcement crossing
    every link); trees of the last recalculation cost under twice that, and lose nothing."""
    n = 30
    net, ratio = forming_cost(n, dial_spread, seed=4, monkeypatch=monkeypatch)
    assert all(len(p.router.connections) == n - 1 for p in net.peers)
    assert net.converged(exact=True), "a view missed an announcement (no anti-entropy ran)"
    for peer in net.peers:
        assert len(peer.router.routes.neighbours()) == n - 1
    assert ratio <= 3.0, f"topology gossip was {ratio:.1f} times what telling each peer each announcement once costs"

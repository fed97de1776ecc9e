"""Routes: unicast next hops by BFS over symmetric connections, and broadcast trees that reach everyone once."""

from __future__ import annotations

import random
from collections import deque

import pytest

from weft.mesh.peer import PeerInfo
from weft.mesh.routes import Routes
from weft.mesh.topology import ConnectionSummary, PeerEntry, Topology, TopologyUpdate

BASE = 0x020000000000


def name(i: int) -> int:
    return BASE + i


def entries_for(reports: dict[int, set[int]], version: int = 1, established: bool = True) -> dict[int, PeerEntry]:
    """One entry per peer, reporting established connections to the peers in ``reports[peer]``."""
    return {
        p: PeerEntry(
            p,
            f"p{p - BASE}",
            p * 7,
            version,
            tuple(ConnectionSummary(q, f"h{q - BASE}:6783", p < q, established) for q in sorted(reports[p])),
        )
        for p in reports
    }


def view(me: int, entries: dict[int, PeerEntry]) -> Topology:
    """``me``'s view of the mesh: its own connections set locally, everyone else's merged from gossip."""
    ours = entries[me]
    topology = Topology(PeerInfo(me, ours.nickname, ours.uid))
    topology.set_local_connections(ours.connections)
    topology.merge(TopologyUpdate({n: e for n, e in entries.items() if n != me}))
    return topology


def symmetric(edges: list[tuple[int, int]], peers: list[int]) -> dict[int, set[int]]:
    reports: dict[int, set[int]] = {p: set() for p in peers}
    for a, b in edges:
        reports[a].add(b)
        reports[b].add(a)
    return reports


def random_connected_graph(rng: random.Random, n: int, extra: int) -> tuple[list[int], list[tuple[int, int]]]:
    peers = [name(i) for i in range(1, n + 1)]
    order = peers[:]
    rng.shuffle(order)
    edges = {tuple(sorted((order[i], rng.choice(order[:i])))) for i in range(1, n)}  # a random spanning tree
    extra = min(extra, n * (n - 1) // 2 - (n - 1))
    while len(edges) < n - 1 + extra:
        a, b = rng.sample(peers, 2)
        edges.add(tuple(sorted((a, b))))
    return peers, sorted(edges)  # type: ignore[arg-type]


def distances(reports: dict[int, set[int]], source: int) -> dict[int, int]:
    """Hop counts over symmetric connections, computed independently of Routes."""
    dist = {source: 0}
    queue = deque([source])
    while queue:
        node = queue.popleft()
        for n in reports[node]:
            if node in reports.get(n, ()) and n not in dist:
                dist[n] = dist[node] + 1
                queue.append(n)
    return dist


# -- unicast ------------------------------------------------------------------------------------------


def test_unicast_takes_the_shortest_path() -> None:
    p = [name(i) for i in range(8)]
    # p0-p1-p2-p3 is 3 hops; p0-p4-p5-p6-p3 is 4 hops; p7 is off on its own.
    edges = [(p[0], p[1]), (p[1], p[2]), (p[2], p[3]), (p[0], p[4]), (p[4], p[5]), (p[5], p[6]), (p[6], p[3])]
    entries = entries_for(symmetric(edges, p))
    routes = Routes(view(p[0], entries))
    assert routes.unicast(p[3]) == p[1]
    assert routes.unicast(p[2]) == p[1]
    assert routes.unicast(p[5]) == p[4]
    assert routes.unicast(p[6]) == p[4]
    assert routes.unicast(p[1]) == p[1]
    assert routes.unicast(p[7]) is None
    assert routes.neighbours() == {p[1], p[4]}
    assert set(routes.reachable()) == {p[1], p[2], p[3], p[4], p[5], p[6]}


def test_a_one_sided_connection_carries_no_traffic() -> None:
    p = [name(i) for i in range(4)]
    reports = {p[0]: {p[1]}, p[1]: {p[2]}, p[2]: {p[1], p[3]}, p[3]: {p[2]}}  # p1 does not report p0
    entries = entries_for(reports)

    routes = Routes(view(p[0], entries))
    assert routes.neighbours() == set()
    assert routes.unicast(p[1]) is None
    assert routes.unicast(p[3]) is None
    assert routes.reachable() == {}

    other = Routes(view(p[2], entries))
    assert other.neighbours() == {p[1], p[3]}
    assert other.unicast(p[0]) is None
    assert other.broadcast(p[0]) is None


def test_connections_not_yet_established_carry_no_traffic() -> None:
    p = [name(i) for i in range(3)]
    entries = entries_for(symmetric([(p[0], p[1]), (p[1], p[2])], p), established=False)
    routes = Routes(view(p[0], entries))
    assert routes.neighbours() == set()
    assert routes.unicast(p[2]) is None


@pytest.mark.parametrize("seed", range(5))
def test_following_next_hops_reaches_every_peer_by_a_shortest_path(seed: int) -> None:
    rng = random.Random(seed)
    peers, edges = random_connected_graph(rng, rng.randrange(6, 25), extra=rng.randrange(0, 20))
    # A few one-sided reports that must be ignored.
    reports = symmetric(edges, peers)
    for _ in range(3):
        a, b = rng.sample(peers, 2)
        if b not in reports[a]:
            reports[a].add(b)
    entries = entries_for(reports)
    routes = {p: Routes(view(p, entries)) for p in peers}
    for source in peers:
        dist = distances(reports, source)
        for dest in peers:
            if dest == source:
                continue
            hops, node = 0, source
            while node != dest:
                nxt = routes[node].unicast(dest)
                assert nxt is not None, f"{node - BASE} has no route to {dest - BASE}"
                assert node in reports[nxt] and nxt in reports[node], "routed over a one-sided connection"
                node, hops = nxt, hops + 1
                assert hops <= len(peers)
            assert hops == dist[dest]


def reference_next_hops(reports: dict[int, set[int]], me: int) -> dict[int, int]:
    """The first hop to each peer: a plain BFS over symmetric links, each peer's links taken in order of name."""

    def linked(node: int) -> list[int]:
        return [p for p in sorted(reports.get(node, ())) if node in reports.get(p, ())]

    hops = {n: n for n in linked(me)}
    queue = deque(hops)
    while queue:
        node = queue.popleft()
        for n in linked(node):
            if n != me and n not in hops:
                hops[n] = hops[node]
                queue.append(n)
    return hops


@pytest.mark.parametrize("seed", range(8))
def test_next_hops_break_ties_as_a_plain_bfs_does(seed: int) -> None:
    """Among equally short paths the first hop is the one a plain BFS finds first: every figure of the simulator
    depends on it."""
    rng = random.Random(seed)
    n = rng.randrange(2, 40)
    peers, edges = random_connected_graph(rng, n, extra=rng.choice([0, 2, rng.randrange(0, n), 3 * n]))
    reports = symmetric(edges, peers)
    for _ in range(rng.randrange(4)):
        a, b = rng.sample(peers, 2)
        reports[a].add(b)
    for me in peers:
        assert Routes(view(me, entries_for(reports))).reachable() == reference_next_hops(reports, me)


def test_routes_follow_changes_to_the_topology() -> None:
    rng = random.Random(7)
    peers = [name(i) for i in range(1, 13)]
    me = peers[0]
    reports: dict[int, set[int]] = {p: set() for p in peers}
    topology = view(me, entries_for(reports))
    routes = Routes(topology)
    for version in range(2, 80):
        # Flip a random report on or off, as that peer's next entry.
        a, b = rng.sample(peers, 2)
        reports[a] ^= {b}
        entries = entries_for(reports, version=version)
        if a == me:
            topology.set_local_connections(entries[me].connections)
        else:
            topology.merge(TopologyUpdate({a: entries[a]}))
        fresh = Routes(view(me, entries))
        assert routes.reachable() == fresh.reachable()
        assert routes.neighbours() == fresh.neighbours()
        assert set(routes.reachable()) == set(distances(reports, me)) - {me}


def test_forgetting_a_peer_removes_its_routes() -> None:
    p = [name(i) for i in range(3)]
    entries = entries_for(symmetric([(p[0], p[1]), (p[1], p[2])], p))
    topology = view(p[0], entries)
    routes = Routes(topology)
    assert routes.unicast(p[2]) == p[1]
    topology.forget({p[2]})
    assert routes.unicast(p[2]) is None
    assert routes.unicast(p[1]) == p[1]


# -- broadcast ----------------------------------------------------------------------------------------


def deliver_broadcast(routes: dict[int, Routes], source: int) -> dict[int, int]:
    """Simulate a broadcast from ``source``: every peer forwards to its children in the source's tree."""
    received = dict.fromkeys(routes, 0)
    queue = deque([source])
    while queue:
        node = queue.popleft()
        children = routes[node].broadcast(source)
        assert children is not None, f"{node - BASE} got a broadcast from {source - BASE} but is on no tree"
        for child in children:
            received[child] += 1
            queue.append(child)
    return received


@pytest.mark.parametrize("seed", range(8))
def test_broadcast_from_every_source_reaches_every_peer_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    peers, edges = random_connected_graph(rng, rng.randrange(2, 40), extra=rng.randrange(0, 40))
    entries = entries_for(symmetric(edges, peers))
    routes = {p: Routes(view(p, entries)) for p in peers}
    for source in peers:
        received = deliver_broadcast(routes, source)
        assert received.pop(source) == 0
        assert set(received.values()) == {1}, {p - BASE: n for p, n in received.items() if n != 1}


def test_broadcast_trees_ignore_one_sided_connections() -> None:
    rng = random.Random(99)
    peers, edges = random_connected_graph(rng, 15, extra=10)
    reports = symmetric(edges, peers)
    outsider = name(100)
    reports[outsider] = set(peers[:3])  # reports three peers, none of which report it back
    entries = entries_for(reports)
    routes = {p: Routes(view(p, entries)) for p in peers}
    for source in peers:
        received = deliver_broadcast(routes, source)
        assert received.pop(source) == 0
        assert set(received.values()) == {1}
    assert all(routes[p].broadcast(outsider) is None for p in peers)


def test_a_peer_off_the_sources_tree_gets_no_children() -> None:
    p = [name(i) for i in range(4)]
    entries = entries_for(symmetric([(p[0], p[1]), (p[2], p[3])], p))  # two islands
    assert Routes(view(p[2], entries)).broadcast(p[0]) is None
    assert Routes(view(p[1], entries)).broadcast(p[0]) == []
    assert Routes(view(p[0], entries)).broadcast(p[0]) == [p[1]]


@pytest.mark.parametrize("seed", range(12))
def test_children_across_a_bridge_are_those_of_the_walk_from_the_source(seed: int) -> None:
    """Our children in a tree the source reaches us by a bridge are answered without walking it: the answer must
    be the walk's, for every source, in graphs from trees (all bridges) to dense meshes (none)."""
    rng = random.Random(seed)
    n = rng.randrange(2, 40)
    peers, edges = random_connected_graph(rng, n, extra=rng.choice([0, 1, 2, rng.randrange(0, n), 3 * n]))
    reports = symmetric(edges, peers)
    for _ in range(rng.randrange(3)):  # one-sided reports, and a peer on no tree, do not count
        a, b = rng.sample(peers, 2)
        reports[a].add(b)
    reports[name(100)] = set(peers[:2])
    for me in peers:
        routes = Routes(view(me, entries_for(reports)))
        for hop in routes.neighbours():
            cut = {p: r - {me} if p == hop else r - {hop} if p == me else r for p, r in reports.items()}
            assert (hop in routes._bridges) == (me not in distances(cut, hop)), "a bridge is a link with no way round"
        for source in [*peers, name(100)]:
            assert routes.broadcast(source) == routes._walk_children(source), (me - BASE, source - BASE)

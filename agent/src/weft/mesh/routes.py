"""Routes over the topology: unicast next hops by BFS, and one broadcast tree per source.

Only symmetric connections count (both ends report each other), so a half-open or one-sided
view never attracts traffic. Every peer computes the same trees from the same view, so a
broadcast reaches each peer exactly once.
"""

from __future__ import annotations

from collections import deque

from weft.mesh.topology import Topology


class Routes:
    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self._ourself = topology.ourself.name
        self._graph_version = -1
        self._reported: dict[int, set[int]] = {}
        self._adjacency: dict[int, set[int]] = {}
        self._unicast: dict[int, int] | None = None
        self._broadcast: dict[int, list[int]] = {}

    def _refresh(self) -> None:
        if self._graph_version == self._topology.graph_version:
            return
        self._update_adjacency()
        self._unicast = None
        self._broadcast = {}
        self._graph_version = self._topology.graph_version

    def _update_adjacency(self) -> None:
        """Bring the symmetric adjacency up to date for just the peers whose edges changed."""
        peers = self._topology.peers
        reported, adjacency = self._reported, self._adjacency
        dirty, self._topology.dirty = self._topology.dirty, set()
        for name in dirty:
            old = reported.pop(name, set())
            adjacency.pop(name, None)
            for p in old:
                adjacency.get(p, set()).discard(name)
            entry = peers.get(name)
            if entry is None:
                continue
            out = {c.peer for c in entry.connections if c.established}
            reported[name] = out
            adjacency[name] = {p for p in out if name in reported.get(p, ())}
            for p in adjacency[name]:
                adjacency[p].add(name)

    def _bfs_next_hops(self) -> dict[int, int]:
        hops: dict[int, int] = {}
        queue: deque[int] = deque()
        for n in sorted(self._adjacency.get(self._ourself, ())):
            hops[n] = n
            queue.append(n)
        while queue:
            node = queue.popleft()
            for n in sorted(self._adjacency.get(node, ())):
                if n != self._ourself and n not in hops:
                    hops[n] = hops[node]
                    queue.append(n)
        return hops

    def _unicast_table(self) -> dict[int, int]:
        self._refresh()
        if self._unicast is None:
            self._unicast = self._bfs_next_hops()
        return self._unicast

    def unicast(self, dest: int) -> int | None:
        """The neighbour to send to for ``dest``, or None if it is unreachable."""
        return self._unicast_table().get(dest)

    def reachable(self) -> dict[int, int]:
        return dict(self._unicast_table())

    def neighbours(self) -> set[int]:
        """Peers we share a symmetric, established connection with."""
        self._refresh()
        return set(self._adjacency.get(self._ourself, ()))

    def broadcast(self, source: int) -> list[int] | None:
        """Our children in ``source``'s BFS tree; None when we are not on that tree in our view."""
        self._refresh()
        if source in self._broadcast:
            return self._broadcast[source]
        if source not in self._adjacency:
            return None
        parent: dict[int, int] = {source: source}
        queue: deque[int] = deque([source])
        while queue:
            node = queue.popleft()
            for n in sorted(self._adjacency[node]):
                if n not in parent:
                    parent[n] = node
                    queue.append(n)
        if self._ourself not in parent:
            return None
        children = sorted(n for n in self._adjacency.get(self._ourself, ()) if parent.get(n) == self._ourself)
        self._broadcast[source] = children
        return children

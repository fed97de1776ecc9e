"""Routes over the topology: unicast next hops by BFS, and one broadcast tree per source.

Only symmetric connections count (both ends report each other), so a half-open or one-sided
view never attracts traffic. Every peer computes the same trees from the same view, so a
broadcast reaches each peer exactly once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from weft.mesh.topology import Topology


class Routes:
    """Routes over a topology, recomputed lazily and at most once per ``min_interval``.

    While the graph churns faster than that, ``broadcast`` answers None ("not sure") and the caller
    floods instead; since gossip only relays what was new to the relaying peer, a flood costs little
    and cannot miss anyone, and exact trees return once the graph settles.
    """

    def __init__(self, topology: Topology, now: Callable[[], float] | None = None, min_interval: float = 0.0) -> None:
        self._topology = topology
        self._now = now or (lambda: 0.0)
        self._min_interval = min_interval
        self._refreshed_at = float("-inf")
        self._ourself = topology.ourself.name
        self._graph_version = -1
        self._reported: dict[int, frozenset[int]] = {}
        self._adjacency: dict[int, set[int]] = {}
        self._unicast: dict[int, int] | None = None
        self._broadcast: dict[int, list[int]] = {}

    def _refresh(self) -> bool:
        """Bring routes up to date if allowed; True when they match the current graph."""
        if self._graph_version == self._topology.graph_version:
            return True
        now = self._now()
        if now - self._refreshed_at < self._min_interval:
            return False
        self._refreshed_at = now
        self._update_adjacency()
        self._unicast = None
        self._broadcast = {}
        self._graph_version = self._topology.graph_version
        return True

    def _update_adjacency(self) -> None:
        """Bring the symmetric adjacency up to date for just the peers whose edges changed."""
        peers = self._topology.peers
        reported, adjacency = self._reported, self._adjacency
        dirty, self._topology.dirty = self._topology.dirty, set()
        for name in dirty:
            adjacency.pop(name, None)
            for p in reported.pop(name, ()):
                if p in adjacency:
                    adjacency[p].discard(name)
            entry = peers.get(name)
            if entry is None:
                continue
            out = entry.established  # shared with the entry, never changed
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
        """Our children in ``source``'s BFS tree; None when we are not on it or the view is churning."""
        if not self._refresh():
            return None
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

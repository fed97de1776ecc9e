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
        self._reported: dict[int, frozenset[int]] = {}  # established connections each peer reports
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
        """Take the established connections each peer reports, for just the peers whose edges changed.

        The symmetric adjacency is not stored: a mesh of N peers would hold N sets in every peer's view
        (the simulator holds all the views at once); ``_linked`` works it out when a walk needs it.
        """
        peers, reported = self._topology.peers, self._reported
        dirty, self._topology.dirty = self._topology.dirty, set()
        for name in dirty:
            entry = peers.get(name)
            if entry is None:
                reported.pop(name, None)
            else:
                reported[name] = entry.established  # shared with the entry, never changed

    def _linked(self, node: int) -> list[int]:
        """``node``'s neighbours over symmetric connections (both ends report each other), in order."""
        reported = self._reported
        return sorted(p for p in reported.get(node, ()) if node in reported.get(p, ()))

    def _bfs_next_hops(self) -> dict[int, int]:
        hops: dict[int, int] = {}
        queue: deque[int] = deque()
        for n in self._linked(self._ourself):
            hops[n] = n
            queue.append(n)
        while queue:
            node = queue.popleft()
            for n in self._linked(node):
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
        return set(self._linked(self._ourself))

    def broadcast(self, source: int) -> list[int] | None:
        """Our children in ``source``'s BFS tree; None when we are not on it or the view is churning."""
        if not self._refresh():
            return None
        if source in self._broadcast:
            return self._broadcast[source]
        if source not in self._reported:
            return None
        # A peer's parent is the first peer taken from the queue that links to it. Once we are taken, each of our
        # neighbours has its parent: the walk stops there, as the rest of the tree does not change our children.
        parent: dict[int, int] = {source: source}
        queue: deque[int] = deque([source])
        while queue:
            node = queue.popleft()
            linked = self._linked(node)
            for n in linked:
                if n not in parent:
                    parent[n] = node
                    queue.append(n)
            if node == self._ourself:
                children = [n for n in linked if parent[n] == node]
                self._broadcast[source] = children
                return children
        return None

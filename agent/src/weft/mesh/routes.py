"""Routes over the topology: unicast next hops by BFS, and one broadcast tree per source.

Only symmetric connections count (both ends report each other), so a half-open or one-sided
view never attracts traffic. Every peer computes the same trees from the same view, so a
broadcast reaches each peer exactly once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from weft.mesh.clock import Handle, Scheduler
from weft.mesh.topology import PeerEntry, Topology

# Links a second that passes over the whole graph (a recalculation of routes, the broadcast trees, what to dial) may
# walk in a burst of changes. Each such pass reads every link; at a fixed rate, a mesh of 100 in full mesh (9,900
# links) spent a few percent of a core on each, a hundred agents on two cores twice what the machine had.
WALK_RATE = 20_000
MAX_WALK_SPACING = 5.0  # seconds: routes never older than this in a burst, however many links a view holds


class Routes:
    """Routes over a topology, recalculated on a timer: at most once per :meth:`spacing` while the graph changes.

    With a scheduler, a change of the graph schedules one recalculation (at once after a quiet spell, else
    :meth:`spacing` after the last one), and every reader gets the tables of the last recalculation: a mesh that is
    forming changes its graph hundreds of times a second, and recalculating for each change, or flooding gossip
    until the graph stops changing, costs far more than routes a fraction of a second old. ``listeners`` are
    called after each recalculation. Without a scheduler (tests, tools), routes follow every change at once.
    """

    def __init__(self, topology: Topology, scheduler: Scheduler | None = None, interval: float = 0.0) -> None:
        self._topology = topology
        self._scheduler = scheduler
        self._interval = interval
        self._calculated_at = float("-inf")
        self._timer: Handle | None = None
        self._ourself = topology.ourself.name
        self._graph_version = -1
        self._reported: dict[int, PeerEntry] = {}  # each peer's entry as of the last recalculation
        self._links = 0  # established connections the reported entries list, all told
        self._unicast: dict[int, int] = {}
        self._bridges: set[int] = set()  # neighbours whose link to us is a bridge (see ``_children``)
        self._broadcast: dict[int, list[int] | None] = {}
        self.recalculations = 0
        self.listeners: list[Callable[[], None]] = []
        if scheduler is not None:
            topology.graph_listeners.append(self._graph_changed)
        self._recalculate()

    # -- when ---------------------------------------------------------------------------------------

    def _graph_changed(self) -> None:
        if self._timer is not None or self._scheduler is None:
            return
        now = self._scheduler.now()
        self._timer = self._scheduler.call_later(max(0.0, self._calculated_at + self.spacing() - now), self._on_timer)

    def spacing(self, least: float | None = None) -> float:
        """Seconds between two passes over the whole graph in a burst of changes: ``least`` (our ``interval`` by
        default), or longer in a large mesh, so that passes walk at most ``WALK_RATE`` links a second. Deterministic
        (the graph's size, not a measured time), so the simulator's peers pace as the agents do."""
        return max(self._interval if least is None else least, min(MAX_WALK_SPACING, self._links / WALK_RATE))

    def _on_timer(self) -> None:
        self._timer = None
        if self._graph_version != self._topology.graph_version:
            self._recalculate()
            for listener in self.listeners:
                listener()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refresh(self) -> None:
        """Without a scheduler, bring the tables up to date with the graph now."""
        if self._scheduler is None and self._graph_version != self._topology.graph_version:
            self._recalculate()

    def _recalculate(self) -> None:
        self._calculated_at = self._scheduler.now() if self._scheduler is not None else 0.0
        self._graph_version = self._topology.graph_version
        self._update_adjacency()
        self._unicast, self._bridges = self._bfs_next_hops()
        self._broadcast = {}
        self.recalculations += 1

    # -- what ---------------------------------------------------------------------------------------

    def _update_adjacency(self) -> None:
        """Take the established connections each peer reports, for just the peers whose edges changed.

        The symmetric adjacency is not stored: a mesh of N peers would hold N sets in every peer's view
        (the simulator holds all the views at once); ``_linked`` works it out when a walk needs it.
        """
        peers, reported = self._topology.peers, self._reported
        dirty, self._topology.dirty = self._topology.dirty, set()
        links = self._links
        for name in dirty:
            old = reported.get(name)
            if old is not None:
                links -= len(old.established)
            entry = peers.get(name)
            if entry is None:
                reported.pop(name, None)
            else:
                reported[name] = entry  # immutable: its established connections are as they were reported
                links += len(entry.established)
        self._links = links

    def _linked(self, node: int) -> list[int]:
        """``node``'s neighbours over symmetric connections (both ends report each other), in order."""
        reported = self._reported
        entry = reported.get(node)
        if entry is None:
            return []
        linked = []
        for p in entry.established_order:
            other = reported.get(p)
            if other is not None and node in other.established:
                linked.append(p)
        return linked

    def _bfs_next_hops(self) -> tuple[dict[int, int], set[int]]:
        """Next hops by BFS from us, and which of our neighbours' links are bridges.

        The walk reads every link of every peer we reach, so finding the bridges costs one lookup per link: the
        link to neighbour ``n`` is a bridge when no link joins the peers reached through ``n`` to those reached
        through another neighbour (each then has a second way to us).
        """
        ourself, reported = self._ourself, self._reported
        order = self._linked(ourself)
        hops = {n: n for n in order}
        bridged = set(order)
        for node in order:  # a queue that grows as the walk goes, and is never popped
            first = hops[node]
            for n in reported[node].established_order:
                other = hops.get(n)
                if other == first:
                    continue  # reached the same way already: whether the link is symmetric changes nothing
                entry = reported.get(n)
                if entry is None or node not in entry.established:
                    continue  # one-sided: not a link
                if other is not None:
                    bridged.discard(other)
                    bridged.discard(first)
                elif n != ourself:
                    hops[n] = first
                    order.append(n)
        return hops, bridged

    def unicast(self, dest: int) -> int | None:
        """The neighbour to send to for ``dest``, or None if it is unreachable."""
        self._refresh()
        return self._unicast.get(dest)

    def reachable(self) -> dict[int, int]:
        self._refresh()
        return dict(self._unicast)

    def reachable_count(self) -> int:
        """How many peers we reach (as of the last recalculation), without a copy of the table."""
        self._refresh()
        return len(self._unicast)

    def neighbours(self) -> set[int]:
        """Peers we share a symmetric, established connection with."""
        self._refresh()
        return set(self._linked(self._ourself))

    def broadcast(self, source: int) -> list[int] | None:
        """Our children in ``source``'s BFS tree; None when the source, or we, are not on it."""
        self._refresh()
        if source in self._broadcast:
            return self._broadcast[source]
        children = self._children(source)
        self._broadcast[source] = children
        return children

    def _children(self, source: int) -> list[int] | None:
        if source != self._ourself and source not in self._unicast:
            return None  # not reachable from us: we are not on its tree
        hop = self._unicast.get(source)
        if hop in self._bridges:
            # Every path from the source comes to us over that bridge, and reaches our other neighbours only
            # through us: they are all our children, at no cost of a walk (a leaf, every peer of a tree).
            return [n for n in self._linked(self._ourself) if n != hop]
        return self._walk_children(source)

    def _walk_children(self, source: int) -> list[int] | None:
        """Our children in ``source``'s tree, by walking it from the source."""
        # A peer's parent is the first peer taken from the queue that links to it; only our neighbours can be our
        # children. The walk stops once we are taken (each of our neighbours has its parent then), or as soon as
        # all of them have one before that: none is ours (in a full mesh, right after the source's neighbours).
        mine = set(self._linked(self._ourself))
        waiting = len(mine - {source})
        parent: dict[int, int] = {source: source}
        queue: deque[int] = deque([source])
        while queue:
            node = queue.popleft()
            linked = self._linked(node)
            for n in linked:
                if n not in parent:
                    parent[n] = node
                    queue.append(n)
                    if n in mine:
                        waiting -= 1
            if node == self._ourself:
                return [n for n in linked if parent[n] == node]
            if not waiting and self._ourself in parent:
                return []
        return None

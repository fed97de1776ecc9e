"""The router: this peer's connections, its view of the topology, routes, and gossip dispatch.

Transports (real TCP or the simulator) hand it established connections and decoded messages;
it never does I/O itself, which is what lets one code base run both for real and simulated.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from weft.mesh.clock import Handle, Scheduler
from weft.mesh.codec import DecodeError, expect, expect_uint, field, pack, unpack
from weft.mesh.gossip import (
    BROADCAST,
    DIGEST,
    DIGEST_CAPABILITY,
    GOSSIP,
    UNICAST,
    Digester,
    GossipChannel,
    GossipData,
    Gossiper,
    GossipSender,
    SeenPayloads,
)
from weft.mesh.peer import NAME_BITS, PeerInfo, format_name
from weft.mesh.routes import Routes
from weft.mesh.topology import KIND as TOPOLOGY_KIND
from weft.mesh.topology import ConnectionSummary, PeerEntry, Topology, TopologyUpdate
from weft.metrics import Metrics

if TYPE_CHECKING:
    from weft.mesh.crypto import SessionKeys

log = logging.getLogger(__name__)

TOPOLOGY = "topology"
MAX_CHANNEL_NAME = 64
MAX_DIGEST_PEERS = 1 << 16  # peers a topology digest may name (the simulator runs 3,000)
# Bytes a second of announcements (our entry, broadcast) each peer receives from all the others in a burst of changes:
# a forming mesh of 100 sent 29 MB per agent without it, each entry decoded once by every agent (see announce_spacing)
ANNOUNCE_BUDGET = 64 * 1024
MAX_ANNOUNCE_SPACING = 10.0  # seconds; also bounds the grace before unreachable peers are forgotten (twice this)
DIGEST_SPACING = 1.0  # seconds: the least time between two digests of one kind we answer from one neighbour
# A view filling in (VIEW_BURST peers or more new to it in one burst: a mesh forming, a host joining a large one, two
# halves merging) holds the work that can wait for it (see Router.view_settles_in): settled once no peer has been new
# to it for VIEW_QUIET seconds, and never held longer than VIEW_HOLD_MAX from the first new peer of the burst. A hub
# told of by a hundred hosts at once takes them in waves a second or two apart on two cores: a quiet of 2 s took the
# gap between two waves for the end, and the dials that followed starved the hub of the rest.
VIEW_BURST = 8
VIEW_QUIET = 5.0
VIEW_HOLD_MAX = 15.0
# Meanwhile the topology's listeners (the data plane's tables, the connection maker) are told at most this often: each
# pass walks the whole view, and a spoke's view grows in a dozen steps in the first seconds of a forming mesh.
VIEW_FILLING_SPACING = 1.0


class Conn(Protocol):
    """An established control connection, as the router, the transport's status and the data plane read it."""

    remote: PeerInfo
    remote_address: str  # where the remote peer can be dialled, reported in topology
    outbound: bool
    conn_uid: int  # both ends compute the same number; the lower one wins a duplicate
    encrypted: bool
    sender: GossipSender
    remote_ip: str | None  # the underlay address the socket sees (None where there is no socket: the simulator)
    data_keys: SessionKeys | None  # the data path's keys for this link (None without a secret)
    secret: bytes | None  # the mesh secret the session was keyed with (None without one)
    caps: frozenset[str]  # what the peer reads beyond its protocol version (handshake.CAPABILITIES)

    @property
    def info(self) -> str:
        """Protocol version and cipher, for status."""
        ...

    def close(self, reason: str) -> None: ...


class Router:
    def __init__(
        self,
        ourself: PeerInfo,
        scheduler: Scheduler,
        metrics: Metrics,
        *,
        gossip_interval: float = 30.0,
        conn_limit: int = 100,
        update_delay: float = 0.05,
        gc_grace: float = 1.0,
        route_interval: float = 0.1,
        announce_interval: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        self.ourself = ourself
        self.scheduler = scheduler
        self.metrics = metrics
        self.gossip_interval = gossip_interval
        self.conn_limit = conn_limit
        self.update_delay = update_delay
        self.announce_interval = announce_interval
        self.gc_grace = gc_grace
        self._unreachable_since: dict[int, float] = {}
        self._gc_handle: Handle | None = None
        self._full_state_sent: set[int] = set()  # peers whose current connection has had our full state
        self._digests_answered: dict[tuple[int, str, bool], float] = {}  # (peer, channel, reply): when, lately
        self._seen_payloads = SeenPayloads()  # broadcasts on channels we do not have, passed on lately
        self.rng = rng or random.Random()
        self.connections: dict[int, Conn] = {}
        self.topology = Topology(ourself)
        self.routes = Routes(self.topology, scheduler, route_interval)
        self.routes.listeners.append(self._topology_changed)  # listeners see the routes of the change
        self.channels: dict[str, GossipChannel] = {}
        self.topology_listeners: list[Callable[[], None]] = []
        self.peer_gone_listeners: list[Callable[[PeerEntry], None]] = []
        self._announce_handle: Handle | None = None
        self._announce_at = float("inf")  # when the scheduled announcement goes out
        self._announced_at = float("-inf")
        self._announced_links: set[int] = set()  # our connections as of the last announcement
        self._changed_handle: Handle | None = None
        self._listeners_told_at = float("-inf")
        self._gossip_handle: Handle | None = None
        self._view_grew_at = float("-inf")  # when a peer last became new to our view
        self._view_growing_since = float("-inf")  # when the current burst of new peers began
        self._view_burst = 0  # peers new to our view in the current burst
        self._view_size = 1
        self.view_changed_at = scheduler.now()  # when our view last gained or lost a peer (scheduler time)
        topology_gossiper = _TopologyGossiper(self)
        self._topology_channel = self.new_channel(TOPOLOGY, topology_gossiper, topology_gossiper)
        self.metrics.peers.set(1)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._schedule_periodic_gossip()

    def stop(self) -> None:
        for handle in (self._announce_handle, self._changed_handle, self._gossip_handle, self._gc_handle):
            if handle is not None:
                handle.cancel()
        self.routes.stop()

    def new_channel(self, name: str, gossiper: Gossiper, digester: Digester | None = None) -> GossipChannel:
        channel = GossipChannel(name, self, gossiper, digester)
        self.channels[name] = channel
        return channel

    # -- connections -----------------------------------------------------------------------------

    def add_connection(self, conn: Conn) -> str | None:
        """Register a connection whose handshake finished; returns why it was refused, or None."""
        name = conn.remote.name
        if name == self.ourself.name:
            return "connection to self"
        existing = self.connections.get(name)
        if existing is not None:
            restarted = existing.remote.uid != conn.remote.uid
            if not restarted and conn.conn_uid >= existing.conn_uid:
                return f"duplicate connection to {conn.remote.label()}"
            del self.connections[name]
            existing.close(
                "the peer restarted" if restarted else f"replaced by a simultaneous connection to {conn.remote.label()}"
            )
        elif len(self.connections) >= self.conn_limit:
            return f"connection limit ({self.conn_limit}) reached"
        known = self.topology.peers.get(name)
        self.connections[name] = conn
        self._full_state_sent.discard(name)
        self._local_connections_changed()
        if known is None or known.uid != conn.remote.uid:
            # A peer new to us (or restarted) may know nothing we know: exchange state. Two peers already in each
            # other's view share the mesh's deltas, and anti-entropy covers anything missed, so a discovered full
            # mesh does not ship the whole state N times.
            self._send_full_state(conn)
        log.info(
            "connection established with %s at %s (%s, %s)",
            conn.remote.label(),
            conn.remote_address,
            "outbound" if conn.outbound else "inbound",
            "encrypted" if conn.encrypted else "unencrypted",
        )
        return None

    def _send_full_state(self, conn: Conn) -> None:
        """Our state, for a peer that may know nothing we know. A channel with digests sends its digest to a peer
        that reads them (``DIGEST_CAPABILITY``): the peer answers with what we lack and asks for what it lacks, so
        only the difference crosses. In a forming mesh, most peers we are new to already know most of what we know:
        a full state each (230 KB at 100 peers) made most of a forming mesh's gossip. While our view holds only
        ourselves (we are the one joining) the full state is the smaller, and is sent as before."""
        self._full_state_sent.add(conn.remote.name)
        by_digest = DIGEST_CAPABILITY in conn.caps and len(self.topology.peers) > 1
        for channel in self.channels.values():
            if by_digest and channel.digester is not None:
                conn.sender.send_digest(channel.name, channel.digester.digest(), reply=False)
                continue
            data = channel.gossiper.gossip()
            if data is not None:
                conn.sender.send(channel.name, data)

    def remove_connection(self, conn: Conn, reason: str) -> None:
        name = conn.remote.name
        if self.connections.get(name) is not conn:
            return
        del self.connections[name]
        self._full_state_sent.discard(name)
        for key in [k for k in self._digests_answered if k[0] == name]:
            del self._digests_answered[key]
        self.metrics.terminations.inc()
        log.info("connection to %s ended: %s", conn.remote.label(), reason)
        self._local_connections_changed()

    def _local_connections_changed(self) -> None:
        self.topology.set_local_connections(
            ConnectionSummary(c.remote.name, c.remote_address, c.outbound, True) for c in self.connections.values()
        )
        self._schedule_announce()
        self._topology_changed()

    def _schedule_announce(self) -> None:
        """Coalesce bursts of local changes into one broadcast of our entry: at most one per ``announce_interval``,
        and in a large mesh at most one per :meth:`announce_spacing`. A peer joining a dense mesh changes its entry
        with every connection, and each announcement crosses the mesh. A connection lost since the last announcement
        goes out at ``announce_interval`` whatever the mesh's size: routes must stop using it."""
        now = self.scheduler.now()
        lost = not self._announced_links.issubset(self.connections)
        spacing = self.announce_interval if lost else max(self.announce_interval, self.announce_spacing())
        at = max(now + self.update_delay, self._announced_at + spacing)
        if self._announce_handle is not None:
            if self._announce_at <= at:
                return
            self._announce_handle.cancel()  # a lost connection moves a budgeted announcement forward
        self._announce_at = at
        self._announce_handle = self.scheduler.call_later(at - now, self._announce)

    def announce_spacing(self) -> float:
        """Seconds between two announcements of our entry in a burst, so that all peers' announcements together
        cost each peer at most ``ANNOUNCE_BUDGET`` bytes a second: every peer receives, decodes and passes on each
        one. A mesh of 100 in full mesh (entries of 2.3 KB) spaces them 3.5 s apart; up to about 40 peers the
        ``announce_interval`` is the longer. Only peers we reach count, and never more than ``MAX_ANNOUNCE_SPACING``:
        a neighbour that fills our view with made-up peers cannot hold our announcements back for an hour."""
        hearing = self.routes.reachable_count() + 1  # who our announcements reach: made-up entries do not count
        return min(MAX_ANNOUNCE_SPACING, hearing * len(self.topology.our_entry.packed()) / ANNOUNCE_BUDGET)

    def announce_pending(self) -> None:
        """Announce our entry now if an announcement is waiting (for the spacing or the budget)."""
        if self._announce_handle is not None:
            self._announce_handle.cancel()
            self._announce()

    def _announce(self) -> None:
        self._announce_handle = None
        self._announced_at = self.scheduler.now()
        self._announced_links = set(self.connections)
        entry = self.topology.our_entry
        self._topology_channel.broadcast(TopologyUpdate({entry.name: entry}))

    def _topology_changed(self) -> None:
        """Tell the topology's listeners, once for a burst of changes: ``update_delay`` after the first, and in a
        large mesh no more often than ``routes.spacing`` allows (the listeners walk the whole view: what to dial, who
        is gone, the data plane's tables), nor while the view fills in than VIEW_FILLING_SPACING."""
        if self._changed_handle is None:
            now = self.scheduler.now()
            spacing = self.routes.spacing(self.update_delay)
            if self.view_settles_in() > 0:
                spacing = max(spacing, VIEW_FILLING_SPACING)
            at = max(now + self.update_delay, self._listeners_told_at + spacing)
            self._changed_handle = self.scheduler.call_later(at - now, self._after_topology_change)

    def _after_topology_change(self) -> None:
        self._changed_handle = None
        self._listeners_told_at = self.scheduler.now()
        self._collect_garbage()
        self._note_view_size()
        self.metrics.peers.set(len(self.topology.peers))
        for listener in self.topology_listeners:
            listener()

    def _collect_garbage(self) -> None:
        """Forget peers that stayed unreachable for ``gc_grace``, or for twice the spacing of announcements in a large
        mesh, where that is longer.

        The grace absorbs ordering: a peer's entry can arrive a moment before the entry of the
        neighbour that connects it to us, and forgetting it then would lose it until the next full
        gossip.
        """
        now = self.scheduler.now()
        # A peer's entry can reach us before the announcement of the connection that links it (the hub it joined
        # by announces within its budget, 3.5 s at 100 peers): forgetting it meanwhile loses it until its next.
        grace = max(self.gc_grace, 2 * self.announce_spacing())
        unreachable = self.topology.unreachable()
        self._unreachable_since = {n: self._unreachable_since.get(n, now) for n in unreachable}
        # The slack absorbs float rounding: the timer below, set for since + grace, can fire a hair before it, and
        # would then set itself again for a delay too small to move the clock (an endless loop on a virtual one).
        expired = {n for n, since in self._unreachable_since.items() if now - since >= grace - 1e-6}
        for entry in self.topology.forget(expired):
            del self._unreachable_since[entry.name]
            log.info("forgetting unreachable peer %s(%s)", format_name(entry.name), entry.nickname)
            for listener in self.peer_gone_listeners:
                listener(entry)
        if self._unreachable_since and self._gc_handle is None:
            wait = grace - (now - min(self._unreachable_since.values()))
            self._gc_handle = self.scheduler.call_later(max(wait, 0.0), self._gc_timer)

    def _gc_timer(self) -> None:
        self._gc_handle = None
        self._after_topology_change()

    # -- gossip in ------------------------------------------------------------------------------

    def handle_message(self, conn: Conn, msg: dict) -> None:
        """Dispatch one decoded control message; malformed ones are counted and dropped.

        What a later version may add is let through (docs/protocol.md, "Compatibility between versions"):
        fields we do not know are ignored, an unknown type is counted and dropped. A broadcast on a channel we do
        not have is passed on down its tree as it came, and a unicast for another peer is forwarded whatever its
        channel; other messages on a channel we do not have are counted and dropped.
        """
        try:
            kind = field(msg, "t", str, "message")
            if kind not in (GOSSIP, BROADCAST, UNICAST, DIGEST):
                raise DecodeError("message", f"unknown message type {kind[:MAX_CHANNEL_NAME]!r}")
            channel_name = field(msg, "ch", str, "message")
            payload = field(msg, "d", bytes, "message")
            if len(channel_name) > MAX_CHANNEL_NAME:
                raise DecodeError("message", "channel name too long")
            self._count_bytes(channel_name, "in", len(payload))
            if kind in (BROADCAST, UNICAST):
                source = expect_uint(field(msg, "src", int, "message"), NAME_BITS, "message", "src")
            if kind == UNICAST:
                dest = expect_uint(field(msg, "dst", int, "message"), NAME_BITS, "message", "dst")
                if dest != self.ourself.name:
                    # Forwarding needs only the envelope: an older peer on the route must not cut off two newer ones.
                    if self.relay_unicast(channel_name, source, dest, payload) and channel_name not in self.channels:
                        self.metrics.gossip_unknown_relayed.labels("unicast").inc()
                    return
            channel = self.channels.get(channel_name)
            if channel is None:
                if kind == BROADCAST:
                    self._pass_on_broadcast(channel_name, source, payload, came_from=conn.remote.name)
                else:
                    self.metrics.gossip_dropped.labels("unknown_channel").inc()
                return
            if kind == DIGEST:
                self._on_digest(conn, channel, payload, reply=msg.get("re") is True)
            elif kind == GOSSIP:
                repair = msg.get("rp") is True  # they did not take us for new (a repair, anti-entropy)
                if (
                    not repair
                    and conn.remote.name not in self._full_state_sent
                    and self.connections.get(conn.remote.name) is conn
                ):
                    self._send_full_state(conn)  # they took us for new: answer in kind
                delta = channel.gossiper.on_gossip(payload)
                if delta is not None:
                    self.relay_broadcast(channel_name, self.ourself.name, delta, came_from=conn.remote.name)
            elif kind == BROADCAST:
                delta = channel.gossiper.on_gossip_broadcast(source, payload)
                if delta is not None:
                    self.relay_broadcast(channel_name, source, delta, came_from=conn.remote.name)
            else:  # a unicast for us
                channel.gossiper.on_gossip_unicast(source, payload)
        except DecodeError as exc:
            self.metrics.decode_errors.labels(exc.kind).inc()
            log.warning("dropped a malformed message from %s: %s", conn.remote.label(), exc)

    def _on_digest(self, conn: Conn, channel: GossipChannel, payload: bytes, *, reply: bool) -> None:
        """A neighbour's digest: send it what it lacks; if it holds something we lack, answer with our own digest
        (unless this is its answer to ours), so that it sends us that in turn."""
        if channel.digester is None:
            self.metrics.gossip_dropped.labels("unknown_channel").inc()
            return
        # A digest costs its sender a few bytes and may cost us the whole state: one of each kind per neighbour and
        # channel in DIGEST_SPACING is plenty (a neighbour turns to us at most once a round, 24 s at the least).
        key, now = (conn.remote.name, channel.name, reply), self.scheduler.now()
        if now - self._digests_answered.get(key, float("-inf")) < DIGEST_SPACING:
            self.metrics.gossip_dropped.labels("digest_too_soon").inc()
            return
        self._digests_answered[key] = now
        missing, lacking = channel.digester.compare(payload)
        if missing is not None:
            conn.sender.send_repair(channel.name, missing)
        if lacking and not reply:
            conn.sender.send_digest(channel.name, channel.digester.digest(), reply=True)

    # -- gossip out -----------------------------------------------------------------------------

    def _pass_on_broadcast(self, channel: str, source: int, payload: bytes, came_from: int) -> None:
        """A broadcast on a channel we do not have (a later version's): down ``source``'s tree as it came,
        so newer peers that reach each other only through us still hear each other; each payload once."""
        if source == self.ourself.name or not self._seen_payloads.first_time(channel, source, payload):
            self.metrics.gossip_dropped.labels("repeat").inc()
        elif self.relay_broadcast(channel, source, payload, came_from):
            self.metrics.gossip_unknown_relayed.labels("broadcast").inc()

    def relay_broadcast(self, channel: str, source: int, data: GossipData | bytes, came_from: int | None) -> int:
        """Pass ``data`` on: our own news to every neighbour, a relayed broadcast down ``source``'s tree. Returns
        how many neighbours it went to.

        Trees are those of the last recalculation of routes, a fraction of a second behind while the mesh forms.
        The source tells each neighbour itself, as its tree in a view that lags cannot be trusted to; a relay passes
        it to its children in the source's tree, plus any neighbour our routes cannot reach yet (on no tree in our
        view), or to every neighbour when we are on no tree of the source (a peer relays only what was new to it,
        so a flood stops where the data is already known)."""
        hops = None if source == self.ourself.name else self.routes.broadcast(source)
        if hops is None:
            targets = set(self.connections)
        else:
            targets = set(hops) | {n for n in self.connections if self.routes.unicast(n) is None}
        targets -= {came_from, source}
        sent = 0
        for name in targets:
            conn = self.connections.get(name)  # trees may be up to one recalculation behind
            if conn is not None:
                conn.sender.send_broadcast(channel, source, data)
                sent += 1
        return sent

    def broadcast(self, channel: str, data: GossipData) -> None:
        """A channel's own change, down our broadcast tree (the channels' ``Relay``)."""
        self.relay_broadcast(channel, self.ourself.name, data, came_from=None)

    def unicast(self, channel: str, dest: int, payload: bytes) -> bool:
        """A channel's own message to one peer (the channels' ``Relay``)."""
        return self.relay_unicast(channel, self.ourself.name, dest, payload)

    def _fanout(self) -> int:
        return 2 * max(1, math.ceil(math.log2(len(self.topology.peers) + 1)))

    def relay_unicast(self, channel: str, source: int, dest: int, payload: bytes) -> bool:
        hop = self.routes.unicast(dest)
        conn = self.connections.get(hop) if hop is not None else None
        if conn is None:
            self.metrics.gossip_dropped.labels("unreachable").inc()
            return False
        conn.sender.send_unicast(channel, source, dest, payload)
        return True

    def count_sent(self, messages: list[dict]) -> None:
        for m in messages:
            self._count_bytes(m["ch"], "out", len(m["d"]))

    def _count_bytes(self, channel: str, direction: str, n: int) -> None:
        """Gossip bytes by channel: ours by name, any other as "unknown" (its name is the sender's choice)."""
        self.metrics.gossip_bytes[channel if channel in self.channels else "unknown", direction] += n

    def _schedule_periodic_gossip(self) -> None:
        jitter = self.rng.uniform(0.8, 1.2)
        self._gossip_handle = self.scheduler.call_later(self.gossip_interval * jitter, self._periodic_gossip)

    def _periodic_gossip(self) -> None:
        """Anti-entropy with a few random neighbours, repairing anything a delta missed: a channel's digest to a
        neighbour that reads digests (each end then sends the other what it lacks), its full state otherwise."""
        self._schedule_periodic_gossip()
        if not self.connections:
            return
        fanout = min(len(self.connections), self._fanout())
        chosen = [self.connections[name] for name in self.rng.sample(sorted(self.connections), fanout)]
        for channel in self.channels.values():
            digest: bytes | None = None
            data: GossipData | None = None
            asked = False  # for the full state (which may be None: nothing to say)
            for conn in chosen:
                if channel.digester is not None and DIGEST_CAPABILITY in conn.caps:
                    if digest is None:
                        digest = channel.digester.digest()
                    conn.sender.send_digest(channel.name, digest, reply=False)
                    continue
                if not asked:
                    data, asked = channel.gossiper.gossip(), True
                if data is not None:
                    # Not a full state for a peer taken for new: flagged so, a neighbour that knows the flag does
                    # not answer with all of its own (an older one ignores it, and answers once a connection).
                    conn.sender.send_repair(channel.name, data)

    # -- views ----------------------------------------------------------------------------------

    def view_settles_in(self) -> float:
        """Seconds until our view counts as settled (0: it is): while it fills in (``VIEW_BURST`` peers or more new
        to it in one burst), VIEW_QUIET after the last new peer, and at most VIEW_HOLD_MAX after the first.

        A hundred hosts told of one at once learn of each other through it within seconds when nothing else competes
        for the CPU; dialling each other and agreeing keys as each peer appeared left the hub too little of it, and
        the views took 20 to 40 s on two cores (5.5 s, median, with the hold). What can wait for the view
        (discovery's dials, first end-to-end agreements) waits this long. A peer or two joining a settled mesh holds
        nothing."""
        if self._view_burst < VIEW_BURST:
            return 0.0
        now = self.scheduler.now()
        settled_at = min(self._view_grew_at + VIEW_QUIET, self._view_growing_since + VIEW_HOLD_MAX)
        # A timer set for ``settled_at`` can fire a hair before it (float rounding): what is left then counts as
        # settled, or the caller would wait again for a delay too small to move a virtual clock, and loop.
        left = settled_at - now
        return left if left > 1e-6 else 0.0

    def _view_grew(self, new: int) -> None:
        now = self.scheduler.now()
        if now - self._view_grew_at >= VIEW_QUIET:
            self._view_growing_since, self._view_burst = now, 0
        self._view_grew_at = now
        self._view_burst += new
        self._note_view_size()

    def _note_view_size(self) -> None:
        """Keep ``view_changed_at``: exact for peers gossip brings (the moment they are merged), at the next
        topology pass for the rest (a peer forgotten, a neighbour's entry made by our own connection)."""
        size = len(self.topology.peers)
        if size != self._view_size:
            self._view_size, self.view_changed_at = size, self.scheduler.now()

    def peers_status(self) -> list[dict]:
        return [
            {
                "name": format_name(e.name),
                "nickname": e.nickname,
                "uid": e.uid,
                "version": e.version,
                "connections": [
                    {
                        "peer": format_name(c.peer),
                        "nickname": self.topology.peers[c.peer].nickname if c.peer in self.topology.peers else "",
                        "address": c.address,
                        "outbound": c.outbound,
                        "established": c.established,
                    }
                    for c in e.connections
                ],
            }
            for e in sorted(self.topology.peers.values(), key=lambda e: e.name)
        ]


class _TopologyGossiper:
    """The topology channel: merges peer entries and keeps routes and the connection maker informed."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def gossip(self) -> TopologyUpdate:
        return self._router.topology.full_update()

    def on_gossip(self, payload: bytes) -> TopologyUpdate | None:
        """Merge a neighbour's full state or repair, and pass on what it told us that was new: each entry down its
        own peer's broadcast tree, as if that peer's broadcast had reached us this way. Entries of peers on no tree
        in our view (not reachable yet, or made up) go in one message as our own news, to every neighbour, as all of
        them once did: one message whatever their number. Returns None: the passing on is done.

        As our own news, each new entry went to every neighbour: in a forming full mesh, where every peer is a leaf
        of every other's tree, each entry a repair carried went to every neighbour from every peer it repaired,
        half of the topology gossip of 100 agents forming. Down its tree it goes to no one there, while a partition
        healing over one connection still spreads each side's entries over the other (its peers' trees run through
        the new link). Should the peer's own broadcast come to us later, it is known by then and goes no further:
        our children in its tree have it from us already."""
        delta = self._merge(payload)
        if delta is None:
            return None
        router = self._router
        ourself = router.ourself.name
        ours: dict[int, PeerEntry] = {}  # entries of peers on no tree we know: our own news, one message
        passed_on = 0
        for name, entry in delta.entries.items():
            if name == ourself:
                continue
            if router.routes.broadcast(name) is None:
                ours[name] = entry
            else:
                passed_on += router.relay_broadcast(TOPOLOGY, name, TopologyUpdate({name: entry}), None)
        if ours:
            passed_on += router.relay_broadcast(TOPOLOGY, ourself, TopologyUpdate(ours), None)
        if passed_on:
            # If our own entry changed too and waits to be announced, it goes now, so nobody holds the entries we
            # passed on without the connection that links them to us (they would be forgotten as unreachable).
            router.announce_pending()
        return None

    def on_gossip_broadcast(self, source: int, payload: bytes) -> TopologyUpdate | None:
        return self._merge(payload)

    def on_gossip_unicast(self, source: int, payload: bytes) -> None:
        return None

    def digest(self) -> bytes:
        """Every entry's header, ``[name, uid, version]``: about 20 bytes a peer where its entry is 25 a connection."""
        return pack([[e.name, e.uid, e.version] for e in self._router.topology.peers.values()])

    def compare(self, payload: bytes) -> tuple[TopologyUpdate | None, bool]:
        topology = self._router.topology
        theirs: dict[int, tuple[int, int]] = {}
        # Entries are three numbers each: a digest of more peers than a mesh holds (a 16 MiB frame can carry some
        # 700,000) is refused at its header, before a Python object is made for each.
        for item in expect(unpack(payload, TOPOLOGY_KIND, most=MAX_DIGEST_PEERS), list, TOPOLOGY_KIND, "digest"):
            if not isinstance(item, list) or len(item) != 3:
                raise DecodeError(TOPOLOGY_KIND, "an entry of a digest is not [name, uid, version]")
            name = expect_uint(item[0], NAME_BITS, TOPOLOGY_KIND, "name")
            uid = expect_uint(item[1], 64, TOPOLOGY_KIND, "uid")
            version = expect_uint(item[2], 64, TOPOLOGY_KIND, "version")
            theirs[name] = (version, uid)
        absent = (-1, -1)
        missing = {n: e for n, e in topology.peers.items() if (e.version, e.uid) > theirs.get(n, absent)}
        lacking = any(not topology.knows(n, uid, version) for n, (version, uid) in theirs.items())
        return (TopologyUpdate(missing) if missing else None), lacking

    def _merge(self, payload: bytes) -> TopologyUpdate | None:
        router = self._router
        before, known = router.topology.graph_version, len(router.topology.peers)
        delta, reannounce = router.topology.merge(TopologyUpdate.decode(payload, router.topology.knows))
        if len(router.topology.peers) > known:
            router._view_grew(len(router.topology.peers) - known)
        if reannounce:
            router._schedule_announce()
        if router.topology.graph_version != before or delta.entries:
            router._topology_changed()
        return delta if delta.entries else None

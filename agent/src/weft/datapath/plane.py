"""The data plane's controller: turns the mesh's view into kernel state and sleeve tables.

It runs on the agent's event loop and never touches packets. Inputs: the router's connections and
routes, the ``macs`` gossip channel, this bridge's MACs (netlink), and the heartbeats and probes the
sleeve's data thread hands over. Outputs: FDB entries for the kernel fast path, ``Forwarding`` tables
for the sleeve, status rows and metrics. Stopping leaves every kernel object in place, so traffic on
the fast path keeps flowing while the agent restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from weft.datapath import fdb
from weft.datapath.endtoend import AGREEMENT_TYPES, EndToEnd
from weft.datapath.macs import MacTable
from weft.datapath.paths import FAST, PATHS, RELAY, PathState, ladder, trusted
from weft.datapath.probe import ETHERTYPE, build_probe, parse_probe
from weft.mesh.codec import DecodeError, expect, pack, unpack
from weft.mesh.peer import format_name, parse_name
from weft.mesh.router import VIEW_FILLING_SPACING

if TYPE_CHECKING:
    from weft.config import AgentConfig
    from weft.datapath.fastguard import FastGuard
    from weft.datapath.netdev import NetDev
    from weft.datapath.portguard import PortGuard
    from weft.datapath.sleeve import Sleeve
    from weft.mesh.router import Conn, Router
    from weft.mesh.topology import PeerEntry
    from weft.metrics import Metrics

log = logging.getLogger(__name__)

MACS = "macs"
FORGED_SOURCE_MAC = "forged_source_mac"  # drop reason: a container sent a source MAC not attached to its port
VNI = 0x5746  # one overlay per mesh; the bridge keeps hosts apart, not VNIs
DEAD_AFTER = 3  # heartbeat intervals without news before a path counts as down
WARMUP_AFTER = 4  # intervals after start before we remove kernel state we did not write this run
PMTU_EVERY = 5  # probe rounds between path-MTU probe rounds, after one each for the first three
TICKS = 5  # passes per interval: probe rounds are due at random phases, a few in each pass
TRAFFIC_EVERY = 2  # intervals between readings of the fast-path guard's per-peer counters (an nft call)
KERNEL_SPACING = 0.5  # seconds between two programmings of the kernel's FDB in a burst of changes
RECOMPUTE_SPACING = 0.1  # seconds between two recomputations of the forwarding tables in a burst of changes
FDB_REREAD = 30.0  # seconds after which a programming reads the kernel's FDB again rather than trust what it applied
E2E_HOLD = 10.0  # seconds a relayed peer that discovery is dialling waits for end-to-end keys
SLEEVE_OVERHEAD = 80  # Ethernet, virtio header, sleeve header and AEAD tag, per datagram (upper bound)
E2E_OVERHEAD = SLEEVE_OVERHEAD + 10  # the end-to-end form: 6 more header bytes, 4 more nonce bytes
PORTGUARD_POLL_EVERY = 5  # intervals between reads of the port guard's counters (about a millisecond each)
# Intervals between re-reads of the attach state for the port guard, in case the MAC watcher (which re-reads after a
# lost event) stopped: each decodes the whole FDB, the overlay's entries too (15 ms of CPU with 40 peers).
GUARD_RESYNC = 60


def device_names(bridge: str, vxlan_port: int) -> tuple[str, str]:
    """The VXLAN and TAP device names that go with a bridge."""
    return f"vxlan-{vxlan_port}", f"{bridge}-tap"


class DataPlane:
    def __init__(
        self,
        config: AgentConfig,
        router: Router,
        metrics: Metrics,
        *,
        encrypting: bool = False,
        secrets: Callable[[], list[bytes]] = list,
    ) -> None:
        self.config = config
        self.router = router
        self.metrics = metrics
        self.ourself = router.ourself.name
        self.bridge = config.bridge
        self.vxlan, self.tap = device_names(config.bridge, config.vxlan_port)
        self.udp_port = config.listen_host_port()[1]
        self.interval = config.path_interval
        self.dead = DEAD_AFTER * config.path_interval
        self.grace = config.fast_path_grace
        self.trusted = config.trusted_networks()
        self.paths: dict[int, PathState] = {}
        # Closed connections' path state: kept `dead` seconds for a re-key, and `grace` seconds for a peer
        # that was on the fast path, whose kernel entries keep its containers reachable while its agent restarts.
        self._ended: dict[int, tuple[float, PathState]] = {}
        self.relayed: dict[int, int] = {}  # peer -> next hop, for peers with no usable direct path
        self.macs = MacTable(self.ourself, self._changed)
        self.nd: NetDev | None = None
        self.sleeve: Sleeve | None = None
        self.workers = config.workers()
        self._watcher: Any = None
        self.portguard: PortGuard | None = None
        self._guarded: set[str] = set()  # container ports already made non-learning
        self._guard_ticks = 0
        self._ticks = 0
        self._rounds: list[tuple[float, int]] = []  # (when a probe round is due, peer): see _tick
        self._fast_read_at = float("-inf")
        self._rng = random.Random()  # the phases and jitter of probe rounds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._recompute_handle: asyncio.Handle | None = None
        self._recomputed_at = float("-inf")  # when the forwarding tables were last recomputed
        self._kernel_handle: asyncio.Handle | None = None
        self._kernel_at = float("-inf")  # when the kernel was last programmed
        self._kernel_urgent = False  # the next programming takes a peer off the fast path: it waits for nothing
        self._fast_wanted: frozenset[int] = frozenset()  # the neighbours the last recomputation wanted on the fast path
        self._fdb_have: fdb.FdbState | None = None  # what the kernel's FDB holds, as last read or applied
        self._fdb_read_at = float("-inf")  # when it was last read
        self._relayed_since: dict[int, float] = {}  # relayed peers, since when
        self._e2e_handle: asyncio.TimerHandle | None = None
        self._e2e_at = 0.0  # when it fires (time.monotonic)
        # The peers the connection maker is dialling (they are about to be neighbours); set by the agent.
        self.dialling: Callable[[], set[int]] = set
        # Seconds until the mesh view settles (Router.view_settles_in): first agreements wait for it; set by the agent.
        self.view_settles_in: Callable[[], float] = float
        self._want: tuple[fdb.FdbState, bool] | None = None  # kernel state to program next, and whether to delete
        self._started_at = 0.0
        self._stopped = False
        self._probe_sock: socket.socket | None = None
        self._adopted_fast: set[str] = set()  # peer IPs the kernel already sent to fast when we started
        self._hello: set[int] = set()  # new connections: a heartbeat goes out as soon as the sleeve has their keys
        self.encrypting = encrypting  # a mesh secret is set: plaintext only inside the trusted subnets
        self._next_hop: dict[int, int] = {}  # the sleeve's next hop per peer, as of the last recomputation
        # Where the kernel floods (the all-zero FDB entry's addresses), as last applied or read, and the neighbours
        # told so in their heartbeats ("kf"): those in the fast set the kernel already floods to. A neighbour takes our
        # broadcasts from the sleeve unless told; it is told only once the kernel floods to it, and told otherwise as
        # soon as the path leaves the fast set, so a change of path duplicates a flood for a moment rather than lose it.
        self._kernel_floods: frozenset[str] = frozenset()
        self._told_floods: frozenset[int] = frozenset()
        self.e2e = EndToEnd(
            self.ourself,
            router.ourself.uid,
            secrets,
            metrics,
            _EndToEndIo(self),
            interval=self.interval,
            dead=self.dead,
        )
        self.guard: FastGuard | None = None
        self._channel = router.new_channel(MACS, self.macs)
        router.topology_listeners.append(self._changed)
        router.peer_gone_listeners.append(self._peer_gone)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        from weft.datapath.attach import gso_size_for, limit_gso
        from weft.datapath.macwatch import MacWatcher
        from weft.datapath.netdev import NetDev
        from weft.datapath.sleeve import open_sleeve

        self._loop = asyncio.get_running_loop()
        self._started_at = time.monotonic()
        c = self.config
        self.nd = NetDev()
        self.nd.ensure_bridge(self.bridge, c.mtu)
        limit_gso(self.nd, self.bridge, gso_size_for(self.encrypting))  # the host's own traffic (expose)
        self.nd.ensure_vxlan(self.vxlan, bridge=self.bridge, vni=VNI, port=c.vxlan_port, mtu=c.mtu)
        # Multi-queue whatever the number of workers, so changing it needs no new device; a single-queue TAP
        # (made by a release before the workers) is replaced once.
        self.nd.ensure_tap(self.tap, bridge=self.bridge, mtu=c.mtu, multi_queue=True)
        self._start_portguard()
        self._guard_fast_path_from_the_start()
        self._adopted_fast = set(self._read_fdb().vxlan.get(fdb.ZERO_MAC, set()))
        self._kernel_floods = frozenset(self._adopted_fast)
        if self._adopted_fast:
            log.info("kept the kernel fast path to %d peer(s) from the last run", len(self._adopted_fast))
        self.sleeve = open_sleeve(
            self.ourself,
            tap=self.tap,
            listen=(c.listen_host_port()[0], self.udp_port),
            workers=self.workers,
            on_control=self._from_thread(self._on_control),
            on_probe=lambda frame: None,  # probes never reach the TAP: see _open_probe_socket
            on_pair_control=self._from_thread(self.e2e.on_pair_message),
        )
        self.sleeve.start()
        self._watcher = MacWatcher(
            self.bridge, (self.vxlan, self.tap), self._from_thread(self._on_local_macs), settle=0.05
        )
        self._watcher.start()
        self._open_probe_socket()
        self._tick_handle = self._loop.call_later(0, self._tick)
        log.info(
            "data plane up: bridge %s, fast path %s (UDP %d), sleeve %s (UDP %d, %d worker(s)), MTU %d",
            self.bridge,
            self.vxlan,
            c.vxlan_port,
            self.tap,
            self.udp_port,
            self.workers,
            c.mtu,
        )

    def _guard_fast_path_from_the_start(self) -> None:
        """Before anything else: the nftables guard, admitting only what the kernel may still send to.

        What the last run left (guard set and VXLAN FDB) keeps fast traffic flowing while the agent
        restarts, but with a secret set only towards trusted subnets: everything else is dropped by the
        guard, then removed from the FDB, before the agent says it runs.
        """
        from weft.datapath.fastguard import FastGuard

        assert self.nd is not None
        self.guard = FastGuard(self.config.vxlan_port, self.udp_port)
        have = self._read_fdb()
        kept = self.guard.kept() | fdb.destinations(have)
        allowed = {ip for ip in kept if self._fast_permitted(ip)}
        self.guard.start(allowed)
        purged = fdb.purge(self.nd, bridge=self.bridge, vxlan=self.vxlan, allowed=self._fast_permitted, have=have)
        if kept - allowed or purged:
            log.info(
                "encryption on: dropped the fast path to %d peer address(es) outside the trusted subnets (%s)",
                len(kept - allowed),
                ", ".join(sorted(kept - allowed)),
            )

    def _fast_permitted(self, ip: str) -> bool:
        """May frames to and from ``ip`` cross unencrypted? Always without a secret, else only if trusted."""
        return not self.encrypting or trusted(ip, self.trusted)

    def _sends_us_plaintext(self, st: PathState) -> bool:
        """May this neighbour send us unencrypted frames (the guard's peer set takes its VXLAN)? Both ends trust each
        other's subnet, or there is no secret."""
        return st.fast_allowed() and self._fast_permitted(st.ip)

    def _matching_connections(self) -> dict[int, Conn]:
        """The connections whose encryption matches ours: one that does not is being closed (a reload)."""
        return {n: c for n, c in self.router.connections.items() if c.encrypted == self.encrypting}

    def forwarding(self, peers: Iterable[int]) -> bool:
        """Each of ``peers`` that is connected has its path chosen: a restarted agent's traffic to them flows."""
        conns = self._matching_connections()
        return all(self.paths[n].path is not None if n in self.paths else n not in conns for n in peers)

    def set_encryption(self, on: bool) -> int:
        """A reload turned encryption on or off: apply it now, before the reload is acknowledged.

        Connections of the other kind are being closed; their paths go at once, as does the fast path
        (guard set, then FDB) to every peer that may no longer use it. Returns the fast-path peers dropped.
        """
        from weft.datapath.attach import gso_size_for, limit_gso

        if on == self.encrypting:
            return 0
        self.encrypting = on
        if self.nd is not None:  # containers take the new size when next attached (docs/datapath.md)
            limit_gso(self.nd, self.bridge, gso_size_for(on))
        before = set(self.guard.fast) if self.guard is not None else set()
        now = time.monotonic()
        for name, st in list(self.paths.items()):
            if st.encrypted != on:  # its connection is closing; a trusted peer's fast path is held meanwhile
                del self.paths[name]
                if self._fast_permitted(st.ip):
                    self._ended[name] = (now, st)
        self._ended = {n: e for n, e in self._ended.items() if e[1].encrypted == on or self._fast_permitted(e[1].ip)}
        if self._recompute_handle is not None:
            self._recompute_handle.cancel()
        self._recompute()
        self._fdb_have = None  # what is removed now is what the kernel holds, not what we last wrote
        self._kernel_urgent = True
        self._program_kernel()
        after = set(self.guard.fast) if self.guard is not None else set()
        return len(before - after)

    def _open_probe_socket(self) -> None:
        """Fast-path probes arrive on the VXLAN device as link-local frames: read them off it."""
        assert self._loop is not None
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        sock.bind((self.vxlan, ETHERTYPE))
        sock.setblocking(False)
        self._probe_sock = sock
        self._loop.add_reader(sock.fileno(), self._read_probes)

    def _read_probes(self) -> None:
        assert self._probe_sock is not None
        now = time.monotonic()
        for _ in range(256):
            try:
                frame = self._probe_sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("fast-path probe socket: %s", exc)
                return
            self._on_probe(frame, now)

    def stop(self) -> None:
        """Stop the threads; the bridge, devices and FDB entries stay for the next run.

        From here on nothing is recomputed: connections closing as the agent shuts down must not take the
        kernel entries of their peers with them, which keep forwarding while the agent is away.
        """
        self._stopped = True
        if self._probe_sock is not None and self._loop is not None:
            self._loop.remove_reader(self._probe_sock.fileno())
            self._probe_sock.close()
        for handle in (self._tick_handle, self._recompute_handle, self._kernel_handle, self._e2e_handle):
            if handle is not None:
                handle.cancel()
        if self._watcher is not None:
            self._watcher.stop()
        if self.sleeve is not None:
            self.sleeve.stop()
        if self.nd is not None:
            self.nd.close()

    def _from_thread(self, fn: Callable[..., None]) -> Callable[..., None]:
        """Wrap a handler so the data and netlink threads can call it: it runs on the event loop."""
        loop = self._loop
        assert loop is not None

        def call(*args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed while the thread was finishing
                loop.call_soon_threadsafe(fn, *args, time.monotonic())

        return call

    # -- inputs ------------------------------------------------------------------------------------

    def _on_local_macs(self, macs: frozenset[str], now: float) -> None:
        if not self._guard_has(macs):
            self._guard_ports()
        delta = self.macs.set_local(bytes.fromhex(m.replace(":", "")) for m in macs)
        if delta is not None:
            log.debug("local MACs now %s", ", ".join(sorted(macs)) or "none")
            self._channel.broadcast(delta)
            self._changed()

    def _on_control(self, peer: int, addr: tuple[str, int], payload: bytes, size: int, now: float) -> None:
        st = self.paths.get(peer)
        if st is None:
            return
        st.last_heard = now
        if addr != st.udp_addr:
            log.info("peer %s: its UDP address is now %s:%d (learned from its heartbeat)", format_name(peer), *addr)
            st.udp_addr = addr
            self._changed()
        try:
            msg = expect(unpack(payload, "datapath"), dict, "datapath", "message")
            if msg.get("t") in AGREEMENT_TYPES:
                self.e2e.on_hop_message(peer, msg, now)
            elif msg.get("t") == "pm":
                st.max_rx_size = max(st.max_rx_size, size)
            elif msg.get("t") == "hb":
                trusted_us, floods = st.peer_trusts, st.peer_floods
                kf = msg.get("kf")
                st.on_heartbeat(
                    now,
                    bool(msg.get("tr")),
                    _uint(msg.get("fs", 0)),
                    _uint(msg.get("mx", 0)),
                    kf if isinstance(kf, bool) else None,
                )
                if msg.get("rq") is True:  # it asks for an answer: its rounds, at its own pace, are its evidence
                    st.echoes = st.answered = True
                    st.asked_at = now
                    self._heartbeat(st, now, ask=False)
                elif not st.answered:  # a new connection: the far end hears from us now, not at our next round
                    st.answered = True
                    self._heartbeat(st, now, report_size=False, ask=False)
                if st.peer_trusts != trusted_us and st.encrypted:  # the guard takes its fast traffic, or no longer
                    self._changed()
                if st.peer_floods != floods:  # its broadcasts come from the kernel now, or from the sleeve
                    self._changed()
        except DecodeError as exc:
            self.metrics.decode_errors.labels(exc.kind).inc()
            log.debug("bad data-path control message from %s: %s", format_name(peer), exc)
        if st.path is None and self._choose(st, now):  # a path that was down is up: use it now, not next round
            self._changed()

    def _on_probe(self, frame: bytes, now: float) -> None:
        parsed = parse_probe(frame)
        if parsed is None:
            return
        sender, seq = parsed
        st = self.paths.get(sender)
        if st is not None and seq >= st.heard_fast_seq:
            st.heard_fast_seq, st.heard_fast_at = seq, now

    def _changed(self) -> None:
        """Something the tables depend on changed: recompute soon, once for a burst of changes.

        The first change in a while is recomputed at once (next on the loop); in a burst (a dense mesh forming, each
        connection and path changing the tables) at most once per RECOMPUTE_SPACING, or in a large mesh as the
        routes pace their passes (``Routes.spacing``), as each recomputation builds the tables for every peer; while
        our view fills in (``view_settles_in``), at most once per VIEW_FILLING_SPACING (as the router tells them).
        """
        if self._loop is not None and self._recompute_handle is None and not self._stopped:
            spacing = self.router.routes.spacing(RECOMPUTE_SPACING)
            if self.view_settles_in() > 0:
                spacing = max(spacing, VIEW_FILLING_SPACING)
            wait = self._recomputed_at + spacing - time.monotonic()
            if wait > 0:
                self._recompute_handle = self._loop.call_later(wait, self._recompute)
            else:
                self._recompute_handle = self._loop.call_soon(self._recompute)

    # -- heartbeats --------------------------------------------------------------------------------

    def _tick(self) -> None:
        """A pass every 1/TICKS of the interval: the probe rounds due now (their phases are spread, so each pass
        sends a few), and once an interval the housekeeping and every path's choice (silence ends a path).

        Between the full passes only the paths whose round is due (``_rounds``, a heap by due time) and those whose
        frame counters moved (traffic speeds a path's rounds up) are looked at: looking at every path five times a
        second was a quarter of a settled agent's CPU with 50 neighbours."""
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(self.interval / TICKS, self._tick)
        now = time.monotonic()
        full = self._ticks % TICKS == 0
        self._ticks += 1
        if full:
            self._sync_neighbours(now)
            self._poll_portguard(now)
            if self.encrypting:
                self.e2e.tick(now, self.sleeve.pair_traffic() if self.sleeve is not None else {})
        if self._probe_pass(now, full=full) or (full and self._warming_up_ended(now)):
            self._changed()

    def _probe_pass(self, now: float, *, full: bool) -> bool:
        """The rounds due and the paths' choices (see _tick); True if the sleeve's tables must change."""
        moved = self._note_traffic(now)
        if not full:
            return self._pass(now, self._due_paths(now, moved), full=False)
        changed = self._pass(now, list(self.paths.values()), full=True)
        self._rounds = [(st.next_round, name) for name, st in self.paths.items()]
        heapq.heapify(self._rounds)
        return changed

    def _due_paths(self, now: float, moved: list[PathState]) -> list[PathState]:
        """The paths whose round is due by ``now`` (from the heap; entries a later round or a new path made stale
        are skipped), and those in ``moved``, each once."""
        out = {id(st): st for st in moved}
        rounds = self._rounds
        while rounds and rounds[0][0] <= now:
            _, name = heapq.heappop(rounds)
            st = self.paths.get(name)
            if st is not None and st.next_round <= now:
                out[id(st)] = st
        return list(out.values())

    def _pass(self, now: float, paths: list[PathState], *, full: bool) -> bool:
        """Probe rounds for those of ``paths`` that are due; path choice for those, or for all of them on a ``full``
        pass. True if the sleeve's tables must change."""
        changed = False
        for st in paths:
            due = st.pace(now, self.interval, DEAD_AFTER)
            if due and st.covered_by_peer(self.interval):
                st.round_covered(now, self._rng)
                heapq.heappush(self._rounds, (st.next_round, st.peer))
            elif due:
                self._round(st, now)
            elif not full:
                continue
            size = st.datagram_size()
            if size != st.announced_size:
                st.announced_size = size  # the sleeve must cut datagrams to the new size
                changed = True
                if st.pmtu() is not None:
                    log.info("peer %s: path MTU %d", format_name(st.peer), st.pmtu())
            if self._choose(st, now):
                changed = True
        return changed

    def _round(self, st: PathState, now: float) -> None:
        """One probe round to a neighbour: path-MTU probes (now and then), a fast probe, then a heartbeat that asks
        for an answer, which therefore reports what the probes before it found."""
        sleeve = self.sleeve
        assert sleeve is not None
        st.round_done(now, self._rng)
        heapq.heappush(self._rounds, (st.next_round, st.peer))
        if st.ticks <= 3 or st.ticks % PMTU_EVERY == 0:
            for size in ladder(st.route_mtu):
                sleeve.send_control(st.peer, pack({"t": "pm"}), pad_to=size - 28)
        if st.fast_allowed() or not st.encrypted:
            st.fast_seq += 1
            probe = build_probe(VNI, self.ourself, st.fast_seq, self.config.mtu)
            sleeve.send_raw((st.ip, self.config.vxlan_port), probe)
        self._heartbeat(st, now)

    def _note_traffic(self, now: float) -> list[PathState]:
        """Which paths carried frames since the last look: the sleeve's per-link counters (each pass, they cost a
        dict read) and, every TRAFFIC_EVERY intervals while some path is fast, the fast-path guard's per-peer ones.
        Returns the paths whose counters moved."""
        sleeve = self.sleeve.traffic() if self.sleeve is not None else {}
        fast: dict[str, int] | None = None
        due = self.guard is not None and now - self._fast_read_at >= TRAFFIC_EVERY * self.interval
        if due and self.guard is not None and any(st.path == FAST for st in self.paths.values()):
            self._fast_read_at = now
            fast = self.guard.traffic()
        moved = []
        for st in self.paths.values():
            on_fast = fast.get(st.ip, 0) if fast is not None else st.traffic_mark[1]
            if st.note_traffic(now, sleeve.get(st.peer, 0), on_fast):
                moved.append(st)
        return moved

    def _heartbeat(self, st: PathState, now: float, *, report_size: bool = True, ask: bool = True) -> None:
        """One heartbeat to a neighbour; ``report_size`` reports (and starts over) the largest probe heard from it,
        which only rounds and answers to them do: an extra heartbeat must not cut a probe round short. ``ask``: the
        neighbour answers at once (``rq``), which an answer never asks, so two peers never ping-pong."""
        if self.sleeve is None:
            return
        hb = {
            "t": "hb",
            "tr": st.we_trust,
            "fs": st.heard_fast(now, self.dead),
            "mx": 0,
            "kf": st.peer in self._told_floods,
        }
        if report_size:
            hb["mx"], st.max_rx_size = st.max_rx_size, 0
        if ask:
            hb["rq"] = True
        self.sleeve.send_control(st.peer, pack(hb))

    def _choose(self, st: PathState, now: float) -> bool:
        """Choose the neighbour's path from the evidence now; True (and a log line) if it changed."""
        if not st.choose(now, self._dead(st), self.config.mtu, self.config.vxlan_port, self.udp_port):
            return False
        log.info(
            "peer %s: data path now %s%s",
            format_name(st.peer),
            st.path or "down",
            f" ({st.reason})" if st.reason else "",
        )
        return True

    def _dead(self, st: PathState) -> float:
        """Silence after which a path is down: DEAD_AFTER rounds at its pace (3 s busy, 30 s idle by default)."""
        return st.dead_after(DEAD_AFTER, self.interval)

    def _warming_up_ended(self, now: float) -> bool:
        started = now - self._started_at
        return WARMUP_AFTER * self.interval <= started < (WARMUP_AFTER + 1) * self.interval

    def _sync_neighbours(self, now: float) -> None:
        """One PathState per established control connection; a new connection brings new keys."""
        conns = self._matching_connections()
        for name, (ended_at, st) in list(self._ended.items()):
            if now - ended_at > self._kept_for(st):
                del self._ended[name]
                if st.path == FAST:
                    log.info(
                        "peer %s: no sign of it for %.0fs, dropping its fast-path entries",
                        format_name(name),
                        now - ended_at,
                    )
                    self._changed()
                if name not in self.router.topology.peers:
                    self.macs.forget(name)
        for name in [n for n in self.paths if n not in conns]:
            st = self.paths.pop(name)
            self._ended[name] = (now, st)
            if self._kept_for(st) > self.dead:
                log.info(
                    "peer %s: control connection gone, keeping its fast path for up to %gs",
                    format_name(name),
                    self._kept_for(st),
                )
            self._changed()
        new = {
            name: conn
            for name, conn in conns.items()
            if conn.remote_ip is not None and (name not in self.paths or self.paths[name].epoch != conn.conn_uid)
        }
        if not new:
            return
        assert self.nd is not None
        route_mtus = self.nd.batch(self._route_mtus, {conn.remote_ip for conn in new.values()})
        for name, conn in new.items():
            st = self.paths.get(name)
            ip = conn.remote_ip
            assert ip is not None
            route_mtu = route_mtus[ip]
            ended_at, before = self._ended.pop(name, (0.0, None))
            if st is None and before is not None and before.ip == ip and now - ended_at <= self._kept_for(before):
                st = before  # a reconnection (a re-key or a restart): what the paths proved still holds
            fresh = PathState(
                peer=name,
                ip=ip,
                udp_addr=st.udp_addr if st is not None else (ip, self.udp_port),
                keys=conn.data_keys,
                epoch=conn.conn_uid,
                we_trust=trusted(ip, self.trusted),
                route_mtu=route_mtu,
                remote_uid=conn.remote.uid,
                assume_fast_until=now + self.dead + self.interval if ip in self._adopted_fast else 0.0,
                # The kernel sent to it fast when we started: both runs trusted each other then. Held until
                # its first heartbeat, like a restart of the peer (PathState.resumed).
                held_trust=ip in self._adopted_fast,
                e2e="e2e" in conn.caps,
                next_round=now + self._rng.uniform(0, self.interval),  # a phase of its own (it gets a hello now)
            )
            if st is not None and st.ip == ip:
                # New keys, same paths: keep the evidence so traffic does not stop until the next heartbeat.
                fresh = st.resumed(
                    now, keys=fresh.keys, epoch=fresh.epoch, remote_uid=conn.remote.uid, hold=self.dead + self.interval
                )
                fresh.we_trust, fresh.route_mtu = trusted(ip, self.trusted), route_mtu
                fresh.e2e = "e2e" in conn.caps
            self.paths[name] = fresh
            heapq.heappush(self._rounds, (fresh.next_round, name))
            self.paths[name].choose(now, self._dead(fresh), self.config.mtu, self.config.vxlan_port, self.udp_port)
            self._hello.add(name)
            self._changed()

    def _route_mtus(self, ips: set[str]) -> dict[str, int]:
        """The MTU towards each address (1500 where there is no route right now: the heartbeat will fail and say so).
        Run as one batch on the netlink thread: a dense mesh forming brings dozens of new neighbours at once."""
        assert self.nd is not None
        out = {}
        for ip in ips:
            try:
                out[ip] = self.nd.route_mtu(ip)
            except Exception:
                out[ip] = 1500
        return out

    def _kept_for(self, st: PathState) -> float:
        """How long a closed connection's path state is kept: the fast path's grace, else a re-key's moment."""
        if st.path == FAST and st.fast_allowed() and self._fast_permitted(st.ip):
            return max(self.grace, self.dead)
        return self.dead

    def _held_fast(self) -> dict[int, str]:
        """Peers whose agent is gone for now but whose kernel fast path we keep (peer -> underlay address)."""
        return {n: st.ip for n, (_, st) in self._ended.items() if self._kept_for(st) > self.dead}

    def address_refused(self, ip: str) -> None:
        """A handshake with ``ip`` failed over the secrets: its agent is back and will not talk plaintext
        with us (or we with it), so a fast path held for it ends now, not after the grace."""
        ended = [n for n, (_, st) in self._ended.items() if st.ip == ip and self._kept_for(st) > self.dead]
        for name in ended:
            del self._ended[name]
            log.info(
                "peer %s at %s and this host disagree on secrets: dropping its held fast path", format_name(name), ip
            )
            if name not in self.router.topology.peers:
                self.macs.forget(name)
        if ended:
            self._changed()

    def _peer_gone(self, entry: PeerEntry) -> None:
        """The mesh forgot a peer; its MACs go too, unless its fast path is held (its agent restarting)."""
        if entry.name not in self._held_fast():
            self.macs.forget(entry.name)

    # -- outputs -----------------------------------------------------------------------------------

    def _recompute(self) -> None:
        self._recompute_handle = None
        if self.sleeve is None or self.nd is None or self._stopped:
            return
        from weft.datapath.sleeve import Forwarding, Link

        now = time.monotonic()
        self._recomputed_at = now
        self._sync_neighbours(now)
        routes = self.router.routes
        reachable = routes.reachable()
        usable = {n for n, st in self.paths.items() if st.sleeve_up(now, self._dead(st))}
        fast_ips = {n: ip for n, ip in self._held_fast().items() if n not in self.paths}
        fast_ips.update((n, st.ip) for n, st in self.paths.items() if st.path == FAST)
        fast_ips = {n: ip for n, ip in fast_ips.items() if self._fast_permitted(ip)}
        next_hop: dict[int, int] = {}  # how to reach each peer over the sleeve (relays need all of them)
        relayed: dict[int, int] = {}
        for dest, hop in reachable.items():
            st = self.paths.get(dest)
            if dest in usable:
                next_hop[dest] = dest
            if st is None or st.path is None:
                via = hop if hop in usable and hop != dest else self._other_hop(dest, usable)
                if via is not None:
                    next_hop[dest] = relayed[dest] = via
        self.relayed = relayed
        self._next_hop = next_hop
        if self.encrypting:
            self.e2e.update(self._agree_with(relayed, now), now)
        else:
            self.e2e.update({}, now)
        pairs = self.e2e.pairs()
        sleeve_peers = frozenset(n for n in next_hop if n not in fast_ips)
        told = frozenset(n for n, ip in fast_ips.items() if n in self.paths and ip in self._kernel_floods)
        links = {
            n: Link(n, st.udp_addr, st.keys, st.datagram_size(), st.epoch, st.e2e and st.keys is not None)
            for n, st in self.paths.items()
        }
        children: dict[int, tuple[int, ...]] = {}
        for origin in [self.ourself, *reachable]:
            tree = routes.broadcast(origin)
            if tree is None:  # routes are being recalculated: flood to every neighbour
                tree = list(self.paths)
            children[origin] = tuple(n for n in tree if n in usable)
        if not sleeve_peers and told.issuperset(n for n in fast_ips if n in self.paths):
            children[self.ourself] = ()  # every neighbour hears our floods from the kernel, and knows it
        frame_mtu = {n: st.frame_mtu(self.config.mtu, SLEEVE_OVERHEAD) for n, st in self.paths.items()}
        for dest, hop in relayed.items():
            frame_mtu[dest] = frame_mtu.get(hop, self.config.mtu)
        for pair in pairs:
            if pair.send and pair.peer in relayed and relayed[pair.peer] in self.paths:
                size = min(pair.datagram_size, self.paths[relayed[pair.peer]].datagram_size())
                frame_mtu[pair.peer] = min(frame_mtu[pair.peer], size - E2E_OVERHEAD)
        self.sleeve.update(
            Forwarding(
                links=links,
                next_hop=next_hop,
                flood_origins=self._flood_origins(next_hop, fast_ips),
                bcast_children=children,
                mac_owner=dict(self.macs.owner),
                local_macs=self.macs.local,
                frame_mtu=frame_mtu,
                pairs=pairs,
            )
        )
        self.e2e.after_update(now)
        self._tell_floods(told, now)
        for name in self._hello:  # the sleeve has their keys now: heartbeats need not wait for the next round
            if name in self.paths:
                self._heartbeat(self.paths[name], now, report_size=False)  # asks: the new run answers at once
        self._hello.clear()
        want = fdb.desired_state(
            fast_ips=fast_ips,
            sleeve_peers=sleeve_peers,
            owner=self.macs.owner,
            ourself=self.ourself,
            vxlan=self.vxlan,
            tap=self.tap,
        )
        warming = now - self._started_at < WARMUP_AFTER * self.interval
        self._want = (want, not warming)
        # A neighbour leaving the fast path (its peer disagrees on secrets now, or stopped trusting us) must stop
        # getting our traffic in clear at once: such a programming is not held back by the spacing below.
        leaving = bool(self._fast_wanted - fast_ips.keys())
        self._fast_wanted = frozenset(fast_ips)
        if leaving:
            self._kernel_urgent = True
            if self._kernel_handle is not None and self._loop is not None:
                self._kernel_handle.cancel()
                self._kernel_handle = None
        if self._kernel_handle is None and self._loop is not None:
            # Next, not now: the sleeve's tables are already in place, and heartbeats that came meanwhile (a path
            # coming up) are handled before the netlink work, which takes a while, rather than after it. In a burst
            # (a hundred connections coming up one after the other) at most once per KERNEL_SPACING: each pass reads
            # the whole FDB, tens of milliseconds with a hundred peers. While our view of the mesh fills in, not
            # until it settles (see _program_kernel).
            wait = 0.0 if leaving else max(self._kernel_at + KERNEL_SPACING - time.monotonic(), self.view_settles_in())
            if wait > 0:
                self._kernel_handle = self._loop.call_later(wait, self._program_kernel)
            else:
                self._kernel_handle = self._loop.call_soon(self._program_kernel)
        self.metrics.mac_conflicts.set(len(self.macs.conflicts))

    def _flood_origins(self, next_hop: Mapping[int, int], fast_ips: Mapping[int, str]) -> frozenset[int]:
        """The origins whose broadcasts this host takes from the sleeve: those whose kernel does not flood to it.

        A neighbour says in its heartbeats whether its kernel floods to us; the two ends choose their paths apart
        (each from its own probes), so our own choice is no guide to theirs. An older neighbour does not say: it
        floods from the kernel while we are on its fast path. A neighbour that says it does, but whose plaintext our
        guard would not take, is heard from the sleeve: its kernel's floods are dropped here.
        """

        def kernel_floods(origin: int) -> bool:
            st = self.paths.get(origin)
            if st is None or st.peer_floods is None:
                return origin in fast_ips
            accepted = origin in fast_ips or self._sends_us_plaintext(st)
            return st.peer_floods and accepted

        return frozenset(n for n in next_hop if not kernel_floods(n))

    def _tell_floods(self, told: frozenset[int], now: float) -> None:
        """Neighbours whose floods from us changed path hear it now, not at their next round."""
        changed, self._told_floods = told ^ self._told_floods, told
        for name in changed:
            if name in self.paths:
                self._heartbeat(self.paths[name], now, report_size=False, ask=False)

    def _agree_with(self, relayed: dict[int, int], now: float) -> dict[int, int]:
        """The relayed peers to agree end-to-end keys with: none new while our view of the mesh fills in
        (``view_settles_in``: a hundred hosts agreeing keys through their hub as they appeared left it too little CPU
        to tell them of each other), and not yet those the connection maker is dialling (a mesh forming relays every
        pair for a few seconds, and agreeing keys for each, then dropping them, was a quarter of its relays' CPU),
        unless keys are under way already or the peer has been relayed for E2E_HOLD seconds. Frames go hop by hop
        meanwhile, as they do until any agreement completes."""
        since = {d: self._relayed_since.get(d, now) for d in relayed}
        self._relayed_since = since
        dialling = self.dialling()
        settling = self.view_settles_in()
        agree = {
            d: hop
            for d, hop in relayed.items()
            if self.e2e.knows(d) or (not settling and (d not in dialling or now - since[d] >= E2E_HOLD))
        }
        held = [max(now + settling, since[d] + E2E_HOLD if d in dialling else 0.0) for d in relayed if d not in agree]
        if held and self._loop is not None:
            at = min(held)
            if self._e2e_handle is not None and self._e2e_at > at + 0.01:
                self._e2e_handle.cancel()  # due sooner now (the view settled before a dialled peer's hold ends)
                self._e2e_handle = None
            if self._e2e_handle is None:
                self._e2e_at = at
                self._e2e_handle = self._loop.call_later(max(0.0, at - now), self._e2e_due)
        return agree

    def _e2e_due(self) -> None:
        self._e2e_handle = None
        self._changed()

    def _program_kernel(self) -> None:
        """The FDBs and the fast-path guard, to what the last recomputation wants (several coalesce into one).

        Held while our view of the mesh fills in (``view_settles_in``), unless it takes a neighbour off the fast path
        (that must stop at once). A hundred hosts told of one at once each programmed an FDB entry for every peer's MAC
        as they learnt of it, about a third of what they ran in the first seconds, and the hub that tells them of each
        other got that much less of two cores. Frames for MACs the bridge has no entry for yet are flooded to the
        sleeve, which forwards them by owner: slower, never lost."""
        if self._kernel_handle is not None:
            self._kernel_handle.cancel()
            self._kernel_handle = None
        if self._want is None or self.nd is None or self._stopped:
            return
        settling = 0.0 if self._kernel_urgent else self.view_settles_in()
        if settling > 0 and self._loop is not None:
            self._kernel_handle = self._loop.call_later(settling, self._program_kernel)
            return
        self._kernel_urgent = False
        last, self._kernel_at = self._kernel_at, time.monotonic()
        (want, delete), self._want = self._want, None
        self._sync_guard(want, before_fdb=True)
        have = self._fdb_have
        read = have is None or self._kernel_at - self._fdb_read_at >= FDB_REREAD
        changed = 1  # a failure counts as work: the next pass reads the kernel again
        nd = self.nd

        def program(current: fdb.FdbState | None) -> tuple[fdb.FdbState, int]:
            if current is None:
                current = fdb.read(nd, bridge=self.bridge, vxlan=self.vxlan)
            return current, fdb.apply(
                nd, bridge=self.bridge, vxlan=self.vxlan, tap=self.tap, want=want, delete=delete, have=current
            )

        try:  # one hand-over to the netlink thread for the read and every entry changed
            have, changed = nd.batch(program, None if read else have)
            if read:
                self._fdb_have, self._fdb_read_at = have, time.monotonic()
        except Exception as exc:  # netlink refused one entry: say so, keep the rest working (and read them again)
            log.warning("could not program the kernel forwarding table: %s", exc)
            self._fdb_have = have = None
        self._sync_guard(want, before_fdb=False, have=have)
        if not read and not changed:  # nothing read nor changed: the next change (a path turning fast) need not wait
            self._kernel_at = last
        floods = self._fdb_have.vxlan.get(fdb.ZERO_MAC, set()) if self._fdb_have is not None else set()
        if floods != self._kernel_floods:  # neighbours the kernel now floods to (or no longer) are told so
            self._kernel_floods = frozenset(floods)
            self._changed()

    def _read_fdb(self) -> fdb.FdbState:
        """Read what the kernel's FDB holds; later programmings diff against it (see FDB_REREAD)."""
        nd = self.nd
        assert nd is not None
        self._fdb_have = nd.batch(lambda: fdb.read(nd, bridge=self.bridge, vxlan=self.vxlan))
        self._fdb_read_at = time.monotonic()
        return self._fdb_have

    def _sync_guard(self, want: fdb.FdbState, *, before_fdb: bool, have: fdb.FdbState | None = None) -> None:
        """Keep the guard's sets equal to where the kernel sends fast traffic (and whose probes may cross).

        Before the FDB changes: drop what is no longer permitted and admit new fast peers, so no frame
        is dropped on its way to one. After: remove what the FDB no longer sends to.
        """
        if self.guard is None or self.nd is None:
            return
        probe = {st.ip for st in self.paths.values() if self._fast_permitted(st.ip)}
        peers = {st.ip for st in self.paths.values() if self._sends_us_plaintext(st)}
        try:
            if before_fdb:
                wanted = {dst for dsts in want.vxlan.values() for dst in dsts}
                self.guard.sync({ip for ip in self.guard.fast if self._fast_permitted(ip)} | wanted, probe, peers)
            else:
                if have is None:  # programming failed: what the kernel holds, not what we tried
                    have = self._read_fdb()
                if self.encrypting:
                    fdb.purge(self.nd, bridge=self.bridge, vxlan=self.vxlan, allowed=self._fast_permitted, have=have)
                sends_to = fdb.destinations(have)
                self.guard.sync({ip for ip in sends_to if self._fast_permitted(ip)}, probe, peers)
        except Exception as exc:  # nft or netlink refused: say so; the next change tries again, on a fresh read
            log.warning("could not update the fast-path guard: %s", exc)
            self._fdb_have = None

    def _other_hop(self, dest: int, usable: set[int]) -> int | None:
        """A neighbour with a working sleeve that has its own route to ``dest`` (not through us)."""
        for hop in sorted(usable):
            if hop == dest:
                continue
            entry = self.router.topology.peers.get(hop)
            if entry is not None and any(c.peer == dest for c in entry.connections):
                return hop
        return None

    # -- requests from the API ----------------------------------------------------------------------

    async def overlay(self, action: str, body: dict[str, Any], cidrs: list[str], probe: bool = True) -> dict:
        """attach/detach/expose/hide (see weft.datapath.attach); the MAC watcher picks up the result.

        In a worker thread: a new address is probed for on the overlay first (unless ``probe`` is False: IPAM
        reserved every address in the ring, which no one else hands out), and the answers cross the mesh, which
        this event loop goes on running meanwhile.
        """
        from weft.datapath.attach import AddressInUse, OverlayError, carry_out, gso_size_for

        assert self.nd is not None
        started = time.perf_counter()
        try:
            result = await asyncio.to_thread(
                carry_out,
                self.nd,
                self.bridge,
                self.config.mtu,
                action,
                body,
                cidrs,
                probe_wait=self.config.address_probe_time if probe else 0.0,
                describe_mac=self.describe_mac,
                routes=[f"{self.config.dns_address}/32"] if self.config.dns else [],
                gso_max_size=gso_size_for(self.encrypting),
            )
        except OverlayError as exc:
            reason = "address_in_use" if isinstance(exc, AddressInUse) else "invalid"
            self.metrics.overlay_refused.labels(action, reason).inc()
            log.info("%s refused: %s", action, exc)
            raise
        done = time.perf_counter()
        # Now, not after the watcher's settle time: a new port drops all until then.
        if action == "attach":
            self._guard_attached(result["host_interface"], result["mac"])
        elif action == "detach":
            self._guard_ports()
        log.debug(
            "%s: devices %.1f ms, port guard %.1f ms",
            action,
            1e3 * (done - started),
            1e3 * (time.perf_counter() - done),
        )
        if result["changed"]:
            log.info("%s %s: %s", action, body.get("netns") or body.get("pid") or "host", ", ".join(cidrs) or "all")
        return result

    def ipam_holders_alive(self) -> Callable[..., bool]:
        """For IPAM's start: whether an allocation's holder is still attached (its veth, or the host's address)."""
        from weft.ipam.holders import alive_check

        assert self.nd is not None
        nd = self.nd
        return alive_check(lambda ifname: nd.link(ifname) is not None, lambda: nd.addresses(self.bridge))

    def attached_containers(self, known: set[str]) -> list[tuple[str, str, list[str]]]:
        """(netns, host veth, CIDRs) of containers attached to our bridge whose veth is not in ``known``."""
        from weft.datapath.attach import find_attached

        assert self.nd is not None
        return find_attached(self.nd, bridge=self.bridge, skip=known)

    def describe_mac(self, mac: str) -> str:
        """Who holds a MAC, for an error message: this host, or the peer that announces it."""
        owner = self.macs.owner.get(bytes.fromhex(mac.replace(":", "")))
        if owner is None:
            return "not announced by any host of the mesh"
        if owner == self.ourself:
            return "this host"
        entry = self.router.topology.peers.get(owner)
        return f"host {entry.nickname if entry else '?'!r} {format_name(owner)}"

    # -- status and metrics ------------------------------------------------------------------------

    def connection_status(self) -> dict[int, dict[str, Any]]:
        """Per peer: the path in use, encryption, MTU, and why a faster path is not in use."""
        rows: dict[int, dict[str, Any]] = {}
        mtu = self.config.mtu
        for name, st in self.paths.items():
            rows[name] = {
                "path": st.path or ("relay" if name in self.relayed else "down"),
                "encrypted": st.encrypted and st.path != FAST,
                "mtu": st.frame_mtu(mtu, SLEEVE_OVERHEAD),
                "pmtu": st.pmtu(),
                "udp": f"{st.udp_addr[0]}:{st.udp_addr[1]}",
                "reason": st.reason,
            }
        for name, hop in self.relayed.items():
            if name not in rows:
                hop_state = self.paths.get(hop)
                rows[name] = {
                    "path": RELAY,
                    "encrypted": hop_state is not None and hop_state.encrypted,
                    "mtu": hop_state.frame_mtu(mtu, SLEEVE_OVERHEAD) if hop_state else mtu,
                    "pmtu": None,
                    "udp": None,
                    "reason": "no direct connection",
                    "via": format_name(hop),
                }
            else:
                rows[name]["via"] = format_name(hop)
            if rows[name]["encrypted"]:
                # Sealed once by us and opened only by the peer, or opened and sealed again by every relay.
                rows[name]["sealing"] = "end-to-end" if self.e2e.sealing(name) else "hop-by-hop"
        return rows

    def end_to_end_status(self) -> list[dict[str, Any]]:
        """The peers reached through relays with which this host agrees (or agreed) end-to-end keys."""
        rows = self.e2e.status(time.monotonic())
        for row in rows:
            entry = self.router.topology.peers.get(parse_name(row["peer"]))
            row["nickname"] = entry.nickname if entry is not None else None
        return rows

    def connection_metrics(self) -> dict[str, tuple[int, dict[str, int]]]:
        """Each peer's MTU and data path for a scrape, read when scraped so they agree with ``weft status``."""
        return {
            format_name(name): (row["mtu"], {path: int(row["path"] == path) for path in PATHS})
            for name, row in self.connection_status().items()
        }

    def byte_counts(self) -> dict[tuple[str, str], int]:
        """Data-path bytes by (path, direction): the sleeve's counters plus the VXLAN device's."""
        counts: dict[tuple[str, str], int] = {}
        if self.sleeve is not None:
            counts.update(self.sleeve.totals().bytes)
        if self.nd is not None:
            with contextlib.suppress(Exception):
                rx, tx = self.nd.link_bytes(self.vxlan)
                counts[(FAST, "rx")], counts[(FAST, "tx")] = rx, tx
        return counts

    def drop_counts(self) -> dict[str, int]:
        counts = self.sleeve.totals().dropped if self.sleeve is not None else {}
        if self.guard is not None:
            counts.update(self.guard.dropped())
        if self.portguard is not None:
            counts[FORGED_SOURCE_MAC] = self.portguard.dropped
        return counts

    def worker_bytes(self) -> list[dict[str, int]]:
        """Per sleeve worker, the bytes it sent and received: shows that every worker carries traffic."""
        return self.sleeve.worker_bytes() if self.sleeve is not None else []

    def mac_conflicts(self) -> list[dict[str, Any]]:
        """MACs more than one peer claims, for status: who claims each, and who other hosts send it to."""
        return [
            {"mac": mac.hex(":"), "peers": [format_name(n) for n in names], "owner": format_name(names[0])}
            for mac, names in sorted(self.macs.conflicts.items())
        ]

    # -- the container port guard --------------------------------------------------------------------

    def _start_portguard(self) -> None:
        """Replace the last run's guard table with one for the ports attached now, before anything else runs."""
        from weft.datapath.portguard import NftError, PortGuard, default_runner

        assert self.nd is not None
        guard = PortGuard(default_runner())  # libnftables in this process (this loop's thread), else `nft`
        try:
            guard.start(self.nd.attached_macs(self.bridge, (self.vxlan, self.tap)))
        except NftError as exc:  # without it, containers could forge source MACs: do not run
            raise NftError(f"cannot load the container port guard: {exc}") from None
        self.portguard = guard
        self._guard_ports()

    def _guard_ports(self) -> None:
        """Container ports learn nothing, and pass frames only from the MACs attached to them."""
        from weft.datapath.attach import HOST_PREFIX

        if self.nd is None:
            return
        try:
            attached = self.nd.attached_macs(self.bridge, (self.vxlan, self.tap))
            for port in sorted(attached.keys() - self._guarded):
                if port.startswith(HOST_PREFIX):
                    self.nd.container_port(self.bridge, port)
            self._guarded = set(attached)
            if self.portguard is not None:
                self.portguard.sync(attached)
        except Exception as exc:  # a port that went away meanwhile, nft refusing: the next event or tick retries
            log.warning("could not update the container port guard: %s", exc)

    def _guard_has(self, macs: frozenset[str]) -> bool:
        """Whether the port guard already passes exactly the local MACs the watcher reports, the bridge's aside (an
        attach guards its port before it answers): then the whole pass, which reads every port's links and FDB
        entries, would change nothing. A MAC that moves to another port leaves the set as it was, and the watcher
        silent: the periodic pass catches that, whether or not this one runs."""
        if self.portguard is None or self.nd is None:
            return False
        try:
            bridge = self.nd.link(self.bridge)
        except Exception:
            return False
        allowed: set[str] = set()
        for port_macs in self.portguard.ports.values():
            allowed |= port_macs
        return bridge is not None and set(macs) - {bridge.mac} == allowed

    def _guard_attached(self, port: str, mac: str) -> None:
        """The port an attach made (or found), at once: it learns nothing and forgets what it learned, and passes
        frames from the container's MAC. That port alone, a few requests whatever the number of containers: the
        MAC watcher's event runs the whole pass (_guard_ports) next, in the background."""
        if self.nd is None:
            return
        try:
            self.nd.container_port(self.bridge, port, count=False)  # a pair made again keeps its name: always
            self._guarded.add(port)
            if self.portguard is not None:
                allowed = dict(self.portguard.ports)
                allowed[port] = allowed.get(port, frozenset()) | {mac}
                self.portguard.sync(allowed)
        except Exception as exc:  # the port went away meanwhile, nft refusing: the whole pass retries
            log.warning("could not update the container port guard: %s", exc)

    def _poll_portguard(self, now: float) -> None:
        self._guard_ticks += 1
        if self._guard_ticks % GUARD_RESYNC == 0:
            self._guard_ports()
        if self.portguard is not None and self._guard_ticks % PORTGUARD_POLL_EVERY == 0:
            self.portguard.poll(now)


def _uint(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class _EndToEndIo:
    """What the end-to-end keys need of the controller and the sleeve (endtoend.Io)."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane

    def send_hop(self, peer: int, payload: bytes) -> bool:
        sleeve = self._plane.sleeve
        return sleeve is not None and sleeve.send_control(peer, payload)

    def send_pair(self, peer: int, kid: int, payload: bytes) -> bool:
        sleeve = self._plane.sleeve
        return sleeve is not None and sleeve.send_pair_control(peer, kid, payload)

    def route(self, dst: int) -> tuple[int, int] | None:
        plane = self._plane
        hop = plane._next_hop.get(dst)
        st = plane.paths.get(hop) if hop is not None else None
        if st is None or not st.e2e or st.keys is None:
            return None
        return hop, st.datagram_size()

    def peer_uid(self, peer: int) -> int | None:
        entry = self._plane.router.topology.peers.get(peer)
        return entry.uid if entry is not None else None

    def changed(self) -> None:
        self._plane._changed()

"""The encrypted userspace path ("sleeve"): frames between the bridge's TAP port and peers over UDP.

Each forwarding worker is a thread with a plain epoll loop (asyncio is slower on this path; reference/datapath.md)
over its own TAP queue and its own UDP socket. It reads whole GSO frames from the TAP, seals each once with the
link's ChaCha20-Poly1305 key and sends it as path-MTU datagrams with UDP_SEGMENT; it receives GRO-coalesced
datagrams, reassembles, opens, checks the replay window, and writes the frame to the TAP, relays it (re-sealed for
the next hop) or passes a CONTROL message up. The wire format is in wire.py.

The sleeve takes its file descriptors already open (``Sleeve(taps=..., socks=...)``): the agent's are a multi-queue
TAP and a SO_REUSEPORT group opened by ``open_sleeve``; a test's may be socketpairs and loopback sockets. Threads,
not processes: ChaCha20-Poly1305 and the TAP and UDP syscalls release the GIL, so workers share the tables and
the link state at no cost (docs/datapath.md has the figures). The controller swaps whole forwarding tables with
``update`` (a reference assignment to every worker), so the loops take no locks but two per link or pair: the send
counter (an ``itertools.count``, whose ``next`` is atomic) and the replay window's check-and-record.

Frames for a peer reached through relays, with which this host agreed end-to-end keys (a ``Pair``), are sealed once
with the pair's keys in the end-to-end form; a relay passes such datagrams on by their header, without opening or
reassembling them (``_transit``), and only from a neighbour's endpoint towards a known peer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from weft.datapath import icmp, wire
from weft.datapath.tap import ETH_LEN, MAX_READ, VNET_LEN, open_tap
from weft.datapath.udp import GRO_CMSG_SPACE, gro_size, open_udp_group, segment_cmsg
from weft.datapath.wire import (
    BROADCAST,
    CLEN,
    CONTROL,
    CONTROL_LEN,
    COUNTER,
    E2E_HEADER,
    E2E_HLEN,
    E2E_MAGIC,
    E2E_NLEN,
    E2E_NONCE,
    FRAME,
    HEADER,
    HLEN,
    ILEN,
    INNER,
    MAGIC,
    NONCE,
    TAG,
    peer_bytes,
    segment_into,
)
from weft.mesh.crypto import SessionKeys

log = logging.getLogger(__name__)

PROBE_ETHERTYPE = b"\x88\xb5"
MIN_DATAGRAM = 548
BATCH = 64  # reads per fd per wake-up, so neither direction starves the other
MAX_WORKERS = 16
_NO_PEER = bytes(6)
_MSGID_MASK = 0xFFFFFFFF
# The socket module's flags are IntFlag members: `flags & socket.MSG_TRUNC` runs the enum's Python operator and
# makes a member on every receive (a few microseconds, a tenth of what a relay spends on a buffer). Plain ints.
_DONTWAIT = int(socket.MSG_DONTWAIT)
_TRUNC = int(socket.MSG_TRUNC)
_SLEEVE_TX, _SLEEVE_RX = ("sleeve", "tx"), ("sleeve", "rx")
_RELAY_TX, _RELAY_RX = ("relay", "tx"), ("relay", "rx")
_CONTROL_TX, _CONTROL_RX = ("control", "tx"), ("control", "rx")
_TRANSIT_TX, _TRANSIT_RX = ("transit", "tx"), ("transit", "rx")


@dataclass(frozen=True, slots=True)
class Link:
    peer: int  # 48-bit peer name of a direct neighbour
    addr: tuple[str, int]  # its UDP endpoint
    keys: SessionKeys | None  # None: this mesh runs without a secret (no sealing)
    datagram_size: int  # largest UDP payload on this link (path MTU - 28)
    epoch: int  # changes when the keys change (a new control connection)
    e2e: bool = False  # the neighbour reads end-to-end datagrams and passes them on (its handshake said so)


@dataclass(frozen=True, slots=True)
class Pair:
    """End-to-end keys agreed with a peer that is not a neighbour (endtoend.py). A peer may have several at once
    (the current keys, and the ones before or after a rekey): all open, at most one seals."""

    peer: int
    kid: int  # 32-bit key id, the first 4 bytes of every nonce under these keys
    keys: SessionKeys
    send: bool  # seal this host's unicast frames for the peer with these keys
    datagram_size: int  # largest UDP payload on every hop to the peer, as the agreement found it


@dataclass(frozen=True)
class Forwarding:
    links: Mapping[int, Link] = field(default_factory=dict)
    next_hop: Mapping[int, int] = field(default_factory=dict)
    flood_origins: frozenset[int] = frozenset()  # whose broadcasts from the sleeve reach our containers
    bcast_children: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    mac_owner: Mapping[bytes, int] = field(default_factory=dict)
    local_macs: frozenset[bytes] = frozenset()
    frame_mtu: Mapping[int, int] = field(default_factory=dict)
    pairs: tuple[Pair, ...] = ()


def _byte_counters() -> dict[tuple[str, str], int]:
    return {(p, d): 0 for p in ("sleeve", "relay", "transit", "control") for d in ("tx", "rx")}


@dataclass
class SleeveStats:
    """Plain counters for the controller to export. ``bytes`` is UDP payload by (path, direction): path "sleeve"
    for this host's frames, "relay" for frames passed on after opening them (sealed hop by hop), "transit" for
    end-to-end datagrams passed on unopened, "control" for control messages. ``dropped`` counts
    packets by reason. Each worker has its own, written by its thread only; the control sends have one more (under
    a lock). ``Sleeve.totals`` sums them."""

    bytes: dict[tuple[str, str], int] = field(default_factory=_byte_counters)
    dropped: dict[str, int] = field(default_factory=dict)


class _LinkState:
    """A Link plus what must outlive table swaps: the AEADs, the send counter and the replay window. They are
    kept while (epoch, keys) stay the same, so a nonce is never reused and replays stay caught."""

    __slots__ = (
        "addr",
        "cmsg",
        "counter",
        "dsize",
        "keys",
        "link",
        "opener",
        "peer",
        "sealer",
        "step",
        "traffic",
        "window",
    )

    def __init__(self, link: Link, prev: _LinkState | None) -> None:
        self.link = link
        self.peer = link.peer
        self.addr = link.addr
        self.keys = link.keys
        self.traffic = prev.traffic if prev is not None else 0  # unicast frames sent or received on this link, ever
        if prev is not None and prev.link.epoch == link.epoch and prev.keys == link.keys:
            self.sealer, self.opener = prev.sealer, prev.opener
            self.counter, self.window = prev.counter, prev.window
        else:
            keys = link.keys
            self.sealer = ChaCha20Poly1305(keys.send) if keys else None
            self.opener = ChaCha20Poly1305(keys.receive) if keys else None
            self.counter = itertools.count()  # next() is atomic: every worker and the control thread share it
            self.window = wire.ReplayWindow()  # one per link, shared by the workers (its accept() takes a lock)
        # a bad value must not break sending: at most one UDP payload, at least what IPv4 guarantees (576 - 28)
        self.dsize = max(MIN_DATAGRAM, min(link.datagram_size, wire.MAX_UDP))
        self.cmsg = segment_cmsg(self.dsize)
        self.step = wire.segments_per_send(self.dsize) * self.dsize


class _PairState:
    """A Pair plus its AEADs, send counter and replay window, kept while (peer, kid, keys) stay the same."""

    __slots__ = ("counter", "dsize", "keys", "kid", "opener", "pair", "peer", "route", "sealer", "traffic", "window")

    def __init__(self, pair: Pair, me: bytes, prev: _PairState | None) -> None:
        self.pair = pair
        self.peer = pair.peer
        self.kid = pair.kid
        self.keys = pair.keys
        self.route = me + peer_bytes(pair.peer)  # the header's origin|dst for what we send
        self.traffic = prev.traffic if prev is not None else 0  # frames sealed or opened with these keys, ever
        if prev is not None and prev.keys == pair.keys:
            self.sealer, self.opener = prev.sealer, prev.opener
            self.counter, self.window = prev.counter, prev.window
        else:
            self.sealer = ChaCha20Poly1305(pair.keys.send)
            self.opener = ChaCha20Poly1305(pair.keys.receive)
            self.counter = itertools.count()
            self.window = wire.ReplayWindow()
        self.dsize = max(MIN_DATAGRAM, min(pair.datagram_size, wire.MAX_UDP))


class _Tables:
    __slots__ = (
        "by_addr",
        "by_hop",
        "fwd",
        "known",
        "own_children",
        "pair_routes",
        "pair_rx",
        "pair_tx",
        "states",
        "transit",
    )

    def __init__(
        self,
        ourself: int,
        fwd: Forwarding,
        old: Mapping[int, _LinkState],
        old_pairs: Mapping[tuple[bytes, int], _PairState] | None = None,
    ) -> None:
        self.fwd = fwd
        self.states = {peer: _LinkState(link, old.get(peer)) for peer, link in fwd.links.items()}
        self.by_hop = {peer_bytes(peer): st for peer, st in self.states.items()}
        self.own_children = tuple(self.states[c] for c in fwd.bcast_children.get(ourself, ()) if c in self.states)
        me = peer_bytes(ourself)
        old_pairs = old_pairs or {}
        self.pair_rx: dict[tuple[bytes, int], _PairState] = {}
        self.pair_tx: dict[int, _PairState] = {}
        for pair in fwd.pairs:
            key = (peer_bytes(pair.peer), pair.kid)
            st = self.pair_rx[key] = _PairState(pair, me, old_pairs.get(key))
            if pair.send:
                self.pair_tx[pair.peer] = st
        self.pair_routes = frozenset(peer_bytes(p.peer) + me for p in fwd.pairs)  # origin|dst of what we open
        # Transit: end-to-end datagrams are taken only from a capable neighbour's endpoint (where its authenticated
        # heartbeats come from), for a peer the mesh knows, towards a capable next hop.
        self.by_addr = {st.addr: st for st in self.states.values() if st.link.e2e and st.keys is not None}
        self.transit = {
            peer_bytes(dst): self.states[hop]
            for dst, hop in fwd.next_hop.items()
            if hop in self.states and self.states[hop].link.e2e and self.states[hop].keys is not None
        }
        self.known = frozenset(peer_bytes(p) for p in fwd.next_hop)

    def transit_hop(self, addr: tuple[str, int], route: bytes, me: bytes) -> _LinkState | str:
        """Where an end-to-end datagram with header ``route`` (origin|dst) from ``addr`` goes next, or why it is
        dropped (the reason counted)."""
        sender = self.by_addr.get(addr)
        if sender is None:
            return "transit_unknown_sender"
        origin, dst = route[:6], route[6:]
        nxt = self.transit.get(dst)
        if nxt is None:
            return "transit_no_route"
        if origin not in self.known or origin in (me, dst):
            return "transit_unknown_origin"
        if nxt is sender:
            return "transit_loop"
        return nxt


class Sleeve:
    """The sleeve: its forwarding workers (one per TAP queue and UDP socket) and the controller's side; see the
    module docstring. It owns the descriptors it is given and closes them in ``stop``."""

    def __init__(
        self,
        ourself: int,
        *,
        taps: Sequence[int],
        socks: Sequence[socket.socket],
        on_control: Callable[[int, tuple[str, int], bytes, int], None],
        on_probe: Callable[[bytes], None],
        on_pair_control: Callable[[int, int, bytes], None] | None = None,
        name: str = "sleeve",
    ) -> None:
        """``taps``: non-blocking descriptors that read and write a virtio-net header and a frame per call (TAP
        queues, or one end of a SOCK_SEQPACKET socketpair); ``socks``: bound UDP sockets, as many, one per worker
        (a SO_REUSEPORT group steered by ``udp.steer`` when there are several)."""
        if not taps or len(taps) != len(socks) or len(taps) > MAX_WORKERS:
            raise ValueError(f"the sleeve needs 1-{MAX_WORKERS} TAP descriptors and as many UDP sockets")
        self.ourself = ourself
        self.name = name
        self._me = peer_bytes(ourself)
        self._on_control = on_control
        self._on_probe = on_probe
        self._on_pair_control = on_pair_control  # (peer, kid, payload): a CONTROL message sealed end to end
        self._tables = _Tables(ourself, Forwarding(), {})
        self._update_lock = threading.Lock()
        self._control_lock = threading.Lock()
        self._control_stats = SleeveStats()  # what the control sends sent and failed to send (under _control_lock)
        self._msgid = itertools.count(int.from_bytes(os.urandom(3)))  # random start: no clash with stale partials
        self._flow_slots = [-1] * 256  # flow slot -> flow byte (worker._flow_byte)
        self._flow_next = itertools.count()
        self._taps = list(taps)
        self._socks = list(socks)
        self._sock: socket.socket | None = self._socks[0]  # control messages and probes leave by the first
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # one write wakes every worker
        self._stopping = False
        self._threads: list[threading.Thread] = []
        partials = (wire.Partials(), wire.Partials(), wire.Partials())  # per form: link, end-to-end, recut
        self.workers = [
            _Worker(self, i, fd, sock, partials) for i, (fd, sock) in enumerate(zip(taps, socks, strict=True))
        ]

    # -- control thread API ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads or self._sock is None:
            return
        self._stopping = False
        for w in self.workers:
            t = threading.Thread(target=w.loop, name=f"{self.name}-{w.index}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop the workers and close every descriptor; idempotent."""
        threads, self._threads = self._threads, []
        self._stopping = True
        if threads:
            os.eventfd_write(self._wake_fd, 1)
            for t in threads:
                t.join(5.0)
        self._close_fds()

    def _close_fds(self) -> None:
        self._sock = None
        for sock in self._socks:
            sock.close()
        for fd in [*self._taps, self._wake_fd]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._socks, self._taps, self._wake_fd = [], [], -1

    def update(self, fwd: Forwarding) -> None:
        """Swap in new tables; link crypto state carries over while a link's epoch and keys stay the same."""
        with self._update_lock:
            tables = self._tables = _Tables(self.ourself, fwd, self._tables.states, self._tables.pair_rx)
            for w in self.workers:
                w._tables = tables

    def totals(self) -> SleeveStats:
        """Every worker's counters and the control sends', summed (a snapshot)."""
        out = SleeveStats(bytes={}, dropped={})
        with self._control_lock:
            parts = [(dict(self._control_stats.bytes), dict(self._control_stats.dropped))]
        parts += [(dict(w.stats.bytes), dict(w.stats.dropped)) for w in self.workers]  # dict() copies atomically
        for counts, dropped in parts:
            for key, n in counts.items():
                out.bytes[key] = out.bytes.get(key, 0) + n
            for reason, n in dropped.items():
                out.dropped[reason] = out.dropped.get(reason, 0) + n
        return out

    def worker_bytes(self) -> list[dict[str, int]]:
        """Per worker: the UDP bytes it sent ("tx") and received ("rx"), over every path (control sends aside)."""
        out = []
        for w in self.workers:
            counts = dict(w.stats.bytes)
            out.append({d: sum(n for (_, dd), n in counts.items() if dd == d) for d in ("tx", "rx")})
        return out

    def _control_sent(self, datagram: bytes | None) -> bool:
        """Count a control send: its bytes, or (None) a failure."""
        with self._control_lock:
            stats = self._control_stats
            if datagram is None:
                stats.dropped["control_send_error"] = stats.dropped.get("control_send_error", 0) + 1
                return False
            stats.bytes[_CONTROL_TX] += len(datagram)
        return True

    def traffic(self) -> dict[int, int]:
        """Unicast frames (not control messages nor floods) each link carried, either way: which paths are in use."""
        return {peer: st.traffic for peer, st in self._tables.states.items()}

    def pair_traffic(self) -> dict[int, int]:
        """Frames sealed or opened end to end, per peer (all its key sets): which pairs carry traffic."""
        out: dict[int, int] = {}
        for st in self._tables.pair_rx.values():
            out[st.peer] = out.get(st.peer, 0) + st.traffic
        return out

    def send_control(self, peer: int, payload: bytes, *, pad_to: int = 0) -> bool:
        """Seal ``payload`` for the neighbour ``peer`` as one DF datagram of at least ``pad_to`` bytes."""
        st = self._tables.states.get(peer)
        sock = self._sock
        if st is None or sock is None or len(payload) > 0xFFFF:
            return False
        body = INNER.pack(CONTROL, self._me, peer_bytes(peer)) + CONTROL_LEN.pack(len(payload)) + payload
        overhead = HLEN + CLEN + (TAG if st.keys else 0)
        if pad_to > overhead + len(body):
            body += bytes(pad_to - overhead - len(body))
        if overhead + len(body) > wire.MAX_UDP:
            return False
        counter = next(st.counter)
        if st.keys is not None:  # an AEAD object of its own: the workers use the link's
            body = ChaCha20Poly1305(st.keys.send).encrypt(NONCE.pack(counter), body, None)
        msg = COUNTER.pack(counter) + body
        msgid = (next(self._msgid) << 8) & _MSGID_MASK
        datagram = HEADER.pack(MAGIC, self._me, msgid, 0, 1, len(msg)) + msg
        try:
            sock.sendto(datagram, socket.MSG_DONTWAIT, st.addr)
        except OSError:
            return self._control_sent(None)
        return self._control_sent(datagram)

    def send_pair_control(self, peer: int, kid: int, payload: bytes) -> bool:
        """Seal ``payload`` with the pair keys ``kid`` agreed with ``peer`` and send it end to end, as one datagram."""
        t = self._tables
        pst = t.pair_rx.get((peer_bytes(peer), kid))
        st = t.states.get(t.fwd.next_hop.get(peer, -1))
        sock = self._sock
        if pst is None or st is None or not st.link.e2e or st.peer == peer or sock is None:
            return False
        body = INNER.pack(CONTROL, self._me, peer_bytes(peer)) + CONTROL_LEN.pack(len(payload)) + payload
        if E2E_HLEN + E2E_NLEN + len(body) + TAG > min(st.dsize, pst.dsize):
            return False
        nonce = E2E_NONCE.pack(pst.kid, next(pst.counter))
        msg = nonce + ChaCha20Poly1305(pst.keys.send).encrypt(nonce, body, None)
        msgid = (next(self._msgid) << 8) & _MSGID_MASK
        datagram = E2E_HEADER.pack(E2E_MAGIC, pst.route, msgid, 0, 1, len(msg)) + msg
        try:
            sock.sendto(datagram, socket.MSG_DONTWAIT, st.addr)
        except OSError:
            return self._control_sent(None)
        return self._control_sent(datagram)

    def send_raw(self, addr: tuple[str, int], data: bytes) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.sendto(data, socket.MSG_DONTWAIT, addr)
        except OSError:
            return False
        return True


def open_sleeve(
    ourself: int,
    *,
    tap: str,
    listen: tuple[str, int],
    workers: int,
    on_control: Callable[[int, tuple[str, int], bytes, int], None],
    on_probe: Callable[[bytes], None],
    on_pair_control: Callable[[int, int, bytes], None] | None = None,
) -> Sleeve:
    """The agent's sleeve: ``workers`` queues of the persistent TAP ``tap`` (multi-queue when more than one) and as
    many UDP sockets on ``listen`` in one SO_REUSEPORT group, steered by each message's flow byte."""
    try:  # asks the kernel of this network namespace: /sys/class/net may show another one (nspawn)
        socket.if_nametoindex(tap)
    except OSError:
        raise FileNotFoundError(f"TAP {tap} does not exist (the sleeve attaches to a persistent TAP)") from None
    taps: list[int] = []
    socks: list[socket.socket] = []
    try:
        for _ in range(workers):
            try:
                taps.append(open_tap(tap))
            except OSError as exc:
                if taps:  # EBUSY: a TAP made before multi-queue ones, which takes one queue
                    raise OSError(
                        exc.errno, f"TAP {tap} takes no more than {len(taps)} queue(s): {exc.strerror}"
                    ) from None
                raise
        socks = open_udp_group(listen, workers)
        return Sleeve(
            ourself,
            taps=taps,
            socks=socks,
            on_control=on_control,
            on_probe=on_probe,
            on_pair_control=on_pair_control,
            name=f"sleeve-{tap}",
        )
    except BaseException:
        for fd in taps:
            os.close(fd)
        for sock in socks:
            sock.close()
        raise


class _Worker:
    """One TAP queue and one UDP socket, moved between by one thread, with buffers and counters of its own; the
    forwarding tables, the link and pair state (keys, send counters, replay windows) and the partial messages are
    the sleeve's, shared."""

    def __init__(
        self,
        sleeve: Sleeve,
        index: int,
        tap_fd: int,
        sock: socket.socket,
        partials: tuple[wire.Partials, wire.Partials, wire.Partials],
    ) -> None:
        self.index = index
        self.ourself = sleeve.ourself
        self.stats = SleeveStats()
        self._sleeve = sleeve
        self._me = sleeve._me
        self._on_control = sleeve._on_control
        self._on_probe = sleeve._on_probe
        self._on_pair_control = sleeve._on_pair_control
        self._msgid = sleeve._msgid  # shared: message ids stay unique per sender whichever worker sends
        self._flow_slots, self._flow_next = sleeve._flow_slots, sleeve._flow_next  # shared: see _flow_byte
        self._tables = sleeve._tables  # replaced by Sleeve.update
        self._rt = self._tables  # the tables of the batch being handled
        self._tap_fd = tap_fd
        self._sock = sock
        self._logged: set[str] = set()
        self._cur_addr: tuple[str, int] = ("", 0)
        # Preallocated buffers: TAP frames are read after room for counter + inner header, so the plaintext
        # (kind, origin, dst, vnet header, frame) is contiguous without a copy.
        self._tap_buf = wire.preallocated(CLEN + ILEN + MAX_READ)
        self._tap_view = memoryview(self._tap_buf)
        self._tap_iov = [self._tap_view[CLEN + ILEN :]]
        self._rx_view = memoryview(wire.preallocated(1 << 16))
        self._rx_iov = [self._rx_view]
        self._seal_view = memoryview(wire.preallocated(wire.MAX_MESSAGE))
        self._open_view = memoryview(wire.preallocated(wire.MAX_MESSAGE))
        self._out = wire.preallocated(wire.MAX_MESSAGE + wire.MAX_SEGMENTS * HLEN)
        self._out_view = memoryview(self._out)
        links, pairs, recuts = partials
        dropped = self.stats.dropped
        self._reasm = wire.Reassembler(dropped, lambda: self._tables.by_hop, partials=links)
        self._e2e_reasm = wire.Reassembler(
            dropped, lambda: self._tables.pair_routes, header=E2E_HEADER, magic=E2E_MAGIC, partials=pairs
        )
        # A relay whose next link takes smaller datagrams than the origin cut (its path MTU fell after the pair's
        # agreement) cuts the sealed message again: reassembled, never opened.
        self._recut_reasm = wire.Reassembler(dropped, lambda: _ANY, header=E2E_HEADER, magic=E2E_MAGIC, partials=recuts)
        self._recut_to: _LinkState | None = None
        self._cmsgs: dict[int, list[tuple[int, int, bytes]]] = {}

    def loop(self) -> None:
        sleeve = self._sleeve
        sock_fd, tap_fd = self._sock.fileno(), self._tap_fd
        ep = select.epoll()
        try:
            for fd in (sock_fd, tap_fd, sleeve._wake_fd):
                ep.register(fd, select.EPOLLIN)
            while not sleeve._stopping:
                for fd, _ in ep.poll():
                    if fd == sock_fd:
                        self._drain_udp()
                    elif fd == tap_fd:
                        self._drain_tap()
        except Exception:
            log.exception("sleeve worker %d failed", self.index)
        finally:
            ep.close()

    def _drop(self, reason: str) -> None:
        dropped = self.stats.dropped
        dropped[reason] = dropped.get(reason, 0) + 1

    def _error(self, where: str) -> None:
        """An unexpected exception on one packet: count it, log its first occurrence, keep going."""
        self._drop("error")
        if where not in self._logged:
            self._logged.add(where)
            log.exception("sleeve: unexpected error in %s (logged once)", where)

    def _drain_tap(self) -> None:
        readv, fd, iov = os.readv, self._tap_fd, self._tap_iov
        self._rt = self._tables
        for _ in range(BATCH):
            try:
                n = readv(fd, iov)
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if n == 0:  # an error, e.g. the TAP was deleted (or a socketpair's end closed)
                self._drop("tap_read")
                time.sleep(0.05)  # epoll keeps reporting it: do not spin
                return
            try:
                self._from_tap(n)
            except Exception:
                self._error("tap")

    def _drain_udp(self) -> None:
        recv, iov, view = self._sock.recvmsg_into, self._rx_iov, self._rx_view
        feed, deliver = self._reasm.feed, self._on_message
        self._rt = self._tables
        for _ in range(BATCH):
            try:
                n, anc, flags, addr = recv(iov, GRO_CMSG_SPACE, _DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self._drop("recv_error")
                continue
            if flags & _TRUNC or n == 0:
                self._drop("malformed")
                continue
            self._cur_addr = addr
            try:
                gso = gro_size(anc) if anc else 0
                if gso <= 0 or gso >= n:
                    gso = 0
                    magics = view[0:1].tobytes()
                else:
                    magics = view[0:n:gso].tobytes()  # the first byte of every datagram in the buffer
                if magics.count(MAGIC) == len(magics):
                    feed(view, n, gso, deliver)
                elif magics.count(E2E_MAGIC) == len(magics):
                    self._from_e2e(view, n, gso)
                else:
                    self._mixed(view, n, gso, magics)
            except Exception:
                self._error("udp")

    def _mixed(self, view: memoryview, n: int, gso: int, magics: bytes) -> None:
        """A GRO buffer holding both forms (one neighbour's own messages and those it passes on): each run of one
        form is handled as such."""
        i, k = 0, len(magics)
        while i < k:
            j = i + 1
            while j < k and magics[j] == magics[i]:
                j += 1
            start, end = i * gso, min(j * gso, n)
            run, size = view[start:end], gso if j - i > 1 else 0
            if magics[i] == MAGIC:
                self._reasm.feed(run, end - start, size, self._on_message)
            elif magics[i] == E2E_MAGIC:
                self._from_e2e(run, end - start, size)
            else:
                self._drop("malformed")
            i = j

    def _from_e2e(self, view: memoryview, n: int, gso: int) -> None:
        """End-to-end datagrams (``gso`` bytes each, 0: one): opened if they are for us, else passed on unopened."""
        if n < E2E_HLEN:
            self._drop("malformed")
            return
        route = view[1:13].tobytes()
        if gso:
            last = (n - 1) // gso * gso
            if gso < E2E_HLEN or n - last < E2E_HLEN:
                self._drop("malformed")
                return
            if not _one_route(view, n, gso, last, route):
                for off in range(0, n, gso):  # several destinations in one buffer: one datagram at a time
                    end = min(off + gso, n)
                    self._from_e2e(view[off:end], end - off, 0)
                return
        if route[6:] == self._me:
            self._e2e_reasm.feed(view, n, gso, self._on_pair_message)
        else:
            self._transit(view, n, gso, route)

    def _transit(self, view: memoryview, n: int, gso: int, route: bytes) -> None:
        """Pass end-to-end datagrams on to the next hop as they came: one GRO buffer, one UDP_SEGMENT send."""
        nxt = self._rt.transit_hop(self._cur_addr, route, self._me)
        if isinstance(nxt, str):
            self._drop(nxt)
            return
        size = gso or n
        if size > nxt.dsize:
            self._recut_to = nxt
            self._recut_reasm.feed(view, n, gso, self._recut)
            return
        assert self._sock is not None
        try:
            if not gso:
                self._sock.sendto(view[:n], nxt.addr)
            else:
                step = wire.segments_per_send(gso) * gso
                cmsg = self._cmsg(gso)
                for start in range(0, n, step):
                    self._sock.sendmsg([view[start : min(start + step, n)]], cmsg, 0, nxt.addr)
        except OSError:
            self._drop("send_error")
            return
        b = self.stats.bytes
        b[_TRANSIT_RX] += n
        b[_TRANSIT_TX] += n

    def _recut(self, route: bytes, msg: memoryview, datagram_size: int) -> None:
        """A whole sealed message whose datagrams were too big for the next link: cut it again, smaller."""
        nxt = self._recut_to
        if nxt is None:
            return
        where = f"recut {route[:6].hex()}->{route[6:].hex()}"
        if where not in self._logged:
            self._logged.add(where)
            log.info(
                "sleeve: end-to-end datagrams for %s are larger than the next link takes (%d bytes): cutting again",
                route[6:].hex(":"),
                nxt.dsize,
            )
        self.stats.bytes[_TRANSIT_RX] += len(msg)
        self._send_segments(msg, route, nxt.addr, nxt.dsize, _TRANSIT_TX, E2E_HEADER, E2E_MAGIC)

    def _cmsg(self, size: int) -> list[tuple[int, int, bytes]]:
        cmsg = self._cmsgs.get(size)
        if cmsg is None:
            cmsg = self._cmsgs[size] = segment_cmsg(size)
        return cmsg

    def _from_tap(self, n: int) -> None:
        """One vnet header + frame of length ``n`` read from the TAP into the buffer after the inner-header room."""
        if n < VNET_LEN + ETH_LEN:
            self._drop("malformed")
            return
        buf, view = self._tap_buf, self._tap_view
        base = CLEN + ILEN
        frame = base + VNET_LEN
        if buf[frame + 12 : frame + 14] == PROBE_ETHERTYPE:
            self._on_probe(bytes(view[frame : base + n]))
            return
        t = self._rt
        fwd = t.fwd
        if bytes(view[frame + 6 : frame + 12]) not in fwd.local_macs:
            self._drop("foreign_source")
            return
        dst = bytes(view[frame : frame + 6])
        plain = view[CLEN : base + n]
        owner = None if dst[0] & 1 else fwd.mac_owner.get(dst)
        if owner is None:
            if dst in fwd.local_macs:
                self._drop("local")
                return
            INNER.pack_into(buf, CLEN, BROADCAST, self._me, _NO_PEER)
            for st in t.own_children:
                self._send_plain(st, plain, _SLEEVE_TX)
            return
        # A frame for a peer on the fast path still comes here for a moment when the path has just turned fast: the
        # tables change at once, the kernel's FDB a little later (KERNEL_SPACING). It goes over the sleeve, as it
        # would have a moment before, rather than being lost.
        mtu = fwd.frame_mtu.get(owner)
        if mtu is not None and (n - VNET_LEN - ETH_LEN > mtu or buf[base + 1]):
            size = icmp.ip_size(view[base : base + n])
            if size > mtu:
                self._drop("too_big")
                try:
                    os.write(self._tap_fd, bytes(VNET_LEN) + icmp.frag_needed(view[frame : base + n], mtu))
                except OSError:
                    self._drop("tap_write")
                return
        st = t.states.get(fwd.next_hop.get(owner, -1))
        if st is None:
            self._drop("no_route")
            return
        INNER.pack_into(buf, CLEN, FRAME, self._me, peer_bytes(owner))
        pst = t.pair_tx.get(owner)
        if pst is not None and st.link.e2e and st.peer != owner:
            self._send_pair(pst, st, plain)
            return
        self._send_plain(st, plain, _SLEEVE_TX)

    def _send_pair(self, pst: _PairState, st: _LinkState, plain: memoryview) -> None:
        """Seal ``plain`` with the pair's keys and send it end to end through the neighbour ``st``."""
        st.traffic += 1
        pst.traffic += 1
        nonce = E2E_NONCE.pack(pst.kid, next(pst.counter))
        view = self._seal_view
        m = len(plain)
        view[:E2E_NLEN] = nonce
        pst.sealer.encrypt_into(nonce, plain, None, view[E2E_NLEN : E2E_NLEN + m + TAG])
        size = st.dsize if st.dsize < pst.dsize else pst.dsize
        sealed = view[: E2E_NLEN + m + TAG]
        self._send_segments(sealed, pst.route, st.addr, size, _SLEEVE_TX, E2E_HEADER, E2E_MAGIC, self._flow_byte(plain))

    def _send_plain(self, st: _LinkState, plain: memoryview, path: tuple[str, str]) -> None:
        """Seal ``plain`` (inner header + payload) for the link ``st`` and send it."""
        counter = next(st.counter)
        if plain[0] == FRAME:
            st.traffic += 1
        view = self._seal_view
        m = len(plain)
        COUNTER.pack_into(view, 0, counter)
        if st.sealer is None:
            view[CLEN : CLEN + m] = plain
            msg = view[: CLEN + m]
        else:
            st.sealer.encrypt_into(NONCE.pack(counter), plain, None, view[CLEN : CLEN + m + TAG])
            msg = view[: CLEN + m + TAG]
        self._send_message(st, msg, path, self._flow_byte(plain))

    def _flow_byte(self, plain: memoryview) -> int:
        """The flow byte of a frame's message: the receiver steers by it, so one flow's messages reach one worker
        and stay in order (as a NIC's RSS keeps them) while flows spread. Flows hash to one of 256 slots, and each
        slot takes the next byte in turn when first used: a few flows spread evenly, not as a coin falls."""
        slot = hash(flow_key(plain)) & 0xFF
        flow = self._flow_slots[slot]
        if flow < 0:
            flow = self._flow_slots[slot] = next(self._flow_next) & 0xFF
        return flow

    def _send_message(self, st: _LinkState, msg: memoryview, path: tuple[str, str], flow: int = 0) -> None:
        msgid = ((next(self._msgid) << 8) | flow) & _MSGID_MASK
        total = segment_into(self._out, msg, self._me, msgid, st.dsize)
        if total < 0:
            self._drop("too_big")
            return
        out = self._out_view
        try:
            if total <= st.dsize:
                self._sock.sendto(out[:total], st.addr)
            else:
                sendmsg, step, cmsg, addr = self._sock.sendmsg, st.step, st.cmsg, st.addr
                for start in range(0, total, step):
                    sendmsg([out[start : min(start + step, total)]], cmsg, 0, addr)
        except OSError:
            self._drop("send_error")
            return
        self.stats.bytes[path] += total

    def _send_segments(
        self,
        msg: memoryview,
        hop: bytes,
        addr: tuple[str, int],
        dsize: int,
        path: tuple[str, str],
        header: struct.Struct,
        magic: int,
        flow: int = 0,
    ) -> None:
        """Cut ``msg`` into datagrams of ``dsize`` with ``header`` and send them to ``addr``."""
        msgid = ((next(self._msgid) << 8) | flow) & _MSGID_MASK
        total = segment_into(self._out, msg, hop, msgid, dsize, header, magic)
        if total < 0:
            self._drop("too_big")
            return
        out = self._out_view
        try:
            if total <= dsize:
                self._sock.sendto(out[:total], addr)
            else:
                step, cmsg = wire.segments_per_send(dsize) * dsize, self._cmsg(dsize)
                for start in range(0, total, step):
                    self._sock.sendmsg([out[start : min(start + step, total)]], cmsg, 0, addr)
        except OSError:
            self._drop("send_error")
            return
        self.stats.bytes[path] += total

    def _on_message(self, hop: bytes, msg: memoryview, datagram_size: int) -> None:
        """A reassembled message from the neighbour named ``hop``: open it and act on its kind."""
        t = self._rt
        st = t.by_hop.get(hop)
        if st is None:
            self._drop("unknown_peer")
            return
        m = len(msg)
        if st.opener is not None:
            if m < CLEN + ILEN + TAG:
                self._drop("malformed")
                return
            counter = COUNTER.unpack_from(msg)[0]
            window = st.window
            if not window.check(counter):
                self._drop("replay")
                return
            plain = self._open_view[: m - CLEN - TAG]
            try:
                st.opener.decrypt_into(NONCE.pack(counter), msg[CLEN:], None, plain)
            except InvalidTag:
                self._drop("auth")
                return
            if not window.accept(counter):  # another worker opened the same counter meanwhile
                self._drop("replay")
                return
        else:
            if m < CLEN + ILEN:
                self._drop("malformed")
                return
            plain = msg[CLEN:]
        kind, origin_b, dst_b = INNER.unpack_from(plain)
        fwd = t.fwd
        if kind == FRAME:
            st.traffic += 1
            dst = int.from_bytes(dst_b)
            if dst == self.ourself:
                self.stats.bytes[_SLEEVE_RX] += m
                self._to_tap(plain)
                return
            nxt = t.states.get(fwd.next_hop.get(dst, -1))
            if nxt is None or nxt.peer == st.peer:
                self._drop("no_route")
                return
            self.stats.bytes[_RELAY_RX] += m
            self._send_plain(nxt, plain, _RELAY_TX)
        elif kind == BROADCAST:
            origin = int.from_bytes(origin_b)
            if origin == self.ourself:
                self._drop("loop")
                return
            if origin in fwd.flood_origins:
                self.stats.bytes[_SLEEVE_RX] += m
                self._to_tap(plain)
            for child in fwd.bcast_children.get(origin, ()):
                nxt = t.states.get(child)
                if nxt is not None and child != st.peer:
                    self._send_plain(nxt, plain, _RELAY_TX)
        elif kind == CONTROL:
            length = CONTROL_LEN.unpack_from(plain, ILEN)[0] if len(plain) >= ILEN + 2 else -1
            if int.from_bytes(origin_b) != st.peer or length < 0 or ILEN + 2 + length > len(plain):
                self._drop("malformed")
                return
            self.stats.bytes[_CONTROL_RX] += m
            try:
                self._on_control(st.peer, self._cur_addr, bytes(plain[ILEN + 2 : ILEN + 2 + length]), datagram_size)
            except Exception:
                self._error("on_control")
        else:
            self._drop("malformed")

    def _on_pair_message(self, route: bytes, msg: memoryview, datagram_size: int) -> None:
        """A reassembled end-to-end message for us (``route`` = origin|us): open it with the pair's keys."""
        m = len(msg)
        if m < E2E_NLEN + ILEN + TAG:
            self._drop("malformed")
            return
        kid, counter = E2E_NONCE.unpack_from(msg)
        pst = self._rt.pair_rx.get((route[:6], kid))
        if pst is None:
            self._drop("unknown_pair")
            return
        window = pst.window
        if not window.check(counter):
            self._drop("replay")
            return
        plain = self._open_view[: m - E2E_NLEN - TAG]
        try:
            pst.opener.decrypt_into(msg[:E2E_NLEN], msg[E2E_NLEN:], None, plain)
        except InvalidTag:
            self._drop("auth")
            return
        if not window.accept(counter):  # another worker opened the same counter meanwhile
            self._drop("replay")
            return
        kind, origin_b, dst_b = INNER.unpack_from(plain)
        if origin_b != route[:6] or dst_b != self._me:
            self._drop("malformed")
            return
        if kind == FRAME:
            self.stats.bytes[_SLEEVE_RX] += m
            pst.traffic += 1
            hop = self._rt.by_addr.get(self._cur_addr)  # the neighbour it came through carries traffic
            if hop is not None:
                hop.traffic += 1
            self._to_tap(plain)
        elif kind == CONTROL:
            length = CONTROL_LEN.unpack_from(plain, ILEN)[0] if len(plain) >= ILEN + 2 else -1
            if length < 0 or ILEN + 2 + length > len(plain):
                self._drop("malformed")
                return
            self.stats.bytes[_CONTROL_RX] += m
            if self._on_pair_control is not None:
                try:
                    self._on_pair_control(pst.peer, pst.kid, bytes(plain[ILEN + 2 : ILEN + 2 + length]))
                except Exception:
                    self._error("on_pair_control")
        else:
            self._drop("malformed")

    def _to_tap(self, plain: memoryview) -> None:
        if len(plain) < ILEN + VNET_LEN + ETH_LEN:
            self._drop("malformed")
            return
        try:
            os.write(self._tap_fd, plain[ILEN:])
        except OSError:
            self._drop("tap_write")


class _Anything:
    """A container holding everything: a relay re-cutting a message takes chunks from whichever origin passed."""

    def __contains__(self, item: object) -> bool:
        return True


_ANY = _Anything()


def _one_route(view: memoryview, n: int, gso: int, last: int, route: bytes) -> bool:
    """Whether every datagram in the buffer carries ``route`` (origin|dst). Two header reads when the first and the
    last are chunks of one message (then, from an honest sender, so is everything between them: GRO joins one
    flow's datagrams in order); else every header is looked at. A buffer crafted to break that rule still comes
    from a neighbour's endpoint, and each of its datagrams still goes only to a neighbour, which drops what it
    cannot open."""
    if view[last + 1 : last + 13] != route:
        return False
    _, _, id0, idx0, _, _ = E2E_HEADER.unpack_from(view, 0)
    _, _, id1, idx1, _, _ = E2E_HEADER.unpack_from(view, last)
    if id0 == id1 and idx1 - idx0 == last // gso:
        return True
    return all(view[off + 1 : off + 13] == route for off in range(gso, last, gso))


_PORTS = frozenset({6, 17, 132})  # TCP, UDP, SCTP: the 4 bytes after the IP header are the ports


def flow_key(plain: memoryview) -> bytes:
    """What is the same for every frame of one flow and differs between flows: the IP addresses, and the ports for
    TCP, UDP and SCTP. Empty for what is not IP (ARP and the like: one flow)."""
    eth = ILEN + VNET_LEN
    ip = eth + ETH_LEN
    n = len(plain)
    kind = plain[eth + 12 : eth + 14]
    if kind == b"\x08\x00" and n >= ip + 20:
        ports = ip + (plain[ip] & 0x0F) * 4
        if plain[ip + 9] in _PORTS and n >= ports + 4:
            return plain[ip + 12 : ip + 20].tobytes() + plain[ports : ports + 4].tobytes()
        return plain[ip + 12 : ip + 20].tobytes()
    if kind == b"\x86\xdd" and n >= ip + 40:
        if plain[ip + 6] in _PORTS and n >= ip + 44:
            return plain[ip + 8 : ip + 44].tobytes()
        return plain[ip + 8 : ip + 40].tobytes()
    return b""

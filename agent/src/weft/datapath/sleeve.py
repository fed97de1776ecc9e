"""The encrypted userspace path ("sleeve"): frames between the bridge's TAP port and peers over UDP.

One data thread runs a plain epoll loop (asyncio is slower on this path; reference/datapath.md). It reads whole GSO
frames from the TAP, seals each once with the link's ChaCha20-Poly1305 key and sends it as path-MTU datagrams with
UDP_SEGMENT; it receives GRO-coalesced datagrams, reassembles, opens, checks the replay window, and writes the frame
to the TAP, relays it (re-sealed for the next hop) or passes a CONTROL message up. The wire format is in wire.py.
The controller swaps whole forwarding tables with ``update`` (a reference assignment), so the loop takes no locks.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from weft.datapath import icmp, wire
from weft.datapath.tap import ETH_LEN, MAX_READ, VNET_LEN, open_tap
from weft.datapath.udp import GRO_CMSG_SPACE, gro_size, open_udp, segment_cmsg
from weft.datapath.wire import (
    BROADCAST,
    CLEN,
    CONTROL,
    CONTROL_LEN,
    COUNTER,
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
_NO_PEER = bytes(6)
_MSGID_MASK = 0xFFFFFFFF
_SLEEVE_TX, _SLEEVE_RX = ("sleeve", "tx"), ("sleeve", "rx")
_RELAY_TX, _RELAY_RX = ("relay", "tx"), ("relay", "rx")
_CONTROL_TX, _CONTROL_RX = ("control", "tx"), ("control", "rx")


@dataclass(frozen=True)
class Link:
    peer: int  # 48-bit peer name of a direct neighbour
    addr: tuple[str, int]  # its UDP endpoint
    keys: SessionKeys | None  # None: this mesh runs without a secret (no sealing)
    datagram_size: int  # largest UDP payload on this link (path MTU - 28)
    epoch: int  # changes when the keys change (a new control connection)


@dataclass(frozen=True)
class Forwarding:
    links: Mapping[int, Link] = field(default_factory=dict)
    next_hop: Mapping[int, int] = field(default_factory=dict)
    sleeve_peers: frozenset[int] = frozenset()
    bcast_children: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    mac_owner: Mapping[bytes, int] = field(default_factory=dict)
    local_macs: frozenset[bytes] = frozenset()
    frame_mtu: Mapping[int, int] = field(default_factory=dict)


def _byte_counters() -> dict[tuple[str, str], int]:
    return {(p, d): 0 for p in ("sleeve", "relay", "control") for d in ("tx", "rx")}


@dataclass
class SleeveStats:
    """Plain counters for the controller to export. ``bytes`` is UDP payload by (path, direction): path "sleeve"
    for this host's frames, "relay" for frames passed on, "control" for control messages. ``dropped`` counts
    packets by reason. Written by the data thread only, except the control-send entries (under a lock)."""

    bytes: dict[tuple[str, str], int] = field(default_factory=_byte_counters)
    dropped: dict[str, int] = field(default_factory=dict)


class _LinkState:
    """A Link plus what must outlive table swaps: the AEADs, the send counter and the replay window. They are
    kept while (epoch, keys) stay the same, so a nonce is never reused and replays stay caught."""

    __slots__ = ("addr", "cmsg", "counter", "dsize", "keys", "link", "opener", "peer", "sealer", "step", "window")

    def __init__(self, link: Link, prev: _LinkState | None) -> None:
        self.link = link
        self.peer = link.peer
        self.addr = link.addr
        self.keys = link.keys
        if prev is not None and prev.link.epoch == link.epoch and prev.keys == link.keys:
            self.sealer, self.opener = prev.sealer, prev.opener
            self.counter, self.window = prev.counter, prev.window
        else:
            keys = link.keys
            self.sealer = ChaCha20Poly1305(keys.send) if keys else None
            self.opener = ChaCha20Poly1305(keys.receive) if keys else None
            self.counter = itertools.count()  # next() is atomic: the data and control threads share it
            self.window = wire.ReplayWindow()
        # a bad value must not break sending: at most one UDP payload, at least what IPv4 guarantees (576 - 28)
        self.dsize = max(MIN_DATAGRAM, min(link.datagram_size, wire.MAX_UDP))
        self.cmsg = segment_cmsg(self.dsize)
        self.step = wire.segments_per_send(self.dsize) * self.dsize


class _Tables:
    __slots__ = ("by_hop", "fwd", "own_children", "states")

    def __init__(self, ourself: int, fwd: Forwarding, old: Mapping[int, _LinkState]) -> None:
        self.fwd = fwd
        self.states = {peer: _LinkState(link, old.get(peer)) for peer, link in fwd.links.items()}
        self.by_hop = {peer_bytes(peer): st for peer, st in self.states.items()}
        self.own_children = tuple(self.states[c] for c in fwd.bcast_children.get(ourself, ()) if c in self.states)


class Sleeve:
    """One TAP and one UDP socket, moved between by one data thread; see the module docstring."""

    def __init__(
        self,
        ourself: int,
        *,
        tap: str,
        listen: tuple[str, int],
        on_control: Callable[[int, tuple[str, int], bytes, int], None],
        on_probe: Callable[[bytes], None],
        stats: SleeveStats | None = None,
    ) -> None:
        self.ourself = ourself
        self.tap_name = tap
        self.listen = listen
        self.stats = stats if stats is not None else SleeveStats()
        self._me = peer_bytes(ourself)
        self._on_control = on_control
        self._on_probe = on_probe
        self._tables = _Tables(ourself, Forwarding(), {})
        self._rt = self._tables  # the tables of the batch being handled (data thread)
        self._update_lock = threading.Lock()
        self._control_lock = threading.Lock()
        self._msgid = itertools.count(int.from_bytes(os.urandom(4)))  # random start: no clash with stale partials
        self._tap_fd = -1
        self._wake_fd = -1
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._logged: set[str] = set()
        self._cur_addr: tuple[str, int] = ("", 0)
        # Preallocated buffers: TAP frames are read after room for counter + inner header, so the plaintext
        # (kind, origin, dst, vnet header, frame) is contiguous without a copy.
        self._tap_buf = bytearray(CLEN + ILEN + MAX_READ)
        self._tap_view = memoryview(self._tap_buf)
        self._tap_iov = [self._tap_view[CLEN + ILEN :]]
        self._rx_view = memoryview(bytearray(1 << 16))
        self._rx_iov = [self._rx_view]
        self._seal_view = memoryview(bytearray(wire.MAX_MESSAGE))
        self._open_view = memoryview(bytearray(wire.MAX_MESSAGE))
        self._out = bytearray(wire.MAX_MESSAGE + wire.MAX_SEGMENTS * HLEN)
        self._out_view = memoryview(self._out)
        self._reasm = wire.Reassembler(self.stats.dropped, lambda: self._tables.by_hop)

    # -- control thread API ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        try:  # asks the kernel of this network namespace: /sys/class/net may show another one (nspawn)
            socket.if_nametoindex(self.tap_name)
        except OSError:
            raise FileNotFoundError(
                f"TAP {self.tap_name} does not exist (the sleeve attaches to a persistent TAP)"
            ) from None
        self._tap_fd = open_tap(self.tap_name)
        try:
            self._sock = open_udp(self.listen)
            self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except BaseException:
            self._close_fds()
            raise
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"sleeve-{self.tap_name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            os.eventfd_write(self._wake_fd, 1)
            thread.join(5.0)
        self._close_fds()

    def _close_fds(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for name in ("_tap_fd", "_wake_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def update(self, fwd: Forwarding) -> None:
        """Swap in new tables; link crypto state carries over while a link's epoch and keys stay the same."""
        with self._update_lock:
            self._tables = _Tables(self.ourself, fwd, self._tables.states)

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
        if st.keys is not None:  # an AEAD object of its own: the data thread uses the link's
            body = ChaCha20Poly1305(st.keys.send).encrypt(NONCE.pack(counter), body, None)
        msg = COUNTER.pack(counter) + body
        datagram = HEADER.pack(MAGIC, self._me, next(self._msgid) & _MSGID_MASK, 0, 1, len(msg)) + msg
        try:
            sock.sendto(datagram, socket.MSG_DONTWAIT, st.addr)
        except OSError:
            with self._control_lock:
                dropped = self.stats.dropped
                dropped["control_send_error"] = dropped.get("control_send_error", 0) + 1
            return False
        with self._control_lock:
            self.stats.bytes[_CONTROL_TX] += len(datagram)
        return True

    def send_raw(self, addr: tuple[str, int], data: bytes) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.sendto(data, socket.MSG_DONTWAIT, addr)
        except OSError:
            return False
        return True

    # -- data thread ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        assert self._sock is not None
        sock_fd, tap_fd = self._sock.fileno(), self._tap_fd
        ep = select.epoll()
        try:
            for fd in (sock_fd, tap_fd, self._wake_fd):
                ep.register(fd, select.EPOLLIN)
            while not self._stopping:
                for fd, _ in ep.poll():
                    if fd == sock_fd:
                        self._drain_udp()
                    elif fd == tap_fd:
                        self._drain_tap()
        except Exception:
            log.exception("sleeve data thread failed")
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
                self._drop("tap_read")
                time.sleep(0.05)  # e.g. the TAP was deleted: epoll keeps reporting it; do not spin
                return
            try:
                self._from_tap(n)
            except Exception:
                self._error("tap")

    def _drain_udp(self) -> None:
        assert self._sock is not None
        recv, iov, view = self._sock.recvmsg_into, self._rx_iov, self._rx_view
        feed, deliver = self._reasm.feed, self._on_message
        self._rt = self._tables
        for _ in range(BATCH):
            try:
                n, anc, flags, addr = recv(iov, GRO_CMSG_SPACE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self._drop("recv_error")
                continue
            if flags & socket.MSG_TRUNC:
                self._drop("malformed")
                continue
            self._cur_addr = addr
            try:
                feed(view, n, gro_size(anc) if anc else 0, deliver)
            except Exception:
                self._error("udp")

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
        if owner not in fwd.sleeve_peers:
            self._drop("fast_path")
            return
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
        self._send_plain(st, plain, _SLEEVE_TX)

    def _send_plain(self, st: _LinkState, plain: memoryview, path: tuple[str, str]) -> None:
        """Seal ``plain`` (inner header + payload) for the link ``st`` and send it."""
        counter = next(st.counter)
        view = self._seal_view
        m = len(plain)
        COUNTER.pack_into(view, 0, counter)
        if st.sealer is None:
            view[CLEN : CLEN + m] = plain
            msg = view[: CLEN + m]
        else:
            st.sealer.encrypt_into(NONCE.pack(counter), plain, None, view[CLEN : CLEN + m + TAG])
            msg = view[: CLEN + m + TAG]
        self._send_message(st, msg, path)

    def _send_message(self, st: _LinkState, msg: memoryview, path: tuple[str, str]) -> None:
        assert self._sock is not None
        total = segment_into(self._out, msg, self._me, next(self._msgid) & _MSGID_MASK, st.dsize)
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
            window.update(counter)
        else:
            if m < CLEN + ILEN:
                self._drop("malformed")
                return
            plain = msg[CLEN:]
        kind, origin_b, dst_b = INNER.unpack_from(plain)
        fwd = t.fwd
        if kind == FRAME:
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
            if origin in fwd.sleeve_peers:
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

    def _to_tap(self, plain: memoryview) -> None:
        if len(plain) < ILEN + VNET_LEN + ETH_LEN:
            self._drop("malformed")
            return
        try:
            os.write(self._tap_fd, plain[ILEN:])
        except OSError:
            self._drop("tap_write")

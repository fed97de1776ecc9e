"""Which MACs live behind this host's bridge, kept current from netlink events.

The mesh gossips these MACs so that other hosts program their FDBs (and so that a frame is put on the mesh only by
the host where its source lives). Polling would be late or wasteful; instead a netlink socket subscribed to link
and neighbour events wakes a thread, which re-reads the bridge FDB after a short settle time and reports the set
only when it changed. Events are a trigger, never the source of truth: a lost event (ENOBUFS) just means re-read.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Collection

from weft.datapath.netdev import NetDev, NetDevError, enter_netns

__all__ = ["MacWatcher"]

log = logging.getLogger(__name__)

RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTM_NEWLINK, RTM_DELLINK, RTM_NEWNEIGH, RTM_DELNEIGH = 16, 17, 28, 29
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid; the ndmsg follows
NDMSG = struct.Struct("=BxxxiHBB")  # family, padding, ifindex, state, flags, type
RCVBUF = 4 << 20


def _relevant(data: bytes, ignored_ports: Collection[int] = ()) -> bool:
    """Link changes and bridge FDB changes on a port other than ``ignored_ports`` (ifindexes); IP neighbour churn
    (ARP/ND) is not ours, nor are the entries the agent itself writes on the overlay ports: in a mesh of a hundred
    peers each programming changes hundreds of them, and re-reading the whole FDB for each burst was a good part of
    the agent's CPU."""
    off = 0
    while off + NLMSG_HDR.size < len(data):
        length, kind, _, _, _ = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size:
            break
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            return True
        if kind in (RTM_NEWNEIGH, RTM_DELNEIGH) and off + NLMSG_HDR.size + NDMSG.size <= len(data):
            family, ifindex, _, _, _ = NDMSG.unpack_from(data, off + NLMSG_HDR.size)
            if family == socket.AF_BRIDGE and ifindex not in ignored_ports:
                return True
        off += (length + 3) & ~3
    return False


class MacWatcher:
    """Watches the bridge's FDB over netlink and reports the set of local MACs when it changes."""

    def __init__(
        self,
        bridge: str,
        exclude_ports: Collection[str],
        on_change: Callable[[frozenset[str]], None],
        *,
        settle: float = 0.05,
        netns: str | None = None,
    ) -> None:
        """`exclude_ports` are the overlay ports (vxlan, tap): MACs behind them live elsewhere. `on_change` runs on
        the watcher thread. `netns` (a name or path) watches another namespace; the agent uses its own."""
        self.bridge = bridge
        self.exclude_ports = frozenset(exclude_ports)
        self.settle = settle
        self.netns = netns
        self._on_change = on_change
        self._current: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._ignored: frozenset[int] = frozenset()  # the excluded ports' ifindexes, as of the last read

    def start(self) -> None:
        """Start the thread; returns once the initial set is read (current() is valid), or raises why it cannot."""
        if self._thread is not None:
            raise RuntimeError("MacWatcher already started")
        self._wake = os.pipe()
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name=f"macwatch-{self.bridge}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self.stop()
            raise self._error

    def stop(self) -> None:
        """Wake the thread through its pipe and join it; idempotent."""
        thread, wake = self._thread, self._wake
        if thread is None or wake is None:
            return
        os.write(wake[1], b"x")
        thread.join()
        for fd in wake:
            os.close(fd)
        self._thread = self._wake = None

    def current(self) -> frozenset[str]:
        with self._lock:
            return self._current

    # -- the thread ----------------------------------------------------------------------------------------------

    def _open_socket(self) -> socket.socket:
        if self.netns is not None:
            enter_netns(self.netns)  # this thread is ours; its sockets then belong to that namespace
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(
                socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), RCVBUF
            )  # not in Python 3.11's socket
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, RTMGRP_LINK | RTMGRP_NEIGH))  # subscribe before the first read, so no change slips between
        sock.setblocking(False)
        return sock

    def _run(self) -> None:
        try:
            sock = self._open_socket()
            try:
                nd = NetDev(self.netns)
            except BaseException:
                sock.close()
                raise
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        try:
            macs = self._read(nd, frozenset())
            with self._lock:
                self._current = macs
            self._ready.set()
            self._notify(macs)
            while self._wait_for_event(sock):
                if self._sleep(self.settle):
                    break
                self._drain(sock)
                self._update(self._read(nd, self.current()))
        except Exception:
            log.exception("MAC watcher for bridge %s failed; local MACs are no longer tracked", self.bridge)
        finally:
            self._ready.set()
            sock.close()
            nd.close()

    def _read(self, nd: NetDev, fallback: frozenset[str]) -> frozenset[str]:
        try:
            if nd.link_index(self.bridge) is None:
                return frozenset()  # no bridge (yet): nothing lives here; a link event will tell when it appears
            # A port recreated under a new index comes with a link event, which always leads here.
            self._ignored = frozenset(i for i in map(nd.link_index, self.exclude_ports) if i is not None)
            return frozenset(nd.local_macs(self.bridge, self.exclude_ports))
        except NetDevError as e:
            log.warning("cannot read the FDB of bridge %s, keeping the last set: %s", self.bridge, e)
            return fallback

    def _update(self, macs: frozenset[str]) -> None:
        with self._lock:
            if macs == self._current:
                return
            self._current = macs
        self._notify(macs)

    def _notify(self, macs: frozenset[str]) -> None:
        try:
            self._on_change(macs)
        except Exception:
            log.exception("MAC watcher callback failed")

    def _wait_for_event(self, sock: socket.socket) -> bool:
        """Block until a relevant event (True) or stop() (False)."""
        assert self._wake is not None
        while True:
            ready, _, _ = select.select([sock, self._wake[0]], [], [])
            if self._wake[0] in ready:
                return False
            if self._drain(sock):
                return True

    def _sleep(self, seconds: float) -> bool:
        """Let a burst of changes settle; True if stop() came meanwhile."""
        assert self._wake is not None
        ready, _, _ = select.select([self._wake[0]], [], [], seconds)
        return bool(ready)

    def _drain(self, sock: socket.socket) -> bool:
        """Read everything queued; True if any of it matters (an overrun counts: events were lost)."""
        relevant = False
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return relevant
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                relevant = True
                continue
            relevant = relevant or _relevant(data, self._ignored)

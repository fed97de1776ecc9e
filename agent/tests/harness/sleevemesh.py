"""Sleeves in one process, without root: the data plane's seam for tests and benchmarks.

Each node's "TAP" is one end of an AF_UNIX SOCK_SEQPACKET socketpair per worker (a message is one virtio-net header
plus a frame, as a TAP read or write is); the test holds the other end and reads and writes what the kernel would.
The underlay is real UDP on 127.0.0.1: one SO_REUSEPORT group per node, steered as the agent's is, with UDP_SEGMENT
and UDP_GRO. A link may go through a ``Wire``, a UDP forwarder that records every datagram (to look at or replay).
"""

from __future__ import annotations

import contextlib
import hashlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from weft.datapath.sleeve import Forwarding, Link, Sleeve
from weft.datapath.tap import VNET_HDR
from weft.datapath.udp import open_udp_group
from weft.mesh.crypto import SessionKeys

VNET_NONE = bytes(VNET_HDR.size)
LOOPBACK = "127.0.0.1"


def link_keys(a: int, b: int) -> SessionKeys:
    """Fixed test keys for the link between a and b, as a's sleeve uses them."""

    def key(x: int, y: int) -> bytes:
        return hashlib.sha256(f"weft in-process sleeve {x}->{y}".encode()).digest()

    return SessionKeys(send=key(a, b), receive=key(b, a))


def mac_of(index: int) -> bytes:
    return bytes([2, 0x32, 0, 0, 0, index])


def ip_of(index: int) -> bytes:
    return bytes([10, 32, 0, index])


def udp_frame(
    src: int,
    dst: int | bytes,
    payload: bytes,
    *,
    sport: int = 40000,
    dport: int = 5001,
    df: bool = True,
    vnet: bytes = VNET_NONE,
) -> bytes:
    """virtio-net header + Ethernet + IPv4 + UDP from node ``src`` to node ``dst`` (or to the MAC ``dst``)."""
    dst_mac = dst if isinstance(dst, bytes) else mac_of(dst)
    dst_ip = ip_of(dst) if isinstance(dst, int) else bytes([10, 32, 0, 255])
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000 if df else 0, 64, 17, 0, ip_of(src), dst_ip)
    return vnet + dst_mac + mac_of(src) + b"\x08\x00" + ip + udp


class Kernel:
    """The kernel's side of a node's TAP queues: what it writes the sleeve reads, what the sleeve writes it reads."""

    def __init__(self, queues: int) -> None:
        self.pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(queues)]
        for ours, theirs in self.pairs:
            theirs.setblocking(False)
            for sock in (ours, theirs):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.received: list[bytes] = []

    def sleeve_fds(self) -> list[int]:
        """The sleeve's ends, detached: the sleeve owns and closes them."""
        return [theirs.detach() for _, theirs in self.pairs]

    def write(self, packet: bytes, queue: int = 0) -> None:
        self.pairs[queue][0].send(packet)

    def drain(self, wait: float = 0.0) -> list[bytes]:
        """Frames the sleeve wrote since the last call, waiting up to ``wait`` seconds for the first."""
        socks = [ours for ours, _ in self.pairs]
        out: list[bytes] = []
        deadline = time.monotonic() + wait
        while True:
            ready, _, _ = select.select(socks, [], [], max(0.0, deadline - time.monotonic()) if not out else 0)
            if not ready:
                break
            for sock in ready:
                out.append(sock.recv(1 << 17))
        self.received += out
        return out

    def close(self) -> None:
        for ours, theirs in self.pairs:
            ours.close()
            theirs.close()


class Wire:
    """A UDP forwarder on 127.0.0.1 put between two sleeves: records every datagram it passes (one each: it does not
    ask for GRO), and can send them again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((LOOPBACK, 0))
        self.addr: tuple[str, int] = self.sock.getsockname()
        self.datagrams: list[bytes] = []
        self.passing = True
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="wire", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if not ready:
                continue
            data = self.sock.recv(1 << 16)
            with self._lock:
                self.datagrams.append(data)
            if self.passing:
                self.sock.sendto(data, self.target)

    def taken(self) -> list[bytes]:
        with self._lock:
            return list(self.datagrams)

    def replay(self, datagrams: Iterable[bytes]) -> int:
        n = 0
        for d in datagrams:
            self.sock.sendto(d, self.target)
            n += 1
        return n

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@dataclass
class Node:
    index: int
    workers: int
    kernel: Kernel
    sleeve: Sleeve
    port: int
    controls: list[tuple[int, tuple[str, int], bytes, int]] = field(default_factory=list)
    neighbours: dict[int, tuple[str, int]] = field(default_factory=dict)  # neighbour -> where we send to it

    @property
    def mac(self) -> bytes:
        return mac_of(self.index)

    @property
    def addr(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def totals(self) -> Any:
        return self.sleeve.totals()

    def dropped(self, reason: str) -> int:
        return self.sleeve.totals().dropped.get(reason, 0)

    def bytes(self, path: str, direction: str) -> int:
        return self.sleeve.totals().bytes.get((path, direction), 0)


class Mesh:
    """Nodes joined by links; ``start`` hands every node its forwarding table (chain routes, as on a line)."""

    def __init__(self, *, keys: bool = True, datagram_size: int = 1472) -> None:
        self.keys = keys
        self.datagram_size = datagram_size
        self.nodes: dict[int, Node] = {}
        self.wires: list[Wire] = []
        self.frame_mtu: dict[int, dict[int, int]] = {}

    def add(self, index: int, workers: int = 1) -> Node:
        kernel = Kernel(workers)
        socks = open_udp_group((LOOPBACK, 0), workers, buffer_bytes=4 << 20)
        node: Node

        def on_control(peer: int, addr: tuple[str, int], payload: bytes, size: int) -> None:
            node.controls.append((peer, addr, payload, size))

        sleeve = Sleeve(
            index,
            taps=kernel.sleeve_fds(),
            socks=socks,
            on_control=on_control,
            on_probe=lambda frame: None,
            name=f"sleeve-n{index}",
        )
        node = Node(index, workers, kernel, sleeve, socks[0].getsockname()[1])
        self.nodes[index] = node
        return node

    def connect(self, a: Node, b: Node, *, wire: bool = False) -> Wire | None:
        """A link between a and b; ``wire``: a's datagrams to b go through a recording Wire."""
        w = None
        if wire:
            w = Wire(b.addr)
            self.wires.append(w)
        a.neighbours[b.index] = w.addr if w else b.addr
        b.neighbours[a.index] = a.addr
        return w

    def forwarding(self, node: Node) -> Forwarding:
        me = node.index
        links = {
            n: Link(n, addr, link_keys(me, n) if self.keys else None, self.datagram_size, 1)
            for n, addr in node.neighbours.items()
        }
        next_hop = {}
        for other in self.nodes:
            if other != me:
                next_hop[other] = other if other in links else min(links, key=lambda n: abs(n - other))
        children = {
            o: tuple(sorted(links)) if o == me else tuple(n for n in sorted(links) if abs(n - o) > abs(me - o))
            for o in self.nodes
        }
        return Forwarding(
            links=links,
            next_hop=next_hop,
            flood_origins=frozenset(next_hop),
            bcast_children=children,
            mac_owner={n.mac: n.index for n in self.nodes.values() if n is not node},
            local_macs=frozenset({node.mac}),
            frame_mtu=self.frame_mtu.get(me, {}),
        )

    def start(self) -> None:
        for node in self.nodes.values():
            node.sleeve.update(self.forwarding(node))
            node.sleeve.start()

    def close(self) -> None:
        for node in self.nodes.values():
            node.sleeve.stop()
            node.kernel.close()
        for w in self.wires:
            w.close()


@contextlib.contextmanager
def mesh(**kwargs: Any) -> Iterator[Mesh]:
    m = Mesh(**kwargs)
    try:
        yield m
    finally:
        m.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, message: str = "condition not met") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.01)


def split_datagrams(data: bytes) -> list[bytes]:
    """A captured UDP payload as the datagrams it holds (a GSO send shows as one): by each header's chunk size."""
    from weft.datapath.wire import HEADER, HLEN

    out, off = [], 0
    while off + HLEN <= len(data):
        csize = HEADER.unpack_from(data, off)[5]
        end = min(off + HLEN + csize, len(data))
        out.append(data[off:end])
        off = end
    return out


def messages(datagrams: Iterable[bytes]) -> dict[tuple[bytes, int], dict[int, bytes]]:
    """Datagrams grouped by (hop, msgid): chunk index -> datagram."""
    from weft.datapath.wire import HEADER

    out: dict[tuple[bytes, int], dict[int, bytes]] = {}
    for d in datagrams:
        _, hop, msgid, idx, _cnt, _ = HEADER.unpack_from(d)
        out.setdefault((hop, msgid), {})[idx] = d
    return out


def complete_counters(datagrams: Iterable[bytes]) -> list[int]:
    """The nonce counter of every message whose chunks are all among ``datagrams`` (it sits in chunk 0)."""
    from weft.datapath.wire import COUNTER, HEADER, HLEN

    out = []
    for chunks in messages(datagrams).values():
        first = chunks.get(0)
        if first is not None and len(chunks) == HEADER.unpack_from(first)[4]:
            out.append(COUNTER.unpack_from(first, HLEN)[0])
    return out

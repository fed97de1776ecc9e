"""The sleeve's UDP sockets: big forced buffers, DF on every datagram, UDP_SEGMENT sends and UDP_GRO receives.

One sendmsg with UDP_SEGMENT puts up to 64 datagrams (65,507 bytes) on the wire and one recvmsg with UDP_GRO
returns many coalesced, so the Python cost is per message rather than per datagram. DF (IP_PMTUDISC_DO) because the
sleeve sizes its own datagrams to the path MTU: IP fragments are lost wholesale on many clouds.

Several forwarding workers share the listen port with SO_REUSEPORT. The kernel would pick a socket by hashing the
4-tuple, and between two hosts there is only one, so everything would reach one worker: a classic BPF program
attached to the group (SO_ATTACH_REUSEPORT_CBPF) picks the socket by the flow byte of the datagram's msgid instead,
in either datagram form (hop by hop, or end to end).
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

from weft.datapath import wire

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_DO = 2
BUFFER_BYTES = 8 << 20
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
SO_ATTACH_REUSEPORT_CBPF = 51
# Where the flow byte (the msgid's last) sits in each datagram form: idx, cnt and csize (4 bytes) end both headers.
STEER_OFFSET = wire.HLEN - 5
E2E_STEER_OFFSET = wire.E2E_HLEN - 5
_INT = struct.Struct("i")
_FILTER = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_BPF_LDB_ABS, _BPF_JEQ_K, _BPF_JA, _BPF_MOD_K, _BPF_RET_A = 0x30, 0x15, 0x05, 0x94, 0x16


def open_udp(listen: tuple[str, int], buffer_bytes: int = BUFFER_BYTES, *, reuseport: bool = False) -> socket.socket:
    """A blocking UDP socket bound to ``listen`` (sends may wait for buffer space: back-pressure, not loss).
    ``reuseport``: join the port's SO_REUSEPORT group, one socket per forwarding worker (see ``steer``)."""
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
            try:  # rmem_max cannot be raised inside a namespace; FORCE (root) ignores it
                sock.setsockopt(socket.SOL_SOCKET, force, buffer_bytes)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, buffer_bytes)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError as e:  # old kernels: single datagrams still work
            if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
                raise
        sock.bind(listen)
    except BaseException:
        sock.close()
        raise
    return sock


def segment_cmsg(size: int) -> list[tuple[int, int, bytes]]:
    """The ancillary data that makes one sendmsg go out as datagrams of ``size`` bytes (the last may be shorter)."""
    return [(SOL_UDP, UDP_SEGMENT, struct.pack("H", size))]


def gro_size(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The segment size of a GRO-coalesced receive, or 0 for a single datagram."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
            return _INT.unpack_from(data)[0]
    return 0


def open_udp_group(listen: tuple[str, int], n: int, buffer_bytes: int = BUFFER_BYTES) -> list[socket.socket]:
    """``n`` sockets sharing ``listen`` (port 0: the first one's port), steered by ``steer``; one socket: no group."""
    if n == 1:
        return [open_udp(listen, buffer_bytes)]
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            where = listen if not socks else (listen[0], socks[0].getsockname()[1])
            socks.append(open_udp(where, buffer_bytes, reuseport=True))
        steer(socks[0], n)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def steer(sock: socket.socket, n: int) -> None:
    """Attach to ``sock``'s reuseport group the program that picks socket ``flow byte % n`` (sockets are numbered
    in the order they joined), the flow byte read where the datagram's form (its first byte) has it. A UDP program
    sees the payload at offset 0; a datagram too short to hold the byte ends the program with 0: the first socket."""
    program = (
        (_BPF_LDB_ABS, 0, 0, 0),  # the magic
        (_BPF_JEQ_K, 2, 0, wire.E2E_MAGIC),  # end to end: to 4
        (_BPF_LDB_ABS, 0, 0, STEER_OFFSET),
        (_BPF_JA, 0, 0, 1),  # to 5
        (_BPF_LDB_ABS, 0, 0, E2E_STEER_OFFSET),
        (_BPF_MOD_K, 0, 0, n),
        (_BPF_RET_A, 0, 0, 0),
    )
    prog = ctypes.create_string_buffer(b"".join(_FILTER.pack(*insn) for insn in program))
    fprog = struct.pack("HP", len(program), ctypes.addressof(prog))  # struct sock_fprog, native alignment
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)

"""The sleeve's UDP socket: big forced buffers, DF on every datagram, UDP_SEGMENT sends and UDP_GRO receives.

One sendmsg with UDP_SEGMENT puts up to 44 datagrams on the wire and one recvmsg with UDP_GRO returns many
coalesced, so the Python cost is per message rather than per datagram. DF (IP_PMTUDISC_DO) because the sleeve
sizes its own datagrams to the path MTU: IP fragments are lost wholesale on many clouds.
"""

from __future__ import annotations

import errno
import socket
import struct

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
_INT = struct.Struct("i")


def open_udp(listen: tuple[str, int], buffer_bytes: int = BUFFER_BYTES) -> socket.socket:
    """A blocking UDP socket bound to ``listen`` (sends may wait for buffer space: back-pressure, not loss)."""
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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

"""ICMP "fragmentation needed" for frames too big for the path to their destination.

The sleeve carries any size (it segments), but the far bridge drops a non-GSO packet larger than the container's
MTU, and a smaller path MTU elsewhere needs telling too: answering like a router would lets the sender's TCP shrink
its segments instead of black-holing them. IPv4 only (IPv6 would need ICMPv6 Packet Too Big).
"""

from __future__ import annotations

import struct

from weft.datapath.tap import ETH_LEN, GSO_NONE, GSO_TCPV4, VNET_LEN

ETH_IPV4 = b"\x08\x00"
_IP = struct.Struct("!BBHHHBBH4s4s")
_ICMP = struct.Struct("!BBHHH")
_U16 = struct.Struct("!H")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip_size(packet: memoryview | bytes) -> int:
    """For a vnet header + Ethernet frame carrying IPv4 with DF set: the size of the IP packets it makes on the
    wire (a TCP GSO frame: gso_size + IP and TCP headers). 0 when the frame may be fragmented or is not IPv4."""
    if len(packet) < VNET_LEN + ETH_LEN + 20:
        return 0
    eth = VNET_LEN
    ip = eth + ETH_LEN
    if packet[eth + 12 : eth + 14] != ETH_IPV4 or not packet[ip + 6] & 0x40:
        return 0
    gso_type = packet[1] & 0x7F
    if gso_type == GSO_NONE:
        return _U16.unpack_from(packet, ip + 2)[0]
    ihl = (packet[ip] & 0x0F) * 4
    gso_size = packet[4] | packet[5] << 8
    if gso_type == GSO_TCPV4 and len(packet) >= ip + ihl + 13:
        return gso_size + ihl + (packet[ip + ihl + 12] >> 4) * 4
    return gso_size + ihl + 8  # UDP


def frag_needed(frame: memoryview | bytes, mtu: int) -> bytes:
    """An Ethernet frame answering the IPv4 ``frame`` with ICMP type 3 code 4 and next-hop MTU ``mtu``: sent to
    the frame's source, from the address it was trying to reach, quoting its IP header and 8 bytes."""
    ip = ETH_LEN
    ihl = (frame[ip] & 0x0F) * 4
    quoted = bytes(frame[ip : ip + ihl + 8])
    body = _ICMP.pack(3, 4, 0, 0, mtu) + quoted
    body = body[:2] + _U16.pack(checksum(body)) + body[4:]
    src, dst = bytes(frame[ip + 12 : ip + 16]), bytes(frame[ip + 16 : ip + 20])
    header = _IP.pack(0x45, 0xC0, 20 + len(body), 0, 0, 64, 1, 0, dst, src)
    header = header[:10] + _U16.pack(checksum(header)) + header[12:]
    return bytes(frame[6:12]) + bytes(frame[0:6]) + ETH_IPV4 + header + body

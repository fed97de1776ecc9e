"""Is an IPv4 address already in use on the overlay? Ask, RFC 5227 style, before anyone is given it.

An ARP probe (sender address 0.0.0.0, so no one's ARP cache changes) for each address is sent from the bridge
device, which floods it to every local container and, over the fast path and the sleeve, to every host of the mesh
and their containers. Any interface that holds the address answers to the bridge's MAC, which every host already
knows, so the answer needs no new forwarding state. An ARP packet from someone else that claims the address (a
reply, an announcement, or another probe for it at the same time) is a conflict.

Probing from the bridge rather than from the new container means the probe happens before the container's
interface exists: a refused attach leaves nothing behind. IPv6 needs none of this: the kernel's duplicate address
detection marks a duplicate "dadfailed".
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from collections.abc import Iterable

__all__ = ["ETH_P_ARP", "arp_probe", "probe_frame"]

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARP_REQUEST, ARP_REPLY = 1, 2
PACKET_OUTGOING = 4
BROADCAST = b"\xff" * 6
_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")  # htype, ptype, hlen, plen, op, sha, spa, tha, tpa
ZERO_IP = bytes(4)
MIN_FRAME = 60  # an Ethernet frame without its FCS is padded to this


def probe_frame(mac: bytes, target: ipaddress.IPv4Address) -> bytes:
    """A broadcast ARP request for ``target`` with sender IP 0.0.0.0 (RFC 5227 2.1.1)."""
    frame = _ETH.pack(BROADCAST, mac, ETH_P_ARP) + _ARP.pack(
        1, ETH_P_IP, 6, 4, ARP_REQUEST, mac, ZERO_IP, bytes(6), target.packed
    )
    return frame.ljust(MIN_FRAME, b"\0")


def claimant(frame: bytes, mine: bytes, targets: set[bytes]) -> tuple[ipaddress.IPv4Address, str] | None:
    """(address, MAC) when ``frame`` shows another interface holding or claiming one of ``targets``."""
    if len(frame) < _ETH.size + _ARP.size or _ETH.unpack_from(frame)[2] != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = _ARP.unpack_from(frame, _ETH.size)
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4) or sha == mine:
        return None
    if spa in targets:  # a reply, an announcement or a request from the holder
        return ipaddress.IPv4Address(spa), sha.hex(":")
    if op == ARP_REQUEST and spa == ZERO_IP and tpa in targets:  # someone else probing for it right now
        return ipaddress.IPv4Address(tpa), sha.hex(":")
    return None


def arp_probe(
    device: str, addresses: Iterable[ipaddress.IPv4Address], *, wait: float, probes: int = 3
) -> dict[ipaddress.IPv4Address, str]:
    """Probe each address from ``device`` ``probes`` times over the first half of ``wait`` seconds and listen for
    the whole of it; returns the addresses found in use, with the MAC that answered for each. Blocks: call it
    from a worker thread, never from the event loop."""
    targets = {a.packed: a for a in addresses}
    if not targets or wait <= 0:
        return {}
    found: dict[ipaddress.IPv4Address, str] = {}
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((device, ETH_P_ARP))
        mine = sock.getsockname()[4][:6]
        start = time.monotonic()
        deadline = start + wait
        send_at = [start + i * wait / (2 * probes) for i in range(probes)]
        while True:
            now = time.monotonic()
            while send_at and send_at[0] <= now:
                send_at.pop(0)
                for target in targets.values():
                    if target not in found:
                        sock.send(probe_frame(mine, target))
            if now >= deadline or len(found) == len(targets):
                return found
            timeout = min(deadline, send_at[0] if send_at else deadline) - now
            ready, _, _ = select.select([sock], [], [], max(0.0, timeout))
            if not ready:
                continue
            frame, addr = sock.recvfrom(2048)
            if addr[2] == PACKET_OUTGOING:
                continue
            hit = claimant(frame, mine, set(targets))
            if hit is not None:
                found.setdefault(hit[0], hit[1])

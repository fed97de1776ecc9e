"""Fast-path probes: proof that the kernel VXLAN path to a peer carries full-size frames.

The agent sends, from userspace, a VXLAN packet to the peer's VXLAN port. The peer's kernel
decapsulates it like any other frame, so a probe that arrives has crossed what container traffic
crosses; it is padded to the overlay MTU so a path that drops big datagrams fails the probe too. The
inner frame goes to a link-local group address (01:80:c2:00:00:0f), which a bridge never forwards
but passes up the port it arrived on, where the peer's agent reads it with a packet socket bound to
its VXLAN device: no container ever sees a probe. The receiver reports the highest sequence it heard
in its heartbeat.
"""

from __future__ import annotations

import struct

ETHERTYPE = 0x88B5  # IEEE "local experimental"
GROUP = bytes.fromhex("0180c200000f")  # link-local: never forwarded by a bridge
MAGIC = b"weftprobe"
_VXLAN = struct.Struct(">B3xI")  # flags (I bit), reserved, VNI << 8
_BODY = struct.Struct(">9s6sI")  # magic, sender name, sequence
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14


def probe_mac(name: int) -> bytes:
    """A locally administered unicast MAC for a peer's probes, derived from its 48-bit name."""
    raw = bytearray(name.to_bytes(6, "big"))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return bytes(raw)


def build_probe(vni: int, src: int, seq: int, mtu: int) -> bytes:
    """The UDP payload of one probe: a VXLAN header and an Ethernet frame of ``mtu`` payload bytes."""
    body = _BODY.pack(MAGIC, src.to_bytes(6, "big"), seq)
    frame = GROUP + probe_mac(src) + struct.pack(">H", ETHERTYPE) + body
    return _VXLAN.pack(0x08, vni << 8) + frame + bytes(max(0, mtu - len(body)))


def parse_probe(frame: bytes | memoryview) -> tuple[int, int] | None:
    """(sender name, sequence) from a received Ethernet frame, or None if it is not a probe."""
    if len(frame) < 14 + _BODY.size or frame[12:14] != struct.pack(">H", ETHERTYPE):
        return None
    magic, sender, seq = _BODY.unpack_from(frame, 14)
    if magic != MAGIC:
        return None
    return int.from_bytes(sender, "big"), seq

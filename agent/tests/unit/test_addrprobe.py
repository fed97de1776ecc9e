"""ARP probes for a new overlay address: the frames sent and which answers count as "in use" (no root needed)."""

from __future__ import annotations

import ipaddress
import struct

from weft.datapath.addrprobe import ARP_REPLY, ARP_REQUEST, ETH_P_ARP, claimant, probe_frame

MINE = bytes.fromhex("020000000001")
THEIRS = bytes.fromhex("5a0000000002")
TARGET = ipaddress.IPv4Address("10.32.2.1")


def arp(op: int, sha: bytes, spa: str, tpa: str, dst: bytes = b"\xff" * 6) -> bytes:
    return (
        dst
        + sha
        + struct.pack("!H", ETH_P_ARP)
        + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
        + sha
        + ipaddress.IPv4Address(spa).packed
        + bytes(6)
        + ipaddress.IPv4Address(tpa).packed
    )


def test_a_probe_is_a_broadcast_request_from_0_0_0_0() -> None:
    frame = probe_frame(MINE, TARGET)
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[6:12] == MINE
    assert frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x01"
    assert frame[28:32] == bytes(4), "sender IP 0.0.0.0: no receiver's ARP cache changes"
    assert frame[38:42] == TARGET.packed


def test_answers_that_mean_the_address_is_taken() -> None:
    targets = {TARGET.packed}
    reply = arp(ARP_REPLY, THEIRS, "10.32.2.1", "0.0.0.0", dst=MINE)
    assert claimant(reply, MINE, targets) == (TARGET, "5a:00:00:00:00:02")
    announcement = arp(ARP_REQUEST, THEIRS, "10.32.2.1", "10.32.2.1")
    assert claimant(announcement, MINE, targets) == (TARGET, "5a:00:00:00:00:02")
    rival_probe = arp(ARP_REQUEST, THEIRS, "0.0.0.0", "10.32.2.1")
    assert claimant(rival_probe, MINE, targets) == (TARGET, "5a:00:00:00:00:02")


def test_answers_that_do_not() -> None:
    targets = {TARGET.packed}
    assert claimant(probe_frame(MINE, TARGET), MINE, targets) is None, "our own probe"
    assert claimant(arp(ARP_REPLY, THEIRS, "10.32.2.9", "10.32.2.1"), MINE, targets) is None, "another address"
    assert claimant(arp(ARP_REQUEST, THEIRS, "10.32.2.9", "10.32.2.1"), MINE, targets) is None, "asking, not holding"
    assert claimant(b"\x00" * 20, MINE, targets) is None
    ipv4 = arp(ARP_REPLY, THEIRS, "10.32.2.1", "0.0.0.0")
    assert claimant(ipv4[:12] + b"\x08\x00" + ipv4[14:], MINE, targets) is None, "not ARP"

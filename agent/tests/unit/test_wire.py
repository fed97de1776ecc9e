"""The sleeve's wire format: segmentation and reassembly, the replay window, rejecting garbage, ICMP."""

from __future__ import annotations

import os
import random
import struct

import pytest

from weft.datapath import icmp, wire
from weft.datapath.tap import VNET_HDR

HOP = wire.peer_bytes(0x0A0B0C0D0E0F)
OTHER = wire.peer_bytes(0x112233445566)


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, bytes, int]] = []

    def __call__(self, hop: bytes, msg: memoryview, size: int) -> None:
        self.got.append((hop, bytes(msg), size))


def reassembler(known: tuple[bytes, ...] = (HOP,)) -> tuple[wire.Reassembler, dict[str, int]]:
    dropped: dict[str, int] = {}
    return wire.Reassembler(dropped, lambda: set(known)), dropped


def datagrams(msg: bytes, size: int, msgid: int = 7, hop: bytes = HOP) -> list[bytes]:
    out = bytearray(len(msg) + wire.MAX_SEGMENTS * wire.HLEN)
    total = wire.segment_into(out, memoryview(msg), hop, msgid, size)
    assert total > 0
    return [bytes(out[i : min(i + size, total)]) for i in range(0, total, size)]


def feed(r: wire.Reassembler, data: bytes, gso: int, sink: Sink) -> None:
    buf = bytearray(1 << 16)
    buf[: len(data)] = data
    r.feed(memoryview(buf), len(data), gso, sink)


def test_every_datagram_fits_and_the_layout_is_gso_friendly() -> None:
    msg = os.urandom(65_600)
    parts = datagrams(msg, 1472)
    assert all(len(p) <= 1472 for p in parts)
    assert all(len(p) == 1472 for p in parts[:-1])
    assert len(parts) == -(-len(msg) // (1472 - wire.HLEN))
    assert wire.segments_per_send(1472) == 44  # 65,507 bytes
    assert wire.segments_per_send(1408) == 46
    assert wire.segments_per_send(972) == 64  # the kernel's limit
    assert wire.segments_per_send(9000 - 28) == 7


@pytest.mark.parametrize("size", [1472, 972, 200])
def test_round_trip_in_gro_buffers_of_any_split(size: int) -> None:
    msg = os.urandom(65_600 if size > 500 else 20_000)
    parts = datagrams(msg, size)
    r, dropped = reassembler()
    sink = Sink()
    # like the kernel: GRO buffers of one send's worth (up to 64 datagrams, 65,507 bytes), then the rest
    step = wire.segments_per_send(size)
    for i in range(0, len(parts), step):
        feed(r, b"".join(parts[i : i + step]), size, sink)
    assert sink.got == [(HOP, msg, size)]
    assert not dropped and r.pending() == 0


def test_whole_message_in_one_buffer_and_single_datagrams() -> None:
    r, dropped = reassembler()
    sink = Sink()
    msg = os.urandom(5000)
    feed(r, b"".join(datagrams(msg, 1472)), 1472, sink)
    small = [os.urandom(60), os.urandom(60)]
    # two single-datagram messages of the same size, coalesced by GRO into one buffer
    feed(r, datagrams(small[0], 1472, msgid=8)[0] + datagrams(small[1], 1472, msgid=9)[0], 60 + wire.HLEN, sink)
    assert [g[1] for g in sink.got] == [msg, *small]
    assert not dropped


def test_out_of_order_duplicate_and_missing_segments() -> None:
    msg = os.urandom(30_000)
    parts = datagrams(msg, 1472)
    order = list(range(len(parts)))
    random.Random(1).shuffle(order)
    r, dropped = reassembler()
    sink = Sink()
    for i in order:
        feed(r, parts[i], 0, sink)
    assert [(hop, m) for hop, m, _ in sink.got] == [(HOP, msg)]

    # a duplicate of a pending chunk is dropped; a message missing a chunk never comes out
    feed(r, datagrams(msg, 1472, msgid=99)[0], 0, sink)
    feed(r, datagrams(msg, 1472, msgid=99)[0], 0, sink)
    assert dropped == {"duplicate": 1}
    assert len(sink.got) == 1 and r.pending() == 1


def test_the_partial_table_is_bounded() -> None:
    r, dropped = reassembler()
    sink = Sink()
    msg = os.urandom(3000)
    for msgid in range(wire.MAX_PARTIAL + 10):
        feed(r, datagrams(msg, 1472, msgid=msgid)[0], 0, sink)
    assert r.pending() <= wire.MAX_PARTIAL
    assert dropped["incomplete"] == 10
    assert not sink.got


def test_garbage_truncated_and_unknown_are_counted_not_raised() -> None:
    r, dropped = reassembler()
    sink = Sink()
    rng = random.Random(2)
    good = datagrams(os.urandom(3000), 1472)
    cases = [b"", b"W", good[0][:10], good[0][: wire.HLEN], bytes([0x58]) + good[0][1:]]
    cases += [rng.randbytes(rng.randrange(1, 2000)) for _ in range(500)]
    cases += [bytes([wire.MAGIC]) + rng.randbytes(rng.randrange(wire.HLEN, 1500)) for _ in range(500)]
    for case in cases:
        feed(r, case, 0, sink)
        feed(r, case * 3, max(1, len(case)), sink)
    # a header claiming more than a message can hold
    huge = wire.HEADER.pack(wire.MAGIC, HOP, 1, 3, 255, 60_000) + bytes(100)
    feed(r, huge, 0, sink)
    # a well-formed chunk from a peer that is not a neighbour gets no reassembly buffer
    feed(r, datagrams(os.urandom(3000), 1472, hop=OTHER)[0], 0, sink)
    assert dropped["malformed"] > 0 and dropped["unknown_peer"] == 1
    assert r.pending() <= wire.MAX_PARTIAL
    assert all(len(m) <= wire.MAX_MESSAGE for _, m, _ in sink.got)


def test_replay_window() -> None:
    w = wire.ReplayWindow()
    for c in (0, 1, 5, 3):
        assert w.check(c)
        w.update(c)
    assert not w.check(3) and not w.check(5) and not w.check(0)
    assert w.check(2) and w.check(4) and w.check(6)
    w.update(5000)
    assert not w.check(5000)
    assert w.check(5000 - 1023) and not w.check(5000 - 1024)  # older than the window
    assert not w.check(4)
    w.update(4999)
    assert not w.check(4999) and w.check(4998)
    w.update(5000 + 5000)  # a jump beyond the window forgets everything below it
    assert w.check(9999) and not w.check(10000)


def _tcp_frame(size: int, df: bool = True, gso_size: int = 0) -> bytes:
    src_ip, dst_ip = bytes([10, 32, 0, 1]), bytes([10, 32, 0, 2])
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 0, 0x50, 0x10, 1000, 0, 0) + bytes(size - 40)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 1, 0x4000 if df else 0, 64, 6, 0, src_ip, dst_ip)
    ip = ip[:10] + struct.pack("!H", icmp.checksum(ip)) + ip[12:]
    eth = bytes.fromhex("020000000002") + bytes.fromhex("020000000001") + b"\x08\x00"
    vnet = VNET_HDR.pack(1, 1 if gso_size else 0, 54, gso_size, 34, 16)
    return vnet + eth + ip + tcp


def test_ip_size_and_frag_needed() -> None:
    assert icmp.ip_size(_tcp_frame(1400)) == 1400
    assert icmp.ip_size(_tcp_frame(1400, df=False)) == 0
    assert icmp.ip_size(_tcp_frame(30_000, gso_size=1324)) == 1324 + 20 + 20

    packet = _tcp_frame(1400)
    frame = packet[10:]
    reply = icmp.frag_needed(frame, 1200)
    assert reply[0:6] == frame[6:12] and reply[6:12] == frame[0:6] and reply[12:14] == b"\x08\x00"
    ip, body = reply[14:34], reply[34:]
    assert icmp.checksum(ip) == 0 and icmp.checksum(body) == 0
    assert ip[12:16] == frame[30:34] and ip[16:20] == frame[26:30]  # from the original destination, to its source
    assert struct.unpack("!H", ip[2:4])[0] == len(reply) - 14
    assert ip[9] == 1 and body[0] == 3 and body[1] == 4
    assert struct.unpack("!H", body[6:8])[0] == 1200
    assert body[8:] == frame[14 : 14 + 20 + 8]  # the original IP header and 8 bytes


@pytest.mark.parametrize("length", [1, 1457, 1458, 30_000, 65_600])
@pytest.mark.parametrize("form", ["hop", "e2e"])
def test_each_datagram_carries_its_index_and_its_piece(length: int, form: str) -> None:
    header, magic, addr = (
        (wire.HEADER, wire.MAGIC, HOP) if form == "hop" else (wire.E2E_HEADER, wire.E2E_MAGIC, HOP + OTHER)
    )
    msg = os.urandom(length)
    out = bytearray(len(msg) + wire.MAX_SEGMENTS * header.size)
    total = wire.segment_into(out, memoryview(msg), addr, 0x01020304, 1472, header, magic)
    parts = [bytes(out[i : min(i + 1472, total)]) for i in range(0, total, 1472)]
    csize = 1472 - header.size
    for i, part in enumerate(parts):
        assert header.unpack_from(part) == (magic, addr, 0x01020304, i, len(parts), csize)
        assert part[header.size - wire.IDX_FROM_END] == i
        assert part[header.size :] == msg[i * csize : (i + 1) * csize]


@pytest.mark.parametrize("size", sorted({*wire.COMMON_DATAGRAMS, 1280 - 28, 1400 - 28, 1436 - 28}))
@pytest.mark.parametrize("form", ["hop", "e2e"])
def test_a_frame_below_the_overlay_gso_size_is_one_send_and_arrives_whole(size: int, form: str) -> None:
    """The overlay's devices keep the kernel's packets below OVERLAY_GSO_MAX: sealed, in either form, at the common
    path MTUs and at those of tunnels between 1280 and 1500, each is one UDP_SEGMENT send and one GRO buffer, so the
    receiver takes it whole (no partial message waits for a second buffer). The kernel's own 64 KiB packets did
    not fit."""
    header, magic, addr, front = (
        (wire.HEADER, wire.MAGIC, HOP, wire.CLEN)
        if form == "hop"
        else (wire.E2E_HEADER, wire.E2E_MAGIC, HOP + OTHER, wire.E2E_NLEN)
    )

    def sealed(ip_packet: int) -> bytes:  # nonce part, inner header, vnet header, Ethernet + VLAN tag, packet, tag
        return os.urandom(front + wire.ILEN + wire.FRAME_ROOM + ip_packet + wire.TAG)

    def sent(msg: bytes) -> bytes:
        out = bytearray(len(msg) + wire.MAX_SEGMENTS * header.size)
        return bytes(out[: wire.segment_into(out, memoryview(msg), addr, 9, size, header, magic)])

    one_send = wire.segments_per_send(size) * size
    largest = sealed(wire.OVERLAY_GSO_MAX - 1)
    data = sent(largest)
    assert len(data) <= one_send and len(data) <= wire.MAX_UDP and -(-len(data) // size) <= 64
    dropped: dict[str, int] = {}
    r = wire.Reassembler(dropped, lambda: set(), header, magic)  # knows no sender: a partial would be refused
    sink = Sink()
    buf = bytearray(1 << 16)
    buf[: len(data)] = data
    r.feed(memoryview(buf), len(data), size, sink)
    assert sink.got == [(addr, largest, size)] and not dropped and r.pending() == 0
    if size == 1472:
        assert len(sent(sealed(65_535))) > one_send

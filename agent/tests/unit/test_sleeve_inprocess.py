"""The sleeve in one process, without root: sleeves over socketpair "TAPs" and loopback UDP (tests/sleevemesh.py).

What a user would notice: frames cross both ways intact, the wire never shows them in clear, and what an attacker
sends (replays, forged tags or counters, frames with a source MAC from elsewhere) is dropped and counted, while
relaying, broadcast and the path-MTU answer keep working; with several workers, all of them carry traffic and no
nonce is used twice.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
import threading

import pytest
from sleevemesh import (
    Mesh,
    Node,
    complete_counters,
    mac_of,
    mesh,
    messages,
    udp_frame,
    wait_for,
)

from weft.datapath import icmp, wire
from weft.datapath.tap import VNET_HDR
from weft.datapath.udp import SOL_UDP as UDP_LEVEL
from weft.datapath.udp import UDP_SEGMENT
from weft.datapath.wire import COUNTER, HLEN

BROADCAST_MAC = b"\xff" * 6


def pair(m: Mesh, workers: int = 1, *, wire_12: bool = False) -> tuple[Node, Node]:
    a, b = m.add(1, workers), m.add(2, workers)
    m.connect(a, b, wire=wire_12)
    m.start()
    return a, b


def send(src: Node, dst: Node | bytes, payload: bytes, *, queue: int = 0, **kw: object) -> bytes:
    frame = udp_frame(src.index, dst.index if isinstance(dst, Node) else dst, payload, **kw)  # type: ignore[arg-type]
    src.kernel.write(frame, queue)
    return frame


def receive(node: Node, count: int = 1, timeout: float = 5.0) -> list[bytes]:
    got: list[bytes] = []
    wait_for(lambda: got.extend(node.kernel.drain(0.05)) or len(got) >= count, timeout, f"n{node.index} got {got}")
    return got


def test_frames_cross_both_ways_intact_small_and_64k() -> None:
    with mesh() as m:
        a, b = pair(m)
        sent = send(a, b, b"hello b")
        assert receive(b) == [sent]
        big = udp_frame(2, 1, os.urandom(60_000), df=False)  # one message of 41 datagrams
        b.kernel.write(big)
        assert receive(a) == [big]
        assert a.bytes("sleeve", "tx") > 0 and a.bytes("sleeve", "rx") > 60_000
        assert not a.totals().dropped and not b.totals().dropped


def test_a_frame_for_a_peer_that_just_turned_fast_still_crosses_over_the_sleeve() -> None:
    """The tables say "fast" at once, the kernel's FDB follows a moment later: a frame the bridge still hands the TAP
    for that peer meanwhile goes over the sleeve rather than being lost (a lost ping in the tests showed it)."""
    with mesh() as m:
        a, b = pair(m)
        a.sleeve.update(dataclasses.replace(m.forwarding(a), flood_origins=frozenset()))
        sent = send(a, b, b"sent while the kernel still points at the TAP")
        assert receive(b) == [sent]
        assert not a.totals().dropped and not b.totals().dropped


def test_the_wire_carries_sealed_messages_only_and_without_a_secret_in_clear() -> None:
    marker = b"WEFT-INPROC-MARKER-5e1d" * 40
    for keys in (True, False):
        with mesh(keys=keys) as m:
            a, b = pair(m, wire_12=True)
            sent = send(a, b, marker)
            assert receive(b) == [sent]
            captured = b"".join(m.wires[0].taken())
            assert (marker in captured) is not keys


def test_control_messages_reach_the_controller_with_the_sender_address() -> None:
    with mesh() as m:
        a, b = pair(m)
        assert a.sleeve.send_control(2, b"hb from 1", pad_to=1200)
        wait_for(lambda: b.controls, message="no control message")
        assert b.controls == [(1, a.addr, b"hb from 1", 1200)]
        assert not a.sleeve.send_control(9, b"to nobody")


def test_replayed_datagrams_are_rejected_counted_and_not_delivered() -> None:
    with mesh() as m:
        a, b = pair(m, wire_12=True)
        frames = [send(a, b, os.urandom(n), sport=40000 + i) for i, n in enumerate((100, 3000, 20_000))]
        assert sorted(receive(b, 3)) == sorted(frames)
        taken = m.wires[0].taken()
        m.wires[0].replay(taken)
        wait_for(lambda: b.dropped("replay") >= 3, message=f"replays counted: {b.totals().dropped}")
        assert b.kernel.drain(0.2) == []
        assert b.dropped("auth") == 0


def test_forged_tags_and_counters_are_rejected_and_never_move_the_window() -> None:
    with mesh() as m:
        a, b = pair(m, wire_12=True)
        send(a, b, b"genuine")
        receive(b)
        (genuine,) = m.wires[0].taken()
        body = genuine[HLEN + 8 :]
        flipped_tag = body[:-1] + bytes([body[-1] ^ 1])
        flipped_text = bytes([body[0] ^ 0x80]) + body[1:]
        # Counters far ahead pass the cheap check before opening, so only the tag can stop these.
        forged = [
            genuine[:HLEN] + COUNTER.pack((1 << 40) + i) + b for i, b in enumerate((body, flipped_tag, flipped_text))
        ]
        m.wires[0].replay(forged)
        wait_for(lambda: b.dropped("auth") == 3, message=f"auth drops: {b.totals().dropped}")
        assert b.kernel.drain(0.1) == []
        # No forged counter was recorded: the next genuine message (counter 1) still opens.
        nxt = send(a, b, b"next")
        assert receive(b) == [nxt]


def test_garbage_and_strangers_are_counted_and_the_sleeve_carries_on() -> None:
    with mesh() as m:
        a, b = pair(m, wire_12=True)
        send(a, b, b"first")
        receive(b)
        (genuine,) = m.wires[0].taken()
        rng = random.Random(3)
        stranger = genuine[:1] + (77).to_bytes(6, "big") + genuine[7:]
        m.wires[0].replay([rng.randbytes(rng.randrange(1, 1400)) for _ in range(100)] + [genuine[:10], stranger])
        wait_for(lambda: b.dropped("unknown_peer") >= 1 and b.dropped("malformed") >= 1, message=str(b.totals()))
        # A frame from the TAP whose source MAC does not live on this host is never sent (it came from the mesh).
        a.kernel.write(udp_frame(5, 2, b"spoofed"))
        wait_for(lambda: a.dropped("foreign_source") == 1, message=str(a.totals()))
        sent = send(a, b, b"still fine")
        assert receive(b) == [sent]


def test_relay_through_a_third_sleeve_both_ways() -> None:
    with mesh() as m:
        n1, n2, n3 = m.add(1), m.add(2), m.add(3)
        m.connect(n1, n2)
        m.connect(n2, n3)
        m.start()
        there = send(n1, n3, os.urandom(30_000), df=False)
        assert receive(n3) == [there]
        back = send(n3, n1, b"back")
        assert receive(n1) == [back]
        assert n2.bytes("relay", "tx") > 30_000 and n2.bytes("relay", "rx") > 30_000
        assert n2.kernel.drain(0.1) == []  # the relay's own TAP sees nothing of it


def test_broadcast_reaches_every_node_along_the_tree_once() -> None:
    with mesh() as m:
        n1, n2, n3 = m.add(1), m.add(2), m.add(3)
        m.connect(n1, n2)
        m.connect(n2, n3)
        m.start()
        frame = send(n1, BROADCAST_MAC, b"who has 10.32.0.3")
        assert receive(n2) == [frame]
        assert receive(n3) == [frame]
        assert n1.kernel.drain(0.2) == [] and n2.kernel.drain(0) == [] and n3.kernel.drain(0) == []


def test_a_frame_too_big_for_the_path_gets_icmp_frag_needed() -> None:
    with mesh() as m:
        a, b = m.add(1), m.add(2)
        m.connect(a, b)
        m.frame_mtu[1] = {2: 1200}
        m.start()
        send(a, b, bytes(1300 - 28))  # an IPv4 packet of 1300 bytes with DF
        (reply,) = receive(a)
        frame = reply[VNET_HDR.size :]
        assert frame[:6] == mac_of(1) and frame[12:14] == b"\x08\x00"
        ip, body = frame[14:34], frame[34:]
        assert body[0] == 3 and body[1] == 4 and struct.unpack("!H", body[6:8])[0] == 1200
        assert icmp.checksum(ip) == 0 and icmp.checksum(body) == 0
        assert a.dropped("too_big") == 1 and b.kernel.drain(0.1) == []
        fits = send(a, b, bytes(1200 - 28))
        assert receive(b) == [fits]


# -- several workers --------------------------------------------------------------------------------------------


def flows(src: Node, dst: Node, count: int, size: int) -> list[bytes]:
    """``count`` frames of distinct flows (source ports), written to src's queues in turn as the kernel spreads
    flows over a multi-queue TAP."""
    out = []
    for i in range(count):
        out.append(send(src, dst, os.urandom(size), sport=20000 + i, df=False, queue=i % src.workers))
    return out


@pytest.mark.parametrize("count", [4, 64])
def test_two_workers_each_carry_traffic_and_every_frame_arrives(count: int) -> None:
    """Even four flows spread over both workers: flow slots take flow bytes in turn."""
    with mesh() as m:
        a, b = pair(m, workers=2)
        sent = [f for _ in range(64 // count) for f in flows(a, b, count, 9000)]
        got = receive(b, len(sent), timeout=10)
        assert sorted(got) == sorted(sent)
        tx = [w["tx"] for w in a.sleeve.worker_bytes()]
        rx = [w["rx"] for w in b.sleeve.worker_bytes()]
        assert all(n > 0 for n in tx), tx
        assert all(n > 0 for n in rx), rx  # steered by the flow byte although it is all one 4-tuple


def test_one_flow_stays_on_one_receiving_worker_and_in_order() -> None:
    with mesh() as m:
        a, b = pair(m, workers=2)
        sent = [send(a, b, i.to_bytes(4, "big") + bytes(2000), sport=33333, df=False) for i in range(200)]
        got = receive(b, len(sent), timeout=10)
        assert got == sent
        rx = [w["rx"] for w in b.sleeve.worker_bytes()]
        assert sorted(rx)[0] == 0 and sorted(rx)[1] > 0, rx


def test_nonces_never_repeat_across_workers_and_every_replay_is_rejected() -> None:
    """Both of a's workers send to b at once (through a recording wire); every counter on the wire is distinct, and
    replaying all of it makes b count each message a replay and deliver nothing."""
    with mesh() as m:
        a, b = pair(m, workers=2, wire_12=True)
        start = threading.Barrier(2)

        def blast(queue: int) -> None:
            start.wait()
            for i in range(150):
                send(a, b, os.urandom(3000 if i % 3 else 20_000), sport=1000 * queue + i, df=False, queue=queue)

        threads = [threading.Thread(target=blast, args=(q,)) for q in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        receive(b, 300, timeout=20)
        tx = [w["tx"] for w in a.sleeve.worker_bytes()]
        assert all(n > 0 for n in tx), tx
        taken = m.wires[0].taken()
        counters = complete_counters(taken)
        assert len(counters) == 300 and len(set(counters)) == 300, "a nonce was used twice"
        before = b.dropped("replay")
        m.wires[0].replay(taken)
        wait_for(lambda: b.dropped("replay") - before >= 300, 10, f"replays: {b.totals().dropped}")
        assert b.kernel.drain(0.2) == []
        assert b.dropped("replay") - before == 300 and b.dropped("auth") == 0


def test_a_message_split_between_workers_is_still_reassembled() -> None:
    """A GRO buffer may start with another message's chunks, and is steered by that message's flow byte: the rest
    of a message then reaches another worker. Here the wire coalesces chunk 0 of message Z with the first half of
    message X in one UDP_SEGMENT send (steered to Z's worker) and sends X's second half alone (X's worker)."""
    with mesh() as m:
        a, b = pair(m, workers=2, wire_12=True)
        m.wires[0].passing = False
        sent = [send(a, b, os.urandom(30_000), sport=30000 + i, df=False) for i in range(8)]
        wait_for(lambda: len(messages(m.wires[0].taken())) == 8 and len(m.wires[0].taken()) >= 8 * 21, 10)
        by_msg = messages(m.wires[0].taken())
        odd = [k for k in by_msg if k[1] & 1]
        even = [k for k in by_msg if not k[1] & 1]
        assert odd and even, "all eight flows steer to one worker"  # 2 * 0.5**8: the hash would be broken
        x, z = by_msg[odd[0]], by_msg[even[0]]
        size = len(x[0])
        assert len(z[0]) == size and all(len(x[i]) == size for i in range(10))
        first = z[0] + b"".join(x[i] for i in range(10))
        m.wires[0].sock.sendmsg([first], [(UDP_LEVEL, UDP_SEGMENT, struct.pack("H", size))], 0, b.addr)
        wait_for(lambda: b.sleeve.workers[0]._reasm.pending() == 2, message="the coalesced buffer did not arrive")
        m.wires[0].replay([x[i] for i in sorted(x) if i >= 10] + [z[i] for i in sorted(z) if i >= 1])
        got = receive(b, 2)
        assert len(got) == 2 and set(got) <= set(sent)
        assert b.dropped("incomplete") == 0 and b.totals().dropped.keys() <= {"duplicate"}


def test_the_replay_window_accepts_each_counter_once_whatever_the_threads() -> None:
    window = wire.ReplayWindow()
    counters = list(range(5000)) * 4
    random.Random(1).shuffle(counters)
    accepted: list[int] = []
    lock = threading.Lock()
    go = threading.Barrier(4)

    def work(part: list[int]) -> None:
        go.wait()
        mine = [c for c in part if window.accept(c)]
        with lock:
            accepted.extend(mine)

    threads = [threading.Thread(target=work, args=(counters[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == len(set(accepted))  # never twice
    assert set(range(5000 - wire.ReplayWindow.SIZE, 5000)) <= set(accepted)  # the newest are never lost


def test_flow_keys_tell_flows_apart_and_keep_one_flow_together() -> None:
    from weft.datapath.sleeve import flow_key
    from weft.datapath.wire import ILEN

    def key(frame: bytes) -> bytes:
        return flow_key(memoryview(bytes(ILEN) + frame))

    a = udp_frame(1, 2, b"x", sport=1000)
    assert key(a) == key(udp_frame(1, 2, b"other payload", sport=1000))
    assert key(a) != key(udp_frame(1, 2, b"x", sport=1001)) and key(a) != key(udp_frame(1, 3, b"x", sport=1000))
    icmp_frame = bytearray(a)
    icmp_frame[VNET_HDR.size + 14 + 9] = 1  # ICMP: no ports, so a ping's changing checksum is not a new flow
    assert key(bytes(icmp_frame)) == a[VNET_HDR.size + 26 : VNET_HDR.size + 34]
    arp = VNET_HDR.pack(0, 0, 0, 0, 0, 0) + BROADCAST_MAC + mac_of(1) + b"\x08\x06" + bytes(28)
    assert key(arp) == b""
    v6 = VNET_HDR.pack(0, 0, 0, 0, 0, 0) + mac_of(2) + mac_of(1) + b"\x86\xdd"
    v6 += struct.pack("!IHBB", 6 << 28, 8, 17, 64) + bytes(15) + b"\x01" + bytes(15) + b"\x02"
    assert key(v6 + struct.pack("!HHHH", 1, 2, 8, 0)) != key(v6 + struct.pack("!HHHH", 1, 3, 8, 0))


def test_the_sleeve_refuses_mismatched_descriptors() -> None:
    from weft.datapath.sleeve import Sleeve

    with pytest.raises(ValueError):
        Sleeve(1, taps=[], socks=[], on_control=lambda *a: None, on_probe=lambda f: None)

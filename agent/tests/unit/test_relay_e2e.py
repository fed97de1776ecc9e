"""End-to-end sealing through relays, without root: the relayed key agreement (forged and replayed messages refused),
the key manager carried through a relay, and three sleeves on loopback UDP where the middle one passes the end-to-end
form on by its header (and refuses what is not from a neighbour, or not for a known peer)."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from itertools import pairwise
from random import Random

import pytest

from weft.datapath import wire
from weft.datapath.agreement import AgreementError, ReplayGuard, complete, initiate, parse, respond
from weft.datapath.endtoend import IN_FLIGHT_TRIES, MAX_OFFERS, EndToEnd
from weft.datapath.sleeve import Forwarding, Link, Pair, Sleeve, _Tables
from weft.datapath.tap import VNET_LEN
from weft.datapath.udp import open_udp
from weft.mesh.codec import pack, unpack
from weft.mesh.crypto import SessionKeys
from weft.metrics import Metrics

A, B, C, D = 0x020000000001, 0x020000000002, 0x020000000003, 0x020000000004
SECRET, OTHER = b"the mesh secret!", b"another mesh secret"
UID = {A: 11, B: 22, C: 33}


# -- the agreement ---------------------------------------------------------------------------------------------


def agree(secrets_a: list[bytes], secrets_c: list[bytes], guard: ReplayGuard | None = None):
    offer = initiate(A, UID[A], C, 1, secrets_a, 1472)
    init = parse(offer.init.encode())
    resp, c_keys = respond(init, C, UID[C], secrets_c, guard or ReplayGuard(), UID[A], 1472)
    a_keys = complete(offer, parse(resp.encode()), UID[C])
    return offer, resp, a_keys, c_keys


def test_both_ends_derive_the_same_keys_one_per_direction_and_fresh_every_time() -> None:
    _, _, a, c = agree([SECRET], [SECRET])
    assert a.kid == c.kid and a.peer == C and c.peer == A
    assert a.keys.send == c.keys.receive and a.keys.receive == c.keys.send and a.keys.send != a.keys.receive
    assert a.initiator and not c.initiator
    _, _, again, _ = agree([SECRET], [SECRET])
    assert again.keys != a.keys and again.kid != a.kid, "two agreements gave the same keys: no fresh exchange"


def test_secret_rotation_picks_the_first_of_the_initiators_secrets_that_the_responder_holds() -> None:
    _, resp, a, c = agree([OTHER, SECRET], [SECRET])
    assert resp.index == 1 and a.keys == SessionKeys(c.keys.receive, c.keys.send) and a.secret == SECRET


def test_a_forged_or_altered_init_is_refused() -> None:
    offer = initiate(A, UID[A], C, 1, [OTHER], 1472)
    with pytest.raises(AgreementError) as e:
        respond(offer.init, C, UID[C], [SECRET], ReplayGuard(), UID[A], 1472)
    assert e.value.reason == "auth"
    good = initiate(A, UID[A], C, 2, [SECRET], 1472).init
    for altered in (
        replace(good, pub=bytes(32)),  # a man in the middle's key
        replace(good, src=B),  # someone else's init
        replace(good, seq=good.seq + 1),  # a replay with a new sequence
        replace(good, uid=99),
    ):
        with pytest.raises(AgreementError) as e:
            respond(altered, C, UID[C], [SECRET], ReplayGuard(), altered.uid, 1472)
        assert e.value.reason == "auth"
    # What relays change on the way (hops, datagram size) is outside the tag.
    respond(replace(good, ds=576, hops=3), C, UID[C], [SECRET], ReplayGuard(), UID[A], 1472)


def test_a_replayed_init_is_refused_and_so_is_one_from_another_run() -> None:
    guard = ReplayGuard()
    offer = initiate(A, UID[A], C, 5, [SECRET], 1472)
    respond(offer.init, C, UID[C], [SECRET], guard, UID[A], 1472)
    with pytest.raises(AgreementError) as e:
        respond(offer.init, C, UID[C], [SECRET], guard, UID[A], 1472)
    assert e.value.reason == "replay"
    older = initiate(A, UID[A], C, 4, [SECRET], 1472)
    with pytest.raises(AgreementError):
        respond(older.init, C, UID[C], [SECRET], guard, UID[A], 1472)
    with pytest.raises(AgreementError) as e:  # the peer restarted since: its last run's init is stale
        respond(initiate(A, UID[A], C, 9, [SECRET], 1472).init, C, UID[C], [SECRET], guard, UID[A] + 1, 1472)
    assert e.value.reason == "stale_run"
    forged = initiate(A, UID[A], C, 100, [OTHER], 1472)  # a forged init does not move the record
    with pytest.raises(AgreementError):
        respond(forged.init, C, UID[C], [SECRET], guard, UID[A], 1472)
    respond(initiate(A, UID[A], C, 6, [SECRET], 1472).init, C, UID[C], [SECRET], guard, UID[A], 1472)


def test_a_forged_or_misdirected_response_is_refused() -> None:
    offer, resp, _, _ = agree([SECRET], [SECRET])
    for bad, reason in (
        (replace(resp, tag=bytes(16)), "auth"),
        (replace(resp, pub=bytes(32)), "auth"),
        (replace(resp, seq=resp.seq + 1), "stale"),
        (replace(resp, src=B), "stale"),
        (replace(resp, index=3), "auth"),
    ):
        with pytest.raises(AgreementError) as e:
            complete(offer, bad, UID[C])
        assert e.value.reason == reason
    with pytest.raises(AgreementError) as e:
        complete(offer, resp, UID[C] + 1)
    assert e.value.reason == "stale_run"


def test_malformed_agreement_messages_are_decode_errors() -> None:
    from weft.mesh.codec import DecodeError

    good = initiate(A, UID[A], C, 1, [SECRET], 1472).init.encode()
    for bad in (
        {**good, "p": b"short"},
        {**good, "a": []},
        {**good, "a": [b"x"]},
        {**good, "s": 0},
        {**good, "ds": -1},
        {**good, "t": "kx"},
        {k: v for k, v in good.items() if k != "n"},
    ):
        with pytest.raises(DecodeError):
            parse(bad)


# -- the key manager, through a relay ---------------------------------------------------------------------------


class Mesh:
    """A, B and C in a line (A - B - C): agreement messages go hop by hop, sealed messages straight to the end."""

    def __init__(self, capable: bool = True, sizes: dict[tuple[int, int], int] | None = None) -> None:
        self.capable = {A: True, B: capable, C: True}
        self.sizes = sizes or {}
        self.queue: deque = deque()
        self.now = 0.0
        self.metrics = {n: Metrics() for n in (A, B, C)}
        self.uids = dict(UID)
        self.wire: list[tuple[int, int, dict]] = []  # every agreement message sent: (from, to, map)
        self.heartbeats: list[tuple[float, int, int, dict]] = []  # end-to-end heartbeats sent: (when, from, to, map)
        self.traffic: dict[int, dict[int, int]] = {A: {}, B: {}, C: {}}  # the sleeves' per-pair frame counts
        self.cut: set[int] = set()  # peers whose messages are lost (their agent hangs, or the route drops them)
        self.old: set[int] = set()  # peers whose heartbeats never ask (an older version)
        self.e2e = {n: self.make(n) for n in (A, B, C)}

    def make(self, name: int) -> EndToEnd:
        mesh = self

        class Io:
            def send_hop(self, peer: int, payload: bytes) -> bool:
                msg = unpack(payload, "test")
                mesh.wire.append((name, peer, msg))
                mesh.queue.append(("hop", peer, name, msg))
                return True

            def send_pair(self, peer: int, kid: int, payload: bytes) -> bool:
                msg = unpack(payload, "test")
                if name in mesh.old:
                    msg.pop("rq", None)
                    payload = pack(msg)
                mesh.heartbeats.append((mesh.now, name, peer, msg))
                if name not in mesh.cut and peer not in mesh.cut:
                    mesh.queue.append(("pair", peer, name, (kid, payload)))
                return True

            def route(self, dst: int) -> tuple[int, int] | None:
                hop = dst if abs(dst - name) == 1 else B
                if not mesh.capable[hop] or not mesh.capable[name] or hop == name:
                    return None
                return hop, mesh.sizes.get((name, hop), 1472)

            def peer_uid(self, peer: int) -> int | None:
                return mesh.uids.get(peer)

            def changed(self) -> None:
                pass

        return EndToEnd(
            name, self.uids[name], lambda: [SECRET], self.metrics[name], Io(), interval=1.0, dead=3.0, rng=Random(name)
        )

    def run(self) -> None:
        while self.queue:
            kind, to, frm, body = self.queue.popleft()
            if kind == "hop":
                self.e2e[to].on_hop_message(frm, body, self.now)
            elif to in self.e2e:
                kid, payload = body
                if any(p.kid == kid and p.peer == frm for p in self.e2e[to].pairs()):  # the sleeve opens it
                    self.e2e[to].on_pair_message(frm, kid, payload, self.now)
            for e in self.e2e.values():
                e.after_update(self.now)

    def step(self, seconds: float = 1.0) -> None:
        self.now += seconds
        self.e2e[A].update({C: B}, self.now)
        self.e2e[C].update({A: B}, self.now)
        self.e2e[B].update({}, self.now)
        for e in self.e2e.values():
            e.after_update(self.now)
        self.run()
        for name, e in self.e2e.items():
            e.tick(self.now, self.traffic[name])
        self.run()

    def asks(self, frm: int, since: float = 0.0) -> list[float]:
        """When ``frm`` sent a heartbeat that asked for an answer."""
        return [t for t, f, _, m in self.heartbeats if f == frm and m.get("rq") and t > since]

    def events(self, name: int) -> dict[str, float]:
        samples = (s for m in self.metrics[name].e2e_agreements.collect() for s in m.samples)
        return {s.labels["event"]: s.value for s in samples if s.name.endswith("_total")}


def test_two_peers_behind_a_relay_agree_keys_and_seal_end_to_end_and_the_relay_holds_none() -> None:
    mesh = Mesh(sizes={(B, C): 1400})
    for _ in range(3):
        mesh.step()
    a, b, c = mesh.e2e[A], mesh.e2e[B], mesh.e2e[C]
    assert a.sealing(C) and c.sealing(A)
    assert b.pairs() == () and b.status(mesh.now) == []
    (pa,) = [p for p in a.pairs() if p.send]
    (pc,) = [p for p in c.pairs() if p.send]
    assert pa.kid == pc.kid and pa.keys.send == pc.keys.receive
    assert pa.datagram_size == 1400, "A's datagrams must fit B's smaller link to C"
    assert pc.datagram_size == 1472
    # One init and its response crossed the relay: the lower name (A) started, C waited for it and answered.
    assert mesh.events(B)["passed_on"] == 2 and mesh.events(A)["completed"] == 1 and "crossed" not in mesh.events(A)
    assert [m["t"] for frm, _, m in mesh.wire if frm == C] == ["kr"], "C sent an init of its own"
    # Every relayed message went A -> B -> C or C -> B -> A: the relay passed each on once, lowering the size.
    passed = [m for frm, to, m in mesh.wire if frm == B]
    assert passed and all(m["h"] == 1 for m in passed)


def test_a_relay_without_the_capability_leaves_the_pair_hop_by_hop() -> None:
    mesh = Mesh(capable=False)
    for _ in range(5):
        mesh.step()
    assert not mesh.e2e[A].sealing(C) and mesh.e2e[A].pairs() == ()
    assert mesh.wire == [], "an init went to a first hop that cannot pass end-to-end datagrams on"


def test_inits_that_go_unanswered_are_retried_less_and_less_often() -> None:
    mesh = Mesh()
    mesh.capable[C] = False  # B cannot pass the init on: C looks like an older agent
    for _ in range(40):
        mesh.step()
    sent = [m for frm, _, m in mesh.wire if frm == A]
    assert 4 <= len(sent) <= 8, len(sent)  # 1, 2, 4, 8, 16 s apart, not one a second
    assert mesh.events(B)["unroutable"] == len(sent)


def test_a_replayed_init_does_not_replace_the_keys() -> None:
    mesh = Mesh()
    for _ in range(3):
        mesh.step()
    init = next(m for frm, to, m in mesh.wire if frm == B and to == C and m["t"] == "ki")
    before = mesh.e2e[C].pairs()
    mesh.e2e[C].on_hop_message(B, init, mesh.now)
    assert mesh.events(C)["replay"] == 1
    assert mesh.e2e[C].pairs() == before and mesh.e2e[C].sealing(A)


def test_a_restart_of_either_end_brings_new_keys_and_a_direct_link_drops_them() -> None:
    mesh = Mesh()
    for _ in range(3):
        mesh.step()
    old = {p.kid for p in mesh.e2e[A].pairs()}
    mesh.uids[C] = 34  # C's agent restarted: a new run with no keys
    mesh.e2e[C] = mesh.make(C)
    for _ in range(3):
        mesh.step()
    assert mesh.e2e[A].sealing(C) and mesh.e2e[C].sealing(A)
    assert not {p.kid for p in mesh.e2e[A].pairs()} & old
    mesh.e2e[A].update({}, mesh.now)  # A and C now reach each other directly
    assert mesh.e2e[A].pairs() == () and mesh.e2e[A].status(mesh.now) == []


def test_the_initiator_agrees_new_keys_in_time_and_the_old_ones_open_a_moment_longer() -> None:
    mesh = Mesh()
    for _ in range(3):
        mesh.step()
    first = next(p.kid for p in mesh.e2e[A].pairs() if p.send)
    mesh.step(301.0)
    mesh.step()
    kids = {p.kid for p in mesh.e2e[A].pairs()}
    sending = next(p.kid for p in mesh.e2e[A].pairs() if p.send)
    assert sending != first and first in kids
    for _ in range(5):
        mesh.step()
    assert first not in {p.kid for p in mesh.e2e[A].pairs()}


def test_a_quiet_pair_heartbeats_every_ten_intervals_and_keeps_sealing_end_to_end() -> None:
    """A hub relays for every pair of its spokes: heartbeats every interval for each pair were most of its work."""
    mesh = Mesh()
    for _ in range(10):
        mesh.step()
    assert mesh.e2e[A].sealing(C) and mesh.e2e[C].sealing(A)
    start = mesh.now
    for _ in range(100):
        mesh.step()
        assert mesh.e2e[A].sealing(C) and mesh.e2e[C].sealing(A), f"a quiet pair stopped sealing at {mesh.now}"
    for side in (A, C):
        asks = mesh.asks(side, since=start)
        assert 10 <= len(asks) <= 14, asks  # 7.5 to 10 s apart, not every second
        assert all(7.0 <= b - a <= 10.0 for a, b in pairwise(asks)), asks
    sent = [h for h in mesh.heartbeats if h[0] > start]
    assert len(sent) <= 60, f"{len(sent)} heartbeats in 100 s of a quiet pair (every interval: 200)"
    (row,) = mesh.e2e[A].status(mesh.now)
    assert row["heartbeat_every_s"] == 10.0 and row["sealing"] == "end-to-end"


def test_traffic_brings_heartbeats_every_interval_at_once_and_a_silent_peer_is_found_in_seconds() -> None:
    mesh = Mesh()
    for _ in range(30):
        mesh.step()
    assert mesh.e2e[A].status(mesh.now)[0]["heartbeat_every_s"] == 10.0
    mesh.traffic[A][C] = 5  # frames cross the pair
    before = mesh.now
    mesh.step()
    assert mesh.asks(A, since=before) == [mesh.now], "frames on a quiet pair must bring a round at once"
    for _ in range(5):
        mesh.traffic[A][C] += 5
        mesh.step()
    assert len(mesh.asks(A, since=before)) == 6 and mesh.e2e[A].sealing(C)
    # C goes silent (its agent hangs): with frames crossing, A is back to hop by hop within a few seconds,
    # not the thirty a quiet pair allows.
    mesh.cut.add(C)
    silent = mesh.now
    while mesh.e2e[A].sealing(C):
        mesh.traffic[A][C] += 5
        mesh.step()
        assert mesh.now - silent <= 4.0, "A kept sealing for a peer that stopped answering"


def test_a_peer_that_never_asks_gets_a_heartbeat_every_interval() -> None:
    """An older version sends one every interval and counts us gone after three missed: we must not slow down."""
    mesh = Mesh()
    mesh.old.add(C)
    for _ in range(10):
        mesh.step()
    start = mesh.now
    for _ in range(30):
        mesh.step()
        assert mesh.e2e[A].sealing(C)
    assert len(mesh.asks(A, since=start)) == 30


def agree_through_a_hub(
    peers: int, steps: int, silent: int = 0
) -> tuple[dict[int, EndToEnd], dict[int, list[float]], list[int]]:
    """The lowest-named spoke and ``peers`` others behind one hub, stepped a second at a time: each spoke's keys
    manager, when each sent its inits, and how many inits the lowest had in flight at each step. The first
    ``silent`` of the others never get a message (the hub cannot pass it on to them: older agents)."""
    hub, spokes = 0x020000000100, [0x020000000200 + i for i in range(peers + 1)]
    first, rest = spokes[0], spokes[1:]
    queue: deque = deque()
    inits: dict[int, list[float]] = {s: [] for s in spokes}
    clock = [0.0]

    def make(name: int) -> EndToEnd:
        class Io:
            def send_hop(self, peer: int, payload: bytes) -> bool:
                msg = unpack(payload, "test")
                if msg["t"] == "ki":
                    inits[name].append(clock[0])
                queue.append(("hop", msg))
                return True

            def send_pair(self, peer: int, kid: int, payload: bytes) -> bool:
                queue.append(("pair", (peer, name, kid, payload)))
                return True

            def route(self, dst: int) -> tuple[int, int] | None:
                return hub, 1472

            def peer_uid(self, peer: int) -> int | None:
                return peer & 0xFFFF

            def changed(self) -> None:
                pass

        return EndToEnd(
            name, name & 0xFFFF, lambda: [SECRET], Metrics(), Io(), interval=1.0, dead=3.0, rng=Random(name)
        )

    e2e = {s: make(s) for s in spokes}
    for s in rest[:silent]:
        e2e[s].update = lambda relayed, now: None  # type: ignore[method-assign]  # nor send any
    in_flight = []
    for _ in range(steps):
        clock[0] = now = clock[0] + 1.0
        e2e[first].update(dict.fromkeys(rest, hub), now)
        for s in rest:
            e2e[s].update({first: hub}, now)
        in_flight.append(sum(1 for p in e2e[first]._peers.values() if p.offer and p.tries <= IN_FLIGHT_TRIES))
        while queue:  # the hub passes each message on to its destination
            kind, body = queue.popleft()
            if kind == "hop":
                dst = parse(body).dst
                if dst not in rest[:silent]:
                    e2e[dst].on_hop_message(hub, body, now)
            else:
                dst, src, kid, payload = body
                e2e[dst].on_pair_message(src, kid, payload, now)
            for e in e2e.values():
                e.after_update(now)
        for e in e2e.values():
            e.tick(now)
    return e2e, inits, in_flight


def test_a_spoke_agrees_with_forty_peers_behind_its_hub_in_turns_one_init_per_pair() -> None:
    """A hub carries every agreement of its spokes: each pair's single init and response, a bounded number at once."""
    e2e, inits, in_flight = agree_through_a_hub(40, steps=8)
    first, *rest = e2e
    assert all(e2e[first].sealing(s) and e2e[s].sealing(first) for s in rest)
    assert max(in_flight) <= MAX_OFFERS, in_flight
    assert len(inits[first]) == len(rest), "one init per pair: none retried, none crossed"
    assert not any(inits[s] for s in rest), "the higher names waited for the lower's init"


def test_peers_that_never_answer_do_not_keep_the_others_waiting_for_a_turn() -> None:
    """Twenty peers behind the hub cannot answer (older agents: the hub does not pass inits on to them). Their inits,
    unanswered after a retry, stop counting against the sixteen in flight: the last four get theirs in turn."""
    e2e, _, in_flight = agree_through_a_hub(20, steps=15, silent=20)
    first, *rest = e2e
    tried = [s for s in rest if e2e[first]._peers[s].tries > 0]
    assert len(tried) == 20, f"inits went to {len(tried)} of 20 peers: the unanswered ones held every turn"
    assert max(in_flight) <= MAX_OFFERS


def test_a_higher_name_left_waiting_starts_the_agreement_itself() -> None:
    """The lowest spoke's turns reach 48 peers by the time the others have waited a dead interval: the last twelve
    send their own inits, and the lowest answers them."""
    e2e, inits, in_flight = agree_through_a_hub(60, steps=10)
    first, *rest = e2e
    assert all(e2e[first].sealing(s) and e2e[s].sealing(first) for s in rest)
    started = [s for s in rest if inits[s]]
    assert 0 < len(started) < len(rest) and all(min(inits[s]) >= 4.0 for s in started), started
    assert max(in_flight) <= MAX_OFFERS


# -- the forwarding decision --------------------------------------------------------------------------------------

KEYS = SessionKeys(b"s" * 32, b"r" * 32)
ADDR_A, ADDR_C, ADDR_D = ("10.0.0.1", 6783), ("10.0.0.3", 6783), ("10.0.0.4", 6783)


def nb(name: int) -> bytes:
    return name.to_bytes(6, "big")


def test_a_relay_passes_on_only_from_a_capable_neighbour_towards_a_known_peer() -> None:
    fwd = Forwarding(
        links={
            A: Link(A, ADDR_A, KEYS, 1472, 1, e2e=True),
            C: Link(C, ADDR_C, KEYS, 1472, 1, e2e=True),
            D: Link(D, ADDR_D, KEYS, 1472, 1, e2e=False),  # an older agent
        },
        next_hop={A: A, C: C, D: D, 0x020000000005: D},
    )
    t, me = _Tables(B, fwd, {}), nb(B)
    assert t.transit_hop(ADDR_A, nb(A) + nb(C), me).peer == C
    assert t.transit_hop(ADDR_C, nb(C) + nb(A), me).peer == A
    assert t.transit_hop(("192.0.2.9", 6783), nb(A) + nb(C), me) == "transit_unknown_sender"
    assert t.transit_hop(ADDR_D, nb(D) + nb(C), me) == "transit_unknown_sender", "D never said it reads the form"
    assert t.transit_hop(ADDR_A, nb(A) + nb(0x0200000000FF), me) == "transit_no_route"  # no such peer
    assert t.transit_hop(ADDR_A, nb(A) + nb(0x020000000005), me) == "transit_no_route"  # only via an older hop
    assert t.transit_hop(ADDR_A, nb(0x0200000000FF) + nb(C), me) == "transit_unknown_origin"
    assert t.transit_hop(ADDR_A, me + nb(C), me) == "transit_unknown_origin"
    assert t.transit_hop(ADDR_A, nb(C) + nb(A), me) == "transit_loop"
    plain = Forwarding(links={A: Link(A, ADDR_A, None, 1472, 1, e2e=True)}, next_hop={A: A})
    assert _Tables(B, plain, {}).transit_hop(ADDR_A, nb(C) + nb(A), me) == "transit_unknown_sender"


def test_the_end_to_end_form_round_trips_through_the_reassembler() -> None:
    msg = memoryview(os.urandom(20_000))
    out = bytearray(wire.MAX_MESSAGE + wire.MAX_SEGMENTS * wire.E2E_HLEN)
    route = nb(A) + nb(C)
    total = wire.segment_into(out, msg, route, 7, 1000, wire.E2E_HEADER, wire.E2E_MAGIC)
    assert all(out[off] == wire.E2E_MAGIC and out[off + 1 : off + 13] == route for off in range(0, total, 1000))
    got: list[tuple[bytes, bytes]] = []
    dropped: dict[str, int] = {}
    reasm = wire.Reassembler(dropped, lambda: {route}, header=wire.E2E_HEADER, magic=wire.E2E_MAGIC)
    reasm.feed(memoryview(out), total, 1000, lambda hop, m, size: got.append((hop, bytes(m))))
    assert got == [(route, bytes(msg))] and not dropped


# -- three sleeves on loopback --------------------------------------------------------------------------------------

MAC_A, MAC_C = b"\x02\xaa" + bytes(4), b"\x02\xcc" + bytes(4)


class Host:
    def __init__(self, name: int) -> None:
        self.name = name
        self.controls: list[tuple[int, int, bytes]] = []
        self.sock = open_udp(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.tap_r, tap_w = os.pipe()  # what the sleeve writes to its TAP comes out here
        os.set_blocking(self.tap_r, False)
        self.sleeve = Sleeve(
            name,
            taps=[tap_w],
            socks=[self.sock],
            on_control=lambda *a: None,
            on_probe=lambda f: None,
            on_pair_control=lambda peer, kid, payload: self.controls.append((peer, kid, payload)),
        )
        self.worker = self.sleeve.workers[0]  # driven by the test, without its thread
        self.addr = self.sock.getsockname()

    def drain(self) -> None:
        self.worker._rt = self.worker._tables
        self.worker._drain_udp()

    def tap_frames(self) -> bytes:
        try:
            return os.read(self.tap_r, 1 << 20)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        self.sleeve.stop()  # closes the socket and the pipe's write end
        os.close(self.tap_r)

    def dropped(self) -> dict[str, int]:
        return self.sleeve.totals().dropped


def link_keys(a: int, b: int) -> SessionKeys:
    key = {(A, B): b"1" * 32, (B, A): b"2" * 32, (B, C): b"3" * 32, (C, B): b"4" * 32}
    return SessionKeys(key[(a, b)], key[(b, a)])


PAIR_A = SessionKeys(b"a" * 32, b"c" * 32)  # A's view: it seals with a*32; C seals with c*32


@pytest.fixture
def line() -> Iterator[tuple[Host, Host, Host]]:
    hosts = Host(A), Host(B), Host(C)
    try:
        yield hosts
    finally:
        for h in hosts:
            h.close()


def wire_up(a: Host, b: Host, c: Host, *, c_size: int = 1472, pair_size: int = 1472) -> None:
    a.sleeve.update(
        Forwarding(
            links={B: Link(B, b.addr, link_keys(A, B), 1472, 1, e2e=True)},
            next_hop={B: B, C: B},
            flood_origins=frozenset({B, C}),
            mac_owner={MAC_C: C},
            local_macs=frozenset({MAC_A}),
            pairs=(Pair(C, 0x1234, PAIR_A, True, pair_size),),
        )
    )
    b.sleeve.update(
        Forwarding(
            links={
                A: Link(A, a.addr, link_keys(B, A), 1472, 1, e2e=True),
                C: Link(C, c.addr, link_keys(B, C), c_size, 1, e2e=True),
            },
            next_hop={A: A, C: C},
            flood_origins=frozenset({A, C}),
        )
    )
    c.sleeve.update(
        Forwarding(
            links={B: Link(B, b.addr, link_keys(C, B), 1472, 1, e2e=True)},
            next_hop={A: B, B: B},
            flood_origins=frozenset({A, B}),
            local_macs=frozenset({MAC_C}),
            pairs=(Pair(A, 0x1234, SessionKeys(PAIR_A.receive, PAIR_A.send), True, 1472),),
        )
    )


def send_frame(h: Host, payload: bytes) -> None:
    """What the TAP would hand the sleeve: a virtio header and an Ethernet frame from A's container to C's."""
    frame = bytes(VNET_LEN) + MAC_C + MAC_A + b"\x08\x00" + payload
    base = wire.CLEN + wire.ILEN
    h.worker._tap_buf[base : base + len(frame)] = frame
    h.worker._rt = h.worker._tables
    h.worker._from_tap(len(frame))


def settle(*hosts: Host) -> None:
    for _ in range(3):
        time.sleep(0.02)
        for h in hosts:
            h.drain()


def test_the_middle_sleeve_passes_sealed_frames_on_unopened_and_the_far_end_opens_them(line) -> None:
    a, b, c = line
    wire_up(a, b, c)
    payload = os.urandom(40_000)  # a GSO frame: many datagrams in one UDP_SEGMENT send, and GRO at the relay
    send_frame(a, payload)
    assert a.sleeve.send_pair_control(C, 0x1234, b"hello from A")
    settle(b, c)
    assert c.tap_frames().endswith(payload)
    assert c.controls == [(A, 0x1234, b"hello from A")]
    stats = b.sleeve.totals()
    assert stats.bytes[("transit", "tx")] > 40_000 and stats.bytes[("relay", "tx")] == 0
    assert b.worker._e2e_reasm.pending() == 0 and b.worker._recut_reasm.pending() == 0
    assert not b.dropped() and not c.dropped()
    # The pair's frame counters, which pace its heartbeats: the frame counts at both ends, the control message not.
    assert a.sleeve.pair_traffic() == {C: 1} and c.sleeve.pair_traffic() == {A: 1} and b.sleeve.pair_traffic() == {}


def test_a_relay_whose_next_link_is_smaller_cuts_again_without_opening(line) -> None:
    a, b, c = line
    wire_up(a, b, c, c_size=700)
    payload = os.urandom(20_000)
    send_frame(a, payload)
    settle(b, c)
    assert c.tap_frames().endswith(payload)
    assert b.sleeve.totals().bytes[("transit", "tx")] > 20_000 and not c.dropped()


def test_replayed_forged_and_foreign_datagrams_are_refused_and_counted(line) -> None:
    a, b, c = line
    wire_up(a, b, c)
    a.sleeve.send_pair_control(C, 0x1234, b"once")
    time.sleep(0.02)
    b.drain()
    time.sleep(0.02)
    datagram, _ = c.sock.recvfrom(65536)  # taken off the wire at C, then played back from B's address
    for bad in (datagram, datagram, datagram[:-1] + bytes([datagram[-1] ^ 1])):
        b.sock.sendto(bad, c.addr)
    forged_kid = bytearray(datagram)
    forged_kid[21:25] = b"\x00\x00\x99\x99"
    b.sock.sendto(bytes(forged_kid), c.addr)
    settle(c)
    assert c.controls == [(A, 0x1234, b"once")], "a replay or a forgery was taken"
    assert c.dropped() == {"replay": 2, "unknown_pair": 1}  # the tampered copy reuses the counter: a replay

    fresh = bytearray(datagram)
    fresh[25:33] = (1 << 40).to_bytes(8, "big")  # a counter never seen: only the tag can refuse it
    b.sock.sendto(bytes(fresh), c.addr)
    settle(c)
    assert c.dropped()["auth"] == 1

    # Not an open reflector: from an address that is no neighbour's, or towards a peer the relay does not know,
    # nothing leaves the relay.
    stranger = open_udp(("127.0.0.1", 0))
    try:
        stranger.sendto(datagram, b.addr)
        unknown = bytearray(datagram)
        unknown[7:13] = nb(0x0200000000FF)
        a.sock.sendto(bytes(unknown), b.addr)
        time.sleep(0.02)
        sent_before = b.sleeve.totals().bytes[("transit", "tx")]
        b.drain()
        assert b.sleeve.totals().bytes[("transit", "tx")] == sent_before
        assert b.dropped() == {"transit_unknown_sender": 1, "transit_no_route": 1}
        time.sleep(0.02)
        with pytest.raises(BlockingIOError):
            c.sock.recvfrom(65536)
    finally:
        stranger.close()


def test_a_relay_passes_one_gro_buffer_with_both_forms_on_in_parts(line) -> None:
    """A neighbour's own datagrams and the ones it passes on share one flow, so GRO may hand both over at once."""
    a, b, c = line
    wire_up(a, b, c)
    a.sleeve.send_pair_control(C, 0x1234, b"x" * 100)
    time.sleep(0.02)
    b.drain()
    time.sleep(0.02)
    e2e, _ = c.sock.recvfrom(65536)
    own = bytearray(len(e2e))
    own[0] = wire.MAGIC  # an old-form datagram of the same size from A (garbage: dropped as such)
    buf = bytearray(e2e + bytes(own) + e2e)
    b.worker._rx_view[: len(buf)] = buf
    b.worker._cur_addr = a.addr
    b.worker._rt = b.worker._tables
    b.worker._mixed(b.worker._rx_view, len(buf), len(e2e), bytes(buf[0 : len(buf) : len(e2e)]))
    time.sleep(0.02)
    assert c.sock.recvfrom(65536)[0] == e2e and c.sock.recvfrom(65536)[0] == e2e
    assert "transit_unknown_sender" not in b.dropped()


def test_frames_for_a_peer_without_pair_keys_are_sealed_hop_by_hop(line) -> None:
    a, b, c = line
    wire_up(a, b, c)
    fwd = a.sleeve._tables.fwd
    a.sleeve.update(replace(fwd, pairs=(replace(fwd.pairs[0], send=False),)))
    send_frame(a, b"p" * 500)
    settle(b, c)
    assert c.tap_frames().endswith(b"p" * 500)
    stats = b.sleeve.totals().bytes
    assert stats[("transit", "tx")] == 0 and stats[("relay", "tx")] > 500, "B opened and sealed it again"


def test_keys_from_an_init_never_confirmed_expire_and_this_side_agrees_itself() -> None:
    """An init recorded earlier and played back to a responder that forgot its record (it restarted): the keys it
    makes are never used, go after two dead intervals, and the responder then starts an agreement of its own."""
    mesh = Mesh()
    for _ in range(3):
        mesh.step()
    init = next(m for frm, to, m in mesh.wire if frm == B and to == C and m["t"] == "ki")
    mesh.e2e[C] = mesh.make(C)  # C restarted: no keys, no record of A's inits (its uid stays, for the test)
    mesh.e2e[A]._peers.clear()  # and A is quiet: only the replay speaks to C
    mesh.capable[A] = False  # A's side does nothing further
    mesh.e2e[C].update({A: B}, mesh.now)
    mesh.e2e[C]._peers[A].offer = None
    mesh.e2e[C]._peers[A].want = False  # as if C had just answered: nothing of its own in flight
    mesh.e2e[C].on_hop_message(B, init, mesh.now)
    assert [p.send for p in mesh.e2e[C].pairs()] == [False], "C must not seal with keys from an unconfirmed init"
    sent_before = sum(1 for frm, _, m in mesh.wire if frm == C and m["t"] == "ki")
    mesh.now += 7.0
    mesh.e2e[C].tick(mesh.now)
    assert mesh.e2e[C].pairs() == ()
    mesh.now += 1.0
    mesh.e2e[C].tick(mesh.now)
    assert sum(1 for frm, _, m in mesh.wire if frm == C and m["t"] == "ki") > sent_before

"""A ceiling on discovery: at the connection limit discovered peers are held, not dialled; a peer that says it is at
its own limit is not dialled again until it has room; both show in the status and in weft_discovery_held."""

from __future__ import annotations

import asyncio
import collections
import itertools
import random

from weft.mesh.clock import VirtualScheduler
from weft.mesh.connection_maker import FULL_PEER, ConnectionMaker
from weft.mesh.gossip import GOSSIP, GossipSender
from weft.mesh.handshake import HandshakeError, handshake, refuse_full
from weft.mesh.peer import PeerInfo
from weft.mesh.router import TOPOLOGY, VIEW_HOLD_MAX, VIEW_QUIET, Router
from weft.mesh.topology import ConnectionSummary, PeerEntry, TopologyUpdate
from weft.metrics import Metrics
from weft.sim import SimNetwork

ME = PeerInfo(0x020000000001, "me", 11)
PEERS = [PeerInfo(0x020000000010 + i, f"p{i}", 100 + i) for i in range(8)]
SECRET = b"a mesh secret for the ceiling tests"


def held(metrics: Metrics) -> dict[str, float]:
    (family,) = metrics.discovery_held.collect()
    return {s.labels["reason"]: s.value for s in family.samples}


class Conn:
    def __init__(self, remote: PeerInfo) -> None:
        self.remote = remote
        self.remote_address = f"{address(remote)}"
        self.outbound = True
        self.conn_uid = remote.uid
        self.encrypted = False
        self.sender = GossipSender(lambda: None)
        self.caps: frozenset[str] = frozenset()  # an older peer: full states, no digests

    def close(self, reason: str) -> None:
        pass


def address(peer: PeerInfo) -> str:
    return f"10.0.0.{peer.name & 0xFF}:6783"


def entry(peer: PeerInfo, version: int, *others: PeerInfo) -> PeerEntry:
    conns = tuple(ConnectionSummary(o.name, address(o), True, True) for o in others)
    return PeerEntry(peer.name, peer.nickname, peer.uid, version, conns)


class Rig:
    """One maker whose dials are recorded, with a router at ``limit`` connections."""

    def __init__(self, limit: int, me: PeerInfo = ME) -> None:
        self.clock = VirtualScheduler()
        self.router = Router(me, self.clock, Metrics(), conn_limit=limit)
        self.dials: list[str] = []
        self.maker = ConnectionMaker(self.router, self.clock, self.dials.append, rng=random.Random(1))

    def connect(self, peer: PeerInfo) -> Conn:
        conn = Conn(peer)
        assert self.router.add_connection(conn) is None
        self.maker.connection_opened(peer.name)
        return conn

    def learn(self, via: Conn, *entries: PeerEntry) -> None:
        payload = TopologyUpdate({e.name: e for e in entries}).encode()
        self.router.handle_message(via, {"t": GOSSIP, "ch": TOPOLOGY, "d": payload})
        self.run(self.clock.now() + 1.0)

    def run(self, until: float) -> None:
        self.clock.call_later(until - self.clock.now(), lambda: None)
        self.clock.run_until(lambda: False, until)

    def state(self, peer: PeerInfo) -> tuple[str, str | None]:
        (row,) = [t for t in self.maker.status() if t["address"] == address(peer)]
        return row["state"], row["last_error"]


def test_at_the_limit_discovered_peers_are_held_and_direct_ones_still_dialled() -> None:
    rig = Rig(limit=2)
    a, b, c, d = PEERS[:4]
    via = rig.connect(a)
    rig.connect(b)
    rig.learn(via, entry(a, 5, ME, b, c, d), entry(c, 1, a), entry(d, 1, a))  # c and d: discovered targets
    assert rig.dials == []
    assert rig.state(c) == ("held", "connection limit (2) reached: not dialling discovered peers")
    assert held(rig.router.metrics) == {"own_limit": 2.0, "peer_full": 0.0, "view_settling": 0.0}

    other = rig.router.connections[b.name]
    rig.router.remove_connection(other, "gone")  # a place is free: one discovered peer is dialled, the other waits
    rig.maker.connection_closed(b.name)
    rig.run(rig.clock.now() + 1.0)
    assert sorted(rig.dials) in ([address(c)], [address(d)])
    assert held(rig.router.metrics) == {"own_limit": 1.0, "peer_full": 0.0, "view_settling": 0.0}

    rig.maker.connect([address(PEERS[5])])  # an operator's target: dialled whatever the limit
    assert rig.dials[-1] == address(PEERS[5])


def test_a_peer_at_its_limit_is_not_dialled_again_until_it_loses_a_connection() -> None:
    rig = Rig(limit=10)
    a, c = PEERS[0], PEERS[2]
    via = rig.connect(a)
    rig.learn(via, entry(a, 5, ME, c), entry(c, 5, a, PEERS[3], PEERS[4]))
    assert rig.dials == [address(c)]
    rig.maker.dial_finished(address(c), None, "peer_full: the peer is at its connection limit", full=True)
    assert rig.state(c) == ("held", FULL_PEER)
    assert held(rig.router.metrics)["peer_full"] == 1.0
    rig.run(rig.clock.now() + 300.0)  # an ordinary failure would have been retried a dozen times by now
    rig.learn(via, entry(c, 6, a, PEERS[3], PEERS[4], PEERS[5]))  # it gained one: still full
    assert rig.dials == [address(c)]
    rig.learn(via, entry(c, 7, a, PEERS[3]))  # it lost some: it may have room
    assert rig.dials == [address(c), address(c)]
    assert held(rig.router.metrics)["peer_full"] == 0.0


def test_a_peer_held_as_full_is_tried_again_after_the_hold() -> None:
    rig = Rig(limit=10)
    rig.maker.full_hold = 100.0
    a, c = PEERS[0], PEERS[2]
    via = rig.connect(a)
    rig.learn(via, entry(a, 5, ME, c), entry(c, 5, a))
    rig.maker.dial_finished(address(c), None, "peer_full", full=True)
    rig.run(rig.clock.now() + 99.0)
    assert rig.dials == [address(c)]
    rig.run(rig.clock.now() + 3.0)
    assert rig.dials == [address(c), address(c)]


def test_a_direct_target_at_its_limit_is_still_retried() -> None:
    rig = Rig(limit=10)
    target = address(PEERS[0])

    def refused(addr: str) -> None:
        rig.dials.append(addr)
        rig.clock.call_later(0.01, lambda: rig.maker.dial_finished(addr, None, "peer_full", full=True))

    rig.maker._dial = refused  # type: ignore[method-assign]
    rig.maker.connect([target])
    rig.run(60.0)
    assert len(rig.dials) >= 3
    assert rig.state(PEERS[0])[0] in ("retrying", "failed")


def test_a_mesh_past_the_limit_stops_dialling_once_formed() -> None:
    """20 peers in a chain, each told of the one before, discovery on, 5 connections each at most."""
    net = SimNetwork(latency=0.002, seed=2, conn_limit=5)
    dials: collections.Counter[int] = collections.Counter()
    original = net._dial

    def counting(index: int, address: str) -> None:
        dials[int(net.scheduler.now() // 60)] += 1
        original(index, address)

    net._dial = counting  # type: ignore[method-assign]
    for i in range(20):
        net.add_peer([] if i == 0 else [f"sim{i - 1}:6783"], discovery=True)
    net.scheduler.run_until(lambda: False, 590.0)
    assert net.converged(exact=True)
    assert all(len(p.router.connections) <= 5 for p in net.peers)
    assert sum(n for minute, n in dials.items() if minute >= 1) == 0, dict(dials)
    states = collections.Counter(t["state"] for p in net.peers for t in p.maker.status())
    assert states["held"] > 0 and states["retrying"] == states["failed"] == 0
    assert sum(held(p.router.metrics)["own_limit"] for p in net.peers) > 0


def test_a_dialler_hears_that_the_acceptor_is_full() -> None:
    """Over a real socket pair: the dialler's handshake ends with peer_full, with and without a secret."""

    async def main(secrets: list[bytes]) -> BaseException | None:
        import socket

        a, b = socket.socketpair()
        (r1, w1), (r2, w2) = await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)
        try:
            dialler, _ = await asyncio.wait_for(
                asyncio.gather(
                    handshake(r1, w1, outbound=True, ourself=ME, secrets=secrets, port=6783, advertise=None),
                    refuse_full(r2, w2, secrets=secrets),
                    return_exceptions=True,
                ),
                10,
            )
        finally:
            w1.close()
            w2.close()
        return dialler

    for secrets in ([], [SECRET]):
        outcome = asyncio.run(main(secrets))
        assert isinstance(outcome, HandshakeError) and outcome.reason == "peer_full", outcome


def test_of_two_peers_that_discover_each_other_the_lower_name_dials_first() -> None:
    """The higher name waits a moment for the lower one's connection, and dials only if none came: one handshake
    per pair while a dense mesh forms, not two."""
    high = PeerInfo(0x020000000099, "high", 99)
    a, low, higher = PEERS[0], PEERS[1], PeerInfo(0x0200000000A0, "higher", 160)
    rig = Rig(limit=10, me=high)
    via = rig.connect(a)
    found = rig.clock.now()
    rig.learn(via, entry(a, 5, high, low, higher), entry(low, 1, a), entry(higher, 1, a))
    assert rig.dials == [address(higher)], "a higher name is dialled at once"
    rig.run(found + rig.maker.defer * 0.99)
    assert rig.dials == [address(higher)], "a lower name is given time to dial us"
    rig.run(found + rig.maker.defer * 2.01)
    assert rig.dials == [address(higher), address(low)], "no connection came: we dial it ourselves"

    rig = Rig(limit=10, me=high)
    via = rig.connect(a)
    rig.learn(via, entry(a, 5, high, low), entry(low, 1, a))
    rig.connect(low)  # the lower name dialled us meanwhile
    rig.run(rig.clock.now() + 3 * rig.maker.defer)
    assert rig.dials == []


def test_discovered_peers_are_dialled_a_few_at_a_time_as_many_as_finish_their_handshakes() -> None:
    """Twenty peers discovered at once: two dialled at first, one more at a time with each handshake that succeeds
    (up to max_dialling), half as many after one times out (a busy peer, or a busy us), never fewer than one."""
    rig = Rig(limit=100)
    a = PEERS[0]
    others = [PeerInfo(0x020000000200 + i, f"o{i}", 500 + i) for i in range(40)]
    via = rig.connect(a)
    rig.learn(via, entry(a, 5, ME, *others), *(entry(o, 1, a) for o in others))
    rig.run(rig.clock.now() + VIEW_QUIET)  # forty peers new at once: dialled once the view settles
    by_address = {address(o): o for o in others}

    def in_flight() -> list[str]:
        return [d for d in rig.dials if (t := rig.maker.targets.get(d)) is not None and t.state == "connecting"]

    def succeed(dial: str) -> None:
        peer = by_address[dial]
        rig.connect(peer)
        rig.maker.dial_finished(dial, peer.name, None)

    assert len(in_flight()) == 2 == rig.maker.window
    for _ in range(12):  # each success: the window grows by one, so two more dials go out
        succeed(in_flight()[0])
    assert len(in_flight()) == rig.maker.max_dialling == 8, "the window stops at max_dialling"
    rig.maker.dial_finished(in_flight()[0], None, "timeout: no handshake within 5s", timed_out=True)
    assert rig.maker.window == 4 and len(in_flight()) == 7, "halved: no new dial until fewer than four are out"
    for dial in in_flight()[:2]:
        rig.maker.dial_finished(dial, None, "connection refused (is the agent running there?)")
    for dial in in_flight()[:2]:  # nothing answered the connect: an address not routed from here, not a busy peer
        rig.maker.dial_finished(dial, None, "no answer within 3s")
    assert rig.maker.window == 4 and len(in_flight()) == 4, "a refusal is no sign of load: the window stays"
    for _ in range(3):
        rig.maker.dial_finished(in_flight()[0], None, "short_handshake: closed", timed_out=True)
    assert rig.maker.window == 1 and len(in_flight()) == 1, "never below one"
    (family,) = rig.router.metrics.discovery_window.collect()
    assert [s.value for s in family.samples] == [1], "the window shows in weft_discovery_dial_window"


def test_an_acceptor_says_full_only_when_established_connections_fill_its_limit() -> None:
    """Handshakes in progress count towards the limit, but a dialler refused for them is not told "full": that would
    hold a discovered peer for as long as full_hold while its room is a moment away (a dense mesh forming near the
    limit). Over real sockets on 127.0.0.1, against the real transport and router."""
    from transport_rig import listening

    from weft.mesh.clock import AsyncioScheduler
    from weft.mesh.connection import ConnectionSettings

    async def dial(port: int, who: PeerInfo) -> BaseException | tuple:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            session = await asyncio.wait_for(
                handshake(reader, writer, outbound=True, ourself=who, secrets=[], port=6783, advertise=None), 5
            )
        except (HandshakeError, OSError) as exc:
            writer.close()
            return exc
        return session, writer

    async def main() -> None:
        metrics = Metrics()
        router = Router(ME, AsyncioScheduler(asyncio.get_running_loop()), metrics, conn_limit=2)
        settings = ConnectionSettings(heartbeat_interval=0.2, read_timeout=5.0, handshake_timeout=5.0)
        silent, kept = [], []
        async with listening(router, metrics, settings) as (transport, port):
            try:
                # Two connections that never speak: pending handshakes fill the limit of two.
                for _ in range(2):
                    silent.append(await asyncio.open_connection("127.0.0.1", port))
                for _ in range(100):
                    if len(transport.pending) == 2:
                        break
                    await asyncio.sleep(0.01)
                refused = await dial(port, PEERS[0])
                assert isinstance(refused, BaseException), refused
                assert getattr(refused, "reason", None) != "peer_full", refused
                assert (
                    metrics.registry.get_sample_value("weft_connections_refused_total", {"reason": "conn_limit"}) == 1
                )
                for _, writer in silent:
                    writer.close()
                for _ in range(100):
                    if not transport.pending:
                        break
                    await asyncio.sleep(0.01)
                # Two peers established: now the limit is full, and a third dialler hears so.
                for peer in PEERS[1:3]:
                    outcome = await dial(port, peer)
                    assert isinstance(outcome, tuple), outcome
                    kept.append(outcome[1])
                for _ in range(100):
                    if len(router.connections) == 2:
                        break
                    await asyncio.sleep(0.01)
                full = await dial(port, PEERS[3])
                assert isinstance(full, HandshakeError) and full.reason == "peer_full", full
            finally:
                for writer in kept:
                    writer.close()

    asyncio.run(main())


def test_a_view_filling_in_holds_discovery_until_it_settles() -> None:
    """Forty peers new at once (a mesh forming, or this host joining a large one): none is dialled until no peer has
    been new for VIEW_QUIET seconds, so the peers that spread the view get the CPU first; then the dials go out as
    usual, and the status says why they waited."""
    rig = Rig(limit=100)
    a = PEERS[0]
    others = [PeerInfo(0x020000000200 + i, f"o{i}", 500 + i) for i in range(40)]
    via = rig.connect(a)
    payload = TopologyUpdate({e.name: e for e in (entry(a, 5, ME, *others), *(entry(o, 1, a) for o in others))})
    learned = rig.clock.now()
    rig.router.handle_message(via, {"t": GOSSIP, "ch": TOPOLOGY, "d": payload.encode()})
    rig.run(learned + VIEW_QUIET * 0.9)
    assert rig.dials == [], "dialled while the view was still filling in"
    assert held(rig.router.metrics)["view_settling"] == 40
    rig.run(learned + VIEW_QUIET + 0.1)
    assert len(rig.dials) == rig.maker.window == 2, "the view settled: the dials go out as usual"
    assert held(rig.router.metrics)["view_settling"] == 0


def test_the_view_records_when_it_last_gained_a_peer_not_when_gossip_last_came() -> None:
    """What ``weft_peers_changed_timestamp_seconds`` reports: the moment the view became what it is (a mesh watched
    from outside could only say when someone last looked)."""
    rig = Rig(limit=100)
    a = PEERS[0]
    others = [PeerInfo(0x020000000200 + i, f"o{i}", 500 + i) for i in range(12)]
    via = rig.connect(a)
    rig.run(rig.clock.now() + 3.0)
    payload = TopologyUpdate({e.name: e for e in (entry(a, 5, ME, *others), *(entry(o, 1, a) for o in others))})
    learned = rig.clock.now()
    rig.router.handle_message(via, {"t": GOSSIP, "ch": TOPOLOGY, "d": payload.encode()})
    assert rig.router.view_changed_at == learned
    rig.run(learned + 4.0)
    again = TopologyUpdate({a.name: entry(a, 6, ME, *others)})  # news of a known peer: the view is the same
    rig.router.handle_message(via, {"t": GOSSIP, "ch": TOPOLOGY, "d": again.encode()})
    rig.run(learned + 8.0)
    assert len(rig.router.topology.peers) == 14 and rig.router.view_changed_at == learned


def test_while_the_view_fills_in_its_listeners_hear_of_it_at_most_once_a_second() -> None:
    """The data plane's tables and the connection maker walk the whole view each time they hear of a change: a spoke
    of a forming mesh, its view growing in many small steps, tells them once a second until it settles."""
    rig = Rig(limit=100)
    a = PEERS[0]
    others = [PeerInfo(0x020000000200 + i, f"o{i}", 500 + i) for i in range(40)]
    via = rig.connect(a)
    rig.run(rig.clock.now() + 6.0)
    told: list[float] = []
    rig.router.topology_listeners.append(lambda: told.append(rig.clock.now()))
    start = rig.clock.now()
    for step in range(10, 41, 3):  # a new peer or three every 0.2 s for 2 s
        known = {o.name: entry(o, 1, a) for o in others[:step]}
        payload = TopologyUpdate({a.name: entry(a, step, ME, *others[:step]), **known})
        rig.router.handle_message(via, {"t": GOSSIP, "ch": TOPOLOGY, "d": payload.encode()})
        rig.run(rig.clock.now() + 0.2)
    rig.run(start + 3.0)
    gaps = [b - a for a, b in itertools.pairwise(told)]
    assert told and len(told) <= 3 and all(g >= 0.999 for g in gaps), told


def test_a_view_that_keeps_growing_holds_discovery_no_longer_than_the_cap() -> None:
    """Ten peers new at once, then one more every second: the view never goes quiet, and the dials start anyway
    VIEW_HOLD_MAX after the burst began."""
    rig = Rig(limit=100)
    a = PEERS[0]
    others = [PeerInfo(0x020000000200 + i, f"o{i}", 500 + i) for i in range(40)]
    via = rig.connect(a)
    start = rig.clock.now()
    for i in range(10, len(others)):
        payload = TopologyUpdate({a.name: entry(a, i, ME, *others[:i]), **{o.name: entry(o, 1, a) for o in others[:i]}})
        rig.router.handle_message(via, {"t": GOSSIP, "ch": TOPOLOGY, "d": payload.encode()})
        rig.run(start + i - 9.0)
        if rig.dials:
            break
    waited = rig.clock.now() - start
    assert rig.dials, "never dialled"
    assert VIEW_HOLD_MAX - 1.0 <= waited <= VIEW_HOLD_MAX + 1.0, f"dialled after {waited:.1f}s"


def test_a_peer_or_two_joining_a_settled_view_are_dialled_at_once() -> None:
    rig = Rig(limit=100)
    a, b, c = PEERS[0], PEERS[1], PEERS[2]
    via = rig.connect(a)
    rig.learn(via, entry(a, 5, ME, b, c), entry(b, 1, a), entry(c, 1, a))
    assert sorted(rig.dials) == sorted([address(b), address(c)])


def test_a_hold_a_rounding_error_from_its_end_counts_as_over() -> None:
    """A timer set for the end of the hold can fire a hair early (float rounding): what is left then must read as
    nothing, or the connection maker sets a timer too small to move a virtual clock, and loops there."""
    rig = Rig(limit=100)
    a = PEERS[0]
    others = [PeerInfo(0x020000000200 + i, f"o{i}", 500 + i) for i in range(12)]
    via = rig.connect(a)
    payload = TopologyUpdate({e.name: e for e in (entry(a, 5, ME, *others), *(entry(o, 1, a) for o in others))})
    rig.router.handle_message(via, {"t": GOSSIP, "ch": TOPOLOGY, "d": payload.encode()})
    assert rig.router.view_settles_in() == VIEW_QUIET
    rig.router._view_grew_at = rig.clock.now() - VIEW_QUIET + 1e-12
    assert rig.router.view_settles_in() == 0.0


def test_a_neighbour_feeding_made_up_peers_keeps_no_discovered_peer_waiting_past_the_cap() -> None:
    """A neighbour (holding the secret) that gossips eight made-up peers every 4.9 s keeps our view growing for as
    long as it likes: a real peer discovered meanwhile is still dialled within VIEW_HOLD_MAX, and so is one
    discovered after the attack has run for minutes (each burst holds at most the cap; the hold's end dials)."""
    rig = Rig(limit=100)
    a, real, late = PEERS[0], PEERS[1], PEERS[2]
    via = rig.connect(a)
    fake = iter(PeerInfo(0x020000100000 + i, f"fake{i}", 9000 + i) for i in range(10_000))

    def feed_until(until: float) -> None:
        while rig.clock.now() < until:
            made_up = [entry(next(fake), 1, a) for _ in range(8)]
            payload = TopologyUpdate({e.name: e for e in made_up})
            rig.router.handle_message(via, {"t": GOSSIP, "ch": TOPOLOGY, "d": payload.encode()})
            rig.run(min(until, rig.clock.now() + 4.9))

    def discover(peer: PeerInfo, version: int) -> float:
        payload = TopologyUpdate({a.name: entry(a, version, ME, peer), peer.name: entry(peer, 1, a)})
        rig.router.handle_message(via, {"t": GOSSIP, "ch": TOPOLOGY, "d": payload.encode()})
        return rig.clock.now()

    feed_until(12.0)
    found = discover(real, 5)
    feed_until(found + VIEW_HOLD_MAX + 1.0)
    assert address(real) in rig.dials, "a real peer stayed undialled past the cap while made-up peers came"
    feed_until(300.0)
    found = discover(late, 6)
    feed_until(found + VIEW_HOLD_MAX + 1.0)
    assert address(late) in rig.dials, "after minutes of made-up peers, a real one stayed undialled past the cap"

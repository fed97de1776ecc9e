"""The connection maker: address forms, which targets get dialled and when, backoff, discovery."""

from __future__ import annotations

import random
import statistics
from itertools import pairwise

import pytest

from weft.mesh.address import AddressError
from weft.mesh.clock import VirtualScheduler
from weft.mesh.connection_maker import ConnectionMaker, Target
from weft.mesh.gossip import GOSSIP, GossipSender
from weft.mesh.peer import PeerInfo
from weft.mesh.router import TOPOLOGY, Router
from weft.mesh.topology import ConnectionSummary, PeerEntry, TopologyUpdate
from weft.metrics import Metrics

ME = PeerInfo(0x020000000001, "me", 11)
B = PeerInfo(0x020000000002, "b", 22)
C = PeerInfo(0x020000000003, "c", 33)
D = PeerInfo(0x020000000004, "d", 44)


class FakeConn:
    """An established control connection as the router sees it."""

    def __init__(self, remote: PeerInfo, address: str, outbound: bool = True) -> None:
        self.remote = remote
        self.remote_address = address
        self.outbound = outbound
        self.conn_uid = remote.uid
        self.encrypted = False
        self.remote_ip: str | None = None
        self.data_keys = None
        self.secret = None
        self.caps: frozenset[str] = frozenset()
        self.info = "fake"
        self.sender = GossipSender(lambda: None)
        self.closed: str | None = None

    def close(self, reason: str) -> None:
        self.closed = reason


class Rig:
    def __init__(self, *, discovery: bool = True, seed: int = 0, **kwargs: float) -> None:
        self.scheduler = VirtualScheduler()
        self.router = Router(ME, self.scheduler, Metrics(), rng=random.Random(seed))
        self.dials: list[tuple[float, str]] = []
        self.direct_changes: list[list[Target]] = []
        self.maker = ConnectionMaker(
            self.router,
            self.scheduler,
            self._dial,
            discovery=discovery,
            rng=random.Random(seed),
            on_direct_changed=self.direct_changes.append,
            **kwargs,
        )

    def _dial(self, address: str) -> None:
        self.dials.append((self.scheduler.now(), address))

    def dialled(self, address: str) -> list[float]:
        return [t for t, a in self.dials if a == address]

    def run(self, until: float) -> None:
        """Advance virtual time to ``until`` (at most), running everything due."""
        self.scheduler.run_until(lambda: False, until)

    def fail_every_dial(self, error: str = "connection refused") -> None:
        """From now on, each dial fails shortly after it starts."""
        original = self._dial

        def dial(address: str) -> None:
            original(address)
            self.scheduler.call_later(0.01, lambda: self.maker.dial_finished(address, None, error))

        self.maker._dial = dial  # type: ignore[method-assign]

    def connect_peer(self, peer: PeerInfo, address: str) -> FakeConn:
        conn = FakeConn(peer, address)
        assert self.router.add_connection(conn) is None
        self.maker.connection_opened(peer.name)
        return conn

    def disconnect_peer(self, conn: FakeConn, *, clean: bool = False) -> None:
        self.router.remove_connection(conn, "closed")
        self.maker.connection_closed(conn.remote.name, clean=clean)

    def gossip(self, conn: FakeConn, *entries: PeerEntry) -> None:
        payload = TopologyUpdate({e.name: e for e in entries}).encode()
        self.router.handle_message(conn, {"t": GOSSIP, "ch": TOPOLOGY, "d": payload})

    def states(self) -> dict[str, tuple[str, str]]:
        return {s["address"]: (s["origin"], s["state"]) for s in self.maker.status()}


def summary(peer: PeerInfo, address: str) -> ConnectionSummary:
    return ConnectionSummary(peer.name, address, True, True)


# -- addresses ----------------------------------------------------------------------------------------


def test_connect_with_a_bad_address_changes_nothing() -> None:
    rig = Rig()
    rig.maker.connect(["a"])
    with pytest.raises(AddressError):
        rig.maker.connect(["b", "c:http"], replace=True)
    with pytest.raises(AddressError):
        rig.maker.connect(["b", "c:http"])
    assert set(rig.states()) == {"a:6783"}


def test_forget_with_a_bad_address_changes_nothing() -> None:
    """``weft forget a a:0`` fails with a 400; it must not have forgotten ``a`` all the same."""
    rig = Rig()
    rig.maker.connect(["a"])
    with pytest.raises(AddressError):
        rig.maker.forget(["a", "a:0"])
    assert set(rig.states()) == {"a:6783"}


# -- dialling and backoff ----------------------------------------------------------------------------


def test_a_new_target_is_dialled_at_once_and_only_once_while_connecting() -> None:
    rig = Rig()
    assert rig.maker.connect(["10.0.0.2"]) == ["10.0.0.2:6783"]
    assert rig.dials == [(0.0, "10.0.0.2:6783")]
    rig.maker.check()
    rig.run(100.0)
    assert rig.dials == [(0.0, "10.0.0.2:6783")]
    assert rig.states() == {"10.0.0.2:6783": ("api", "connecting")}


def test_failed_dials_back_off_with_jitter_and_report_the_error() -> None:
    rig = Rig(seed=3, initial_interval=1.0, max_interval=30.0)
    rig.fail_every_dial("connection refused")
    rig.maker.connect(["h"])
    rig.run(3000.0)
    times = rig.dialled("h:6783")
    assert len(times) >= 40
    delays = [b - a for a, b in pairwise(times)]
    # Retries slow down a lot, but keep coming.
    assert statistics.mean(delays[-10:]) > 5 * statistics.mean(delays[:3])
    assert min(delays) > 0
    # Jitter: a crowd of peers that failed together does not retry in lockstep.
    assert len({round(d, 6) for d in delays[-10:]}) == 10
    other = Rig(seed=4, initial_interval=1.0, max_interval=30.0)
    other.fail_every_dial()
    other.maker.connect(["h"])
    other.run(3000.0)
    assert other.dialled("h:6783")[1:6] != times[1:6]

    (status,) = rig.maker.status()
    assert status["last_error"] == "connection refused"
    assert status["state"] in ("retrying", "failed")


def test_retry_delay_never_exceeds_max_interval() -> None:
    """``max_interval`` (config ``max_backoff``) caps how long a failing target waits, jitter included."""
    for seed in range(5):
        rig = Rig(seed=seed, initial_interval=1.0, max_interval=10.0)
        rig.fail_every_dial()
        rig.maker.connect(["h"])
        rig.run(1000.0)
        times = rig.dialled("h:6783")
        delays = [b - a for a, b in pairwise(times)]
        assert len(delays) > 20
        assert max(delays) <= 10.0 + 0.01 + 1e-9, f"waited {max(delays):.2f}s with max_interval 10s"


def test_a_target_whose_peer_is_connected_is_not_dialled() -> None:
    rig = Rig()
    rig.maker.connect(["b.example"])
    conn = rig.connect_peer(B, "b.example:6783")
    rig.maker.dial_finished("b.example:6783", B.name, None)
    rig.run(1000.0)
    assert rig.dialled("b.example:6783") == [0.0]
    assert rig.states() == {"b.example:6783": ("api", "connected")}

    # The connection drops: the target is dialled again.
    rig.disconnect_peer(conn)
    rig.run(2000.0)
    assert len(rig.dialled("b.example:6783")) == 2


def test_a_duplicate_connection_counts_as_connected() -> None:
    rig = Rig()
    rig.maker.connect(["b.example"])
    rig.connect_peer(B, "b.example:6783")  # B dialled us at the same time
    rig.maker.dial_finished("b.example:6783", B.name, "duplicate connection to b")
    rig.run(1000.0)
    assert rig.dialled("b.example:6783") == [0.0]
    assert rig.states()["b.example:6783"][1] == "connected"


def test_a_connection_that_lived_long_is_redialled_at_once() -> None:
    rig = Rig(reset_after=60.0, initial_interval=5.0)
    rig.maker.connect(["b.example"])
    conn = rig.connect_peer(B, "b.example:6783")
    rig.maker.dial_finished("b.example:6783", B.name, None)
    rig.scheduler.call_later(500.0, lambda: rig.disconnect_peer(conn))
    rig.run(600.0)
    assert rig.dialled("b.example:6783") == [0.0, 500.0]


def test_a_connection_that_died_young_is_redialled_after_a_pause() -> None:
    rig = Rig(reset_after=60.0, initial_interval=5.0)
    rig.maker.connect(["b.example"])
    conn = rig.connect_peer(B, "b.example:6783")
    rig.maker.dial_finished("b.example:6783", B.name, None)
    rig.scheduler.call_later(2.0, lambda: rig.disconnect_peer(conn))
    rig.run(600.0)
    _, second = rig.dialled("b.example:6783")
    assert second > 2.0


def test_a_connection_the_peer_closed_in_order_is_redialled_at_once() -> None:
    """The peer's agent stopping (a restart): the first dial goes out the moment the connection ends."""
    rig = Rig(reset_after=60.0, initial_interval=1.0)
    rig.maker.connect(["b.example"])
    conn = rig.connect_peer(B, "b.example:6783")
    rig.maker.dial_finished("b.example:6783", B.name, None)
    rig.scheduler.call_later(5.0, lambda: rig.disconnect_peer(conn, clean=True))
    rig.run(5.0)
    assert rig.dialled("b.example:6783") == [0.0, 5.0]


def test_a_connection_the_peer_closed_at_once_is_redialled_after_a_pause() -> None:
    """A peer that accepts and hangs up straight away (failing as it starts) gets the backoff, not a dial loop."""
    rig = Rig(reset_after=60.0, initial_interval=5.0)
    rig.maker.connect(["b.example"])
    conn = rig.connect_peer(B, "b.example:6783")
    rig.maker.dial_finished("b.example:6783", B.name, None)
    rig.scheduler.call_later(2.0, lambda: rig.disconnect_peer(conn, clean=True))
    rig.run(600.0)
    _, second = rig.dialled("b.example:6783")
    assert second > 2.0


def test_after_a_clean_close_failing_dials_still_back_off() -> None:
    """The peer does not come back: only the first dial is immediate, then the waits grow as for any failure."""
    rig = Rig(seed=2, reset_after=60.0, initial_interval=1.0, max_interval=30.0)
    rig.maker.connect(["b.example"])
    conn = rig.connect_peer(B, "b.example:6783")
    rig.maker.dial_finished("b.example:6783", B.name, None)
    rig.fail_every_dial()
    rig.scheduler.call_later(5.0, lambda: rig.disconnect_peer(conn, clean=True))
    rig.run(600.0)
    times = rig.dialled("b.example:6783")[1:]
    assert times[0] == 5.0
    delays = [b - a for a, b in pairwise(times)]
    assert delays[0] > 0.5
    assert statistics.mean(delays[-5:]) > 5 * delays[0]


def test_a_peer_restarting_20_times_in_a_row_costs_a_few_dials_each_time() -> None:
    """Each restart: a dial at once (refused while the peer is down), then backoff until one of the two ends
    reaches the other (the restarted peer dials its configured peers as it starts)."""
    rig = Rig(seed=5, reset_after=60.0, initial_interval=1.0, max_interval=30.0)
    up = True
    conns: list[FakeConn] = []

    def dial(address: str) -> None:
        rig.dials.append((rig.scheduler.now(), address))

        def finish() -> None:
            if not up:
                rig.maker.dial_finished(address, None, "connection refused (is the agent running there?)")
            elif B.name in rig.router.connections:
                rig.maker.dial_finished(address, B.name, "duplicate connection")
            else:
                conns.append(rig.connect_peer(B, address))
                rig.maker.dial_finished(address, B.name, None)

        rig.scheduler.call_later(0.01, finish)

    def stop() -> None:
        nonlocal up
        up = False
        rig.disconnect_peer(conns[-1], clean=True)

    def start() -> None:
        nonlocal up
        up = True
        if B.name not in rig.router.connections:
            conns.append(rig.connect_peer(B, "b.example:6783"))  # it dialled us

    rig.maker._dial = dial  # type: ignore[method-assign]
    rig.maker.connect(["b.example"])
    stops = [5.0 + 4.0 * i for i in range(20)]  # down for a second, up for three, twenty times
    for t in stops:
        rig.scheduler.call_later(t, stop)
        rig.scheduler.call_later(t + 1.0, start)
    rig.run(stops[-1] + 60.0)
    times = rig.dialled("b.example:6783")
    assert B.name in rig.router.connections and len(conns) >= 21
    for t, after in zip(stops, [*stops[1:], stops[-1] + 60.0], strict=True):
        dials = [d for d in times if t <= d < after]
        assert dials[0] == t, "the first dial after a restart goes out at once"
        assert len(dials) <= 3, f"{len(dials)} dials for one restart: {dials}"


def test_a_dial_that_reaches_ourselves_is_never_retried() -> None:
    rig = Rig()
    rig.maker.connect(["10.0.0.1"])
    rig.maker.dial_finished("10.0.0.1:6783", ME.name, "connection to self")
    rig.run(100000.0)
    assert rig.dialled("10.0.0.1:6783") == [0.0]
    (status,) = rig.maker.status()
    assert status["state"] == "failed"
    assert status["next_try"] is None
    # Unrelated activity does not wake it either.
    rig.maker.connect(["other"])
    rig.connect_peer(B, "b:6783")
    rig.run(200000.0)
    assert rig.dialled("10.0.0.1:6783") == [0.0]


# -- direct targets: connect, --replace, forget, config -----------------------------------------------


def direct(rig: Rig) -> dict[str, str]:
    return {t.address: t.origin for t in rig.maker.targets.values() if t.direct}


def test_connect_adds_to_the_targets() -> None:
    rig = Rig()
    rig.maker.set_origin_targets("config", ["a", "b"])
    rig.maker.connect(["c:7000", "[fd00::4]"])
    assert direct(rig) == {"a:6783": "config", "b:6783": "config", "c:7000": "api", "[fd00::4]:6783": "api"}
    assert {t.address for t in rig.direct_changes[-1]} == set(direct(rig))
    assert {a for _, a in rig.dials} == set(direct(rig))


def test_connect_replace_makes_the_direct_targets_exactly_the_given_ones() -> None:
    rig = Rig()
    conn_b = rig.connect_peer(B, "b:6783")
    rig.gossip(conn_b, PeerEntry(B.name, "b", B.uid, 5, (summary(ME, "me:6783"), summary(C, "c.disc:6783"))))
    rig.gossip(conn_b, PeerEntry(C.name, "c", C.uid, 5, (summary(B, "b:6783"),)))
    rig.run(1.0)
    rig.maker.set_origin_targets("config", ["a", "b"])
    rig.maker.connect(["c:7000"])
    assert rig.maker.targets["c.disc:6783"].origin == "discovered"

    assert rig.maker.connect(["d", "a"], replace=True) == ["d:6783", "a:6783"]

    assert direct(rig) == {"a:6783": "api", "d:6783": "api"}
    assert {t.address for t in rig.direct_changes[-1]} == {"a:6783", "d:6783"}
    assert "c.disc:6783" in rig.maker.targets  # discovered targets are not touched
    rig.run(10000.0)
    assert not rig.dialled("c:7000")[1:] and not rig.dialled("b:6783")[1:]


def test_forget_removes_direct_targets_only() -> None:
    rig = Rig()
    rig.fail_every_dial()
    conn_b = rig.connect_peer(B, "b:6783")
    rig.gossip(conn_b, PeerEntry(B.name, "b", B.uid, 5, (summary(ME, "me:6783"), summary(C, "c.disc:6783"))))
    rig.gossip(conn_b, PeerEntry(C.name, "c", C.uid, 5, (summary(B, "b:6783"),)))
    rig.maker.connect(["a", "x"])
    rig.run(1.0)

    assert rig.maker.forget(["a", "nothere", "c.disc"]) == ["a:6783"]

    assert direct(rig) == {"x:6783": "api"}
    assert {t.address for t in rig.direct_changes[-1]} == {"x:6783"}
    assert "c.disc:6783" in rig.maker.targets
    dials_of_a = len(rig.dialled("a:6783"))
    rig.run(5000.0)
    assert len(rig.dialled("a:6783")) == dials_of_a
    assert len(rig.dialled("x:6783")) > dials_of_a
    assert rig.maker.forget(["a"]) == []


def test_config_reload_replaces_config_targets_but_keeps_connect_targets() -> None:
    rig = Rig()
    rig.maker.set_origin_targets("config", ["a", "b"])
    rig.maker.connect(["c", "b"])  # b is now also wanted by the operator
    rig.maker.set_origin_targets("config", ["e"])
    assert direct(rig) == {"b:6783": "api", "c:6783": "api", "e:6783": "config"}


# -- discovery ------------------------------------------------------------------------------------------


def discovered(rig: Rig) -> dict[str, int | None]:
    return {t.address: t.peer for t in rig.maker.targets.values() if t.origin == "discovered"}


def learn_c_and_d_through_b(rig: Rig) -> FakeConn:
    conn_b = rig.connect_peer(B, "b:6783")
    rig.gossip(
        conn_b,
        PeerEntry(B.name, "b", B.uid, 5, (summary(ME, "me:6783"), summary(C, "10.0.0.3:6783"))),
        PeerEntry(C.name, "c", C.uid, 5, (summary(B, "b:6783"), summary(D, "10.0.0.4:7000"))),
        PeerEntry(D.name, "d", D.uid, 5, (summary(C, "10.0.0.3:6783"),)),
    )
    rig.run(rig.scheduler.now() + 0.5)
    return conn_b


def test_discovered_targets_come_from_other_peers_reported_connections() -> None:
    rig = Rig()
    learn_c_and_d_through_b(rig)
    # B is connected (not a target); C and D are dialled at the addresses their neighbours report.
    assert discovered(rig) == {"10.0.0.3:6783": C.name, "10.0.0.4:7000": D.name}
    assert rig.dialled("10.0.0.3:6783") and rig.dialled("10.0.0.4:7000")
    assert not rig.dialled("me:6783") and not rig.dialled("b:6783")


def test_a_discovered_target_vanishes_when_its_peer_is_connected() -> None:
    rig = Rig()
    rig.fail_every_dial("timed out")
    learn_c_and_d_through_b(rig)
    rig.connect_peer(C, "10.0.0.3:6783")  # C dialled us
    rig.run(rig.scheduler.now() + 0.5)
    assert discovered(rig) == {"10.0.0.4:7000": D.name}
    assert rig.states()["10.0.0.4:7000"] == ("discovered", "retrying")


def test_a_discovered_target_being_dialled_vanishes_once_the_dial_ends() -> None:
    rig = Rig()
    learn_c_and_d_through_b(rig)
    rig.connect_peer(C, "10.0.0.3:6783")  # C dialled us while we were dialling it
    rig.maker.dial_finished("10.0.0.3:6783", C.name, "duplicate connection to c")
    rig.run(rig.scheduler.now() + 0.5)
    assert discovered(rig) == {"10.0.0.4:7000": D.name}


def test_a_discovered_target_vanishes_when_its_peer_is_gone() -> None:
    rig = Rig()
    rig.fail_every_dial()
    conn_b = learn_c_and_d_through_b(rig)
    # C goes away: B no longer reports it, so C and D are out of reach and forgotten.
    rig.gossip(conn_b, PeerEntry(B.name, "b", B.uid, 6, (summary(ME, "me:6783"),)))
    rig.run(rig.scheduler.now() + 30.0)
    assert set(rig.router.topology.peers) == {ME.name, B.name}
    assert discovered(rig) == {}
    dials = len(rig.dials)
    rig.run(rig.scheduler.now() + 1000.0)
    assert len(rig.dials) == dials


def test_with_discovery_off_nothing_is_discovered() -> None:
    rig = Rig(discovery=False)
    learn_c_and_d_through_b(rig)
    assert set(rig.router.topology.peers) == {ME.name, B.name, C.name, D.name}
    assert discovered(rig) == {}
    rig.run(1000.0)
    assert rig.dials == []


def test_a_peer_reported_address_we_would_refuse_is_never_dialled() -> None:
    """Gossip is input too: a peer reporting a host name we would refuse must not make us dial it."""
    rig = Rig()
    conn_b = rig.connect_peer(B, "b:6783")
    rig.gossip(
        conn_b,
        PeerEntry(B.name, "b", B.uid, 5, (summary(ME, "me:6783"), summary(C, "x" * 70 + ".example:6783"))),
        PeerEntry(C.name, "c", C.uid, 5, (summary(B, "b:6783"), summary(D, "999.1.1.1:6783"))),
        PeerEntry(D.name, "d", D.uid, 5, (summary(C, "10.0.0.3:6783"),)),
    )
    rig.run(rig.scheduler.now() + 0.5)
    assert discovered(rig) == {"10.0.0.3:6783": C.name}
    assert rig.dialled("10.0.0.3:6783") and len(rig.dials) == 1


def test_a_dial_that_raises_anything_is_a_failed_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver error that is not an OSError (a name IDNA cannot encode raised UnicodeError) once escaped the
    dial task, and the target said "connecting" for ever."""
    import asyncio

    from weft.mesh.connection import ConnectionSettings
    from weft.mesh.transport import ControlTransport

    async def explode(*args: object, **kwargs: object) -> None:
        raise UnicodeError("label too long")

    monkeypatch.setattr(asyncio, "open_connection", explode)
    rig = Rig()
    transport = ControlTransport(
        rig.router, Metrics(), ConnectionSettings(), lambda: [], listen=("0.0.0.0", 6783), advertise=None
    )
    transport.maker = rig.maker
    rig.maker.connect(["a"])
    assert rig.states()["a:6783"] == ("api", "connecting")
    asyncio.run(transport._dial("a:6783"))
    target = rig.maker.targets["a:6783"]
    assert target.state == "retrying" and "label too long" in (target.last_error or "")

"""Probe pacing, in virtual time: busy paths every interval, idle ones every ten, spread out, answered at once, and a
dead path that carries traffic noticed within three intervals."""

from __future__ import annotations

import collections
import random
from collections.abc import Callable

import pytest
from fake_netdev import InlineNetDev

from weft.config import AgentConfig
from weft.datapath import fdb
from weft.datapath import plane as plane_module
from weft.datapath.paths import IDLE_EVERY, SLEEVE, PathState
from weft.datapath.plane import TICKS, DataPlane
from weft.mesh.clock import VirtualScheduler
from weft.mesh.codec import pack, unpack
from weft.mesh.crypto import SessionKeys
from weft.mesh.peer import PeerInfo
from weft.mesh.router import VIEW_FILLING_SPACING, VIEW_HOLD_MAX, Router
from weft.metrics import Metrics

ME = 0x020000000001
KEYS = SessionKeys(b"s" * 32, b"r" * 32)


def peer(i: int) -> int:
    return 0x020000000100 + i


class Mesh:
    """A data plane whose neighbours answer over a fake sleeve: each round's heartbeat asks, a live neighbour answers
    at once (as DataPlane._on_control does), a dead one says nothing. Time is a number moved by ``run``."""

    def __init__(self, n: int, *, echoes: bool = True, seed: int = 1) -> None:
        metrics = Metrics()
        self.plane = DataPlane(AgentConfig(), Router(PeerInfo(ME, "me", 1), VirtualScheduler(), metrics), metrics)
        self.plane._rng = random.Random(seed)
        self.plane.sleeve = self  # type: ignore[assignment]
        self.now = 0.0
        self.echoes = echoes
        self.alive = {peer(i): True for i in range(n)}
        self.frames = collections.Counter[int]()  # per link, as Sleeve.traffic() counts them
        self.asked: list[tuple[float, int]] = []  # (when, peer): heartbeats that asked for an answer
        self.sent: list[tuple[int, dict]] = []
        for name in self.alive:
            self.plane.paths[name] = PathState(name, "10.0.0.2", ("10.0.0.2", 6783), KEYS, 1, False, 1500)
            self.plane.paths[name].next_round = self.plane._rng.uniform(0, 1.0)  # as _sync_neighbours phases it

    # -- the sleeve, as the plane uses it --

    def send_control(self, to: int, payload: bytes, *, pad_to: int = 0) -> bool:
        msg = unpack(payload, "test")
        self.sent.append((to, msg))
        if msg.get("t") == "hb" and msg.get("rq") and self.alive[to]:
            self.asked.append((self.now, to))
            answer = {"t": "hb", "tr": False, "fs": 0, "mx": 0}  # an answer never asks
            self.plane._on_control(to, ("10.0.0.2", 6783), pack(answer), 60, self.now)
        elif msg.get("t") == "hb" and msg.get("rq"):
            self.asked.append((self.now, to))
        return True

    def send_raw(self, addr: tuple[str, int], data: bytes) -> bool:
        return True

    def traffic(self) -> dict[int, int]:
        return dict(self.frames)

    # -- driving it --

    def start(self) -> None:
        """Each neighbour introduces itself: an older one without asking, a newer one asking for an answer."""
        for name in self.alive:
            hb = {"t": "hb", "tr": False, "fs": 0, "mx": 0, **({"rq": True} if self.echoes else {})}
            self.plane._on_control(name, ("10.0.0.2", 6783), pack(hb), 60, self.now)

    def run(self, seconds: float, *, busy: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        """Passes of the plane every 1/TICKS of the interval, as its timer runs them; ``busy`` links carry frames."""
        step = self.plane.interval / TICKS
        for _ in range(round(seconds / step)):
            self.now = round(self.now + step, 9)
            for name in busy:
                self.frames[name] += 3
            full = self.plane._ticks % TICKS == 0
            self.plane._ticks += 1
            self.plane._probe_pass(self.now, full=full)

    def rounds(self, since: float) -> collections.Counter[int]:
        return collections.Counter(p for t, p in self.asked if t > since)


def test_idle_paths_are_probed_every_ten_intervals_and_busy_ones_every_interval() -> None:
    mesh = Mesh(40)
    mesh.start()
    mesh.run(10.0)  # a new connection's first rounds
    busy = {peer(0), peer(1)}
    mesh.run(200.0, busy=busy)
    rounds = mesh.rounds(since=10.0)
    for name in busy:
        assert 200 <= rounds[name] <= 200 / 0.75 + 1, rounds[name]
    idle = [rounds[p] for p in mesh.alive if p not in busy]
    assert all(200 / IDLE_EVERY <= r <= 200 / (IDLE_EVERY * 0.75) + 1 for r in idle), sorted(idle)
    assert all(st.path == SLEEVE for st in mesh.plane.paths.values()), "an idle path went down"


def test_probe_rounds_are_spread_over_the_interval_not_sent_in_one_burst() -> None:
    mesh = Mesh(100)
    mesh.start()
    mesh.run(60.0)
    per_pass = collections.Counter(t for t, _ in mesh.asked if t > 30.0)
    # 100 idle neighbours, one round each per 7.5-10 s, 5 passes a second: about 2.3 a pass on average.
    assert max(per_pass.values()) <= 12, per_pass.most_common(3)


def test_a_heartbeat_that_asks_is_answered_at_once_and_an_answer_is_not() -> None:
    mesh = Mesh(1)
    name = peer(0)
    mesh.plane.paths[name].answered = True
    mesh.plane._on_control(name, ("10.0.0.2", 6783), pack({"t": "hb", "rq": True, "fs": 0, "mx": 0}), 60, 1.0)
    assert [(to, "rq" in msg) for to, msg in mesh.sent] == [(name, False)]
    mesh.plane._on_control(name, ("10.0.0.2", 6783), pack({"t": "hb", "fs": 0, "mx": 0}), 60, 1.1)
    assert len(mesh.sent) == 1


def test_an_older_peer_that_never_asks_is_probed_every_interval() -> None:
    """It heartbeats us every interval and counts us down after three silent ones: it gets what it expects."""
    mesh = Mesh(5, echoes=False)
    mesh.start()
    mesh.run(60.0)
    heartbeats = collections.Counter(to for to, msg in mesh.sent if msg.get("t") == "hb")
    assert all(n >= 60 for n in heartbeats.values()), heartbeats


def test_a_dead_path_is_noticed_within_three_intervals_once_traffic_needs_it() -> None:
    mesh = Mesh(3)
    mesh.start()
    mesh.run(20.0)
    quiet, needed = peer(0), peer(1)
    mesh.alive[quiet] = mesh.alive[needed] = False  # both neighbours vanish without a word
    mesh.run(1.0)
    mesh.run(4.0, busy={needed})  # traffic to one of them
    assert mesh.plane.paths[needed].path is None, "a dead path carrying traffic still up after 4 s"
    assert mesh.plane.paths[quiet].path == SLEEVE, "an idle path is judged at the idle pace"
    mesh.run(30.0)
    assert mesh.plane.paths[quiet].path is None, "a dead idle path still up after 35 s"
    assert mesh.plane.paths[peer(2)].path == SLEEVE


def test_a_path_that_turns_busy_is_not_taken_down_by_its_idle_silence() -> None:
    """An idle path heard from 9 s ago gets a round at once when traffic starts, and stays up on the answer."""
    mesh = Mesh(1)
    mesh.start()
    mesh.run(40.0)
    name = peer(0)
    before = len(mesh.asked)
    mesh.run(0.2, busy={name})
    assert len(mesh.asked) == before + 1, "no round at once when the path turned busy"
    mesh.run(10.0, busy={name})
    assert mesh.plane.paths[name].path == SLEEVE


class _Wire:
    """The sleeve of one of two planes: what it sends is read by the other plane at once, unless the wire is cut."""

    def __init__(self, me: int) -> None:
        self.me = me
        self.other: DataPlane | None = None
        self.now = 0.0
        self.up = True
        self.asks = 0

    def send_control(self, to: int, payload: bytes, *, pad_to: int = 0) -> bool:
        if unpack(payload, "test").get("rq"):
            self.asks += 1
        if self.up and self.other is not None:
            self.other._on_control(self.me, ("10.0.0.1", 6783), payload, max(60, pad_to), self.now)
        return True

    def send_raw(self, addr: tuple[str, int], data: bytes) -> bool:
        return True

    def traffic(self) -> dict[int, int]:
        return {}


def _two_planes() -> tuple[list[DataPlane], list[_Wire], Callable[[float], None]]:
    """Two data planes that are each other's only neighbour, over sealed idle paths, and a ``run(seconds)``."""
    names = (ME, peer(0))
    planes, wires = [], []
    for i, name in enumerate(names):
        metrics = Metrics()
        plane = DataPlane(AgentConfig(), Router(PeerInfo(name, f"h{i}", 1), VirtualScheduler(), metrics), metrics)
        plane._rng = random.Random(i)
        wire = _Wire(name)
        plane.sleeve = wire  # type: ignore[assignment]
        other = names[1 - i]
        plane.paths[other] = PathState(other, "10.0.0.2", ("10.0.0.2", 6783), KEYS, 1, False, 1500)
        plane.paths[other].next_round = plane._rng.uniform(0, 1.0)
        planes.append(plane)
        wires.append(wire)
    wires[0].other, wires[1].other = planes[1], planes[0]
    clock = [0.0]

    def run(seconds: float) -> None:
        step = planes[0].interval / TICKS
        for _ in range(round(seconds / step)):
            clock[0] = round(clock[0] + step, 9)
            for plane, wire in zip(planes, wires, strict=True):
                wire.now = clock[0]
                full = plane._ticks % TICKS == 0
                plane._ticks += 1
                plane._probe_pass(clock[0], full=full)

    return planes, wires, run


def test_of_two_idle_peers_one_runs_the_rounds_and_the_other_answers() -> None:
    """Each side hears the other once a round either way, so an idle sealed pair needs one round per pace, not one
    from each side: half the heartbeats of a settled mesh."""
    planes, wires, run = _two_planes()
    run(20.0)  # first rounds, then the idle pace
    before = [w.asks for w in wires]
    run(300.0)
    asks = [w.asks - b for w, b in zip(wires, before, strict=True)]
    assert all(p.paths[n].path == SLEEVE for p, n in zip(planes, (peer(0), ME), strict=True))
    # One side's rounds: every 7.5 to 10 s over 300 s is 30 to 40; both sides' would be 60 to 80.
    assert sum(asks) <= 300 / (IDLE_EVERY * 0.75) + 4, f"both sides kept running rounds: {asks}"


def test_the_side_that_answered_takes_over_the_rounds_when_the_other_stops() -> None:
    """A peer whose rounds stop coming (it left them to us, or its sends to us are lost) gets ours at once: the path
    is never left without a round for longer than one of ours."""
    planes, wires, run = _two_planes()
    run(60.0)
    leader = max(range(2), key=lambda i: wires[i].asks)
    follower = 1 - leader
    before = wires[follower].asks
    wires[leader].up = False  # the leader's datagrams are lost from now on: no more asks reach the follower
    run(30.0)
    assert wires[follower].asks - before >= 2, "the follower did not take over the rounds"
    follower_plane, leader_name = planes[follower], (ME, peer(0))[leader]
    assert follower_plane.paths[leader_name].path is None, "a path that stopped answering stayed up"


class _Loop:
    """The calls a data plane schedules, kept: call_soon runs next, call_later at a time."""

    def __init__(self) -> None:
        self.soon: list[Callable[[], None]] = []
        self.later: list[tuple[float, Callable[[], None]]] = []

    def call_soon(self, fn: Callable[[], None]) -> _Handle:
        self.soon.append(fn)
        return _Handle()

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Handle:
        self.later.append((delay, fn))
        return _Handle()


class _Handle:
    def cancel(self) -> None:
        pass


class _Fwd:
    def update(self, fwd: object) -> None:
        pass

    def send_control(self, *args: object, **kwargs: object) -> bool:
        return True


def _timed_plane(monkeypatch: pytest.MonkeyPatch) -> tuple[DataPlane, _Loop, list[float]]:
    """A plane on a recording loop, with a fake sleeve and netlink, whose monotonic clock is the list's one number."""
    metrics = Metrics()
    plane = DataPlane(AgentConfig(), Router(PeerInfo(ME, "me", 1), VirtualScheduler(), metrics), metrics)
    loop = _Loop()
    plane._loop = loop  # type: ignore[assignment]
    plane.sleeve, plane.nd = _Fwd(), InlineNetDev()  # type: ignore[assignment]
    clock = [100.0]
    monkeypatch.setattr(plane_module.time, "monotonic", lambda: clock[0])
    return plane, loop, clock


def test_the_kernel_is_programmed_at_once_then_at_most_twice_a_second_in_a_burst(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hundred connections coming up one after the other each change the tables; the FDB is programmed for the first
    at once and then at most once per KERNEL_SPACING (each programming is a round of netlink requests)."""
    plane, loop, clock = _timed_plane(monkeypatch)
    programmed: list[float] = []
    monkeypatch.setattr(fdb, "read", lambda *a, **k: fdb.FdbState())
    monkeypatch.setattr(fdb, "apply", lambda *a, **k: (programmed.append(clock[0]), 1)[1])  # each changes an entry
    monkeypatch.setattr(plane, "_sync_guard", lambda *a, **k: None)

    plane._recompute()
    assert [fn.__name__ for fn in loop.soon] == ["_program_kernel"] and loop.later == []
    loop.soon.pop()()
    assert programmed == [100.0]
    clock[0] = 100.1
    plane._recompute()  # 0.1 s later: waits for the rest of the spacing
    plane._recompute()  # and a second change joins it
    assert loop.soon == [] and [round(d, 3) for d, _ in loop.later] == [round(plane_module.KERNEL_SPACING - 0.1, 3)]
    clock[0] = 100.5
    loop.later.pop()[1]()
    assert programmed == [100.0, 100.5]


def test_a_programming_that_changed_nothing_does_not_hold_back_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recomputation that leaves the kernel's entries as they are (a neighbour told how our floods reach it, a
    trust change) must not make the next real change (a path turning fast) wait out KERNEL_SPACING."""
    plane, loop, clock = _timed_plane(monkeypatch)
    changes = [1]
    monkeypatch.setattr(fdb, "read", lambda *a, **k: fdb.FdbState())
    monkeypatch.setattr(fdb, "apply", lambda *a, **k: changes[0])
    monkeypatch.setattr(plane, "_sync_guard", lambda *a, **k: None)

    plane._recompute()
    loop.soon.pop()()  # the first reads the FDB and changes it
    clock[0], changes[0] = 100.6, 0
    plane._recompute()
    loop.soon.pop()()  # changes nothing
    clock[0], changes[0] = 100.7, 1
    plane._recompute()
    assert [fn.__name__ for fn in loop.soon] == ["_program_kernel"] and loop.later == [], "held back by a no-op"
    loop.soon.pop()()
    clock[0] = 100.8
    plane._recompute()
    assert loop.soon == [] and len(loop.later) == 1, "a real change still spaces the next"


def test_a_neighbour_leaving_the_fast_path_is_programmed_at_once_whatever_the_spacing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A held fast path dropped because the peer now disagrees on secrets: the kernel must stop sending it our frames
    in clear now, not after the rest of KERNEL_SPACING (a frame crossed in clear 0.33 s after the log said so)."""
    plane, loop, clock = _timed_plane(monkeypatch)
    held = {7: "10.0.0.7"}
    monkeypatch.setattr(plane, "_held_fast", lambda: dict(held))
    monkeypatch.setattr(plane, "_fast_permitted", lambda ip: True)
    monkeypatch.setattr(fdb, "read", lambda *a, **k: fdb.FdbState())
    monkeypatch.setattr(fdb, "apply", lambda *a, **k: 1)
    monkeypatch.setattr(plane, "_sync_guard", lambda *a, **k: None)

    plane._recompute()
    loop.soon.pop()()  # programmed, with 7 on the fast path
    clock[0] = 100.1
    plane._recompute()  # another change soon after: it waits for the spacing
    assert loop.soon == [] and len(loop.later) == 1
    held.clear()  # the peer at 10.0.0.7 disagrees on secrets now
    plane._recompute()
    assert [fn.__name__ for fn in loop.soon] == ["_program_kernel"], "the fast path's end waited for the spacing"


def test_the_kernel_waits_for_a_filling_view_but_a_neighbour_leaving_the_fast_path_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hundred hosts told of one at once: each programmed an FDB entry per peer as it learnt of it, and starved the
    hub that tells them of each other. The FDB waits while the view fills in; taking a peer off the fast path never."""
    plane, loop, clock = _timed_plane(monkeypatch)
    settling = [3.0]
    plane.view_settles_in = lambda: settling[0]
    held = {7: "10.0.0.7"}
    programmed: list[float] = []
    monkeypatch.setattr(plane, "_held_fast", lambda: dict(held))
    monkeypatch.setattr(plane, "_fast_permitted", lambda ip: True)
    monkeypatch.setattr(fdb, "read", lambda *a, **k: fdb.FdbState())
    monkeypatch.setattr(fdb, "apply", lambda *a, **k: (programmed.append(clock[0]), 1)[1])
    monkeypatch.setattr(plane, "_sync_guard", lambda *a, **k: None)

    plane._recompute()
    assert loop.soon == [] and [d for d, _ in loop.later] == [3.0], "programmed while the view fills in"
    clock[0], settling[0] = 102.0, 2.5  # the view grew meanwhile: its settling moved on
    loop.later.pop()[1]()
    assert programmed == [] and [d for d, _ in loop.later] == [2.5], "the timer found the view still filling in"
    clock[0], settling[0] = 104.5, 0.0
    loop.later.pop()[1]()
    assert programmed == [104.5]

    settling[0] = 4.0  # a new burst
    clock[0] = 110.0
    plane._recompute()
    assert loop.soon == [] and len(loop.later) == 1
    held.clear()  # the peer at 10.0.0.7 disagrees on secrets now: in clear no longer, whatever the view
    plane._recompute()
    assert [fn.__name__ for fn in loop.soon] == ["_program_kernel"]
    loop.soon.pop()()
    assert programmed == [104.5, 110.0], "the fast path's end waited for the view"


def test_a_neighbour_that_keeps_our_view_growing_cannot_hold_the_kernel_past_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attacker with the mesh secret gossips eight made-up peers every 4.9 s, so our view never goes quiet: the FDB
    (a new peer's fast path, its MACs) is still programmed VIEW_HOLD_MAX after the burst began, not never."""
    plane, loop, clock = _timed_plane(monkeypatch)
    router = plane.router
    scheduler = router.scheduler
    plane.view_settles_in = router.view_settles_in  # as the agent wires it
    programmed: list[float] = []
    monkeypatch.setattr(fdb, "read", lambda *a, **k: fdb.FdbState())
    monkeypatch.setattr(fdb, "apply", lambda *a, **k: (programmed.append(scheduler.now()), 1)[1])
    monkeypatch.setattr(plane, "_sync_guard", lambda *a, **k: None)
    timers: list[tuple[float, Callable[[], None]]] = []
    loop.call_later = lambda delay, fn: (timers.append((scheduler.now() + delay, fn)), _Handle())[1]  # type: ignore

    def advance_to(t: float) -> None:
        scheduler.call_later(t - scheduler.now(), lambda: None)
        scheduler.run_until(lambda: False, t)
        clock[0] = 100.0 + t

    router._view_grew(8)  # the first burst, at 0
    plane._recompute()
    for step in range(1, 600):  # tenths of a second
        if programmed:
            break
        t = step / 10
        advance_to(t)
        if step % 49 == 0:
            router._view_grew(8)  # more made-up peers, never 5 s apart
        for due, fn in [x for x in timers if x[0] <= t]:
            timers.remove((due, fn))
            fn()
        for fn in list(loop.soon):
            loop.soon.remove(fn)
            fn()
    assert programmed, "the kernel was never programmed while the view kept growing"
    assert VIEW_HOLD_MAX - 0.2 <= programmed[0] <= VIEW_HOLD_MAX + 0.2, programmed[0]


def test_a_burst_of_changes_recomputes_the_tables_at_once_then_at_most_ten_times_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each connection and path of a dense mesh forming changes the tables; they are rebuilt for the first change at
    once and then at most once per RECOMPUTE_SPACING, each rebuild taking in every change since the last."""
    plane, loop, clock = _timed_plane(monkeypatch)
    built: list[float] = []
    monkeypatch.setattr(plane, "_sync_neighbours", lambda now: built.append(now))

    def soon() -> list:
        return [fn for fn in loop.soon if fn.__name__ == "_recompute"]

    def later() -> list:
        return [(round(d, 3), fn) for d, fn in loop.later if fn.__name__ == "_recompute"]

    plane._changed()
    assert len(soon()) == 1 and later() == []
    loop.soon.remove(soon()[0])
    plane._recompute()
    clock[0] = 100.03
    for _ in range(50):  # a burst: one recomputation, when the spacing has passed
        plane._changed()
    assert soon() == [] and [d for d, _ in later()] == [round(plane_module.RECOMPUTE_SPACING - 0.03, 3)]
    clock[0] = 100.1
    later()[0][1]()
    assert built == [100.0, 100.1]
    clock[0] = 101.0
    plane._changed()  # a change after a quiet while: at once again
    assert len(soon()) == 1


def test_while_the_view_fills_in_the_tables_are_rebuilt_at_most_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spoke of a forming mesh learns of the others in a dozen steps within seconds; rebuilding every table for
    each was a tenth of what it ran then, while the hub telling it of them waited for the CPU."""
    plane, loop, clock = _timed_plane(monkeypatch)
    settling = [4.0]
    plane.view_settles_in = lambda: settling[0]
    monkeypatch.setattr(plane, "_sync_neighbours", lambda now: None)
    plane._recompute()
    clock[0] = 100.2
    plane._changed()
    assert [round(d, 3) for d, fn in loop.later if fn.__name__ == "_recompute"] == [
        round(VIEW_FILLING_SPACING - 0.2, 3)
    ]
    loop.later.clear()
    plane._recompute_handle = None
    settling[0] = 0.0  # settled: back to RECOMPUTE_SPACING
    plane._changed()
    assert [fn.__name__ for fn in loop.soon][-1:] == ["_recompute"], "held after the view settled"


def test_peers_about_to_be_neighbours_get_no_end_to_end_keys_for_a_while() -> None:
    """A forming mesh relays every pair for a few seconds: keys are agreed only with the relayed peers the connection
    maker is not dialling, or after E2E_HOLD, or when an agreement is under way."""
    mesh = Mesh(0)
    plane = mesh.plane
    plane._loop = _Loop()  # type: ignore[assignment]
    x, y, z, hop = peer(1), peer(2), peer(3), peer(9)
    plane.dialling = lambda: {x, z}
    relayed = {x: hop, y: hop, z: hop}
    assert plane._agree_with(relayed, 100.0) == {y: hop}
    assert [round(d, 3) for d, _ in plane._loop.later] == [plane_module.E2E_HOLD]  # looked at again then
    plane.e2e.knows = lambda p: p == z  # type: ignore[method-assign]  # z started an agreement with us meanwhile
    assert plane._agree_with(relayed, 105.0) == {y: hop, z: hop}
    assert plane._agree_with(relayed, 100.0 + plane_module.E2E_HOLD) == relayed
    assert plane._agree_with({y: hop}, 111.0) == {y: hop} and plane._relayed_since == {y: 100.0}

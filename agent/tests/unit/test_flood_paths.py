"""Which path a neighbour's broadcasts come over: its own word (the heartbeats' ``kf``), not our choice of path.

Each end chooses fast or sleeve from its own probes, so the two can disagree for a round, or for good when the
underlay passes VXLAN one way only. A host takes a neighbour's floods from the sleeve unless that neighbour says its
kernel floods to it; a host says so only once its kernel does, and stops saying so as soon as the path leaves the fast
set. These tests drive the real DataPlane over a recording sleeve, with the kernel's FDB stood in for.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from fake_netdev import InlineNetDev

from weft.config import AgentConfig
from weft.datapath import fdb
from weft.datapath import plane as plane_module
from weft.datapath.paths import FAST, SLEEVE, PathState
from weft.datapath.plane import DataPlane
from weft.datapath.sleeve import Forwarding
from weft.mesh.clock import VirtualScheduler
from weft.mesh.codec import pack, unpack
from weft.mesh.crypto import SessionKeys
from weft.mesh.peer import PeerInfo
from weft.mesh.router import Router
from weft.metrics import Metrics

ME = 0x020000000001
A, B, C, D = 0x020000000101, 0x020000000102, 0x020000000103, 0x020000000104
KEYS = SessionKeys(b"s" * 32, b"r" * 32)


class _Routes:
    """Every neighbour reachable directly, and on our own broadcast tree."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def reachable(self) -> dict[int, int]:
        return {n: n for n in self.plane.paths}

    def broadcast(self, source: int) -> list[int] | None:
        return sorted(self.plane.paths) if source == ME else []

    def spacing(self, least: float) -> float:
        return least


class _Handle:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn, self.cancelled = fn, False

    def cancel(self) -> None:
        self.cancelled = True


class _Loop:
    """Runs what the plane schedules, in order, when the test says (no spacing: it is set to zero)."""

    def __init__(self) -> None:
        self.soon: list[_Handle] = []

    def call_soon(self, fn: Callable[[], None]) -> _Handle:
        self.soon.append(_Handle(fn))
        return self.soon[-1]

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Handle:
        return self.call_soon(fn)

    def run(self) -> None:
        while self.soon:
            handle = self.soon.pop(0)
            if not handle.cancelled:
                handle.fn()


class _Sleeve:
    def __init__(self) -> None:
        self.fwd = Forwarding()
        self.heartbeats: list[tuple[int, dict]] = []

    def update(self, fwd: Forwarding) -> None:
        self.fwd = fwd

    def send_control(self, to: int, payload: bytes, *, pad_to: int = 0) -> bool:
        msg = unpack(payload, "test")
        if msg.get("t") == "hb":
            self.heartbeats.append((to, msg))
        return True

    def told(self, peer: int) -> list[bool]:
        return [hb["kf"] for to, hb in self.heartbeats if to == peer]


@pytest.fixture
def plane(monkeypatch: pytest.MonkeyPatch) -> DataPlane:
    """A plane whose kernel FDB is a dict: programming it sets the all-zero entry to the fast set."""
    metrics = Metrics()
    p = DataPlane(AgentConfig(), Router(PeerInfo(ME, "me", 1), VirtualScheduler(), metrics), metrics)
    p._loop = _Loop()  # type: ignore[assignment]
    p.sleeve, p.nd = _Sleeve(), InlineNetDev()  # type: ignore[assignment]
    monkeypatch.setattr(p.router, "routes", _Routes(p))
    monkeypatch.setattr(p, "_sync_neighbours", lambda now: None)
    monkeypatch.setattr(p, "_sync_guard", lambda *a, **k: None)
    monkeypatch.setattr(plane_module, "KERNEL_SPACING", 0.0)
    monkeypatch.setattr(plane_module, "RECOMPUTE_SPACING", 0.0)
    kernel = fdb.FdbState()
    p._fdb_have = kernel
    p._fdb_read_at = float("inf")

    def apply(nd: object, *, want: fdb.FdbState, have: fdb.FdbState, **kw: object) -> int:
        have.vxlan = {mac: set(dsts) for mac, dsts in want.vxlan.items()}
        return 0

    monkeypatch.setattr(fdb, "apply", apply)
    return p


def _path(name: int, ip: str, *, path: str, keys: SessionKeys | None = None, trust: bool = False) -> PathState:
    st = PathState(name, ip, (ip, 6783), keys, 1, trust, 1500, peer_trusts=trust)
    st.path, st.last_heard = path, time.monotonic()  # its heartbeats come: the sleeve is up
    return st


def _hear(plane: DataPlane, peer: int, **fields: object) -> None:
    hb = {"t": "hb", "tr": plane.paths[peer].we_trust, "fs": 0, "mx": 0, **fields}
    plane._on_control(peer, plane.paths[peer].udp_addr, pack(hb), 100, time.monotonic())


def test_a_neighbour_is_told_its_floods_come_from_the_kernel_only_once_the_kernel_sends_them(plane: DataPlane) -> None:
    sleeve: _Sleeve = plane.sleeve  # type: ignore[assignment]
    plane.paths[A] = _path(A, "10.0.0.2", path=SLEEVE)
    plane.paths[B] = _path(B, "10.0.0.3", path=SLEEVE)
    plane._recompute()
    plane._loop.run()  # type: ignore[union-attr]
    assert sleeve.heartbeats == [] and sleeve.fwd.bcast_children[ME] == (A, B)

    plane.paths[A].path = FAST  # A's path turns fast: the tables change now, the kernel a moment later
    plane._recompute()
    assert sleeve.heartbeats == [], "A was told before the kernel floods to it"
    assert A in sleeve.fwd.bcast_children[ME], "our floods to A went over neither path until the kernel floods"
    plane._loop.run()  # type: ignore[union-attr]  # the kernel is programmed; the tables follow
    assert sleeve.told(A) == [True] and sleeve.told(B) == []
    assert sleeve.fwd.bcast_children[ME] == (A, B), "B is on the sleeve: the whole tree floods"

    plane.paths[B].path = FAST
    plane._recompute()
    plane._loop.run()  # type: ignore[union-attr]
    assert sleeve.told(B) == [True]
    assert sleeve.fwd.bcast_children[ME] == (), "every neighbour hears our floods from the kernel, and knows it"

    plane.paths[A].path = SLEEVE  # A falls back to the sleeve: told at once, before the kernel stops flooding to it
    plane._recompute()
    assert sleeve.told(A) == [True, False]
    assert sleeve.fwd.bcast_children[ME] == (A, B)
    plane._loop.run()  # type: ignore[union-attr]
    assert sleeve.told(A) == [True, False] and sleeve.told(B) == [True]


def test_a_neighbours_floods_are_taken_from_the_sleeve_unless_it_says_its_kernel_sends_them(plane: DataPlane) -> None:
    sleeve: _Sleeve = plane.sleeve  # type: ignore[assignment]
    plane.paths[A] = _path(A, "10.0.0.2", path=FAST)  # no secret: its plaintext is welcome
    plane.paths[B] = _path(B, "10.0.0.3", path=FAST)
    plane.paths[C] = _path(C, "10.0.0.4", path=SLEEVE)
    plane.paths[D] = _path(D, "10.0.0.5", path=SLEEVE, keys=KEYS)  # a secret and no trust: the guard drops its VXLAN
    plane._recompute()
    plane._loop.run()  # type: ignore[union-attr]
    assert sleeve.fwd.flood_origins == {C, D}, "before a word from them, as an older version: by our own paths"

    _hear(plane, A, kf=True)  # fast both ways
    _hear(plane, B, kf=False)  # we are fast towards B, B is on the sleeve towards us (its probes do not get through)
    _hear(plane, C, kf=True)  # the other way round
    _hear(plane, D, kf=True)  # says so, but its plaintext would be dropped here
    plane._loop.run()  # type: ignore[union-attr]
    assert sleeve.fwd.flood_origins == {B, D}

    _hear(plane, B, kf=True)
    _hear(plane, C)  # a heartbeat without "kf": an older version again (a downgrade)
    plane._loop.run()  # type: ignore[union-attr]
    assert sleeve.fwd.flood_origins == {C, D}

    for junk in ("yes", 1, None, [True], "x" * 100_000):  # not a bool: taken as not said, as from an older version
        _hear(plane, A, kf=junk)
        plane._loop.run()  # type: ignore[union-attr]
        assert plane.paths[A].peer_floods is None and sleeve.fwd.flood_origins == {C, D}


def test_what_the_kernel_floods_to_after_a_restart_counts_as_told(plane: DataPlane) -> None:
    """The last run's all-zero entry keeps flooding while the path is held fast: the first heartbeat says so."""
    sleeve: _Sleeve = plane.sleeve  # type: ignore[assignment]
    plane._kernel_floods = frozenset({"10.0.0.2"})
    plane._fdb_have = fdb.FdbState(vxlan={fdb.ZERO_MAC: {"10.0.0.2"}})
    plane.paths[A] = _path(A, "10.0.0.2", path=FAST)
    plane._recompute()
    assert sleeve.told(A) == [True]
    plane._heartbeat(plane.paths[A], 0.0)
    assert sleeve.told(A) == [True, True]

"""Handshake deadlines on a host that runs late: the time the agent's own loop could not run is not counted, and a
peer whose handshakes keep timing out gets more time, so a starved but live hub is reached at last.

The stalls are real: a callback that holds the loop, as a host with every core busy does to the agent. Over real
sockets on 127.0.0.1, against the real transport and handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest

from weft.mesh import transport as transport_module
from weft.mesh.clock import AsyncioScheduler
from weft.mesh.connection import ConnectionSettings
from weft.mesh.peer import PeerInfo
from weft.mesh.router import Router
from weft.mesh.stalls import LoopStalls, within
from weft.mesh.transport import SLOW_STEPS, ControlTransport
from weft.metrics import Metrics

A = PeerInfo(0x020000000001, "a", 11)
B = PeerInfo(0x020000000002, "b", 22)


async def _two_stages(hold: float) -> str:
    """Work that needs the loop before and after it is held for ``hold`` seconds (a handshake's two exchanges)."""
    await asyncio.sleep(0.02)
    time.sleep(hold)  # the loop runs late: nothing else gets a turn
    await asyncio.sleep(0.02)
    return "done"


def test_the_time_the_loop_ran_late_does_not_count_against_a_deadline() -> None:
    async def main() -> None:
        stalls = LoopStalls(tick=0.01)
        stalls.start(asyncio.get_running_loop())
        try:
            assert await within(_two_stages(0.5), 0.2, stalls, most=10.0) == "done"
            assert stalls.stalled() >= 0.4 and stalls.lag() >= 0.4
            with pytest.raises(TimeoutError):  # a plain deadline: the same work fails
                await within(_two_stages(0.5), 0.2, None, most=10.0)
        finally:
            stalls.stop()

    asyncio.run(main())


def test_a_peer_that_does_not_answer_still_times_out_and_a_loop_that_never_keeps_time_hits_the_ceiling() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        stalls = LoopStalls(tick=0.01)
        stalls.start(loop)
        try:
            with pytest.raises(TimeoutError):
                await within(loop.create_future(), 0.1, stalls, most=10.0)
            with pytest.raises(TimeoutError):  # held for longer than the ceiling: no second stage in time
                await within(_two_stages(0.4), 0.1, stalls, most=0.3)
        finally:
            stalls.stop()

    asyncio.run(main())


class _Maker:
    """What the transport tells the connection maker of each dial."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, int | None, str | None]] = []

    def dial_finished(self, address: str, peer: int | None, error: str | None, **kw: object) -> None:
        self.finished.append((address, peer, error))

    def connection_opened(self, peer: int) -> None:
        pass

    def connection_closed(self, peer: int, **kw: object) -> None:
        pass


async def _transport(who: PeerInfo, timeout: float) -> tuple[ControlTransport, Router, LoopStalls]:
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    router = Router(who, AsyncioScheduler(loop), metrics)
    stalls = LoopStalls(tick=0.01)
    stalls.start(loop)
    metrics.add_loop_lag(stalls.lag)
    settings = ConnectionSettings(heartbeat_interval=0.2, read_timeout=5.0, handshake_timeout=timeout)
    t = ControlTransport(router, metrics, settings, lambda: [], listen=("127.0.0.1", 0), advertise=None, stalls=stalls)
    t.maker = _Maker()  # type: ignore[assignment]
    await t.start()
    router.start()
    return t, router, stalls


async def _wait(cond, seconds: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(int(seconds / 0.01)):
        if cond():
            return True
        await asyncio.sleep(0.01)
    return cond()


def test_a_host_whose_loop_runs_late_still_completes_handshakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ends hold a 0.2 s deadline; the loop is held for 0.6 s as the handshake starts. Counted by the wall clock
    both ends would give up; counted by the time the loop ran, the handshake completes."""
    real = transport_module.handshake
    held = []

    async def late(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if kwargs.get("outbound") is False and not held:
            held.append(True)
            time.sleep(0.6)  # the acceptor's host gives the agent no turn for a while
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transport_module, "handshake", late)

    async def main() -> None:
        a, ra, sa = await _transport(A, 0.2)
        b, rb, sb = await _transport(B, 0.2)
        try:
            assert a._server is not None
            port = a._server.sockets[0].getsockname()[1]
            b.dial(f"127.0.0.1:{port}")
            assert await _wait(lambda: B.name in ra.connections and A.name in rb.connections), (
                f"no connection: {b.maker.finished}"  # type: ignore[union-attr]
            )
            assert held and b.maker.finished == [(f"127.0.0.1:{port}", A.name, None)]  # type: ignore[union-attr]
            assert not a.metrics.registry.get_sample_value("weft_handshake_failures_total", {"reason": "timeout"})
            lag = a.metrics.registry.get_sample_value("weft_event_loop_lag_seconds")
            assert lag is not None and lag >= 0.5, f"the stall shows in weft_event_loop_lag_seconds: {lag}"
        finally:
            for t, r, s in ((a, ra, sa), (b, rb, sb)):
                await t.stop()
                r.stop()
                s.stop()

    asyncio.run(main())


def test_a_peer_whose_handshakes_time_out_gets_twice_the_time_at_each_try_then_the_usual_again() -> None:
    """A hub too busy to answer for a while: each try waits twice as long as the one before (up to 2**SLOW_STEPS
    times), and once a handshake with it succeeds, the next waits the usual time."""

    async def main() -> None:
        a, ra, sa = await _transport(A, 0.05)
        b, rb, sb = await _transport(B, 0.05)
        assert a._server is not None
        a_port = a._server.sockets[0].getsockname()[1]
        silent = SLOW_STEPS + 1
        seen: list[int] = []

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        async def hub(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(1)
            if len(seen) <= silent:
                await reader.read()  # says nothing; the dialler gives up and closes
                writer.close()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", a_port)  # now it answers: A's own
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        server = await asyncio.start_server(hub, "127.0.0.1", 0)
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        maker: _Maker = b.maker  # type: ignore[assignment]
        try:
            for attempt in range(silent + 1):
                b.dial(address)
                assert await _wait(lambda n=attempt: len(maker.finished) == n + 1)
            errors = [error for _, _, error in maker.finished]
            assert errors == [
                *(f"timeout: no handshake within {0.05 * 2 ** min(n, SLOW_STEPS):g}s" for n in range(silent)),
                None,
            ]
            assert b.handshake_timeout(address) == 0.05, "after a success, the usual deadline"
            assert b.handshake_timeout("127.0.0.1:1") == 0.05
        finally:
            server.close()
            for t, r, st in ((a, ra, sa), (b, rb, sb)):
                await t.stop()
                r.stop()
                st.stop()

    asyncio.run(main())


@pytest.mark.parametrize("aware", [True, False])
def test_a_connection_outlives_a_stall_of_its_own_loop_longer_than_the_read_timeout(aware: bool) -> None:
    """Both ends heartbeat every 0.05 s and give up after 0.8 s of silence; the loop is held for 1.6 s. The heartbeats
    that came meanwhile are read before the silence is judged: the connection stays. Counted by the wall clock, both
    ends would call it dead at once (the ``aware=False`` case shows that they do)."""
    from weft.mesh.connection import ControlConnection
    from weft.mesh.handshake import handshake

    async def main() -> list[str | None]:
        loop = asyncio.get_running_loop()
        stalls = LoopStalls(tick=0.01)
        stalls.start(loop)
        a, b = socket.socketpair()
        (r1, w1), (r2, w2) = await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)
        sessions = await asyncio.gather(
            handshake(r1, w1, outbound=True, ourself=A, secrets=[b"k" * 32], port=6783, advertise=None),
            handshake(r2, w2, outbound=False, ourself=B, secrets=[b"k" * 32], port=6783, advertise=None),
        )
        settings = ConnectionSettings(heartbeat_interval=0.05, read_timeout=0.8)
        conns = [
            ControlConnection(
                r, w, s, settings=settings, metrics=Metrics(), on_message=lambda c, m: None, on_sent=lambda ms: None,
                outbound=out, remote_address="127.0.0.1:6783", secret=b"k" * 32, stalls=stalls if aware else None,
            )
            for (r, w), s, out in (((r1, w1), sessions[0], True), ((r2, w2), sessions[1], False))
        ]  # fmt: skip
        runs = [asyncio.ensure_future(c.run()) for c in conns]
        await asyncio.sleep(0.2)
        time.sleep(1.6)  # the host gives the agent no turn for twice the read timeout
        await asyncio.sleep(0.5)
        reasons = [c.close_reason for c in conns]
        for c in conns:
            c.close("test over")
        await asyncio.gather(*runs)
        stalls.stop()
        return reasons

    reasons = asyncio.run(main())
    if aware:
        assert reasons == [None, None], reasons
    else:
        assert any(r and "read timeout" in r for r in reasons), reasons

"""A control connection ends when asked, for the first reason it was given, from outside or from its own reader, and
the peer hears that it ended: over a real socket pair with real handshakes."""

from __future__ import annotations

import asyncio
import socket

from weft.mesh.connection import ConnectionSettings, ControlConnection
from weft.mesh.handshake import handshake
from weft.mesh.peer import PeerInfo
from weft.metrics import Metrics

A = PeerInfo(0x020000000001, "a", 11)
B = PeerInfo(0x020000000002, "b", 22)
SECRET = b"k" * 32


async def _pair(on_message_b=lambda c, m: None) -> list[ControlConnection]:
    a, b = socket.socketpair()
    (r1, w1), (r2, w2) = await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)
    sessions = await asyncio.gather(
        handshake(r1, w1, outbound=True, ourself=A, secrets=[SECRET], port=6783, advertise=None),
        handshake(r2, w2, outbound=False, ourself=B, secrets=[SECRET], port=6783, advertise=None),
    )
    settings = ConnectionSettings(heartbeat_interval=0.05, read_timeout=5.0)
    handlers = [lambda c, m: None, on_message_b]
    return [
        ControlConnection(
            r, w, s, settings=settings, metrics=Metrics(), on_message=h, on_sent=lambda ms: None,
            outbound=i == 0, remote_address="127.0.0.1:6783", secret=SECRET,
        )
        for i, ((r, w), s, h) in enumerate(zip(((r1, w1), (r2, w2)), sessions, handlers, strict=True))
    ]  # fmt: skip


def test_a_close_from_outside_ends_the_connection_with_its_reason_and_the_peer_hears_it() -> None:
    async def main() -> tuple[str, str, str | None]:
        a, b = await _pair()
        runs = [asyncio.ensure_future(c.run()) for c in (a, b)]
        await asyncio.sleep(0.2)  # heartbeats flow both ways
        a.close("the operator said so")
        a.close("a second reason")  # the first one stays
        ended_a = await asyncio.wait_for(runs[0], 5)
        ended_b = await asyncio.wait_for(runs[1], 5)
        return ended_a, ended_b, a.close_reason

    ended_a, ended_b, reason = asyncio.run(main())
    assert ended_a == reason == "the operator said so"
    assert ended_b == "the peer closed the connection"


def test_a_connection_closed_before_it_runs_ends_at_once() -> None:
    async def main() -> str:
        a, b = await _pair()
        a.close("shutting down")
        ended = await asyncio.wait_for(a.run(), 5)
        b.close("test over")
        await asyncio.wait_for(b.run(), 5)
        return ended

    assert asyncio.run(main()) == "shutting down"


def test_a_message_handler_that_closes_its_connection_ends_it_with_that_reason() -> None:
    """What the router does with a message it cannot accept: close the connection from inside its read loop."""

    async def main() -> tuple[str, str]:
        a, b = await _pair(on_message_b=lambda c, m: c.close("a message we cannot accept"))
        runs = [asyncio.ensure_future(c.run()) for c in (a, b)]
        a.sender.send_digest("topology", b"digest", reply=False)  # any message but a heartbeat reaches the handler
        return await asyncio.wait_for(runs[1], 5), await asyncio.wait_for(runs[0], 5)

    ended_b, ended_a = asyncio.run(main())
    assert ended_b == "a message we cannot accept"
    assert ended_a == "the peer closed the connection"

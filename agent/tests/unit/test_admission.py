"""Admission of inbound control connections with the default settings: a whole mesh told of one peer at once is let
in at the first try, and a flood past that is still held to the accept rate. Real sockets on 127.0.0.0/8 (each
dialler from an address of its own, as peers are), the real transport, router and handshake."""

from __future__ import annotations

import asyncio
import math
import time

from transport_rig import listening

from weft.mesh.clock import AsyncioScheduler
from weft.mesh.connection import ConnectionSettings
from weft.mesh.handshake import HandshakeError, handshake
from weft.mesh.peer import PeerInfo
from weft.mesh.router import Router
from weft.metrics import Metrics

HUB = PeerInfo(0x020000000001, "hub", 1)


def refused(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("weft_connections_refused_total", {"reason": reason}) or 0.0


async def dial(port: int, index: int, who: PeerInfo | None) -> asyncio.StreamWriter | BaseException:
    """Connect from 127.0.<index / 250>.<index % 250 + 1>; with ``who``, run the handshake as that peer."""
    source = f"127.0.{1 + index // 250}.{index % 250 + 1}"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError as exc:
        return exc
    if who is None:
        return writer
    try:
        await asyncio.wait_for(
            handshake(reader, writer, outbound=True, ourself=who, secrets=[], port=6783, advertise=None), 30
        )
    except (HandshakeError, OSError, TimeoutError) as exc:
        writer.close()
        return exc
    return writer


def test_a_hundred_peers_told_of_one_at_once_are_all_let_in_and_a_flood_past_them_is_rate_limited() -> None:
    async def main() -> None:
        metrics = Metrics()
        router = Router(HUB, AsyncioScheduler(asyncio.get_running_loop()), metrics, conn_limit=1000)
        settings = ConnectionSettings()  # the defaults, as an agent runs without a config
        kept: list[asyncio.StreamWriter] = []
        async with listening(router, metrics, settings) as (_, port):
            try:
                spokes = [PeerInfo(0x020000001000 + i, f"h{i}", 1000 + i) for i in range(99)]
                start = time.monotonic()
                outcomes = await asyncio.gather(*(dial(port, i, who) for i, who in enumerate(spokes)))
                kept += [o for o in outcomes if isinstance(o, asyncio.StreamWriter)]
                failed = [o for o in outcomes if not isinstance(o, asyncio.StreamWriter)]
                assert not failed, f"{len(failed)} of 99 peers dialling at once were turned away: {failed[:3]}"
                assert refused(metrics, "rate_limit") == 0 and refused(metrics, "source_limit") == 0
                for _ in range(200):
                    if len(router.connections) == 99:
                        break
                    await asyncio.sleep(0.02)
                assert len(router.connections) == 99

                # Past the burst, new connections come in at the accept rate: the rest are closed before any handshake.
                flood = await asyncio.gather(*(dial(port, 99 + i, None) for i in range(200)))
                elapsed = time.monotonic() - start
                kept += [o for o in flood if isinstance(o, asyncio.StreamWriter)]
                await asyncio.sleep(0.2)
                # The token the hundred left, and what refilled since they began (a loaded host is slow to take them).
                allowed = 1 + math.ceil(settings.accept_rate * (elapsed + 0.2))
                assert refused(metrics, "rate_limit") >= 200 - allowed, (refused(metrics, "rate_limit"), elapsed)
            finally:
                for writer in kept:
                    writer.close()

    asyncio.run(main())

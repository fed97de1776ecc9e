"""A control transport listening on 127.0.0.1 with its router running, for tests over real sockets."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from weft.mesh.connection import ConnectionSettings
from weft.mesh.router import Router
from weft.mesh.transport import ControlTransport
from weft.metrics import Metrics


@contextlib.asynccontextmanager
async def listening(
    router: Router, metrics: Metrics, settings: ConnectionSettings, secrets: Callable[[], list[bytes]] = list
) -> AsyncIterator[tuple[ControlTransport, int]]:
    """The transport and the port it listens on; stopped, with the router, on the way out."""
    transport = ControlTransport(router, metrics, settings, secrets, listen=("127.0.0.1", 0), advertise=None)
    await transport.start()
    router.start()
    assert transport._server is not None
    try:
        yield transport, transport._server.sockets[0].getsockname()[1]
    finally:
        router.stop()
        await transport.stop()
        transport._server.close()
        await transport._server.wait_closed()

"""The read-only metrics and status listener (TCP, 127.0.0.1:6782 by default).

Any local user can connect to it, so it holds nothing for long: at most ``limit`` connections at once
(beyond that a new connection is closed at once, unread), each one request of at most 8 KiB of headers,
answered and closed within ``timeout`` seconds of being accepted. A plain asyncio protocol rather than a
web framework, so that a refused connection costs no task and no parser, and nothing waits on a client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from weft.limits import Episode
from weft.metrics import Metrics

log = logging.getLogger(__name__)

MAX_HEADER = 8192
LISTENER = "metrics"

# (status, content type, body) for a GET of a path.
Handler = Callable[[str], tuple[int, str, bytes]]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 431: "Headers Too Large"}


class PublicServer:
    def __init__(self, handler: Handler, metrics: Metrics, *, limit: int, timeout: float) -> None:
        self.handler = handler
        self.metrics = metrics
        self.limit = limit
        self.timeout = timeout
        self.open = 0
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self.episode = Episode(
            log,
            f"metrics listener: connection cap ({limit}) reached; closing new connections unanswered"
            " (see weft_api_connections_refused_total)",
            "metrics listener: below its connection cap again; connections refused",
        )

    async def start(self, host: str | None, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        self.episode.cancel()

    def _protocol(self) -> asyncio.Protocol:
        if len(self._connections) >= self.limit:
            return _Refused(self)
        conn = _Connection(self)
        self._connections.add(conn)
        self.metrics.api_connections.labels(LISTENER).set(len(self._connections))
        return conn

    def refused(self, reason: str) -> None:
        self.metrics.api_refused.labels(LISTENER, reason).inc()

    def closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        self.metrics.api_connections.labels(LISTENER).set(len(self._connections))


class _Refused(asyncio.Protocol):
    """Over the cap: close at once without reading a byte."""

    def __init__(self, server: PublicServer) -> None:
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()
        self._server.refused("conn_limit")
        self._server.episode.hit()


class _Connection(asyncio.Protocol):
    """One request: read its headers, answer, close; abort whatever is not done by the deadline."""

    def __init__(self, server: PublicServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._answered = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._deadline = asyncio.get_running_loop().call_later(self._server.timeout, self._expired)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._transport = None
        self._server.closed(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        else:
            self._server.closed(self)

    def _expired(self) -> None:
        if not self._answered:
            self._server.refused("timeout")
        self.abort()  # unanswered, or answered but the client does not read the answer

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            end = self._buffer.find(b"\n\n")
        if end < 0:
            if len(self._buffer) > MAX_HEADER:
                self._server.refused("too_large")
                self._answer(431, "text/plain", b"request headers too large\n")
            return
        request_line = bytes(self._buffer[: self._buffer.find(b"\n")]).decode("latin-1").strip()
        self._buffer.clear()
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._server.refused("bad_request")
            self._answer(400, "text/plain", b"bad request\n")
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method != "GET":
            self._answer(405, "text/plain", b"only GET is served here\n")
            return
        try:
            status, content_type, body = self._server.handler(target)
        except Exception:
            log.exception("metrics listener: GET %s failed", target)
            status, content_type, body = 500, "text/plain", b"internal error\n"
        self._answer(status, content_type, body)

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self._answered = True
        transport = self._transport
        if transport is None:
            return
        transport.pause_reading()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        transport.write(head.encode("latin-1") + body)
        transport.close()  # after the answer is flushed; the deadline still bounds a client that never reads

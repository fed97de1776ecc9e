"""The read-only metrics and status listener (TCP, 127.0.0.1:6782 by default).

Any local user can connect to it, so it holds nothing for long: at most ``limit`` connections at once
(beyond that a new connection is closed at once, unread), each one request of at most 8 KiB of headers,
answered and closed within ``timeout`` seconds of being accepted. A plain asyncio protocol rather than a
web framework, so that a refused connection costs no task and no parser, and nothing waits on a client.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable

from weft.limits import Episode
from weft.metrics import Metrics

log = logging.getLogger(__name__)

MAX_HEADER = 8192
BACKLOG = 128
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
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
        self._loop: asyncio.AbstractEventLoop
        self._sock: socket.socket | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._connections: set[_Connection] = set()
        self.episode = Episode(
            log,
            f"metrics listener: connection cap ({limit}) reached; closing new connections unanswered"
            " (see weft_api_connections_refused_total)",
            "metrics listener: below its connection cap again; connections refused",
        )

    async def start(self, host: str | None, port: int) -> None:
        """Listen with an accept loop of our own: a refused connection costs two system calls, no task."""
        self._loop = asyncio.get_running_loop()
        infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept)

    async def stop(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._retry is not None:
            self._retry.cancel()
        for conn in list(self._connections):
            conn.abort()
        self.episode.cancel()

    def _accept(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(BACKLOG):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # out of files or buffers: stop for a second rather than spin
                # Reported like asyncio's own listeners, so it is counted and logged once per episode.
                self._loop.call_exception_handler(
                    {"message": "socket.accept() out of system resource", "exception": exc}
                )
                self._loop.remove_reader(sock.fileno())
                self._retry = self._loop.call_later(1.0, self._resume)
                return
            if len(self._connections) >= self.limit:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)  # reset: no kernel state left behind
                conn.close()
                self.refused("conn_limit")
                self.episode.hit()
                continue
            connection = _Connection(self)
            self._connections.add(connection)
            self.metrics.api_connections.labels(LISTENER).set(len(self._connections))
            self._loop.create_task(self._adopt(conn, connection))

    def _resume(self) -> None:
        self._retry = None
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    async def _adopt(self, conn: socket.socket, connection: _Connection) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: connection, conn)
        except OSError:
            conn.close()
            self.closed(connection)

    def refused(self, reason: str) -> None:
        self.metrics.api_refused.labels(LISTENER, reason).inc()

    def closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        self.metrics.api_connections.labels(LISTENER).set(len(self._connections))


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

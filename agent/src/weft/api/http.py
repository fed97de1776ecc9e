"""HTTP/1.1 for the agent's two listeners: h11 speaks the protocol, this module holds the limits.

The control API (a unix socket only root can open) and the metrics and read-only status address (TCP, which any
local user can reach) are both served here, each by an :class:`HttpListener` with its own handler and limits:

- **A cap on connections.** The listener accepts with a loop of its own; a connection over ``limit`` is closed at
  once, unread (a TCP one with a reset, so no kernel state is left behind), which costs two system calls and no
  task. Refusals are counted per connection and logged once per episode.
- **Bounded requests.** At most ``MAX_HEADER`` bytes of request line and headers (431) and ``max_body`` bytes of
  body (413); what h11 cannot parse is a 400 and closes the connection.
- **Deadlines.** A request must arrive whole within ``timeout`` of the connection being accepted (or of the
  previous answer on a kept-alive connection), and its answer must be taken within ``timeout``; with
  ``keep_alive`` off (the metrics address) the connection is answered and closed within ``timeout`` of its accept,
  the handler included. Whatever is not done by then is aborted.

h11 parses and frames; nothing here reads HTTP by hand. A handler gets a :class:`Request` with the whole body and
returns a :class:`Response`; an exception in it becomes a 500 with one line of JSON and one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

import h11

from weft.limits import Episode

if TYPE_CHECKING:
    from weft.metrics import Metrics

log = logging.getLogger(__name__)

MAX_HEADER = 8192  # request line and headers
BACKLOG = 128
READ_CHUNK = 16384
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


@dataclass
class Request:
    method: str
    path: str  # percent-decoded, without the query
    query: dict[str, str]  # the first value of each key
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value).encode())


def error(status: int, message: str) -> Response:
    """The API's answer to anything it refuses: one line of JSON, ``{"error": message}``."""
    return json_response({"error": message}, status)


class HttpListener:
    """One listening socket served over HTTP/1.1 within the limits above."""

    def __init__(
        self,
        name: str,
        handler: Handler,
        metrics: Metrics,
        *,
        limit: int,
        timeout: float,
        max_body: int,
        keep_alive: bool,
        methods: tuple[str, ...] = (),
        error_body: Callable[[int, str], Response] = error,
    ) -> None:
        """``name`` labels the listener in metrics and logs (``api``, ``metrics``). ``methods``: the only methods served
        (any other is a 405 before its body is read); empty: the handler decides."""
        self.name = name
        self.handler = handler
        self.metrics = metrics
        self.limit = limit
        self.timeout = timeout
        self.max_body = max_body
        self.keep_alive = keep_alive
        self.methods = methods
        self.error_body = error_body
        self._loop: asyncio.AbstractEventLoop
        self._sock: socket.socket | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.episode = Episode(
            log,
            f"{name} listener: connection cap ({limit}) reached; closing new connections unanswered"
            " (see weft_api_connections_refused_total)",
            f"{name} listener: below its connection cap again; connections refused",
        )

    # -- listening -------------------------------------------------------------------------------

    async def listen_tcp(self, host: str | None, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        self._listen(sock)

    async def listen_unix(self, path: str) -> None:
        """Listen at ``path``; the caller sets the umask that gives the socket file its mode."""
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        self._listen(sock)

    def _listen(self, sock: socket.socket) -> None:
        try:
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept)

    @property
    def address(self) -> Any:
        """Where it listens (a (host, port) or a path); None once stopped."""
        return self._sock.getsockname() if self._sock is not None else None

    async def stop(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._retry is not None:
            self._retry.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.timeout)
        self.episode.cancel()

    # -- accepting -------------------------------------------------------------------------------

    def _accept(self) -> None:
        """Accept what is queued: a connection over the cap is closed unread, the rest each get a task."""
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
            if len(self._tasks) >= self.limit:
                if conn.family != socket.AF_UNIX:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                conn.close()
                self.refused("conn_limit")
                self.episode.hit()
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._done)
            self._count()

    def _resume(self) -> None:
        self._retry = None
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._count()

    def _count(self) -> None:
        self.metrics.api_connections.labels(self.name).set(len(self._tasks))

    def refused(self, reason: str) -> None:
        self.metrics.api_refused.labels(self.name, reason).inc()

    # -- one connection --------------------------------------------------------------------------

    async def _serve(self, conn: socket.socket) -> None:
        transport: asyncio.Transport | None = None
        try:
            if conn.family == socket.AF_UNIX:
                reader, writer = await asyncio.open_unix_connection(sock=conn, limit=READ_CHUNK)
            else:
                reader, writer = await asyncio.open_connection(sock=conn, limit=READ_CHUNK)
        except OSError:
            conn.close()
            return
        transport = writer.transport  # type: ignore[assignment]
        try:
            await self._exchange(reader, writer)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError):
            pass  # the client went away
        finally:
            if transport is not None:
                transport.abort()  # whatever is left unsent or unread goes: nothing waits on a client

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests and answers until the connection closes, fails a limit, or (without keep-alive) is answered."""
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    request = await self._read(h, reader)
            except TimeoutError:
                # An idle kept-alive connection just ends; one that sent part of a request, or (metrics) none, counts.
                if not self.keep_alive or h.their_state is not h11.IDLE or h.trailing_data[0]:
                    self.refused("timeout")
                return
            except _Refusal as refusal:
                if refusal.reason:
                    self.refused(refusal.reason)
                response = self.error_body(refusal.status, refusal.message)
                if refusal.status == 405:
                    response.headers.append(("Allow", ", ".join(self.methods)))
                await self._send(h, writer, response, deadline)
                return
            if request is None:
                return
            if self.keep_alive:
                response = await self._answer(request)
                deadline = loop.time() + self.timeout
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        response = await self._answer(request)
                except TimeoutError:
                    self.refused("timeout")
                    return
            if not self.keep_alive:
                response.headers.append(("Connection", "close"))
            await self._send(h, writer, response, deadline, head=request.method == "HEAD")
            if h.our_state is h11.MUST_CLOSE or h.their_state is not h11.DONE:
                return
            h.start_next_cycle()
            deadline = loop.time() + self.timeout

    async def _read(self, h: h11.Connection, reader: asyncio.StreamReader) -> Request | None:
        """The next whole request, or None if the client closed the connection between requests."""
        received = [len(h.trailing_data[0])]  # bytes handed to h11 for this request, pipelined ones included
        try:
            event = await _next_event(h, reader, received)
            if isinstance(event, h11.ConnectionClosed):
                return None
            if not isinstance(event, h11.Request):
                raise _Refusal(400, "bad_request", "bad request")
            if received[0] - len(h.trailing_data[0]) > MAX_HEADER:  # h11 checks only what it has not parsed yet
                raise _Refusal(431, "too_large", "request headers too large")
            start = event
            if self.methods and event.method.decode("latin-1") not in self.methods:
                raise _Refusal(405, "", f"only {' or '.join(self.methods)} is served here")
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
            length = headers.get("content-length")
            if length is not None and int(length) > self.max_body:  # h11 has checked it is a number
                raise _Refusal(413, "too_large", f"request body is over the {self.max_body}-byte limit")
            body = bytearray()
            while True:
                event = await _next_event(h, reader, received)
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.max_body:
                        raise _Refusal(413, "too_large", f"request body is over the {self.max_body}-byte limit")
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise _Refusal(400, "bad_request", "bad request")
        except h11.RemoteProtocolError as exc:
            if h.their_state is h11.IDLE and not h.trailing_data[0] and "closed" in str(exc):
                return None  # closed before a whole request line: nothing to answer
            if exc.error_status_hint == 431:
                raise _Refusal(431, "too_large", "request headers too large") from None
            raise _Refusal(400, "bad_request", f"bad request: {exc}") from None
        path, _, query = start.target.decode("latin-1").partition("?")
        return Request(
            method=start.method.decode("latin-1"),
            path=unquote(path),
            query=dict(reversed(parse_qsl(query, keep_blank_values=True))),
            body=bytes(body),
            headers=headers,
        )

    async def _answer(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except Exception as exc:
            log.error(
                "%s listener: %s %s failed: %s: %s", self.name, request.method, request.path, type(exc).__name__, exc
            )
            log.debug("%s listener failure", self.name, exc_info=True)
            return self.error_body(500, f"internal error ({type(exc).__name__}); the agent log has the details")

    async def _send(
        self, h: h11.Connection, writer: asyncio.StreamWriter, response: Response, deadline: float, head: bool = False
    ) -> None:
        if h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers,
        ]
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = "Error"
        try:
            data = h.send(h11.Response(status_code=response.status, headers=headers, reason=reason)) or b""
            if response.body and not head:
                data += h.send(h11.Data(data=response.body)) or b""
            data += h.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return  # nothing sensible can be sent on this connection any more
        writer.write(data)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await writer.drain()


class _Refusal(Exception):
    """A request refused before its handler: the status, the metric's reason ("": not counted) and the message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


async def _next_event(h: h11.Connection, reader: asyncio.StreamReader, received: list[int]) -> Any:
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(READ_CHUNK)
            received[0] += len(data)
            h.receive_data(data)
            continue
        return event

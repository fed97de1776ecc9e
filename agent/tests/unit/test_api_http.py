"""The API's HTTP layer (weft.api.http): what each listener answers, and the limits that hold a client to little.

Real sockets on loopback and in a temporary directory; no root needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from weft.api.http import MAX_HEADER, HttpListener, Request, Response, json_response
from weft.metrics import Metrics

TIMEOUT = 0.5


async def echo(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("the handler failed")
    if request.path == "/slow":
        await asyncio.sleep(3 * TIMEOUT)
    return json_response(
        {"method": request.method, "path": request.path, "query": request.query, "body": request.body.decode()}
    )


def refused(metrics: Metrics, listener: str, reason: str) -> float:
    return (
        metrics.registry.get_sample_value(
            "weft_api_connections_refused_total", {"listener": listener, "reason": reason}
        )
        or 0.0
    )


@contextlib.asynccontextmanager
async def control_api() -> AsyncIterator[tuple[HttpListener, str, Metrics]]:
    """A listener like the control API's: a unix socket, kept-alive connections, a body limit."""
    metrics = Metrics()
    listener = HttpListener("api", echo, metrics, limit=4, timeout=TIMEOUT, max_body=1000, keep_alive=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "api.sock")
        await listener.listen_unix(path)
        try:
            yield listener, path, metrics
        finally:
            await listener.stop()


@contextlib.asynccontextmanager
async def metrics_port() -> AsyncIterator[tuple[HttpListener, int, Metrics]]:
    """A listener like the metrics address's: TCP on loopback, one request a connection, a cap of 2."""
    metrics = Metrics()
    listener = HttpListener(
        "metrics", echo, metrics, limit=2, timeout=TIMEOUT, max_body=0, keep_alive=False, methods=("GET", "HEAD")
    )
    await listener.listen_tcp("127.0.0.1", 0)
    try:
        yield listener, listener.address[1], metrics
    finally:
        await listener.stop()


def served(fixture: Callable[[], contextlib.AbstractAsyncContextManager]) -> Callable:
    """Run an async test body with the listener ``fixture`` gives, on a fresh event loop."""

    def wrap(body: Callable[..., Awaitable[None]]) -> Callable[[], None]:
        def test() -> None:
            async def main() -> None:
                async with fixture() as args:
                    await body(args)

            asyncio.run(main())

        test.__name__ = body.__name__
        test.__doc__ = body.__doc__
        return test

    return wrap


def _unix_request(path: str, method: str, target: str, body: bytes | None = None) -> tuple[int, str, bytes]:
    class Unix(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(5)
            self.sock.connect(path)

    conn = Unix("localhost", timeout=5)
    try:
        conn.request(method, target, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


async def unix_request(path: str, method: str, target: str, body: bytes | None = None) -> tuple[int, str, bytes]:
    return await asyncio.to_thread(_unix_request, path, method, target, body)


async def raw(connect: asyncio.Future | object, data: bytes, wait: float = 5.0) -> bytes:
    """Send ``data`` and read until the server closes (or ``wait`` passes: then b"<open>")."""
    reader, writer = await connect  # type: ignore[misc]
    writer.write(data)
    with contextlib.suppress(ConnectionError):  # the server may answer and close before it has read all of it
        await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), wait)
    except TimeoutError:
        return b"<open>"
    finally:
        writer.close()


@served(control_api)
async def test_a_request_gets_its_handlers_answer_with_the_path_decoded_and_the_query_parsed(api) -> None:
    _, path, _ = api
    status, kind, body = await unix_request(path, "GET", "/dns/look%20up?name=web&name=db&empty=")
    assert (status, kind) == (200, "application/json")
    assert json.loads(body) == {
        "method": "GET",
        "path": "/dns/look up",
        "query": {"name": "web", "empty": ""},
        "body": "",
    }
    status, _, body = await unix_request(path, "POST", "/connect", b'{"addresses": ["10.0.0.1"]}')
    assert status == 200 and json.loads(body)["body"] == '{"addresses": ["10.0.0.1"]}'


@served(control_api)
async def test_a_kept_alive_connection_serves_requests_in_turn(api) -> None:
    _, path, _ = api
    two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await raw(asyncio.open_unix_connection(path), two)
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert b'"path": "/a"' in answer and b'"path": "/b"' in answer


@served(control_api)
async def test_a_body_over_the_limit_is_a_413_and_not_read(api) -> None:
    _, path, metrics = api
    # One write: the server answers once it has the headers and closes, and a client sending the body after them
    # (as http.client does) may find the connection closed under it.
    over = b"POST /connect HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001
    answer = await raw(asyncio.open_unix_connection(path), over)
    assert answer.startswith(b"HTTP/1.1 413 ") and b"1000-byte limit" in answer
    chunked = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"200\r\n" + b"y" * 512 + b"\r\n"
    answer = await raw(asyncio.open_unix_connection(path), chunked * 1 + b"400\r\n" + b"z" * 1024 + b"\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert refused(metrics, "api", "too_large") == 2


@served(control_api)
async def test_headers_over_the_limit_are_a_431_whether_they_come_in_one_piece_or_many(api) -> None:
    _, path, metrics = api
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEADER + b"\r\n\r\n"
    assert (await raw(asyncio.open_unix_connection(path), big)).startswith(b"HTTP/1.1 431 ")
    endless = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * MAX_HEADER)
    assert (await raw(asyncio.open_unix_connection(path), endless)).startswith(b"HTTP/1.1 431 ")
    under = b"GET /fits HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * (MAX_HEADER - 200) + b"\r\n\r\n"
    assert (await raw(asyncio.open_unix_connection(path), under)).startswith(b"HTTP/1.1 200 ")
    assert refused(metrics, "api", "too_large") == 2


@served(control_api)
async def test_what_is_not_http_is_a_400_and_the_connection_closes(api) -> None:
    _, path, metrics = api
    for junk in (
        b"hello there\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ):
        answer = await raw(asyncio.open_unix_connection(path), junk)
        assert answer.startswith(b"HTTP/1.1 400 "), (junk, answer[:80])
    assert refused(metrics, "api", "bad_request") == 3


@served(control_api)
async def test_a_failing_handler_is_a_500_with_one_line_of_json(api) -> None:
    _, path, _ = api
    status, kind, body = await unix_request(path, "GET", "/boom")
    assert (status, kind) == (500, "application/json")
    error = json.loads(body)["error"]
    assert "RuntimeError" in error and "\n" not in error


@served(control_api)
async def test_an_idle_kept_alive_connection_is_closed_quietly_and_a_half_request_is_counted(api) -> None:
    _, path, metrics = api
    assert await raw(asyncio.open_unix_connection(path), b"", wait=5 * TIMEOUT) == b""
    assert refused(metrics, "api", "timeout") == 0
    assert await raw(asyncio.open_unix_connection(path), b"GET / HT", wait=5 * TIMEOUT) == b""
    assert refused(metrics, "api", "timeout") == 1


@served(control_api)
async def test_a_slow_handler_on_the_control_socket_is_waited_for(api) -> None:
    """Attach may wait for a ring or for space from a peer: the control API's deadline is for the client's part."""
    _, path, _ = api
    status, _, _ = await unix_request(path, "GET", "/slow")
    assert status == 200


@served(metrics_port)
async def test_the_public_listener_answers_once_and_closes(public) -> None:
    _, port, _ = public
    answer = await raw(asyncio.open_connection("127.0.0.1", port), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head.lower()
    assert json.loads(body)["path"] == "/metrics"
    post = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    answer = await raw(asyncio.open_connection("127.0.0.1", port), post)
    assert answer.startswith(b"HTTP/1.1 405 ") and b"allow: get, head" in answer.lower()


@served(metrics_port)
async def test_the_public_listener_aborts_what_is_not_answered_in_time(public) -> None:
    _, port, metrics = public
    assert await raw(asyncio.open_connection("127.0.0.1", port), b"", wait=5 * TIMEOUT) == b""
    assert await raw(asyncio.open_connection("127.0.0.1", port), b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    assert refused(metrics, "metrics", "timeout") == 2


@served(metrics_port)
async def test_connections_over_the_cap_are_reset_unread_and_counted(public) -> None:
    listener, port, metrics = public
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await asyncio.sleep(0.1)
    assert metrics.registry.get_sample_value("weft_api_connections", {"listener": "metrics"}) == 2
    over = []
    for _ in range(3):
        with pytest.raises(ConnectionError):  # reset at accept (or at once after)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            over.append(writer)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            if not await asyncio.wait_for(reader.read(), 5):
                raise ConnectionResetError
    assert refused(metrics, "metrics", "conn_limit") == 3
    assert listener.episode.active
    for _, writer in held:
        writer.close()
    await asyncio.sleep(3 * TIMEOUT)
    assert metrics.registry.get_sample_value("weft_api_connections", {"listener": "metrics"}) == 0
    answer = await raw(asyncio.open_connection("127.0.0.1", port), b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")

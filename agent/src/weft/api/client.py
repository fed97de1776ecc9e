"""A small client for the agent's unix-socket API, used by the CLI (and later by Ansible modules).

HTTP/1.1 by hand, one request per connection: the CLI runs once per container attached, and http.client (with the
email parser and ssl it imports) took a fifth of its start-up.
"""

from __future__ import annotations

import json
import socket
from typing import Any

DEFAULT_SOCKET = "/run/weft/weft.sock"
MAX_RESPONSE = 64 << 20  # a report of a large mesh is a few MB; anything past this is not the agent talking


class ApiError(Exception):
    """The agent could not be reached or refused the request; the message says what to do."""


class _Malformed(OSError):
    """The answer is not HTTP we understand."""


def _exchange(path: str, timeout: float, method: str, target: str, payload: bytes | None) -> tuple[int, str, bytes]:
    """One request on a fresh connection; (status, content type, body)."""
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    if payload is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(head.encode() + b"\r\n" + (payload or b""))
        reader = _Reader(sock)
        status_line = reader.line()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise _Malformed(f"not an HTTP answer: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        while line := reader.line():
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise _Malformed(f"bad header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = reader.chunked()
        elif "content-length" in headers:
            try:
                body = reader.exactly(int(headers["content-length"]))
            except ValueError:
                raise _Malformed("bad Content-Length") from None
        else:
            body = reader.rest()
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return int(parts[1]), content_type, body


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._eof = False

    def _fill(self) -> None:
        if self._eof:
            raise _Malformed("the agent closed the connection before its answer was complete")
        data = self._sock.recv(65536)
        if not data:
            self._eof = True
        if len(self._buf) + len(data) > MAX_RESPONSE:
            raise _Malformed("answer too large")
        self._buf += data

    def line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            self._fill()
        line, self._buf = self._buf[:end], self._buf[end + 2 :]
        return line

    def exactly(self, n: int) -> bytes:
        if n < 0 or n > MAX_RESPONSE:
            raise _Malformed("bad Content-Length")
        while len(self._buf) < n:
            self._fill()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def rest(self) -> bytes:
        while not self._eof:
            self._fill()
        data, self._buf = self._buf, b""
        return data

    def chunked(self) -> bytes:
        out = []
        while True:
            size_text = self.line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _Malformed(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while self.line():  # trailers, then the blank line
                    pass
                return b"".join(out)
            out.append(self.exactly(size))
            self.line()  # the CRLF after the chunk


class Client:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else None
        try:
            status, content_type, data = _exchange(self.socket_path, self.timeout, method, path, payload)
        except FileNotFoundError:
            raise ApiError(
                f"no agent API at {self.socket_path}: is the agent running? "
                "(start it with 'weft run' or 'systemctl start weft'; use --api-socket "
                "or WEFT_API_SOCKET for another socket)"
            ) from None
        except PermissionError:
            raise ApiError(f"permission denied on {self.socket_path}: the API is for root only") from None
        except (ConnectionError, TimeoutError, OSError) as exc:
            raise ApiError(f"cannot talk to the agent at {self.socket_path}: {exc}") from None
        if content_type != "application/json":
            if status >= 400:
                raise ApiError(f"agent answered {status}")
            return data.decode()
        decoded = json.loads(data)
        if status >= 400:
            raise ApiError(decoded.get("error", f"agent answered {status}"))
        return decoded

    def status(self) -> dict:
        return self.request("GET", "/status")

    def connect(self, addresses: list[str], replace: bool = False) -> dict:
        return self.request("POST", "/connect", {"addresses": addresses, "replace": replace})

    def forget(self, addresses: list[str]) -> dict:
        return self.request("POST", "/forget", {"addresses": addresses})

"""A small client for the agent's unix-socket API, used by the CLI (and later by Ansible modules)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from weft.api import DEFAULT_SOCKET


class ApiError(Exception):
    """The agent could not be reached or refused the request; the message says what to do."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Client:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
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
        finally:
            conn.close()
        if response.headers.get_content_type() != "application/json":
            if response.status >= 400:
                raise ApiError(f"agent answered {response.status}")
            return data.decode()
        decoded = json.loads(data)
        if response.status >= 400:
            raise ApiError(decoded.get("error", f"agent answered {response.status}"))
        return decoded

    def status(self) -> dict:
        return self.request("GET", "/status")

    def connect(self, addresses: list[str], replace: bool = False) -> dict:
        return self.request("POST", "/connect", {"addresses": addresses, "replace": replace})

    def forget(self, addresses: list[str]) -> dict:
        return self.request("POST", "/forget", {"addresses": addresses})

"""The readiness message reaches a real notify socket, path or abstract, and is silent outside systemd."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from weft.sdnotify import notify


def test_ready_reaches_a_socket_at_a_path(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        assert notify("READY=1", {"NOTIFY_SOCKET": path})
        assert server.recv(64) == b"READY=1"


def test_ready_reaches_an_abstract_socket() -> None:
    name = f"weft-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert server.recv(64) == b"READY=1"


def test_without_systemd_nothing_is_sent() -> None:
    assert not notify("READY=1", {})


def test_a_dead_socket_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})

import os
import socket

import pytest

from ansible_collections.weft.mesh.plugins.module_utils.weft_api import (
    WeftApi,
    WeftApiError,
    direct_targets,
    normalize_address,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", "10.0.0.1:6783"),
        (" 10.0.0.1:7000 ", "10.0.0.1:7000"),
        ("host.example", "host.example:6783"),
        ("2001:db8::1", "[2001:db8::1]:6783"),
        ("[2001:db8::1]", "[2001:db8::1]:6783"),
        ("[2001:db8::1]:7000", "[2001:db8::1]:7000"),
    ],
)
def test_normalize_address(text, expected):
    assert normalize_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty peer address"),
        ("a:0", "port must be a number"),
        (":6783", "missing host"),
        ("[nope]:1", "is not HOST[:PORT]"),
        ("[::1", "missing ']'"),
        ("[::1]x", "expected ':PORT'"),
        ("a::b::c", "is not HOST[:PORT]"),
    ],
)
def test_normalize_address_errors(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        normalize_address(text)


def test_direct_targets_leave_out_discovered():
    status = {
        "targets": [
            {"address": "b:1", "origin": "api"},
            {"address": "c:1", "origin": "discovered"},
            {"address": "a:1", "origin": "config"},
        ]
    }
    assert direct_targets(status) == ["a:1", "b:1"]


def test_stale_socket(tmp_path):
    path = str(tmp_path / "stale.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)  # bound but never listening: what a killed agent leaves behind
    try:
        with pytest.raises(WeftApiError, match=r"nothing answers on .*stale\.sock"):
            WeftApi(path).status()
    finally:
        sock.close()


def test_http_error_carries_agent_message(agent):
    with pytest.raises(WeftApiError, match=r"refused POST /attach \(HTTP 400\): give at least one address"):
        WeftApi(agent.path).attach({"netns": "x", "cidrs": []})


def test_unknown_path(agent):
    with pytest.raises(WeftApiError, match="HTTP 404"):
        WeftApi(agent.path).request("GET", "/nope")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can open any socket")
def test_permission_denied(agent):
    os.chmod(agent.path, 0)
    with pytest.raises(WeftApiError, match="root only"):
        WeftApi(agent.path).status()

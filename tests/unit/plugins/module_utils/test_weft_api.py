import json
import os
import socket
from pathlib import Path

import pytest

from ansible_collections.weft.mesh.plugins.module_utils.weft_api import (
    DEFAULT_PORT,
    WeftApi,
    WeftApiError,
    direct_targets,
    normalize_address,
)

ROOT = Path(__file__).resolve().parents[4]

# The agent's table of peer addresses: this twin and weft.mesh.address.peer_address must agree on every case.
CASES = json.loads((ROOT / "agent" / "tests" / "unit" / "data" / "peer_addresses.json").read_text())


@pytest.mark.parametrize("case", CASES["accepted"], ids=lambda c: repr(c["input"])[:40])
def test_normalize_address_gives_the_agents_canonical_form(case):
    port = case.get("default_port", DEFAULT_PORT)
    assert normalize_address(case["input"], port) == case["canonical"]
    assert normalize_address(case["canonical"], port) == case["canonical"]


@pytest.mark.parametrize("case", CASES["refused"], ids=lambda c: repr(c["input"])[:40])
def test_normalize_address_refuses_what_the_agent_refuses(case):
    text = case["input"]
    with pytest.raises(ValueError) as info:
        normalize_address(text)
    message = str(info.value)
    assert case["mentions"] in message
    assert "\n" not in message and len(message) < 300
    if text.strip() and len(text) <= 80:
        assert repr(text.strip()) in message


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

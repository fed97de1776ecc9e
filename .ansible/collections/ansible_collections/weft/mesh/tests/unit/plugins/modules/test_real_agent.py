"""The modules against a real agent (control plane only, no root needed), when the agent's package is
importable, as in the project venv: this is what keeps the fake agent and the modules honest about the API."""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from ansible_collections.weft.mesh.plugins.modules import weft_info, weft_peers

pytestmark = pytest.mark.skipif(importlib.util.find_spec("weft") is None, reason="the weft agent is not installed")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real_agent():
    directory = tempfile.mkdtemp(prefix="weft-ut-")
    sock = os.path.join(directory, "weft.sock")
    cmd = [
        sys.executable,
        "-c",
        "from weft.cli import main; main()",
        "run",
        "--no-datapath",
        "--no-discovery",
        "--listen",
        "127.0.0.1:%d" % free_port(),
        "--metrics-addr",
        "127.0.0.1:%d" % free_port(),
        "--api-socket",
        sock,
        "--state-dir",
        os.path.join(directory, "state"),
        "--nickname",
        "ut",
        "--peer",
        "127.0.0.1:1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    proc = subprocess.Popen(cmd, env=dict(env, WEFT_CONFIG=os.devnull), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the agent did not start: %s" % proc.stderr.read())
            time.sleep(0.1)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(directory)


def test_info_and_peers_round_trip(real_agent, run_module):
    info = run_module(weft_info.main, {"api_socket": real_agent})
    assert info["weft"]["nickname"] == "ut"
    assert [(t["address"], t["origin"]) for t in info["weft"]["targets"]] == [("127.0.0.1:1", "config")]

    args = {"api_socket": real_agent, "peers": ["127.0.0.1:2", "127.0.0.1:1"]}
    added = run_module(weft_peers.main, args)
    assert added["changed"] is True and added["added"] == ["127.0.0.1:2"]
    assert added["targets"] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert run_module(weft_peers.main, args)["changed"] is False

    only = run_module(weft_peers.main, {"api_socket": real_agent, "peers": ["127.0.0.1:3"], "exclusive": True})
    assert only["changed"] is True and only["targets"] == ["127.0.0.1:3"]

    gone = run_module(weft_peers.main, {"api_socket": real_agent, "peers": ["127.0.0.1:3"], "state": "absent"})
    assert gone["changed"] is True and gone["targets"] == []

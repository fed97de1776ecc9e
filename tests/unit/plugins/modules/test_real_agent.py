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

from ansible_collections.weft.mesh.plugins.modules import weft_dns, weft_info, weft_peers, weft_rmpeer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("weft") is None, reason="the weft agent is not installed")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ME = "02:00:00:00:0a:01"
DEAD = "02:00:00:00:0a:02"  # in the seed, never started: it owns half the ring and nobody reaches it


@pytest.fixture(scope="module")
def real_agent():
    yield from start_agent()


@pytest.fixture(scope="module")
def seeded_agent():
    """An agent whose first ring is seeded with itself and a peer that never comes."""
    yield from start_agent("--name", ME, "--ipalloc-init", "seed=%s,%s" % (ME, DEAD), "--ipalloc-range", "10.44.0.0/16")


def start_agent(*extra):
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
        *extra,
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


def test_rmpeer_and_the_ring_round_trip(seeded_agent, run_module):
    info = run_module(weft_info.main, {"api_socket": seeded_agent, "ipam": True})
    ring = info["weft"]["ipam"]
    assert ring["range"] == "10.44.0.0/16" and ring["state"] == "ready", ring
    owners = {p["name"]: p for p in ring["peers"]}
    assert owners[DEAD]["reachable"] is False and owners[DEAD]["addresses"] > 0 and owners[ME]["ourself"]

    args = {"api_socket": seeded_agent, "peers": [DEAD]}
    checked = run_module(weft_rmpeer.main, args, check_mode=True, diff=True)
    assert checked["changed"] is True and checked["reclaimed"] == {DEAD: owners[DEAD]["addresses"]}
    done = run_module(weft_rmpeer.main, args)
    assert done["changed"] is True and done["reclaimed"] == {DEAD: owners[DEAD]["addresses"]}
    again = run_module(weft_rmpeer.main, args)
    assert again["changed"] is False and again["reclaimed"] == {}
    after = run_module(weft_info.main, {"api_socket": seeded_agent, "ipam": True})["weft"]["ipam"]
    assert sum(p["addresses"] for p in after["peers"] if p["name"] == DEAD) == 0

    itself = run_module(weft_rmpeer.main, {"api_socket": seeded_agent, "peers": [ME]})
    assert itself.failed and "is this agent itself" in itself["msg"]


def test_dns_without_the_data_plane_says_it_is_off(real_agent, run_module):
    # DNS needs the data plane (the address on the bridge), which this agent runs without: the lab runs the real one.
    for check_mode in (True, False):
        args = {"api_socket": real_agent, "name": "db", "addresses": ["10.32.9.9"]}
        result = run_module(weft_dns.main, args, check_mode=check_mode)
        assert result.failed and "DNS is off on the agent" in result["msg"], result

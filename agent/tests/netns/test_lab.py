"""Tests for the netns lab harness itself, so agent-test failures can be trusted to be agent bugs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lab import Lab, metric_value, netns_unavailable_reason, wait_until

# A stand-in for weft.cli: just enough of `run` and `status --json` to drive every agent helper
# without depending on the real agent, which is being written concurrently.
FAKE_CLI = r"""
import http.server, json, os, signal, socket, sys, threading

BODY = (
    b'# TYPE weft_peers gauge\nweft_peers{state="up"} 2\nweft_peers{state="down"} 1\n'
    b'# TYPE weft_rx counter\nweft_rx_total 5\n'
)


def opt(argv, flag):
    return argv[argv.index(flag) + 1]


class Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


def run(argv):
    os.makedirs(opt(argv, "--state-dir"), exist_ok=True)
    secret_files = [argv[i + 1] for i, a in enumerate(argv) if a == "--secret-file"]
    info = {
        "argv": argv,
        "pid": os.getpid(),
        "netns_ino": os.stat("/proc/self/ns/net").st_ino,
        "secrets": [[open(p).read(), os.stat(p).st_mode & 0o777] for p in secret_files],
    }
    host, port = opt(argv, "--metrics-addr").rsplit(":", 1)
    httpd = http.server.HTTPServer((host, int(port)), Metrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    path = opt(argv, "--api-socket")
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()

    def api():
        while True:
            conn, _ = srv.accept()
            conn.sendall(json.dumps(info).encode())
            conn.close()

    threading.Thread(target=api, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    print("fake agent up", flush=True)
    while True:
        signal.pause()


def status(argv):
    s = socket.socket(socket.AF_UNIX)
    s.connect(opt(argv, "--api-socket"))
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    sys.stdout.write(b"".join(chunks).decode())


if __name__ == "__main__":
    run(sys.argv[1:]) if "run" in sys.argv else status(sys.argv[1:])
"""


def _require_netns() -> None:
    """Tests that build their own Lab skip the same way the fixture does."""
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- namespaces ---------------------------------------------------------------------------------


@pytest.mark.netns
def test_hosts_reach_each_other(lab: Lab) -> None:
    hosts = lab(3)
    assert [h.name for h in hosts] == ["h1", "h2", "h3"]
    assert [h.ip for h in hosts] == ["10.99.0.11", "10.99.0.12", "10.99.0.13"]
    assert all(h.netns.startswith("wt") for h in hosts)
    assert len({h.netns for h in hosts}) == 3
    assert hosts[0].agent_name == "02:00:00:00:00:01"
    out = hosts[0].exec("ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout
    assert "10.99.0.11/16" in out
    assert "UP" in hosts[0].exec("ip", "link", "show", "lo").stdout
    for a in hosts:
        for b in hosts:
            if a is not b:
                assert a.can_reach(b), f"{a.name} cannot reach {b.name}"


@pytest.mark.netns
def test_block_affects_exactly_that_pair(lab: Lab) -> None:
    h1, h2, h3 = lab(3)
    lab.block(h1, h2)
    assert lab.blocked_pairs == {frozenset({"h1", "h2"})}
    assert not h1.can_reach(h2, timeout=0.5)
    assert not h2.can_reach(h1, timeout=0.5)
    assert h1.can_reach(h3)
    assert h3.can_reach(h2)
    lab.unblock("h1", "h2")
    assert h1.can_reach(h2)
    assert h2.can_reach(h1)

    lab.partition([h1], [h2, h3])
    assert not h3.can_reach(h1, timeout=0.5)
    assert h2.can_reach(h3)
    lab.heal()
    assert lab.blocked_pairs == set()
    assert h1.can_reach(h3)
    assert h3.exec("nft", "list", "tables").stdout.strip() == ""


@pytest.mark.netns
def test_capture_sees_udp_marker(lab: Lab) -> None:
    h1, h2 = lab(2)
    marker = f"weft-marker-{os.getpid()}-{time.monotonic_ns()}"
    on_wire = lab.capture("underlay", "udp port 9999")
    at_h2 = lab.capture(h2, "udp port 9999")
    send = (
        "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        f" s.sendto(sys.argv[1].encode(), ({h2.ip!r}, 9999))"
    )
    h1.exec(sys.executable, "-c", send, marker)
    for cap in (on_wire, at_h2):
        wait_until(lambda cap=cap: marker.encode() in cap.payload_bytes(), timeout=5, message="marker not seen")
        cap.stop()
        assert cap.packet_count() == 1
        assert marker.encode() in cap.packets()[0]


@pytest.mark.netns
def test_agent_helpers_against_fake_agent(tmp_path: Path) -> None:
    _require_netns()
    fake = tmp_path / "fake"
    (fake / "weft").mkdir(parents=True)
    (fake / "weft" / "__init__.py").write_text("")
    (fake / "weft" / "cli.py").write_text(textwrap.dedent(FAKE_CLI))
    with Lab(2, extra_pythonpath=[fake]) as lab:
        h1, h2 = lab.hosts
        proc = h1.start_agent("--extra", peers=[h2, "10.99.9.9:6783"], secrets=["s3cret"])
        h2.start_agent()  # same metrics port in another namespace must not clash
        status = h1.wait_ready(timeout=10)
        h2.wait_ready(timeout=10)
        assert status == h1.status()
        # `ip netns exec` execs rather than forks, so the PID we hold (and kill) is the agent's own.
        assert status["pid"] == proc.pid
        assert status["netns_ino"] == os.stat(f"/run/netns/{h1.netns}").st_ino
        argv = status["argv"]
        expected = [
            "run", "--name", "02:00:00:00:00:01", "--nickname", "h1", "--listen", "10.99.0.11:6783",
            "--state-dir", str(h1.state_dir), "--api-socket", str(h1.api_socket),
            "--metrics-addr", "127.0.0.1:6782", "--log-level", "debug",
            "--peer", "10.99.0.12:6783", "--peer", "10.99.9.9:6783",
        ]  # fmt: skip
        assert argv[: len(expected)] == expected
        assert argv[len(expected) :][-1] == "--extra"
        assert status["secrets"] == [["s3cret", 0o600]]

        text = h1.metrics()
        assert metric_value(text, "weft_peers") == 3
        assert metric_value(text, "weft_peers", state="up") == 2
        assert metric_value(text, "weft_rx") == 5

        assert h1.agent_running()
        assert h1.kill_agent() == 0
        assert not h1.agent_running()
        assert "fake agent up" in h1.agent_log()

        proc2 = h1.start_agent(resume=True)
        assert "--resume" in h1.wait_ready(timeout=10)["argv"]
        assert proc2.pid != proc.pid
        assert h1.agent_log().count("=== lab: starting agent") == 2
        h1.kill_agent(signal.SIGKILL)
        assert proc2.returncode == -signal.SIGKILL


@pytest.mark.netns
def test_teardown_leaves_nothing_behind() -> None:
    _require_netns()
    links_before = _root_links()
    with pytest.raises(RuntimeError, match="test body failed"), Lab(2, stop_grace=0.5) as lab:
        h1, h2 = lab.hosts
        sleeper = h1.popen("sleep", "60")
        # Ignores SIGTERM: teardown must escalate to SIGKILL.
        stubborn = h2.popen(
            sys.executable,
            "-c",
            "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
        )
        capture = lab.capture("underlay", "udp")
        namespaces = set(lab.namespaces)
        tmp_dir = lab.tmp_dir
        assert namespaces <= _netns_names()
        assert len(namespaces) == 3  # underlay + 2 hosts
        assert _root_links() == links_before, "lab must not create links in the root namespace"
        pids = [sleeper.pid, stubborn.pid, capture.proc.pid]
        assert all(_alive(p) for p in pids)
        raise RuntimeError("test body failed")
    assert not namespaces & _netns_names()
    assert not any(_alive(p) for p in pids)
    assert tmp_dir is not None
    assert not tmp_dir.exists()
    assert _root_links() == links_before
    lab.close()  # idempotent

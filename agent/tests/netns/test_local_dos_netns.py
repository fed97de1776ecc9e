"""A local user without privileges cannot take the agent down through its listeners."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lab import METRICS_PORT, Host, Lab, LabProcess, metric_value, wait_until

from weft.api.client import Client, _UnixConnection

FLOOD = 20_000
PROCESSES = 4
# Opens its share of idle connections to the metrics port, says so, and holds them without sending a byte.
ATTACKER = r"""
import socket, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    except OSError as e:
        print("connect failed:", e, flush=True)
        s.close()
        break
    held.append(s)
print("opened", len(held), flush=True)
time.sleep(3600)
"""


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def status_seconds(host: Host) -> float:
    """How long the API takes to answer a status request (what `weft status` waits for)."""
    started = time.monotonic()
    Client(str(host.api_socket), timeout=5.0).status()
    return time.monotonic() - started


def start_attackers(host: Host, total: int) -> list[LabProcess]:
    """As `nobody`, with a file limit root grants it, spread over a few processes."""
    share = total // PROCESSES
    procs = []
    for i in range(PROCESSES):
        procs.append(
            host.popen(
                "prlimit",
                f"--nofile={share + 100}:{share + 100}",
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                ATTACKER,
                str(share),
                str(METRICS_PORT),
                log_name=f"attacker-{i}.log",
            )
        )
    return procs


def test_idle_connection_flood_on_the_metrics_port_does_not_take_the_agent_down(lab: Lab) -> None:
    h1, h2 = lab(2)
    agent = h1.start_agent()
    h1.wait_ready()
    for _ in range(3):
        status_seconds(h1)
    fds_before, rss_before = fd_count(agent.pid), rss_mb(agent.pid)

    attackers = start_attackers(h1, FLOOD)
    wait_until(
        lambda: all("opened" in p.read_log() for p in attackers),
        timeout=60,
        message=lambda: (
            "attackers did not open their connections: " + " | ".join(p.read_log()[-200:] for p in attackers)
        ),
    )
    opened = sum(int(p.read_log().split("opened")[1].split()[0]) for p in attackers)
    assert opened == FLOOD, [p.read_log() for p in attackers]
    time.sleep(3)  # let the flood reach the listener

    # During the flood: the API keeps answering within a second, and a new peer joins.
    h2.start_agent(peers=[h1])
    latencies = []
    fds_during = [fd_count(agent.pid)]
    joined = False
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (joined and len(latencies) >= 10):
        latencies.append(status_seconds(h1))
        fds_during.append(fd_count(agent.pid))
        joined = joined or any(
            c["state"] == "established" and c["nickname"] == "h2" for c in h1.status()["connections"]
        )
        time.sleep(0.3)
    cli_started = time.monotonic()
    human = h1.cli("status", timeout=10).stdout
    cli_seconds = time.monotonic() - cli_started
    print(f"status latency during the flood: max {max(latencies):.3f}s over {len(latencies)}; CLI {cli_seconds:.2f}s")
    print(f"agent fds during the flood: at most {max(fds_during)} (before {fds_before})")
    assert joined, "h2 did not join h1 during the flood"
    assert max(latencies) < 1.0, f"status took up to {max(latencies):.2f}s during the flood"
    assert "Peers: 2" in human
    # At most the cap, plus refused connections between accept and close (one accept burst is the backlog, 100).
    assert max(fds_during) < fds_before + 500, "the agent holds a file per idle connection"

    for p in attackers:
        p.kill()
        p.wait(10)
    # Connections the kernel completed for the attackers are still queued; once they drain, all is as before.
    metrics = wait_until(h1.metrics, timeout=30, message="the metrics listener did not recover after the flood")
    refused = metric_value(metrics, "weft_api_connections_refused", listener="metrics")
    assert refused > FLOOD / 2, f"only {refused} refused connections counted"
    time.sleep(2)
    wait_until(lambda: fd_count(agent.pid) <= fds_before + 5, timeout=30, message="the agent's FDs stayed up")
    rss_after = wait_until(
        lambda: (r := rss_mb(agent.pid)) <= rss_before + 10 and r,
        timeout=30,
        message=lambda: f"RSS {rss_mb(agent.pid):.1f} MB, was {rss_before:.1f} MB",
    )
    print(f"agent RSS {rss_before:.1f} -> {rss_after:.1f} MB, fds {fds_before} -> {fd_count(agent.pid)}")
    # The episode's end is logged once the listener has been quiet for a while (10 s).
    wait_until(
        lambda: "metrics listener: below its connection cap again" in h1.agent_log(),
        timeout=30,
        message="the end of the flood was not logged",
    )
    log = h1.agent_log()
    episodes = [line for line in log.splitlines() if "metrics listener" in line]
    assert 2 <= len(episodes) <= 8, f"the cap was not logged once per episode: {len(episodes)} lines"
    assert "ERROR asyncio" not in log and "Traceback" not in log
    assert h1.agent_running()


def post(host: Host, path: str, body: bytes) -> tuple[int, str]:
    """POST raw bytes to the API socket, as a buggy or hostile client might."""
    conn = _UnixConnection(str(host.api_socket), 10.0)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_malformed_api_requests_get_a_one_line_4xx(lab: Lab) -> None:
    (h1,) = lab(1)
    h1.start_agent()
    h1.wait_ready()
    generic = {
        b"[" * 20_000 + b"]" * 20_000: 400,  # nested deeper than any parser should follow
        b'{"a":' * 5_000 + b"1" + b"}" * 5_000: 400,
        b"[]": 400,
        b'"addresses"': 400,
        b"not json": 400,
        b"\xff\xfe": 400,
        b'{"addresses": ["' + b"x" * 200_000 + b'"]}': 413,
    }
    typed = {
        "/connect": [b'{"addresses": "10.0.0.1"}', b'{"addresses": [1]}', b'{"addresses": ["h"], "replace": "yes"}'],
        "/forget": [b'{"addresses": {"a": 1}}', b"{}"],
        "/attach": [b'{"cidrs": "10.32.0.1/12"}', b'{"cidrs": [5]}'],
    }
    cases = [
        (path, body, code)
        for path in ("/connect", "/forget", "/attach", "/detach", "/expose", "/hide")
        for body, code in generic.items()
    ]
    cases += [(path, body, 400) for path, bodies in typed.items() for body in bodies]
    for path, body, code in cases:
        status, text = post(h1, path, body)
        assert status == code, f"POST {path} {body[:40]!r}: {status} {text[:200]}"
        error = json.loads(text)["error"]
        assert error and "\n" not in error, error
    assert h1.agent_running()
    log = h1.agent_log()
    assert "Traceback" not in log and "Error handling request" not in log

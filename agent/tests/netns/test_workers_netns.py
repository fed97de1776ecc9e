"""Two forwarding workers on the encrypted path, with real agents: a 4-stream transfer arrives intact, both workers
carry it, and every datagram they sent is refused when replayed. One host starts with a single-queue TAP, as a
release before the workers left it: the agent replaces it with a multi-queue one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from lab import Container, Host, Lab, metric_value, wait_until
from sleevemesh import messages, split_datagrams
from test_datapath_netns import _last_json, wait_paths

pytestmark = pytest.mark.netns

TRAFFIC = str(Path(__file__).resolve().parent.parent / "harness" / "traffic.py")
SECRET = "workers-test-secret"
MB = 1024 * 1024
PORT = 6783


def worker_bytes(host: Host, direction: str) -> list[float]:
    text = host.metrics()
    return [metric_value(text, "weft_datapath_worker_bytes", worker=str(w), direction=direction) for w in (0, 1)]


def streams(src: Container, dst: Container, size: int, *, base_port: int, n: int = 4) -> None:
    """``n`` TCP streams of ``size`` bytes at once; each must arrive with the SHA-256 it was sent with."""
    receivers = [dst.popen(sys.executable, TRAFFIC, "recv", str(base_port + i)) for i in range(n)]
    for r in receivers:
        wait_until(lambda r=r: "listening" in r.read_log(), timeout=10, message="receiver did not start")
    senders = [
        src.popen(sys.executable, TRAFFIC, "send", dst.ip, str(base_port + i), str(size), "--seed", str(base_port + i))
        for i in range(n)
    ]
    for s in senders:
        s.wait(600)
    for i, (s, r) in enumerate(zip(senders, receivers, strict=True)):
        r.wait(60)
        sent, got = _last_json(s.read_log()), _last_json(r.read_log())
        assert got == sent and got["bytes"] >= size, f"stream {i}: sent {sent}, received {got}"
        assert len(got["sha256"]) == 64


def test_two_workers_carry_four_streams_intact_and_refuse_every_replay(lab: Lab) -> None:
    h1, h2 = lab(2)
    for h in (h1, h2):  # no IPv6 chatter (router solicitations, MLD) crossing while replays must deliver nothing
        h.exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    # What a release before the workers left on h2: a single-queue TAP, which takes one worker only.
    h2.exec("ip", "tuntap", "add", "dev", "weft-tap", "mode", "tap", "vnet_hdr")
    for h in (h1, h2):
        peers = [h1] if h is h2 else []
        h.start_agent("--datapath-workers", "2", peers=peers, secrets=[SECRET])
    for h in (h1, h2):
        h.wait_ready()
    assert "multi_queue" in h2.exec("ip", "-d", "link", "show", "weft-tap").stdout
    assert "2 worker(s)" in h1.agent_log() and "2 worker(s)" in h2.agent_log()
    wait_paths(h1, {"h2": "sleeve"})
    wait_paths(h2, {"h1": "sleeve"})
    c1, c2 = h1.add_container("10.32.1.1/16"), h2.add_container("10.32.2.1/16")
    for c in (c1, c2):
        c.exec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
    wait_until(lambda: c1.ping(c2), timeout=20, message="no ping across")

    # Every datagram h1's workers send during a 4-stream transfer, captured on h1's underlay interface.
    tx0 = worker_bytes(h1, "tx")
    with lab.capture(h1, f"udp and src host {h1.ip} and dst host {h2.ip} and dst port {PORT}") as capture:
        streams(c1, c2, 4 * MB, base_port=5100)
    tx1 = worker_bytes(h1, "tx")
    assert all(b > a for a, b in zip(tx0, tx1, strict=True)), f"a worker of h1 sent nothing: {tx0} -> {tx1}"
    datagrams = [d for p in capture.packets() if len(p) > 42 for d in split_datagrams(p[42:])]
    captured = {
        key: [chunks[i] for i in sorted(chunks)]
        for key, chunks in messages(datagrams).items()
        if len(chunks) == chunks[min(chunks)][12]  # every chunk of the message (cnt is the header's 13th byte)
    }
    assert len(captured) > 100, f"only {len(captured)} whole messages captured"

    # The 4-stream transfer the acceptance asks for: intact, and both workers on both hosts carried it. It also
    # moves the receiver's replay window far past every captured counter.
    rx0, tx0 = worker_bytes(h2, "rx"), worker_bytes(h1, "tx")
    streams(c1, c2, 75 * MB, base_port=5200)
    rx1, tx1 = worker_bytes(h2, "rx"), worker_bytes(h1, "tx")
    assert all(b - a > 10 * MB for a, b in zip(tx0, tx1, strict=True)), f"h1 workers sent {tx0} -> {tx1}"
    assert all(b - a > 10 * MB for a, b in zip(rx0, rx1, strict=True)), f"h2 workers received {rx0} -> {rx1}"

    # Replayed into h2, from h1's address: every message refused as a replay, nothing reaches the TAP.
    before = h2.metrics()
    script = f"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{h1.ip}", 0))
for n, message in enumerate(json.load(sys.stdin)):
    for d in message:
        s.sendto(bytes.fromhex(d), ("{h2.ip}", {PORT}))
    if n % 16 == 15:
        time.sleep(0.002)
"""
    payload = json.dumps([[d.hex() for d in chunks] for chunks in captured.values()])
    h1.exec(sys.executable, "-c", script, input=payload, timeout=120)

    def grew(reason: str) -> float:
        after = h2.metrics()
        name = "weft_datapath_packets_dropped_total"
        return metric_value(after, name, reason=reason) - metric_value(before, name, reason=reason)

    wait_until(lambda: grew("replay") >= len(captured), timeout=20, message=lambda: f"replays: {grew('replay')}")
    after = h2.metrics()
    assert grew("replay") == len(captured)
    assert grew("auth") == 0 and grew("incomplete") == 0
    for path in ("sleeve", "relay"):
        name = "weft_datapath_bytes_total"
        delivered = metric_value(after, name, path=path, direction="rx") - metric_value(
            before, name, path=path, direction="rx"
        )
        assert delivered == 0, f"{delivered} bytes of replays delivered on {path}"
    assert c1.ping(c2)

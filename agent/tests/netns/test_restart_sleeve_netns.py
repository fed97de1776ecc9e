"""The encrypted path comes back after each restart of an agent, with the same path and encryption on both ends."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest
from lab import HARNESS, Container, Host, Lab, LabProcess, wait_until
from test_datapath_netns import SECRET, datapaths, start_mesh

pytestmark = [pytest.mark.netns, pytest.mark.slow]

FLOW = str(HARNESS / "udpflow.py")
RATE = 200  # datagrams a second, each echoed back
PORT = 7001


class Flow:
    """udpflow.py: numbered datagrams from ``src`` to an echo in ``dst``; the echoes counted as they come."""

    def __init__(self, src: Container, dst: Container) -> None:
        self.echo = dst.popen(sys.executable, FLOW, "echo", str(PORT), log_name=f"echo-{dst.name}.log")
        wait_until(lambda: "listening" in self.echo.read_log(), timeout=10, message="the echo did not start")
        self.sender = src.popen(
            sys.executable, FLOW, "send", dst.ip, str(PORT), "--rate", str(RATE), "--progress", "0.1",
            log_name=f"send-{dst.name}.log",
        )  # fmt: skip

    def echoed(self) -> int:
        """Echoes received so far (from the sender's last progress line)."""
        for line in reversed(self.sender.read_log().splitlines()):
            if line.startswith('{"sent"'):
                return json.loads(line)["echoed"]
        return 0

    def wait_flowing(self, more_than: int, what: str) -> int:
        """Until a second's worth of echoes beyond ``more_than``: traffic goes both ways again."""
        return wait_until(
            lambda: (n := self.echoed()) > more_than + RATE and n,
            timeout=30,
            interval=0.1,
            message=lambda: f"no traffic {what}: {self.echoed()} echoes, {more_than} before",
        )

    def stop(self) -> dict:
        for proc in (self.sender, self.echo):
            proc.send_signal(signal.SIGINT)
            proc.wait(15)
        return _result(self.sender)


def _result(proc: LabProcess) -> dict:
    for line in reversed(proc.read_log().splitlines()):
        if line.startswith('{"done"'):
            return json.loads(line)
    raise AssertionError(f"no result from udpflow: {proc.read_log()[-2000:]}")


def _connections(host: Host) -> dict[str, tuple[str, bool, str | None]]:
    """Peer nickname -> (state, encrypted, data path) of each connection row."""
    return {
        r["nickname"]: (r["state"], r["encrypted"], (r.get("datapath") or {}).get("path"))
        for r in host.status()["connections"]
        if r.get("nickname")
    }


def test_the_encrypted_path_comes_back_after_each_restart_with_the_same_path(lab: Lab) -> None:
    hosts, cs = start_mesh(lab, 3, secret=True, containers=1)
    h1, h2, h3 = hosts
    sleeve = {h.name: {o.name: ("established", True, "sleeve") for o in hosts if o is not h} for h in hosts}
    for h in hosts:
        wait_until(lambda h=h: _connections(h) == sleeve[h.name], timeout=30, message=lambda h=h: f"{_connections(h)}")
    flow = Flow(cs[0][0], cs[1][0])
    flow.wait_flowing(0, "before the first restart")
    restarts = [signal.SIGTERM] * 5 + [signal.SIGKILL]  # as systemd restarts it, and once a crash
    try:
        for i, sig in enumerate(restarts):
            h2.kill_agent(sig)  # and wait for it to exit, as systemd does
            time.sleep(0.3)  # the sender's progress lines catch up: nothing is echoed while h2's agent is away
            before = flow.echoed()
            h2.start_agent(peers=[h1, h3], secrets=[SECRET])
            flow.wait_flowing(before, f"after restart {i + 1} of h2's agent ({signal.Signals(sig).name})")
            # Both ends of both of h2's connections: established, encrypted, on the sleeve, as before the restart.
            for h in hosts:
                wait_until(
                    lambda h=h: _connections(h) == sleeve[h.name],
                    timeout=30,
                    message=lambda h=h, i=i: f"{h.name} after restart {i + 1}: {_connections(h)}, {datapaths(h)}",
                )
    finally:
        result = flow.stop()
    gaps = sorted((round(b - a, 3) for a, b in result["gaps"]), reverse=True)
    lost = result["sent"] - result["echoed"]
    print(
        f"\n{len(restarts)} restarts of h2's agent under {RATE} echoed datagrams a second: {result['sent']} sent,"
        f" {lost} lost ({lost / RATE:.2f} s worth), longest gaps {gaps[: len(restarts)]} s"
    )
    assert result["echoed"] > 0, result

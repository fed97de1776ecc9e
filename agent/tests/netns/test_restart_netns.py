"""The kernel fast path keeps forwarding while an agent restarts: a peer's entries outlive its agent's runs."""

from __future__ import annotations

import re
import signal
import time

import pytest
from lab import Container, Host, Lab, wait_until
from test_datapath_netns import datapaths, start_mesh, wait_paths

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PING_INTERVAL = 0.01  # 100 packets a second


class Pinger:
    """A continuous ``ping -i 0.01`` from one container to another; counts what was sent and lost."""

    def __init__(self, src: Container, dst: Container) -> None:
        self.proc = src.popen("ping", "-n", "-i", str(PING_INTERVAL), "-W", "1", dst.ip, log_name="pinger.log")
        wait_until(lambda: "bytes from" in self.proc.read_log(), timeout=10, message="the pinger got no answer")

    def stop(self) -> tuple[int, int]:
        """(transmitted, received) from ping's summary."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        log = self.proc.read_log()
        found = re.search(r"(\d+) packets transmitted, (\d+) received", log)
        assert found, log[-2000:]
        return int(found.group(1)), int(found.group(2))


def _restart(host: Host, sig: int, *, stopped_for: float = 0.0) -> None:
    host.kill_agent(sig)
    if stopped_for:
        time.sleep(stopped_for)
    host.start_agent(resume=True)
    host.wait_ready()


def _both_fast(a: Host, b: Host, timeout: float = 20) -> None:
    """Both ends say fast: they decide from the same evidence, so they agree."""
    wait_paths(a, {b.name: "fast"}, timeout=timeout)
    wait_paths(b, {a.name: "fast"}, timeout=timeout)


def test_fast_path_loses_nothing_while_the_far_agent_restarts(lab: Lab) -> None:
    hosts, cs = start_mesh(lab, 2, secret=False, containers=1)
    h1, h2 = hosts
    _both_fast(h1, h2)
    pinger = Pinger(cs[0][0], cs[1][0])
    started = time.monotonic()
    try:
        for i in range(20):
            _restart(h2, signal.SIGTERM if i % 2 == 0 else signal.SIGKILL)
            # Let the new run meet h1 before the next stop, as a restart loop in production would.
            wait_until(lambda: len(h2.status()["peers"]) == 2, timeout=20, message="h2 did not meet h1 again")
        _restart(h2, signal.SIGTERM, stopped_for=30)
        _both_fast(h1, h2)
        time.sleep(1)
    finally:
        sent, received = pinger.stop()
        elapsed = time.monotonic() - started
    # The pinger ran throughout (ping keeps its interval loosely on a busy machine: a quarter of it is plenty).
    assert sent >= 0.25 * elapsed / PING_INTERVAL, f"only {sent} pings sent in {elapsed:.0f} s"
    assert received == sent, f"{sent - received} of {sent} pings lost while h2's agent restarted 21 times"


def test_two_restarted_agents_agree_on_the_fast_path(lab: Lab) -> None:
    hosts, cs = start_mesh(lab, 2, secret=False, containers=1)
    h1, h2 = hosts
    _both_fast(h1, h2)
    # One end, the other, then both: the far end's evidence from its last run must not outvote the new one.
    for restarting in ([h2], [h1], [h1, h2]):
        for h in restarting:
            h.kill_agent(signal.SIGTERM)
        for h in restarting:
            h.start_agent(resume=True)
        for h in restarting:
            h.wait_ready()
        _both_fast(h1, h2)
        # Not just for a moment: the path stays fast once the adopted state's grace has passed.
        time.sleep(6)
        assert datapaths(h1)[h2.name]["path"] == "fast", datapaths(h1)
        assert datapaths(h2)[h1.name]["path"] == "fast", datapaths(h2)
    assert cs[0][0].ping(cs[1][0])

"""Soak: an agent's memory and file descriptors stay flat while peers restart and containers come and go.

Each test warms up first (imports, caches and the allocator's pools grow once), then measures the agent's RSS and
open FDs over the rest of the cycles. The API is called from this process, not through the CLI, so a cycle costs
little more than what the agent does. WEFT_SOAK_CYCLES shortens a run while debugging (the limits stay the same).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from lab import Host, Lab, wait_until

from weft.api.client import ApiError, Client

pytestmark = pytest.mark.slow

CYCLES = int(os.environ.get("WEFT_SOAK_CYCLES", "300"))
WARMUP = min(20, CYCLES // 4)
MAX_RSS_GROWTH_MB = 5.0
MAX_FD_GROWTH = 3
QUIET = ("--log-level", "info")  # the lab's debug level logs every netlink message: slow, and not what is measured


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (what `ps` and the OOM killer see)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Meter:
    """Samples an agent's RSS and FDs: a baseline after the warm-up, a line every 50 cycles for the report."""

    def __init__(self, host: Host) -> None:
        assert host.agent is not None
        self.pid = host.agent.pid
        self.base_rss = self.base_fds = 0.0
        self.lines: list[str] = []

    def sample(self, cycle: int) -> tuple[float, int]:
        rss, fds = rss_mb(self.pid), fd_count(self.pid)
        if cycle == WARMUP:
            self.base_rss, self.base_fds = rss, fds
        if cycle == WARMUP or cycle % 50 == 0:
            self.lines.append(f"cycle {cycle}: RSS {rss:.1f} MB, {fds} FDs")
        return rss, fds

    def check(self, what: str) -> None:
        time.sleep(1.0)  # let the last cycle's work finish before the final sample
        rss, fds = rss_mb(self.pid), fd_count(self.pid)
        self.lines.append(f"after the last cycle: RSS {rss:.1f} MB, {fds} FDs")
        report = f"{what}: RSS {self.base_rss:.1f} -> {rss:.1f} MB, FDs {self.base_fds} -> {fds}\n" + "\n".join(
            self.lines
        )
        print(report)
        assert rss - self.base_rss <= MAX_RSS_GROWTH_MB, f"RSS grew by {rss - self.base_rss:.1f} MB\n{report}"
        assert fds - self.base_fds <= MAX_FD_GROWTH, f"FDs grew by {fds - self.base_fds}\n{report}"


def _sees_run(status: dict[str, Any], name: str, old_uid: int | None) -> int | None:
    """The uid of peer ``name``'s run once it is new and its connection established, with a data path."""
    uid = next((p["uid"] for p in status["peers"] if p["name"] == name), None)
    if uid is None or uid == old_uid:
        return None
    for row in status["connections"]:
        if row["peer"] == name and row["state"] == "established" and row.get("datapath") is not None:
            return int(uid)
    return None


@pytest.mark.timeout(900)
def test_peer_restarts_leave_the_survivor_flat(lab: Lab) -> None:
    """A peer restarts CYCLES times (a new uid each time; SIGTERM or kill -9): the agent that stays up does not grow."""
    survivor, peer = lab(2)
    survivor.start_agent(*QUIET)
    survivor.wait_ready()
    api = Client(str(survivor.api_socket), timeout=10.0)
    meter = Meter(survivor)
    uid: int | None = None
    for cycle in range(1, CYCLES + 1):
        peer.start_agent(*QUIET, peers=[survivor])
        uid = wait_until(
            lambda old=uid: _sees_run(api.status(), peer.agent_name, old),
            timeout=30,
            interval=0.05,
            message=lambda n=cycle: f"cycle {n}: the survivor never saw the peer's new run\n{peer.agent_log()[-3000:]}",
        )
        peer.kill_agent(signal.SIGKILL if cycle % 3 == 0 else signal.SIGTERM)
        meter.sample(cycle)
    meter.check(f"survivor over {CYCLES - WARMUP} peer restarts")


@pytest.mark.timeout(900)
def test_attach_detach_leaves_the_agent_flat(lab: Lab) -> None:
    """CYCLES rounds of attach and detach; every third also re-attaches, adds and drops an address, and is refused."""
    (host,) = lab(1)
    host.start_agent(*QUIET)
    host.wait_ready()
    container = host.add_container("10.32.0.2/12", attach=False)
    api = Client(str(host.api_socket), timeout=10.0)
    who = {"netns": container.netns, "ifname": "ethwe"}
    meter = Meter(host)
    for cycle in range(1, CYCLES + 1):
        assert api.request("POST", "/attach", {**who, "cidrs": ["10.32.0.2/12"]})["changed"]
        if cycle % 3 == 0:  # the other requests a user makes; all six cost ~7 minutes over 300 cycles here
            assert not api.request("POST", "/attach", {**who, "cidrs": ["10.32.0.2/12"]})["changed"]
            api.request("POST", "/attach", {**who, "cidrs": ["10.32.0.3/12"]})
            api.request("POST", "/detach", {**who, "cidrs": ["10.32.0.3/12"]})
            with pytest.raises(ApiError):
                api.request("POST", "/attach", {"netns": f"{container.netns}-gone", "cidrs": ["10.32.0.9/12"]})
        assert api.request("POST", "/detach", who)["changed"]
        meter.sample(cycle)
    meter.check(f"agent over {CYCLES - WARMUP} attach/detach cycles")

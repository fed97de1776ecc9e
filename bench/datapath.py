"""Data-path benchmarks: TCP throughput and ping RTT from a container on h1 to a container on another host, over
plain routed veth (the baseline: this machine's limit) and over weft's fast, encrypted and relayed paths.

The method: iperf3 TCP with 1 and 4 streams and ``ping -c 100 -i 0.01``, medians of several runs. Nothing here
asserts on a number: each function returns figures (plain dicts, JSON-ready) for run.py to print, and a scenario that
cannot be measured is returned as ``{"failed": reason}`` so the others still run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mesh

# The netns lab harness lives with the agent's tests.
sys.path.insert(0, str(mesh.REPO / "agent" / "tests" / "harness"))

from lab import Host, Lab, metric_value, netns_unavailable_reason

SCENARIOS = {
    "baseline": "plain routed veth between the same lab hosts and underlay, no agent, MTU 1500",
    "fast": "2 hosts, no secret: kernel VXLAN",
    "encrypted-1w": "2 hosts, secret: userspace sleeve, ChaCha20-Poly1305, one forwarding worker",
    "encrypted": "2 hosts, secret: userspace sleeve, ChaCha20-Poly1305, the default workers (the cores, up to 4)",
    "relayed": "3 hosts, secret, h1-h3 blocked: sleeve relayed through h2, once sealed end to end (default workers)",
}
# The path h1's status must show for the destination peer before a scenario is measured.
EXPECTED_PATH = {
    "baseline": "routed",
    "fast": "fast",
    "encrypted-1w": "sleeve",
    "encrypted": "sleeve",
    "relayed": "relay",
}
# How the path must seal before a scenario is measured, at both ends: a relayed pair starts hop by hop (the relay
# opens and seals again) and agrees end-to-end keys once h1 has been relayed to h3 for a while (E2E_HOLD: the
# connection maker still dials h3). What the relayed target compares is the pair as it runs from then on.
EXPECTED_SEALING = {"relayed": "end-to-end"}
# Extra `weft run` arguments per scenario.
AGENT_ARGS = {"encrypted-1w": ("--datapath-workers", "1")}

# (scenario, figure, comparison, wanted, (scenario, figure) it is a multiple of, or None: absolute; description)
TARGETS = [
    ("encrypted", "gbps_4", ">=", 1.6, ("encrypted", "gbps_1"), "4 streams >= 1.6 x its 1 stream"),
    ("encrypted", "gbps_1", ">=", 4.2, None, "1 stream >= 4.2 Gb/s"),
    ("relayed", "gbps_1", ">=", 0.8, ("encrypted", "gbps_1"), "1 stream >= 0.8 x encrypted"),
    ("fast", "gbps_1", ">=", 0.9, ("baseline", "gbps_1"), "1 stream >= 0.9 x baseline"),
    ("fast", "rtt_added_ms", "<=", 0.1, None, "added RTT (avg) <= 0.1 ms"),
    ("encrypted", "rtt_added_ms", "<=", 0.6, None, "added RTT (avg) <= 0.6 ms"),
]

IPERF_PORT = 5201
# A scenario starts once the machine is at most this busy (% of one core, all CPUs together), or after QUIET_WAIT_S:
# everything here shares the same few CPUs, so a neighbour's test run would show up as a slow data path.
QUIET_PCT = 25.0
QUIET_WAIT_S = 45.0
SECRET_PREFIX = "bench-dp-"
# What asking an agent (CLI or metrics scrape) raises while its API is busy, restarting or gone.
_STATUS_ERRORS = (subprocess.SubprocessError, ValueError, KeyError)


class BenchError(RuntimeError):
    """A scenario could not be measured; the message is the reason printed in its row."""


@dataclass
class Endpoints:
    """Where traffic goes from and to, and which agents' CPU to count while it flows."""

    src_netns: str
    dst_netns: str
    dst_ip: str
    agents: dict[str, int] = field(default_factory=dict)  # host name -> agent PID
    log_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))


# -- processes in namespaces ----------------------------------------------------------------------


def _ns_run(netns: str, *cmd: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command in a namespace; a failure becomes a BenchError naming the command and its output."""
    args = ["ip", "netns", "exec", netns, *cmd]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"`{' '.join(cmd)}` in {netns} took over {timeout:g}s") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise BenchError(f"`{' '.join(cmd)}` in {netns} exited {proc.returncode}: {detail[0]}")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process group we started (by its leader's PID), then SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


@contextlib.contextmanager
def _iperf_server(netns: str, log_dir: Path, port: int = IPERF_PORT) -> Iterator[None]:
    """``iperf3 -s`` in the destination namespace for the length of a scenario, stopped by PID afterwards."""
    log_path = log_dir / f"iperf3-server-{netns}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            f"ip netns exec {netns} iperf3 -s -p {port} --forceflush".split(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 10
        while "Server listening" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"iperf3 -s did not start: {log_path.read_text(errors='replace').strip()[-300:]}")
            time.sleep(0.05)
        yield
    finally:
        _stop(proc)


# -- one measurement ------------------------------------------------------------------------------


def _iperf(ep: Endpoints, streams: int, seconds: float) -> dict:
    """One iperf3 TCP run: received bits per second (summed over streams) and the sender's retransmits."""
    cmd = f"iperf3 -c {ep.dst_ip} -p {IPERF_PORT} -t {seconds:g} -P {streams} -J --connect-timeout 5000"
    proc = _ns_run(ep.src_netns, *cmd.split(), timeout=seconds + 30, check=False)
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise BenchError(
            f"iperf3 -P {streams}: no JSON (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
        ) from exc
    if out.get("error"):
        raise BenchError(f"iperf3 -P {streams}: {out['error']}")
    end = out["end"]
    return {
        "gbps": round(end["sum_received"]["bits_per_second"] / 1e9, 3),
        "retransmits": end["sum_sent"].get("retransmits"),
    }


_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")
_LOSS = re.compile(r"([\d.]+)% packet loss")


def _ping(ep: Endpoints, count: int = 100, interval: float = 0.01) -> dict:
    """``ping -c 100 -i 0.01 -q``: min/avg/max RTT in ms and the loss, as the reference measured latency."""
    cmd = f"ping -n -q -c {count} -i {interval:g} -W 1 {ep.dst_ip}".split()
    proc = _ns_run(ep.src_netns, *cmd, timeout=count * (interval + 1) + 10, check=False)
    rtt, loss = _RTT.search(proc.stdout), _LOSS.search(proc.stdout)
    if rtt is None:
        raise BenchError(f"ping got no replies: {(proc.stdout + proc.stderr).strip().splitlines()[-2:]}")
    return {
        "min_ms": float(rtt[1]),
        "avg_ms": float(rtt[2]),
        "max_ms": float(rtt[3]),
        "loss_pct": float(loss[1]) if loss else None,
    }


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively (a data plane may run worker processes): their CPU counts as the agent's."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    return [p for child in children for p in (child, *_descendants(child))]


def _tree_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process and its live descendants (None once the process is gone)."""
    own = mesh._cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(mesh._cpu_seconds(c) or 0.0 for c in _descendants(pid))


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat: how loaded the whole machine was during a run."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]  # guest time is already in user
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _wait_quiet(log: Callable[[str], None]) -> float:
    """Wait (up to QUIET_WAIT_S) until the machine is nearly idle; returns how busy it was last (% of one core)."""
    deadline = time.monotonic() + QUIET_WAIT_S
    while True:
        busy0, total0 = _machine_busy()
        time.sleep(1.0)
        busy1, total1 = _machine_busy()
        pct = (busy1 - busy0) / max(1, total1 - total0) * 100 * (os.cpu_count() or 1)
        if pct <= QUIET_PCT or time.monotonic() > deadline:
            if pct > QUIET_PCT:
                log(f"    the machine is still {pct:.0f}% busy; measuring anyway")
            return round(pct, 1)
        time.sleep(1.0)


def _timed_iperf(ep: Endpoints, streams: int, seconds: float) -> dict:
    """An iperf3 run with the agents' CPU and the whole machine's during it (both in % of one core)."""
    cpu0 = {name: _tree_cpu_seconds(pid) for name, pid in ep.agents.items()}
    busy0, total0 = _machine_busy()
    t0 = time.monotonic()
    result = _iperf(ep, streams, seconds)
    wall = time.monotonic() - t0
    busy1, total1 = _machine_busy()
    result["agent_cpu_pct"] = {}
    for name, pid in ep.agents.items():
        after = _tree_cpu_seconds(pid)
        if after is not None and cpu0[name] is not None:
            result["agent_cpu_pct"][name] = round((after - cpu0[name]) / wall * 100, 1)
    if total1 > total0:
        result["machine_cpu_pct"] = round((busy1 - busy0) / (total1 - total0) * 100 * (os.cpu_count() or 1), 1)
    return result


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _summary(runs: list[dict], key: str) -> dict:
    """Median, min and max of one figure over runs: the range shows how noisy the machine was."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return {
        "median": _median(values),
        "min": min(values, default=None),
        "max": max(values, default=None),
    }


def measure(ep: Endpoints, *, seconds: float, runs: int, log: Callable[[str], None]) -> dict:
    """``runs`` rounds of iperf3 with 1 and 4 streams and one ping each; medians plus every run."""
    raw: dict[str, list[dict]] = {"tcp_1": [], "tcp_4": [], "ping": []}
    with _iperf_server(ep.dst_netns, ep.log_dir):
        for i in range(runs):
            for streams in (1, 4):
                r = _timed_iperf(ep, streams, seconds)
                raw[f"tcp_{streams}"].append(r)
                log(f"    run {i + 1}/{runs}: {streams} stream(s) {r['gbps']:.2f} Gb/s")
            raw["ping"].append(_ping(ep))
            log(f"    run {i + 1}/{runs}: ping min/avg {raw['ping'][-1]['min_ms']}/{raw['ping'][-1]['avg_ms']} ms")
    result: dict = {
        "gbps_1": _median([r["gbps"] for r in raw["tcp_1"]]),
        "gbps_4": _median([r["gbps"] for r in raw["tcp_4"]]),
        "rtt_min_ms": _median([r["min_ms"] for r in raw["ping"]]),
        "rtt_avg_ms": _median([r["avg_ms"] for r in raw["ping"]]),
        "range": {
            "gbps_1": _summary(raw["tcp_1"], "gbps"),
            "gbps_4": _summary(raw["tcp_4"], "gbps"),
            "rtt_avg_ms": _summary(raw["ping"], "avg_ms"),
        },
        "runs": raw,
    }
    for streams in (1, 4):
        per_run = [r["agent_cpu_pct"] for r in raw[f"tcp_{streams}"]]
        result[f"agent_cpu_pct_{streams}"] = {
            name: _median([c[name] for c in per_run if name in c]) for name in ep.agents
        }
        # The data plane's CPU per Gb/s: every agent's CPU (all hosts, % of a core) over what arrived.
        runs_n = raw[f"tcp_{streams}"]
        per_gbps = [sum(r["agent_cpu_pct"].values()) / r["gbps"] for r in runs_n if r["gbps"] and r["agent_cpu_pct"]]
        result[f"cpu_pct_per_gbps_{streams}"] = _median(per_gbps)
        result[f"machine_cpu_pct_{streams}"] = _median(
            [r["machine_cpu_pct"] for r in raw[f"tcp_{streams}"] if "machine_cpu_pct" in r]
        )
    return result


# -- scenario 1: the routed baseline ----------------------------------------------------------------


@contextlib.contextmanager
def _routed_pair() -> Iterator[tuple[str, str]]:
    """Two lab hosts on the same underlay as the overlay scenarios (veths to a bridge in its own namespace),
    each routing a /24 to a "container" namespace on a plain veth: the kernel path between the same kind of
    namespaces, with no agent and no overlay. Yields (src, dst) namespaces; the lab removes them by name."""
    with Lab() as lab:
        hosts = lab.add_hosts(2)
        containers = []
        for n, host in enumerate(hosts, start=1):
            ctr = f"{host.netns}c1"
            lab._add_netns(ctr)  # the lab deletes it (and the veth in it) on exit
            # `name` everywhere: iproute2 6.1 parses a bare first word after `add` as `address`.
            _ip(f"-n {host.netns} link add name ctr type veth peer name eth0 netns {ctr}")
            _ip(f"-n {host.netns} addr add 10.32.{n}.1/24 dev ctr")
            _ip(f"-n {host.netns} link set ctr up")
            _ip(f"-n {ctr} addr add 10.32.{n}.2/24 dev eth0")
            _ip(f"-n {ctr} link set eth0 up")
            _ip(f"-n {ctr} route add default via 10.32.{n}.1")
            _ns_run(host.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            containers.append(ctr)
        _ip(f"-n {hosts[0].netns} route add 10.32.2.0/24 via {hosts[1].ip}")
        _ip(f"-n {hosts[1].netns} route add 10.32.1.0/24 via {hosts[0].ip}")
        yield containers[0], containers[1]


def _ip(args: str) -> None:
    """One ``ip`` command (words split on spaces); a failure becomes a BenchError with iproute2's message."""
    proc = subprocess.run(["ip", *args.split()], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise BenchError(f"`ip {args}` failed: {proc.stderr.strip()}")


def baseline(*, seconds: float, runs: int, log: Callable[[str], None]) -> dict:
    """Scenario 1: the same measurements with no agent and no overlay."""
    result: dict = {"scenario": "baseline", "path": "routed", "mtu": 1500}
    try:
        with (
            _routed_pair() as (src, dst),
            tempfile.TemporaryDirectory(prefix="weft-bench-dp-") as tmp,
        ):
            ep = Endpoints(src, dst, "10.32.2.2", log_dir=Path(tmp))
            _wait_ping(ep, timeout=10)
            result.update(measure(ep, seconds=seconds, runs=runs, log=log))
    except (BenchError, subprocess.SubprocessError, OSError) as exc:
        result["failed"] = _reason(exc)
    return result


# -- scenarios 2-4: real agents ---------------------------------------------------------------------


def _datapath_row(host: Host, peer: Host) -> dict | None:
    """The data-path part of ``host``'s status row for ``peer`` (None while there is none)."""
    for row in host.status().get("connections", []):
        if row.get("nickname") == peer.name and row.get("datapath"):
            return row["datapath"]
    return None


def _wait_path(
    host: Host, peer: Host, expected: str, timeout: float, hold: float = 4.0, sealing: str | None = None
) -> dict:
    """Wait until ``host`` has carried traffic for ``peer`` on ``expected`` (sealed as ``sealing`` says, if given) for
    ``hold`` seconds in a row: a path that is chosen and then dropped (no heartbeat within 3 s) is not settled. The
    error names what it showed."""
    deadline = time.monotonic() + timeout
    row: dict | None = None
    since: float | None = None
    last_error = ""
    while time.monotonic() < deadline:
        _check_alive([host])
        try:
            row = _datapath_row(host, peer)
            last_error = ""
        except _STATUS_ERRORS as exc:  # a busy or restarting API is "not yet"
            last_error = f" (last status error: {exc!s:.200})"
        if row and row.get("path") == expected and (sealing is None or row.get("sealing") == sealing):
            since = since if since is not None else time.monotonic()
            if time.monotonic() - since >= hold:
                return row
        else:
            since = None
        time.sleep(0.5)
    raise BenchError(
        f"{host.name} -> {peer.name} not on path {expected!r}{f' sealed {sealing}' if sealing else ''} for {hold:g}s"
        f" in a row within {timeout:g}s;"
        f" last seen: {_path_summary(row)}{last_error}"
    )


def _path_summary(row: dict | None) -> str:
    if not row:
        return "no data-path row"
    return ", ".join(f"{k} {row[k]!r}" for k in ("path", "reason", "via", "sealing") if row.get(k))


def _wait_ping(ep: Endpoints, timeout: float) -> None:
    """The path answers a ping (ARP and the FDB are warm) before anything is timed."""
    deadline = time.monotonic() + timeout
    while True:
        ping = f"ping -n -q -c 1 -W 1 {ep.dst_ip}".split()
        if _ns_run(ep.src_netns, *ping, check=False).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"no ping reply from {ep.dst_ip} after {timeout:g}s")
        time.sleep(0.2)


def _check_alive(hosts: list[Host]) -> None:
    for h in hosts:
        if h.agent is not None and h.agent.poll() is not None:
            raise BenchError(f"{h.name}: agent exited with {h.agent.returncode}")


def _start_mesh(lab: Lab, scenario: str, timeout: float) -> list[Host]:
    """2 hosts (3 for relayed, with h1-h3 blocked), each agent told of the others; returns once all have met."""
    hosts = lab.add_hosts(3 if scenario == "relayed" else 2)
    if scenario == "relayed":
        lab.block(hosts[0], hosts[2])
    secret = [] if scenario == "fast" else [SECRET_PREFIX + secrets.token_hex(12)]
    for h in hosts:
        h.start_agent(*AGENT_ARGS.get(scenario, ()), peers=[o for o in hosts if o is not h], secrets=secret)
    for h in hosts:
        h.wait_ready(timeout=timeout)
    deadline = time.monotonic() + timeout
    while not all(_knows(h, len(hosts)) for h in hosts):
        _check_alive(hosts)
        if time.monotonic() > deadline:
            raise BenchError(f"the {len(hosts)} agents did not all know each other after {timeout:g}s")
        time.sleep(0.5)
    return hosts


def _knows(host: Host, n: int) -> bool:
    with contextlib.suppress(*_STATUS_ERRORS):
        return len(host.status()["peers"]) >= n
    return False


def _path_bytes(host: Host) -> dict[str, float]:
    """``host``'s overlay bytes sent per data path: shows which path the measured traffic really took (a relay
    host counts what it forwards under "relay" when it opens it, "transit" when it passes it on sealed end to
    end)."""
    with contextlib.suppress(*_STATUS_ERRORS):
        text = host.metrics()
        return {
            p: metric_value(text, "weft_datapath_bytes", path=p, direction="tx")
            for p in ("fast", "sleeve", "relay", "transit")
        }
    return {}


def _bytes_since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {p: after[p] - before.get(p, 0.0) for p in after}


def _log_tails(hosts: list[Host], lines: int = 15) -> dict[str, str]:
    """The end of each agent's log without pyroute2's netlink chatter, which buries the error at debug level."""
    return {h.name: "\n".join(_meaningful_lines(h)[-lines:]) for h in hosts}


def _meaningful_lines(host: Host, width: int = 400) -> list[str]:
    return [line[:width] for line in host.agent_log().splitlines() if "DEBUG pyroute2" not in line]


def _died(hosts: list[Host]) -> str:
    """Which agents exited, with their last log line (usually the error), hosts with the same error together."""
    by_error: dict[str, list[str]] = {}
    for h in hosts:
        if h.agent is not None and h.agent.poll() is not None:
            last = (_meaningful_lines(h) or ["(empty log)"])[-1]
            by_error.setdefault(last, []).append(h.name)
    return "; ".join(f"{', '.join(names)}: {error}" for error, names in by_error.items())


def overlay(
    scenario: str,
    *,
    seconds: float,
    runs: int,
    settle_timeout: float,
    log: Callable[[str], None],
    extra_pythonpath: tuple[str, ...] = (),
) -> dict:
    """Scenarios 2-4: containers on h1 and h2 (h3 when relayed) over real agents, once h1 shows the path."""
    expected = EXPECTED_PATH[scenario]
    result: dict = {"scenario": scenario, "path": expected}
    with Lab(extra_pythonpath=extra_pythonpath) as lab:
        try:
            hosts = _start_mesh(lab, scenario, settle_timeout)
            h1, dst_host = hosts[0], hosts[-1]
            src = h1.add_container("10.32.1.1/16")
            dst = dst_host.add_container(f"10.32.{dst_host.index}.1/16")
            t0 = time.monotonic()
            sealing = EXPECTED_SEALING.get(scenario)
            row = _wait_path(h1, dst_host, expected, settle_timeout, sealing=sealing)
            if sealing is not None:  # the far end seals what it sends back (TCP's ACKs) the same way
                _wait_path(dst_host, h1, expected, settle_timeout, hold=0.0, sealing=sealing)
            result["path_settled_s"] = round(time.monotonic() - t0, 1)
            result["datapath"] = row
            result["mtu"] = int(src.exec("cat", "/sys/class/net/ethwe/mtu").stdout)
            ep = Endpoints(
                src.netns,
                dst.netns,
                dst.ip,
                {h.name: h.agent.pid for h in hosts if h.agent},
                h1.tmp_dir,
            )
            _wait_ping(ep, timeout=settle_timeout)
            before = {h.name: _path_bytes(h) for h in hosts}
            result.update(measure(ep, seconds=seconds, runs=runs, log=log))
            result["tx_bytes_by_path"] = {h.name: _bytes_since(before[h.name], _path_bytes(h)) for h in hosts}
            result["path_after"] = (_datapath_row(h1, dst_host) or {}).get("path")
            _check_alive(hosts)
        except Exception as exc:  # any failure is this scenario's reason; the others still run
            result["failed"] = _reason(exc) + _state_now(lab.hosts)
            result["log_tail"] = _log_tails(lab.hosts)
    return result


def _state_now(hosts: list[Host]) -> str:
    """What explains a failure: the agents that died, else the path h1 shows now (it may have dropped)."""
    died = _died(hosts)
    if died:
        return f" ({died})"
    if len(hosts) < 2:
        return ""
    try:
        return f" (h1 -> {hosts[-1].name} now: {_path_summary(_datapath_row(hosts[0], hosts[-1]))})"
    except _STATUS_ERRORS:
        return ""


def _reason(exc: BaseException) -> str:
    """One readable line: lab errors carry whole agent logs, which belong in log_tail, not in the table."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if isinstance(exc, BenchError) else f"{type(exc).__name__}: {text}"


# -- all of it --------------------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why the data-path benchmark cannot run here (None if it can)."""
    for tool in ("iperf3", "ping"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` on PATH"
    return netns_unavailable_reason()


def run(
    scenarios: list[str],
    *,
    seconds: float = 10.0,
    runs: int = 3,
    settle_timeout: float = 60.0,
    log: Callable[[str], None] = print,
    extra_pythonpath: tuple[str, ...] = (),
) -> dict:
    """Every scenario asked for, then the targets checked against the figures."""
    report: dict = {
        "seconds": seconds,
        "runs": runs,
        "ping": "100 x 10 ms",
        "load_before": _uptime(),
        "scenarios": {},
    }
    reason = unavailable_reason()
    if reason:
        report["skipped"] = reason
        return report
    for name in scenarios:
        log(f"  {name}: {SCENARIOS[name]} ...")
        busy = _wait_quiet(log)
        if name == "baseline":
            r = baseline(seconds=seconds, runs=runs, log=log)
        else:
            r = overlay(
                name,
                seconds=seconds,
                runs=runs,
                settle_timeout=settle_timeout,
                log=log,
                extra_pythonpath=extra_pythonpath,
            )
        r["machine_busy_before_pct"] = busy
        report["scenarios"][name] = r
        if "failed" in r:
            log(f"    failed: {r['failed']}")
    report["load_after"] = _uptime()
    _add_baseline_ratios(report["scenarios"])
    report["targets"] = check_targets(report["scenarios"])
    return report


def _uptime() -> str:
    """``uptime``'s load averages: the machine is shared, and the figures move with it."""
    one, five, fifteen = os.getloadavg()
    return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} CPUs)"


def _add_baseline_ratios(results: dict[str, dict]) -> None:
    """Each scenario's 1-stream ratio to the baseline and the RTT it adds to it (when both were measured)."""
    base = results.get("baseline", {})
    for r in results.values():
        if r.get("gbps_1") is not None and base.get("gbps_1"):
            r["ratio_to_baseline_1"] = round(r["gbps_1"] / base["gbps_1"], 3)
        if r.get("rtt_avg_ms") is not None and base.get("rtt_avg_ms") is not None:
            r["rtt_added_ms"] = round(r["rtt_avg_ms"] - base["rtt_avg_ms"], 3)


def check_targets(results: dict[str, dict]) -> list[dict]:
    """Whether each target is met: True/False, or None when a figure it needs is missing. Never raises."""
    checked = []
    for scenario, figure, op, wanted, ref, text in TARGETS:
        measured = results.get(scenario, {}).get(figure)
        if ref is None:
            limit = wanted
        else:
            reference = results.get(ref[0], {}).get(ref[1])
            limit = wanted * reference if reference else None
        met = None
        if measured is not None and limit is not None:
            met = measured >= limit if op == ">=" else measured <= limit
        row = {
            "scenario": scenario,
            "target": text,
            "figure": figure,
            "limit": None if limit is None else round(limit, 3),
            "measured": measured,
            "met": met,
        }
        if ref == (scenario, "gbps_1") and figure == "gbps_4":
            row["machine_ceiling"] = machine_ceiling(results.get(scenario, {}))
        elif ref is not None and figure == "gbps_1":
            row["cpu_ceiling"] = cpu_ceiling(results.get(scenario, {}), results.get(ref[0], {}))
            row["reference"] = ref[0]
        checked.append(row)
    return checked


def cpu_ceiling(result: dict, reference: dict) -> float | None:
    """What ``result`` can reach as a multiple of ``reference`` when the machine's CPU is what limits both: the
    ratio of their agents' CPU per Gb/s. A relay on the same machine as the two ends takes its CPU from theirs, so
    the relayed rate is bound by the three agents' cost per byte against the two of a direct path; on hosts of
    their own the relay would not slow the ends."""
    ours, theirs = result.get("cpu_pct_per_gbps_1"), reference.get("cpu_pct_per_gbps_1")
    if not ours or not theirs:
        return None
    return round(theirs / ours, 2)


def machine_ceiling(result: dict) -> float | None:
    """How many times its one-stream rate a scenario could carry with every idle CPU of the machine put to work at
    the same CPU per byte: the most more streams can gain here. Both hosts, their agents and iperf3 share the
    machine's cores, so a scenario whose one stream already keeps them busy cannot scale on this machine, however
    many workers each agent runs."""
    busy = result.get("machine_cpu_pct_1")
    if not busy:
        return None
    return round(100 * (os.cpu_count() or 1) / busy, 2)

#!/usr/bin/env python3
"""Where weft's fast path loses to the kernel: routed veth, a hand-built VXLAN and weft's own, in one run.

    sudo .venv/bin/python bench/fastpath_diff.py [--seconds 4] [--rounds 5] [--perf]
    sudo .venv/bin/python bench/fastpath_diff.py --agent-src main=/work/main/agent/src   # before and after

Every setup is built as /work/shared/reference/datapath.md describes it: two hosts joined by one underlay veth
(10.250.0.1 <-> 10.250.0.2), a container on each. Then:

- ``routed``: no overlay; each host routes its container's /24, MTU 1500 (the machine's limit);
- ``hand``: the reference's hand-built VXLAN (bridge, ``vxlan id 42 dstport 6784 local ... dev ... nolearning``,
  FDB by hand), MTU 1450;
- ``weft``: real agents (``weft run``, no secret, so the fast path) that build their own bridge, VXLAN device,
  FDB and nftables guards; containers attached with ``weft attach``; ``weft@LABEL`` the same from another tree;
- ``weft-<change>``: the weft pair with one thing taken away or changed for the length of a run and put back after
  it (ablation): a guard's table, the guards' rules (hooks kept), the host's br_netfilter, the MTU. The agents keep
  running: none of this is rewritten by them in a steady state, and every run checks that the change held and that
  the traffic went through the VXLAN device.

All setups exist at once and the variants take turns (A B C ... A B C ...), so the load of a shared machine hits
them alike. Tests: iperf3 TCP with 1 and 4 streams, and UDP with 1,300-byte datagrams at full speed (the per-packet
cost, which GSO hides from TCP); the first second of each run is omitted. Figures per variant and test are medians
over the rounds: throughput and its ratio to routed veth (of the medians, and paired: each round's ratio to the
routed run of the same round), and the CPU the path costs per GB and, for UDP, per packet (the iperf3 processes'
CPU, which holds the softirq work done in their context; a loaded machine changes it much less than throughput).
With ``--perf``, one more run per variant and test is profiled (``perf record -a``, cpu-clock) and summarised by
kernel area, outside the medians.

Figures, not tests: nothing here fails on a number. Namespaces are named fastpath<token>-*, and everything is
removed by name and PID at the end, also on failure or SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "agent" / "src"))

from weft.datapath.attach import KERNEL_GSO_MAX  # noqa: E402
from weft.datapath.wire import OVERLAY_GSO_MAX  # noqa: E402

RESULTS = REPO / "bench" / "results"
PREFIX = "fastpath"  # every namespace this script makes starts with it
IPERF_PORT = 5201
AGENT_PORT = 6783
VXLAN_PORT = 6784
HAND_MTU = 1450
UNDERLAY = ("10.250.0.1", "10.250.0.2")
FASTGUARD = ("inet", f"weft_fast_{VXLAN_PORT}")
PORTGUARD = ("bridge", "weft_portguard")
DNSGUARD = ("bridge", "weft_dns")
BRNF = (
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
)


class BenchError(RuntimeError):
    """A setup could not be built or measured; the message says which command and why."""


def log(line: str) -> None:
    print(line, flush=True)


def run(*cmd: str, check: bool = True, timeout: float = 60.0, input: str | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, check=False)
    if check and proc.returncode != 0:
        raise BenchError(f"`{' '.join(cmd)}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc.stdout


def ns(netns: str, *cmd: str, check: bool = True, input: str | None = None) -> str:
    return run("ip", "netns", "exec", netns, *cmd, check=check, input=input)


def ip(netns: str, args: str) -> None:
    """One `ip -n NETNS ...` (words split on spaces; `name` always written: iproute2 6.1 reads a bare word as
    `address`)."""
    run("ip", "-n", netns, *args.split())


# -- namespaces and processes, removed by name and PID ----------------------------------------------------------


class World:
    """Everything this run creates: namespaces (by name) and process groups (by leader PID)."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(2)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.token}-", dir="/tmp"))
        atexit.register(self.close)

    def netns(self, name: str) -> str:
        full = f"{PREFIX}{self.token}-{name}"
        self.namespaces.append(full)
        run("ip", "netns", "add", full)
        ip(full, "link set lo up")
        return full

    def spawn(self, netns: str, cmd: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with (self.tmp / log_name).open("ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()
        for name in reversed(self.namespaces):
            run("ip", "netns", "del", name, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)  # a resolv.conf weft attach wrote
        self.namespaces.clear()
        if not os.environ.get("FASTPATH_KEEP"):
            shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Pair:
    """Two hosts on one underlay veth and a container on each: traffic goes from c1 to ``dst_ip`` in c2."""

    name: str
    h1: str
    h2: str
    c1: str
    c2: str
    dst_ip: str = ""
    agents: list[subprocess.Popen] = field(default_factory=list)
    api: list[Path] = field(default_factory=list)


def hosts(world: World, name: str) -> Pair:
    h1, h2 = world.netns(f"{name}-h1"), world.netns(f"{name}-h2")
    ip(h1, f"link add name ul type veth peer name ul netns {h2}")
    for host, addr in zip((h1, h2), UNDERLAY, strict=True):
        ip(host, f"addr add {addr}/24 dev ul")
        ip(host, "link set ul up")
    return Pair(name, h1, h2, world.netns(f"{name}-c1"), world.netns(f"{name}-c2"))


def routed(world: World) -> Pair:
    """Reference A: plain routing, MTU 1500."""
    p = hosts(world, "routed")
    for n, (host, ctr) in enumerate(((p.h1, p.c1), (p.h2, p.c2)), start=1):
        ip(host, f"link add name ctr type veth peer name eth0 netns {ctr}")
        ip(host, f"addr add 10.32.{n}.1/24 dev ctr")
        ip(host, "link set ctr up")
        ip(ctr, f"addr add 10.32.{n}.2/24 dev eth0")
        ip(ctr, "link set eth0 up")
        ip(ctr, f"route add default via 10.32.{n}.1")
        ns(host, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    ip(p.h1, f"route add 10.32.2.0/24 via {UNDERLAY[1]}")
    ip(p.h2, f"route add 10.32.1.0/24 via {UNDERLAY[0]}")
    p.dst_ip = "10.32.2.2"
    return p


def hand(world: World, name: str = "hand", *, udpcsum: bool = True) -> Pair:
    """Reference B: the hand-built kernel VXLAN, exactly as reference/datapath.md sets it up."""
    p = hosts(world, name)
    pairs = ((p.h1, p.c1, UNDERLAY[0], UNDERLAY[1]), (p.h2, p.c2, UNDERLAY[1], UNDERLAY[0]))
    for n, (host, ctr, local, remote) in enumerate(pairs, start=1):
        ip(host, "link add name weave type bridge")
        ip(host, f"link set weave mtu {HAND_MTU} up")
        csum = "udpcsum" if udpcsum else "noudpcsum"
        ip(host, f"link add name vxlan-6784 type vxlan id 42 dstport 6784 local {local} dev ul nolearning {csum}")
        ip(host, f"link set vxlan-6784 mtu {HAND_MTU} master weave up")
        ip(host, f"link add name vethc type veth peer name eth0 netns {ctr}")
        ip(host, f"link set vethc mtu {HAND_MTU} master weave up")
        ip(ctr, f"link set eth0 address 02:32:00:00:00:0{n} mtu {HAND_MTU} up")
        ip(ctr, f"addr add 10.32.{n}.1/16 dev eth0")
        run("bridge", "-n", host, "fdb", "append", "00:00:00:00:00:00", "dev", "vxlan-6784", "dst", remote)
        other = 2 if n == 1 else 1
        run(
            "bridge", "-n", host, "fdb", "add", f"02:32:00:00:00:0{other}", "dev", "vxlan-6784",
            "dst", remote, "self", "permanent",
        )  # fmt: skip
    p.dst_ip = "10.32.2.1"
    return p


def agent_env(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src)
    env["PYTHONUNBUFFERED"] = "1"
    env["WEFT_DNS_UPSTREAM"] = "127.0.0.1:53"  # names outside the domain go nowhere
    return env


def cli(src: Path, api: Path, *args: str, timeout: float = 60.0) -> str:
    env = agent_env(src)
    cmd = [sys.executable, "-m", "weft.cli", "--api-socket", str(api), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if proc.returncode != 0:
        raise BenchError(f"weft {' '.join(args)}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc.stdout


def weft(world: World, name: str, src: Path, timeout: float = 90.0) -> Pair:
    """Real agents (no secret: the fast path) on the pair's hosts, containers attached with `weft attach`."""
    p = hosts(world, name)
    for n, host in enumerate((p.h1, p.h2), start=1):
        d = world.tmp / f"{name}-h{n}"
        d.mkdir()
        api = d / "weft.sock"
        cmd = [
            sys.executable, "-m", "weft.cli", "run", "--name", f"02:00:00:00:00:0{n}", "--nickname", f"h{n}",
            "--listen", f"{UNDERLAY[n - 1]}:{AGENT_PORT}", "--peer", f"{UNDERLAY[2 - n]}:{AGENT_PORT}",
            "--state-dir", str(d / "state"), "--api-socket", str(api), "--metrics-addr", "127.0.0.1:6782",
            "--log-level", "info",
        ]  # fmt: skip
        p.agents.append(world.spawn(host, cmd, f"{name}-h{n}.log", agent_env(src)))
        p.api.append(api)
    deadline = time.monotonic() + timeout
    for api, agent in zip(p.api, p.agents, strict=True):
        while not api.exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{name}: an agent did not start: {_tail(world, name)}")
            time.sleep(0.2)
    for n, (api, ctr) in enumerate(zip(p.api, (p.c1, p.c2), strict=True), start=1):
        while True:
            try:
                cli(src, api, "attach", "--netns", ctr, f"10.32.{n}.1/16")
                break
            except BenchError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
    p.dst_ip = "10.32.2.1"
    while _path(src, p.api[0]) != "fast" or not _pings(p):
        if time.monotonic() > deadline:
            raise BenchError(f"{name}: h1 never showed the fast path to h2 ({_path(src, p.api[0])})")
        time.sleep(1.0)
    return p


def _tail(world: World, name: str) -> str:
    texts = [f.read_text(errors="replace")[-600:] for f in sorted(world.tmp.glob(f"{name}-h*.log"))]
    return " | ".join(texts)


def _path(src: Path, api: Path) -> str | None:
    with contextlib.suppress(BenchError, ValueError, subprocess.SubprocessError):
        for row in json.loads(cli(src, api, "status", "--json", timeout=20)).get("connections", []):
            if row.get("datapath"):
                return row["datapath"].get("path")
    return None


def _pings(p: Pair) -> bool:
    return (
        subprocess.run(
            ["ip", "netns", "exec", p.c1, "ping", "-n", "-q", "-c", "1", "-W", "1", p.dst_ip],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )


# -- ablations: one change to a weft pair, made before a run and undone after it ---------------------------------


@dataclass
class Change:
    """What an ablation does to both hosts of a pair, and how it is undone and checked."""

    name: str
    what: str
    apply: Callable[[Pair], object]
    undo: Callable[[Pair, object], None]
    holds: Callable[[Pair], bool]


def _table_text(host: str, family: str, table: str) -> str | None:
    out = subprocess.run(
        ["ip", "netns", "exec", host, "nft", "-s", "list", "table", family, table],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout if out.returncode == 0 else None


def _drop_tables(tables: tuple[tuple[str, str], ...]) -> Change:
    def apply(p: Pair) -> dict:
        saved = {}
        for host in (p.h1, p.h2):
            for family, table in tables:
                if family == "bridge" and table == PORTGUARD[1]:  # its dynamic set has timeouts: start it empty
                    ns(host, "nft", "flush", "set", family, table, "forged", check=False)
                text = _table_text(host, family, table)
                if text is None:
                    raise BenchError(f"{host}: no table {family} {table} to take away")
                saved[(host, family, table)] = text
                ns(host, "nft", "delete", "table", family, table)
        return saved

    def undo(p: Pair, saved: object) -> None:
        assert isinstance(saved, dict)
        for (host, _family, _table), text in saved.items():
            ns(host, "nft", "-f", "-", input=text)

    def holds(p: Pair) -> bool:
        return all(_table_text(h, f, t) is None for h in (p.h1, p.h2) for f, t in tables)

    names = "+".join(t.removeprefix("weft_").split("_")[0] for _f, t in tables)
    return Change(
        f"no-{names}", f"without nftables table(s) {', '.join(f'{f} {t}' for f, t in tables)}", apply, undo, holds
    )


def _hooks_only(tables: tuple[tuple[str, str], ...]) -> Change:
    """The tables' chains stay on their hooks with no rules in them: what the hook passes cost without the rules."""

    def apply(p: Pair) -> dict:
        saved = {}
        for host in (p.h1, p.h2):
            for family, table in tables:
                text = _table_text(host, family, table)
                if text is None:
                    raise BenchError(f"{host}: no table {family} {table} to empty")
                saved[(host, family, table)] = text
                ns(host, "nft", "flush", "table", family, table)
        return saved

    def undo(p: Pair, saved: object) -> None:
        assert isinstance(saved, dict)
        for (host, family, table), text in saved.items():
            ns(host, "nft", "delete", "table", family, table)
            ns(host, "nft", "-f", "-", input=text)

    def holds(p: Pair) -> bool:
        for host in (p.h1, p.h2):
            for family, table in tables:
                items = json.loads(ns(host, "nft", "-j", "list", "table", family, table))["nftables"]
                if any("rule" in item for item in items) or not any("chain" in item for item in items):
                    return False
        return True

    return Change("hooks-only", "the guards' chains on their hooks, with no rules in them", apply, undo, holds)


def _sysctls(values: dict[str, str], name: str, what: str) -> Change:
    def apply(p: Pair) -> dict:
        saved = {}
        for host in (p.h1, p.h2):
            for key, value in values.items():
                saved[(host, key)] = ns(host, "sysctl", "-n", key).strip()
                ns(host, "sysctl", "-q", "-w", f"{key}={value}")
        return saved

    def undo(p: Pair, saved: object) -> None:
        assert isinstance(saved, dict)
        for (host, key), value in saved.items():
            ns(host, "sysctl", "-q", "-w", f"{key}={value}")

    def holds(p: Pair) -> bool:
        return all(ns(h, "sysctl", "-n", k).strip() == v for h in (p.h1, p.h2) for k, v in values.items())

    return Change(name, what, apply, undo, holds)


def _overlay_links(p: Pair) -> list[tuple[str, str]]:
    """(netns, link) of every device on the overlay's path: bridge, its ports, the containers' ends."""
    out = []
    for host, ctr in ((p.h1, p.c1), (p.h2, p.c2)):
        out.append((host, "weft"))
        for link in json.loads(ns(host, "ip", "-j", "link", "show", "master", "weft")):
            out.append((host, link["ifname"]))
        out.append((ctr, "ethwe"))
    return out


def _container_links(p: Pair) -> list[tuple[str, str]]:
    return [(p.c1, "ethwe"), (p.c2, "ethwe")]


def _link_setting(name: str, what: str, links: Callable[[Pair], list[tuple[str, str]]], key: str, value: int) -> Change:
    """One ``ip link set`` setting (``key``, as ``ip -d -j link show`` names it) on ``links(p)`` for a run."""

    def current(netns: str, link: str) -> int:
        return json.loads(ns(netns, "ip", "-d", "-j", "link", "show", link))[0][key]

    def apply(p: Pair) -> dict:
        saved = {(netns, link): current(netns, link) for netns, link in links(p)}
        for netns, link in links(p):  # for the MTU, ports before the bridge would do too: the bridge's is set
            ip(netns, f"link set {link} {key} {value}")
        return saved

    def undo(p: Pair, saved: object) -> None:
        assert isinstance(saved, dict)
        for (netns, link), before in saved.items():
            ip(netns, f"link set {link} {key} {before}")

    def holds(p: Pair) -> bool:
        return all(current(netns, link) == value for netns, link in links(p))

    return Change(name, what, apply, undo, holds)


def _mtu(mtu: int) -> Change:
    what = f"overlay MTU {mtu} (bridge, ports, containers) instead of the agent's"
    return _link_setting(f"mtu{mtu}", what, _overlay_links, "mtu", mtu)


def _gso(size: int) -> Change:
    """The containers' GSO size (what their TCP builds packets up to); iperf3's connection is new in every run, so
    it takes it."""
    what = f"the containers' GSO size {size} instead of the agent's"
    return _link_setting(f"gso{size}", what, _container_links, "gso_max_size", size)


CHANGES = {
    c.name: c
    for c in (
        _drop_tables((FASTGUARD,)),
        _drop_tables((PORTGUARD,)),
        _drop_tables((DNSGUARD,)),
        _drop_tables((FASTGUARD, PORTGUARD, DNSGUARD)),
        _hooks_only((FASTGUARD, PORTGUARD, DNSGUARD)),
        _sysctls(dict.fromkeys(BRNF, "0"), "no-brnf", "the host's br_netfilter off (bridge-nf-call-* = 0)"),
        _mtu(HAND_MTU),
        _gso(KERNEL_GSO_MAX),  # gso65536: the kernel's, which agents without a secret keep
        _gso(OVERLAY_GSO_MAX),  # gso62588: what a mesh with a secret gives its containers (trusted subnets' cost)
    )
}


# -- measuring ---------------------------------------------------------------------------------------------------


TESTS = {  # name -> iperf3 arguments
    "tcp1": ["-P", "1"],
    "tcp4": ["-P", "4"],
    # Small packets at full speed: each costs the whole per-packet path (bridges, guards, VXLAN) with no GSO to
    # spread it over 40 segments; 1,300 B fit every MTU here without fragments.
    "udp": ["-u", "-b", "0", "-l", "1300"],
}


@dataclass
class Variant:
    name: str
    pair: Pair
    change: Change | None = None
    src: Path | None = None  # the agents' source, for weft pairs
    server_pid: int = 0
    runs: dict[str, list[dict]] = field(default_factory=lambda: {t: [] for t in TESTS})


def _machine_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def _vxlan_tx(p: Pair) -> int | None:
    with contextlib.suppress(BenchError):
        return int(ns(p.h1, "cat", "/sys/class/net/vxlan-6784/statistics/tx_bytes"))
    return None


def _counters(netns: str) -> dict[str, int]:
    """Byte and packet counters of a container's interfaces (whatever their name), summed."""
    total = {"rx_bytes": 0, "tx_bytes": 0, "tx_packets": 0}
    for link in json.loads(ns(netns, "ip", "-j", "-s", "link", "show")):
        if link["ifname"] != "lo":
            stats = link["stats64"]
            total["rx_bytes"] += stats["rx"]["bytes"]
            total["tx_bytes"] += stats["tx"]["bytes"]
            total["tx_packets"] += stats["tx"]["packets"]
    return total


def _ksoftirqd() -> list[int]:
    """The softirq threads: work they do for our flows counts nowhere else (they serve every tenant alike)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(entry.name))
    return pids


KSOFTIRQD: list[int] = []


def _cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _client(v: Variant, test: str, seconds: float, out: Path, perf_to: Path | None) -> tuple[int, float, float]:
    """Run the iperf3 client to its end; (PID, its CPU seconds from wait4, wall seconds)."""
    cmd = ["iperf3", "-c", v.pair.dst_ip, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-O", "1", *TESTS[test]]
    with out.open("w") as f:
        client = subprocess.Popen(
            ["ip", "netns", "exec", v.pair.c1, *cmd, "-J", "--connect-timeout", "5000"],
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # `ip netns exec` execs: the PID is iperf3's
        )
    recorder = _perf_start(perf_to, seconds) if perf_to else None
    t0 = time.monotonic()
    deadline = t0 + seconds + 40
    while True:
        pid, status, usage = os.wait4(client.pid, os.WNOHANG)
        if pid:
            client.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait()
            raise BenchError(f"{v.name}: iperf3 {test} hung")
        time.sleep(0.05)
    wall = time.monotonic() - t0
    if recorder is not None:
        recorder.wait(30)
    return client.pid, usage.ru_utime + usage.ru_stime, wall


def iperf(v: Variant, test: str, seconds: float, tmp: Path, perf_to: Path | None = None) -> dict:
    """One iperf3 run from c1 (the change applied around it, when the variant has one)."""
    saved = v.change.apply(v.pair) if v.change else None
    try:
        if v.change and not v.change.holds(v.pair):
            raise BenchError(f"{v.name}: the change did not take")
        busy0, total0 = _machine_busy()
        vx0, sent0, got0 = _vxlan_tx(v.pair), _counters(v.pair.c1), _counters(v.pair.c2)
        agents0 = [_cpu_s(a.pid) for a in v.pair.agents]
        server0 = _cpu_s(v.server_pid)
        soft0 = sum(_cpu_s(pid) for pid in KSOFTIRQD)
        out = tmp / "iperf3.json"
        pid, client_cpu, wall = _client(v, test, seconds, out, perf_to)
        busy1, total1 = _machine_busy()
        vx1, sent1, got1 = _vxlan_tx(v.pair), _counters(v.pair.c1), _counters(v.pair.c2)
        agents_cpu = sum(_cpu_s(a.pid) for a in v.pair.agents) - sum(agents0)
        server_cpu = _cpu_s(v.server_pid) - server0
        soft_cpu = sum(_cpu_s(pid) for pid in KSOFTIRQD) - soft0
        holds = v.change.holds(v.pair) if v.change else True
    finally:
        if v.change:
            v.change.undo(v.pair, saved)
    text = out.read_text(errors="replace")
    try:
        end = json.loads(text)["end"]
        received = end["sum_received"]
    except (json.JSONDecodeError, KeyError):
        raise BenchError(f"{v.name}: iperf3 {test}: {text.strip()[-300:]}") from None
    r = {
        "gbps": round(received["bits_per_second"] / 1e9, 3),
        "retransmits": end["sum_sent"].get("retransmits"),
        "machine_pct": round((busy1 - busy0) / max(1, total1 - total0) * 100 * (os.cpu_count() or 1), 1),
        "change_held": holds,
        "client_pid": pid,
    }
    sent_gb = (sent1["tx_bytes"] - sent0["tx_bytes"]) / 1e9
    got_gb = (got1["rx_bytes"] - got0["rx_bytes"]) / 1e9
    packets = sent1["tx_packets"] - sent0["tx_packets"]
    if sent_gb > 0 and got_gb > 0:
        r["cpu_ms_per_gb"] = round((client_cpu / sent_gb + server_cpu / got_gb) * 1000, 1)
        # CPU per GB (the omitted second included on both sides of the division): the work the path costs, which
        # another tenant's load does not change the way it changes throughput. The sender's time includes the
        # softirq work run in its context (tick accounting): with veth, most of both hosts' path.
        r["sender_ms_per_gb"] = round(client_cpu * 1000 / sent_gb, 1)
        r["receiver_ms_per_gb"] = round(server_cpu * 1000 / got_gb, 1)
        r["ksoftirqd_ms_per_gb"] = round(soft_cpu * 1000 / got_gb, 1)
    if packets > 0:
        r["sender_us_per_packet"] = round(client_cpu * 1e6 / packets, 2)
        r["kpps_sent"] = round(packets / wall / 1000, 1)
    if "lost_percent" in received:
        r["lost_pct"] = round(received["lost_percent"], 1)
    if vx0 is not None and vx1 is not None and sent_gb > 0:
        r["vxlan_share"] = round((vx1 - vx0) / 1e9 / sent_gb, 2)  # about 1 when everything went by VXLAN
    if v.pair.agents:
        r["agents_cpu_pct"] = round(agents_cpu / wall * 100, 1)
    return r


# -- perf ----------------------------------------------------------------------------------------------------------

AREAS = [  # (area, symbol pattern): the first that matches a kernel symbol names its area
    ("netfilter: nftables", r"^(nft_|__nft_|nf_tables_|nft_do_chain)"),
    ("netfilter: br_netfilter", r"^(br_nf_|br_validate_|nf_bridge_|setup_pre_routing|br_parse_ip)"),
    ("netfilter: hooks", r"^(nf_hook|nf_conntrack|nf_ct_|nf_nat|ipt_|ip6t_|nf_)"),
    ("bridge", r"^(br_|__br_|nbp_)"),
    ("vxlan / udp tunnel", r"^(vxlan|__vxlan|udp_tunnel|iptunnel|udp_gro|udp4_gro|udp_gso|__udp_gso|skb_udp_tunnel)"),
    ("udp", r"^(udp|__udp|udpv6)"),
    ("ip", r"^(ip_|__ip_|ip4_|inet_|fib_|ipv4_|__ip4|ip_route|rt_)"),
    ("tcp", r"^(tcp|__tcp|skb_copy_datagram|sk_|__sk_|release_sock|lock_sock)"),
    ("veth", r"^(veth|__veth)"),
    ("copy", r"(copy_user|_copy_to|_copy_from|memcpy|rep_mov|copyout|copyin|__memmove|memmove)"),
    ("checksum", r"(csum|checksum)"),
    ("gso / gro", r"(gso|gro|segment)"),
    ("skb alloc/free", r"(skb|kmem_cache|kfree|kmalloc|page_frag|__alloc|alloc_pages|free_unref|__free_pages)"),
    ("device / softirq", r"^(__dev_|dev_|netif_|__netif|net_rx|napi|__napi|process_backlog|do_softirq|__do_softirq"
     r"|handle_softirqs|__local_bh|_raw_spin|queued_spin|rcu_)"),
]  # fmt: skip
_SAMPLE = re.compile(r"^\s*(.+?)\s+(\d+)\s+([0-9a-f]+)\s*(.*)$")
IDLE = re.compile(r"(default_idle|safe_halt|cpu_idle|do_idle|poll_idle|mwait|acpi_idle)")


def _perf_start(path: Path, seconds: float) -> subprocess.Popen | None:
    if shutil.which("perf") is None:
        return None
    return subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-a", "-o", str(path), "--", "sleep", f"{seconds:g}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def perf_summary(path: Path, pids: set[int]) -> dict:
    """Kernel samples of the iperf3 processes (and softirq work in ksoftirqd and the idle task), by area."""
    if not path.exists():
        return {"failed": "no perf data (is perf installed?)"}
    out = run("perf", "script", "-i", str(path), "-F", "comm,pid,ip,sym", timeout=300, check=False)
    areas: Counter[str] = Counter()
    symbols: Counter[str] = Counter()
    total = user = 0
    for line in out.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        comm, pid, addr, sym = m[1], int(m[2]), m[3], m[4].strip() or "[unknown]"
        if not (pid in pids or comm.startswith(("ksoftirqd", "swapper"))):
            continue
        if IDLE.search(sym):
            continue
        total += 1
        if not addr.startswith("ffff"):
            user += 1
            continue
        symbols[sym] += 1
        areas[next((a for a, pattern in AREAS if re.search(pattern, sym)), "other kernel")] += 1
    path.unlink(missing_ok=True)
    if not total:
        return {"failed": "no samples"}
    return {
        "samples": total,
        "user_pct": round(user / total * 100, 1),
        "areas_pct": {a: round(n / total * 100, 1) for a, n in areas.most_common()},
        "top_symbols_pct": {s: round(n / total * 100, 1) for s, n in symbols.most_common(25)},
    }


# -- the run -------------------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _uptime() -> str:
    return run("uptime").strip()


def _snapshot(p: Pair) -> dict:
    """What the kernel has on h1 of a pair: devices with their offloads, the rules, the bridge's settings."""
    out: dict = {"links": {}, "nft": ns(p.h1, "nft", "list", "ruleset", check=False)}
    for link in json.loads(ns(p.h1, "ip", "-d", "-j", "link", "show")):
        name = link["ifname"]
        if name == "lo":
            continue
        features = ns(p.h1, "ethtool", "-k", name, check=False)
        out["links"][name] = {
            "mtu": link.get("mtu"),
            "kind": (link.get("linkinfo") or {}).get("info_kind"),
            "info": (link.get("linkinfo") or {}).get("info_data"),
            "port": (link.get("linkinfo") or {}).get("info_slave_data"),
            "offloads_on": sorted(
                line.split(":")[0].strip()
                for line in features.splitlines()[1:]
                if ": on" in line and "[fixed]" not in line
            ),
        }
    out["sysctl"] = {k: ns(p.h1, "sysctl", "-n", k, check=False).strip() for k in BRNF}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 run length, after 1 s omitted")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of every variant (medians over them)")
    parser.add_argument("--tests", default=",".join(TESTS), help=f"iperf3 tests, comma-separated: {', '.join(TESTS)}")
    parser.add_argument(
        "--changes",
        default=",".join(CHANGES),
        help="ablations of the weft pair, comma-separated ('' for none): "
        + "; ".join(f"{c.name}: {c.what}" for c in CHANGES.values()),
    )
    parser.add_argument(
        "--agent-src",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also measure agents from another source tree (e.g. main=/work/main/agent/src), as weft@LABEL",
    )
    parser.add_argument("--hand-noudpcsum", action="store_true", help="also a hand-built VXLAN with noudpcsum")
    parser.add_argument("--perf", action="store_true", help="one profiled run per variant and test (perf record -a)")
    parser.add_argument("--perf-seconds", type=float, default=10.0, help="length of each profiled run")
    parser.add_argument("--output", type=Path, default=RESULTS / "fastpath_diff.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    changes = [c.strip() for c in args.changes.split(",") if c.strip()]
    tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    unknown = [c for c in changes if c not in CHANGES] + [t for t in tests if t not in TESTS]
    if unknown or not tests:
        parser.error(f"unknown --changes or --tests: {', '.join(unknown) or '(no test)'}")
    others = []
    for spec in args.agent_src:
        label, _, path = spec.partition("=")
        if not path or not Path(path, "weft").is_dir():
            parser.error(f"--agent-src {spec}: expected LABEL=PATH to a directory holding the weft package")
        others.append((label, Path(path).resolve()))

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    world = World()
    report: dict = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "kernel": os.uname().release,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "tests": {t: " ".join(TESTS[t]) for t in tests},
        "uptime": {"start": _uptime()},
    }
    log(f"uptime at start: {report['uptime']['start']}")
    try:
        variants = _build(world, changes, others, hand_noudpcsum=args.hand_noudpcsum)
        report["snapshot"] = {v.name: _snapshot(v.pair) for v in variants if v.name in ("hand", "weft")}
        log(f"variants: {', '.join(v.name for v in variants)}")
        for i in range(args.rounds):
            for v in variants:
                for test in tests:
                    r = iperf(v, test, args.seconds, world.tmp)
                    v.runs[test].append(r)
                    log(f"  round {i + 1}/{args.rounds} {v.name:<20} {test:<5} {_line(r)}")
            report["uptime"][f"after round {i + 1}"] = _uptime()
            log(f"uptime: {report['uptime'][f'after round {i + 1}']}")
        profiles: dict[str, dict] = {}
        if args.perf:
            log("profiling one run per variant and test ...")
            for test in tests:
                for v in variants:
                    data = world.tmp / f"perf-{v.name}-{test}.data"
                    r = iperf(v, test, args.perf_seconds, world.tmp, perf_to=data)
                    pids = {v.server_pid, r["client_pid"]}
                    profiles.setdefault(v.name, {})[test] = {**_strip(r), "perf": perf_summary(data, pids)}
                    log(f"  {v.name} {test}: {_line(r)} (profiled)")
        report["variants"] = _summarise(variants, tests, profiles)
        report["uptime"]["end"] = _uptime()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except BenchError as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        world.close()
    _print(report, tests)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    log(f"\nJSON: {args.output}")
    return 0


def _build(world: World, changes: list[str], others: list[tuple[str, Path]], *, hand_noudpcsum: bool) -> list[Variant]:
    """Every pair, an iperf3 server in each destination container, and the variants that use them."""
    own = REPO / "agent" / "src"
    log("building: routed veth, hand-built VXLAN, weft agents ...")
    variants = [Variant("routed", routed(world)), Variant("hand", hand(world))]
    if hand_noudpcsum:
        variants.append(Variant("hand-noudpcsum", hand(world, "handnc", udpcsum=False)))
    wp = weft(world, "weft", own)
    variants.append(Variant("weft", wp, src=own))
    for label, path in others:
        variants.append(Variant(f"weft@{label}", weft(world, f"w{label}"[:8], path), src=path))
    variants += [Variant(f"weft-{c}", wp, CHANGES[c], src=own) for c in changes]
    servers: dict[str, int] = {}
    for v in variants:
        if v.pair.c2 not in servers:
            cmd = ["iperf3", "-s", "-p", str(IPERF_PORT)]
            servers[v.pair.c2] = world.spawn(v.pair.c2, cmd, f"iperf3-{v.pair.name}.log").pid
        v.server_pid = servers[v.pair.c2]
    KSOFTIRQD[:] = _ksoftirqd()
    time.sleep(1.0)
    for v in variants:
        if not _pings(v.pair):
            raise BenchError(f"{v.name}: c1 cannot ping {v.pair.dst_ip}")
    return variants


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("client_pid", "change_held")}


def _line(r: dict) -> str:
    text = f"{r['gbps']:6.2f} Gb/s  machine {r['machine_pct']:5.1f}%"
    if "sender_ms_per_gb" in r:
        text += f"  send {r['sender_ms_per_gb']:4.0f} recv {r['receiver_ms_per_gb']:4.0f} ms/GB"
    if "lost_pct" in r:
        text += f"  {r.get('kpps_sent', 0):5.0f} kpps sent, {r.get('sender_us_per_packet', 0):.2f} us/packet"
    if "vxlan_share" in r:
        text += f"  vxlan {r['vxlan_share']:.2f}"
    return text + ("" if r["change_held"] else "  (THE CHANGE DID NOT HOLD)")


FIGURES = (
    "gbps",
    "cpu_ms_per_gb",
    "sender_ms_per_gb",
    "receiver_ms_per_gb",
    "ksoftirqd_ms_per_gb",
    "sender_us_per_packet",
    "kpps_sent",
    "lost_pct",
    "retransmits",
    "machine_pct",
    "agents_cpu_pct",
)


def _summarise(variants: list[Variant], tests: list[str], profiles: dict[str, dict]) -> dict:
    """Medians per variant and test, each with its ratio to routed veth's: of the medians, and the median of
    each round's ratio to the routed run of the same round (load that hit a round hit both)."""
    out: dict = {}
    base = next(v for v in variants if v.name == "routed")
    for v in variants:
        row: dict = {"what": v.change.what if v.change else None}
        for test in tests:
            runs, base_runs = v.runs[test], base.runs[test]
            t: dict = {}
            for key in FIGURES:
                values = [r[key] for r in runs if r.get(key) is not None]
                if values:
                    t[key] = _median(values)
                    t[f"{key}_range"] = [min(values), max(values)]
                base_values = [r[key] for r in base_runs if r.get(key) is not None]
                if values and base_values and statistics.median(base_values):
                    t[f"{key}_ratio"] = round(statistics.median(values) / statistics.median(base_values), 3)
                    paired = [
                        r[key] / b[key] for r, b in zip(runs, base_runs, strict=False) if r.get(key) and b.get(key)
                    ]
                    t[f"{key}_paired_ratio"] = _median(paired)
            shares = [r["vxlan_share"] for r in runs if "vxlan_share" in r]
            if shares:
                t["vxlan_share_min"] = min(shares)
            t["change_held"] = all(r["change_held"] for r in runs)
            t["runs"] = [_strip(r) for r in runs]
            row[test] = t
        if v.name in profiles:
            row["profiled"] = profiles[v.name]
        out[v.name] = row
    return out


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _print(report: dict, tests: list[str]) -> None:
    variants = report.get("variants", {})
    print(f"\nMedians of {report['rounds']} rounds of {report['seconds']:g} s (1 s omitted), kernel {report['kernel']}")
    print(f"  {report['uptime']['start']}\n  {report['uptime'].get('end', '?')}")
    print("ratio: to routed veth's median; paired: median over rounds of the ratio to that round's routed run")
    print("CPU ms/GB: the iperf3 sender's and receiver's CPU time per GB (send, recv), softirq work in their context")
    print("included; us/packet: the sender's per datagram sent, for UDP most of the path of both hosts")
    for test in tests:
        print(f"\n{test} (iperf3 {report['tests'][test]})")
        headers = ["variant", "Gb/s (min-max)", "ratio", "paired", "CPU ms/GB", "ratio", "send", "recv"]
        if test == "udp":
            headers += ["kpps sent", "us/packet", "ratio"]
        headers += ["machine %", "agents %"]
        rows = []
        for name, r in variants.items():
            t = r.get(test, {})
            rng = t.get("gbps_range", [None, None])
            row = [
                name,
                f"{_f(t.get('gbps'))} ({_f(rng[0])}-{_f(rng[1])})",
                _f(t.get("gbps_ratio"), ".3f"),
                _f(t.get("gbps_paired_ratio"), ".3f"),
                _f(t.get("cpu_ms_per_gb"), ".0f"),
                _f(t.get("cpu_ms_per_gb_paired_ratio"), ".3f"),
                _f(t.get("sender_ms_per_gb"), ".0f"),
                _f(t.get("receiver_ms_per_gb"), ".0f"),
            ]
            if test == "udp":
                row += [
                    _f(t.get("kpps_sent"), ".0f"),
                    _f(t.get("sender_us_per_packet"), ".2f"),
                    _f(t.get("sender_us_per_packet_paired_ratio"), ".3f"),
                ]
            row += [_f(t.get("machine_pct"), ".0f"), _f(t.get("agents_cpu_pct"), ".1f")]
            rows.append(row)
        _table(headers, rows)
    print()
    for name, r in variants.items():
        if r.get("what"):
            print(f"  {name}: {r['what']}")
        if not all(r.get(t, {}).get("change_held", True) for t in tests):
            print(f"  {name}: THE CHANGE DID NOT HOLD IN SOME RUN")
    for test in tests:
        profiled = {n: r["profiled"][test]["perf"] for n, r in variants.items() if test in r.get("profiled", {})}
        if not profiled:
            continue
        areas = sorted({a for p in profiled.values() for a in p.get("areas_pct", {})})
        samples = ", ".join(f"{n.removeprefix('weft-')} {p.get('samples', 0)}" for n, p in profiled.items())
        print(f"\n{test}: kernel time by area in one profiled run (% of the flow's non-idle samples: {samples})")
        names = list(profiled)
        rows = [[a] + [_f(profiled[n].get("areas_pct", {}).get(a, 0.0), ".1f") for n in names] for a in areas]
        rows.append(["user (iperf3)"] + [_f(profiled[n].get("user_pct"), ".1f") for n in names])
        _table(["area", *(n.removeprefix("weft-") for n in names)], rows)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""DNS and CNI figures: the agent's DNS server against dnsmasq, the CNI plugin's ADD and DEL, and the gossip one DNS
registration costs.

Three parts; the first two on a real agent in a network namespace (agent/tests/harness/lab.py, one host, root):

- **DNS server vs dnsmasq**: the agent (``--dns-upstream 127.0.0.1:1``, so nothing leaves) with NAMES names
  registered through its API (``POST /dns/add``), and dnsmasq serving the same names from a hosts file
  (``--addn-hosts``, ``--local=/weft.local/`` so a missing name is NXDOMAIN, as the agent answers it), listening on
  the agent's own address, 169.254.53.53, port 5300, on the same bridge. dnsperf runs in a container attached to
  that bridge, so both are asked over the path a container's question takes, the port aside. The same query files
  for both: every name once (A), and the same with one query in ten for a name nobody has (NXDOMAIN). Each server is
  first asked the whole file once (not measured, every answer's rcode checked), then: queries per second at
  saturation (100 outstanding), and p50/p99 latency at a fixed rate below the slower one's saturation (``-Q``), from
  dnsperf's per-query output (``-v``; dnsperf 2.10 has no latency histogram), so p99 is latency, not queueing (one
  rate for both query files, from the saturation of the first). Each measure is split in two runs, the servers
  taking turns (weft first, then dnsmasq first), so both meet the same machine; latencies are pooled. The host has
  no route to its containers (the agent's sockets are bound to the bridge and need none), so the bench adds one to
  dnsperf's container, for dnsmasq's answers. Both answer from memory: dnsmasq loads hosts-file names into its
  cache at start (``--cache-size 10000``), and the agent answers a repeated question from its rendered answers
  (up to 4,096 questions; docs/dns.md, "Speed").
- **CNI ADD and DEL**: the ``weft-cni`` plugin (the venv's console script, or ``python -m weft.cni``) run as a
  runtime runs it, CNI_* variables and the network's configuration on stdin, against the same agent: ADD of a fresh
  named namespace (/run/netns/NAME) with a DNS name (``K8S_POD_NAME``), then its DEL; wall time of the plugin
  process, start to exit, each once the agent is idle again. Next to it, the plugin's VERSION (no agent asked): the
  floor a Python process sets; and the agent's part, ``POST /attach`` and ``/detach`` with the plugin's body, sent
  from this process.
- **DNS gossip per registration** on the simulator (weft.sim), as agent/tests/unit/test_dns_service.py measures it: 100
  peers in a tree of strangers holding 1,000 entries, bytes of ``dns`` gossip per registration and per removal
  until every peer has it, next to the whole-table baseline (the table sent to every peer once).

Figures only, nothing asserts. ``run()`` returns them (JSON-ready) for bench/run.py; a part that could not be
measured at all holds ``error`` (``skipped`` when it needs root and the bench has none). Alone:
``python bench/names.py`` prints the JSON.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "agent" / "tests" / "harness"))  # the netns lab harness of the agent's tests

from lab import Container, Host, Lab, netns_unavailable_reason, wait_until  # noqa: E402

Log = Callable[[str], None]

DNS_ADDRESS = "169.254.53.53"
DNSMASQ_PORT = 5300
DOMAIN = "weft.local"
NAMES = 1000
NX_EVERY = 10  # the NXDOMAIN variant: one query in ten for a name nobody has
ROUNDS = 2  # each measure split in this many runs, the servers taking turns (weft first, then dnsmasq first)
OUTSTANDING = 100  # dnsperf -q at saturation
RATE_SHARE = 0.3  # the fixed rate: this share of the slower server's saturation ...
RATE_MIN, RATE_MAX = 500, 5000  # ... within these
CYCLES = 50  # CNI ADD/DEL cycles measured
WARMUP = 3  # and first, not measured (bytecode cache written, agent code paths warm)
VERSION_RUNS = 20
API_CYCLES = 20  # attach/detach through the API from this process: the agent's part of an ADD/DEL
QUIET_PCT, QUIET_WAIT_S = 25.0, 5.0  # before each real-agent part: wait (at most that long) for a quieter machine
IDLE_FOR, IDLE_MAX = 0.1, 2.0  # before each CNI operation: the agent used no CPU for IDLE_FOR s (at most IDLE_MAX)
TARGETS = {"dns_p99_ms": 2.0, "cni_add_ms": 100.0}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- helpers ---------------------------------------------------------------------------------------------------------


def _percentiles(values: list[float], digits: int = 3) -> dict:
    """Samples, median, p99 and max (the shape of the other benches' figures)."""
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "samples": len(ordered),
        "median": round(statistics.median(ordered), digits),
        "p99": round(p99, digits),
        "max": round(ordered[-1], digits),
    }


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


class _Usage:
    """CPU a process used, and how busy the whole machine was, between start and stop (% of one core)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu0 = _cpu_seconds(pid)
        self.busy0, self.total0 = _machine_busy()
        self.t0 = time.monotonic()

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        cpu1 = _cpu_seconds(self.pid)
        busy1, total1 = _machine_busy()
        cores = os.cpu_count() or 1
        out = {"machine_busy_pct": round((busy1 - self.busy0) / max(1, total1 - self.total0) * 100 * cores, 1)}
        if cpu1 is not None and self.cpu0 is not None and wall > 0:
            out["server_cpu_pct"] = round((cpu1 - self.cpu0) / wall * 100, 1)
        return out


def _wait_idle(pid: int) -> None:
    """Until ``pid`` used no CPU for IDLE_FOR seconds (at most IDLE_MAX): what the next operation meets."""
    deadline = time.monotonic() + IDLE_MAX
    while time.monotonic() < deadline:
        before = _cpu_seconds(pid)
        time.sleep(IDLE_FOR)
        if _cpu_seconds(pid) == before:
            return


def _wait_quiet(log: Log) -> float:
    """Wait (up to QUIET_WAIT_S) until the machine is nearly idle; how busy it was last (% of one core)."""
    deadline = time.monotonic() + QUIET_WAIT_S
    cores = os.cpu_count() or 1
    while True:
        busy0, total0 = _machine_busy()
        time.sleep(1.0)
        busy1, total1 = _machine_busy()
        pct = (busy1 - busy0) / max(1, total1 - total0) * 100 * cores
        if pct <= QUIET_PCT or time.monotonic() > deadline:
            if pct > QUIET_PCT:
                log(f"    other processes keep the machine {pct:.0f}% busy (of {100 * cores}%); measuring anyway")
            return round(pct, 1)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


# -- part 1: the DNS server against dnsmasq --------------------------------------------------------------------------


def _name(i: int) -> str:
    return f"name-{i}"


def _address(i: int) -> str:
    return str(ipaddress.IPv4Address("10.40.0.0") + 1 + i)


def _query_files(directory: Path, names: int) -> dict[str, Path]:
    """The query files: every name once, in a shuffled order; and the same with every NX_EVERY-th query for a
    name nobody has."""
    order = list(range(names))
    random.Random(1).shuffle(order)
    hits = [f"{_name(i)}.{DOMAIN} A\n" for i in order]
    mixed: list[str] = []
    for n, line in enumerate(hits, 1):
        mixed.append(line)
        if n % (NX_EVERY - 1) == 0:
            mixed.append(f"missing-{n}.{DOMAIN} A\n")
    files = {"hits": directory / "queries-hits.txt", "nxdomain": directory / "queries-nxdomain.txt"}
    files["hits"].write_text("".join(hits))
    files["nxdomain"].write_text("".join(mixed))
    return files


_SUMMARY = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "qps": re.compile(r"Queries per second:\s+([0-9.]+)"),
    "avg_latency_s": re.compile(r"Average Latency \(s\):\s+([0-9.]+)"),
}
_RCODES = re.compile(r"Response codes:\s+(.*)")
_VERBOSE = re.compile(r"^> (\S+) \S+ \S+ ([0-9.]+)$", re.MULTILINE)


def _dnsperf(c: Container, port: int, queries: Path, *extra: str, timeout: float) -> tuple[dict, str]:
    """dnsperf in the container against ``port`` of the DNS address: (its summary, its output)."""
    cmd = ["dnsperf", "-s", DNS_ADDRESS, "-p", str(port), "-d", str(queries), *extra]
    res = c.exec(*cmd, check=False, timeout=timeout)
    out = res.stdout
    summary: dict = {}
    for key, pattern in _SUMMARY.items():
        m = pattern.search(out)
        if m:
            summary[key] = float(m[1]) if "." in m[1] else int(m[1])
    m = _RCODES.search(out)
    if m:
        summary["rcodes"] = {code: int(count) for code, count in re.findall(r"([A-Z]+) (\d+) \(", m[1])}
    if res.returncode != 0 or "qps" not in summary:
        raise RuntimeError(f"dnsperf {' '.join(extra)}: exit {res.returncode}: {(res.stderr or out)[-500:]}")
    return summary, out


def _saturation(c: Container, port: int, queries: Path, seconds: float, pid: int) -> dict:
    usage = _Usage(pid)
    summary, _ = _dnsperf(c, port, queries, "-l", f"{seconds:g}", "-q", str(OUTSTANDING), timeout=seconds + 30)
    return {
        "qps": summary["qps"],
        "sent": summary.get("sent", 0),
        "lost": summary.get("lost", 0),
        "avg_latency_ms": 1e3 * summary.get("avg_latency_s", 0.0),
        "rcodes": summary.get("rcodes", {}),
        **usage.stop(),
    }


def _fixed_rate(c: Container, port: int, queries: Path, seconds: float, rate: int, pid: int) -> dict:
    usage = _Usage(pid)
    summary, out = _dnsperf(c, port, queries, "-l", f"{seconds:g}", "-Q", str(rate), "-v", timeout=seconds + 30)
    latencies = [1e3 * float(m[2]) for m in _VERBOSE.finditer(out)]
    if not latencies:
        raise RuntimeError(f"dnsperf -v gave no per-query lines: {out[-500:]}")
    return {
        "qps": summary["qps"],
        "sent": summary.get("sent", 0),
        "lost": summary.get("lost", 0),
        "timeouts": out.count("[Timeout]"),
        "rcodes": summary.get("rcodes", {}),
        "latencies": latencies,
        **usage.stop(),
    }


def _pooled(runs: list[dict]) -> dict:
    """The runs of one server (equal lengths) as one: mean rates and CPU, summed counts, latencies pooled."""
    out: dict = {
        "qps": round(statistics.mean(r["qps"] for r in runs)),
        "qps_per_round": [round(r["qps"]) for r in runs],
        "sent": sum(r["sent"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "rcodes": {},
    }
    for r in runs:
        for code, count in r["rcodes"].items():
            out["rcodes"][code] = out["rcodes"].get(code, 0) + count
    for key in ("avg_latency_ms", "server_cpu_pct", "machine_busy_pct"):
        values = [r[key] for r in runs if key in r]
        if values:
            out[key] = round(statistics.mean(values), 3 if key.endswith("_ms") else 1)
    if any("latencies" in r for r in runs):
        out["timeouts"] = sum(r.get("timeouts", 0) for r in runs)
        out["ms"] = _percentiles([x for r in runs for x in r.get("latencies", [])], 4)
    return out


def _version(cmd: list[str], pattern: str) -> str | None:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    m = re.search(pattern, res.stdout + res.stderr)
    return m[1] if m else None


def _register(h: Host, names: int) -> float:
    """NAMES names through the API, one request each; the seconds it took."""
    from weft.api.client import Client  # the tree under test

    client = Client(str(h.api_socket), timeout=30.0)
    began = time.perf_counter()
    for i in range(names):
        client.request("POST", "/dns/add", {"name": _name(i), "addresses": [_address(i)]})
    return time.perf_counter() - began


def _start_dnsmasq(h: Host, hosts_file: Path) -> subprocess.Popen:
    proc = h.popen(
        "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts_file}",
        f"--local=/{DOMAIN}/", "--bind-interfaces", f"--listen-address={DNS_ADDRESS}", f"--port={DNSMASQ_PORT}",
        "--cache-size=10000", "--user=root", "--pid-file=", "--log-facility=-",
        log_name="dnsmasq.log",
    )  # fmt: skip
    wait_until(
        lambda: proc.poll() is not None or f"read {hosts_file}" in proc.read_log(),
        timeout=10,
        interval=0.05,
        message=lambda: f"dnsmasq did not start: {proc.read_log()[-1000:]}",
    )
    if proc.poll() is not None:
        raise RuntimeError(f"dnsmasq exited with {proc.returncode}: {proc.read_log()[-1000:]}")
    return proc


def server_vs_dnsmasq(lab: Lab, h: Host, log: Log, *, names: int = NAMES, seconds: float = 10.0) -> dict:
    """Part 1 (the agent running on ``h``)."""
    for tool in ("dnsperf", "dnsmasq"):
        if shutil.which(tool) is None:
            return {"error": f"{tool} is not installed"}
    assert lab.tmp_dir is not None and h.agent is not None
    log(f"DNS: registering {names:,} names through the API ...")
    register_s = _register(h, names)
    hosts_file = h.tmp_dir / "dnsmasq.hosts"
    hosts_file.write_text("".join(f"{_address(i)} {_name(i)}.{DOMAIN}\n" for i in range(names)))
    dnsmasq = _start_dnsmasq(h, hosts_file)
    client = h.add_container_auto(api=True)  # dnsperf's container, on the agent's bridge
    # The host has no route to the containers (the agent's DNS sockets are bound to the bridge and need none):
    # one to dnsperf's container, for dnsmasq's answers.
    (held,) = json.loads(h.exec("ip", "-j", "-4", "addr", "show", "to", f"{DNS_ADDRESS}/32").stdout)
    h.exec("ip", "route", "add", f"{client.ip}/32", "dev", held["ifname"])
    files = _query_files(lab.tmp_dir, names)
    servers = {"weft": (53, h.agent.pid), "dnsmasq": (DNSMASQ_PORT, dnsmasq.pid)}
    report: dict = {
        "names": names,
        "register_s": round(register_s, 2),
        "seconds": seconds,
        "outstanding": OUTSTANDING,
        "dnsperf": _version(["dnsperf", "-h"], r"Version (\S+)"),
        "dnsmasq": _version(["dnsmasq", "--version"], r"version (\S+)"),
        "variants": {},
    }
    rate: int | None = None
    for variant, queries in files.items():
        length = seconds if variant == "hits" else seconds / 2
        for server, (port, _) in servers.items():  # each asked everything once: caches warm, answers checked
            summary, _ = _dnsperf(client, port, queries, "-n", "1", timeout=60)
            want = {"NOERROR"} if variant == "hits" else {"NOERROR", "NXDOMAIN"}
            if set(summary.get("rcodes", {})) != want or summary.get("lost"):
                raise RuntimeError(
                    f"{server} answered {variant} with {summary.get('rcodes')} (lost {summary.get('lost')})"
                )
        v: dict = {"queries": len(queries.read_text().splitlines()), "seconds": length, "rounds": ROUNDS}
        # Each server in turn, ROUNDS times, first one first then the other: the two meet the same machine.
        each = length / ROUNDS
        orders = [list(servers) if r % 2 == 0 else list(reversed(servers)) for r in range(ROUNDS)]
        log(f"DNS: {variant}, saturation ({OUTSTANDING} outstanding), {ROUNDS} x {each:g} s each ...")
        runs: dict[str, list[dict]] = {server: [] for server in servers}
        for order in orders:
            for server in order:
                port, pid = servers[server]
                runs[server].append(_saturation(client, port, queries, each, pid))
        v["saturation"] = {server: _pooled(r) for server, r in runs.items()}
        if rate is None:  # one rate for both query files: from the first's saturation
            slower = min(s["qps"] for s in v["saturation"].values())
            rate = int(max(RATE_MIN, min(RATE_MAX, RATE_SHARE * slower)) // 100 * 100)
        log(f"DNS: {variant}, {rate:,} queries/s, {ROUNDS} x {each:g} s each ...")
        runs = {server: [] for server in servers}
        for order in orders:
            for server in order:
                port, pid = servers[server]
                runs[server].append(_fixed_rate(client, port, queries, each, rate, pid))
        v["fixed"] = {server: {"rate": rate, **_pooled(r)} for server, r in runs.items()}
        sat = v["saturation"]
        v["qps_ratio"] = round(sat["weft"]["qps"] / sat["dnsmasq"]["qps"], 3) if sat["dnsmasq"]["qps"] else None
        fixed = v["fixed"]
        v["p50_ratio"] = _ratio(fixed["weft"]["ms"]["median"], fixed["dnsmasq"]["ms"]["median"])
        v["p99_ratio"] = _ratio(fixed["weft"]["ms"]["p99"], fixed["dnsmasq"]["ms"]["p99"])
        report["variants"][variant] = v
    return report


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


# -- part 2: CNI ADD and DEL -----------------------------------------------------------------------------------------


def _plugin() -> tuple[list[str], str]:
    """The command that runs the plugin, and what it is."""
    installed = Path(sys.executable).parent / "weft-cni"
    if installed.exists():
        return [str(installed)], str(installed)
    return [sys.executable, "-m", "weft.cni"], f"{Path(sys.executable).name} -m weft.cni"


def cni_latency(lab: Lab, h: Host, log: Log, *, cycles: int = CYCLES) -> dict:
    """Part 2 (the agent running on ``h``)."""
    assert h.agent is not None and lab.tmp_dir is not None
    cmd, what = _plugin()
    pycache = lab.tmp_dir / "pycache"
    env = {k: v for k, v in lab.process_env().items() if not k.startswith("CNI_")}
    # A bytecode cache of the bench's own, written by the first runs: later ones start as installed code does.
    env.update(
        {"PYTHONPYCACHEPREFIX": str(pycache), "PYTHONDONTWRITEBYTECODE": "", "CNI_PATH": str(Path(cmd[0]).parent)}
    )
    conf = json.dumps({"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni", "api_socket": str(h.api_socket)})

    def plugin(command: str, netns: str, container: str, name: str) -> tuple[float, subprocess.CompletedProcess]:
        op_env = {**env, "CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_IFNAME": "eth0"}
        if netns:
            op_env["CNI_NETNS"] = f"/run/netns/{netns}"
        op_env["CNI_ARGS"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"
        began = time.perf_counter()
        proc = subprocess.run(cmd, input=conf, capture_output=True, text=True, env=op_env, timeout=90, check=False)
        took = 1e3 * (time.perf_counter() - began)
        if proc.returncode != 0:
            raise RuntimeError(f"{command} {container}: exit {proc.returncode}: {(proc.stdout + proc.stderr)[-500:]}")
        return took, proc

    version: list[float] = []
    for _ in range(VERSION_RUNS + 1):
        took, _proc = plugin("VERSION", "", "version", "version")
        version.append(took)
    version = version[1:]  # the first wrote the bytecode cache

    from weft.api.client import Client  # the tree under test

    api = Client(str(h.api_socket), timeout=60.0)
    log(f"CNI: {API_CYCLES} attach/detach cycles through the API, the body the plugin sends ...")
    api_add: list[float] = []
    api_del: list[float] = []
    for i in range(API_CYCLES):
        netns = h.add_container("0.0.0.0/0", attach=False).netns
        key = f"cni:weft:api{i:04d}:eth0"
        body = {"key": key, "netns": netns, "ifname": "eth0", "cidrs": [], "exclusive": True, "name": f"api-{i}"}
        _wait_idle(h.agent.pid)
        began = time.perf_counter()
        api.request("POST", "/attach", body)
        api_add.append(1e3 * (time.perf_counter() - began))
        _wait_idle(h.agent.pid)
        began = time.perf_counter()
        api.request("POST", "/detach", {"key": key, "netns": netns, "ifname": "eth0"})
        api_del.append(1e3 * (time.perf_counter() - began))

    log(f"CNI: {WARMUP} + {cycles} ADD/DEL cycles with {what} ...")
    add: list[float] = []
    delete: list[float] = []
    usage = _Usage(h.agent.pid)
    for i in range(WARMUP + cycles):
        netns = h.add_container("0.0.0.0/0", attach=False).netns  # a fresh namespace, as a runtime makes one
        container = f"bench{i:04d}"
        _wait_idle(h.agent.pid)
        took_add, proc = plugin("ADD", netns, container, f"pod-{i}")
        result = json.loads(proc.stdout)
        if not result.get("ips"):
            raise RuntimeError(f"ADD {container} gave no address: {proc.stdout[-500:]}")
        _wait_idle(h.agent.pid)
        took_del, _ = plugin("DEL", netns, container, f"pod-{i}")
        if i >= WARMUP:
            add.append(took_add)
            delete.append(took_del)
    busy = usage.stop()["machine_busy_pct"]
    return {
        "plugin": what,
        "cycles": cycles,
        "warmup": WARMUP,
        "named": True,
        "add": {"ms": _percentiles(add)},
        "del": {"ms": _percentiles(delete)},
        "version": {"ms": _percentiles(version)},
        "api_attach": {"ms": _percentiles(api_add)},
        "api_detach": {"ms": _percentiles(api_del)},
        "machine_busy_pct": busy,
    }


# -- part 3: gossip per registration, simulated ----------------------------------------------------------------------


def gossip_per_registration(peers: int = 100, entries: int = 1000, rounds: int = 20) -> dict:
    """As agent/tests/unit/test_dns_service.py's test_gossip_bytes_per_registration_at_100_peers: a tree of strangers,
    the table of ``entries`` put in place directly, no anti-entropy in the window; then ``rounds`` registrations
    (each until every peer answers it), and as many removals."""
    from weft.sim import SimNetwork, add_dns, chain_of_strangers

    def bytes_out(net: SimNetwork) -> float:
        registry = [p.router.metrics.registry for p in net.peers]
        labels = {"channel": "dns", "direction": "out"}
        return sum(r.get_sample_value("weft_gossip_bytes_total", labels) or 0.0 for r in registry)

    def run_until(net: SimNetwork, done: Callable[[], bool], seconds: float) -> bool:
        return net.scheduler.run_until(done, net.scheduler.now() + seconds, resolution=0.01)

    wall0 = time.perf_counter()
    net = chain_of_strangers(peers, seed=1, latency=0.01, gossip_interval=1e6)
    tables = add_dns(net)
    converged = run_until(net, net.converged, 30.0)
    net.scheduler.run_until(lambda: False, net.scheduler.now() + 5.0)
    base = int(ipaddress.IPv4Address("10.32.0.0"))
    for i in range(entries):
        entry = tables[i % peers].table.add(f"netns:c{i}", f"container-{i}.weft.local.", base + 1 + i, i)
        if entry is None:
            raise RuntimeError(f"entry {i} was not added")
        for t in tables:
            if t.me != entry.origin:
                t.table.merge(entry)
    new = int(ipaddress.IPv4Address("10.33.0.0"))
    before, messages0, answered = bytes_out(net), net.messages, 0
    for i in range(rounds):
        tables[(7 * i) % peers].register(f"netns:new{i}", f"new-container-{i}", [new + 1 + i])
        answered += run_until(net, lambda i=i: all(t.lookup(f"new-container-{i}") for t in tables), 1.0)
    registration = (bytes_out(net) - before) / rounds
    reg_messages = (net.messages - messages0) / rounds
    before, messages0, removed = bytes_out(net), net.messages, 0
    for i in range(rounds):
        tables[(7 * i) % peers].unregister(f"netns:new{i}")
        removed += run_until(net, lambda i=i: not any(t.lookup(f"new-container-{i}") for t in tables), 2.0)
    removal = (bytes_out(net) - before) / rounds
    rem_messages = (net.messages - messages0) / rounds
    full = tables[0].gossip()
    whole = len(full.encode()) if full is not None else 0
    others = peers - 1
    return {
        "peers": peers,
        "entries": entries,
        "rounds": rounds,
        "converged": converged,
        "registration": {
            "messages": round(reg_messages, 1),
            "bytes": round(registration),
            "bytes_per_peer": round(registration / others, 1),
            "every_peer_answered": answered == rounds,
        },
        "removal": {
            "messages": round(rem_messages, 1),
            "bytes": round(removal),
            "bytes_per_peer": round(removal / others, 1),
            "every_peer_forgot": removed == rounds,
        },
        "whole_table_bytes": whole,
        "whole_table_baseline_bytes_per_peer": whole,
        "whole_table_baseline_bytes_total": whole * others,
        "baseline_ratio": round(whole / (registration / others), 1) if registration else None,
        "per_peer": f"bytes in all / {others} (each other peer receives a change once)",
        "wall_s": round(time.perf_counter() - wall0, 1),
    }


# -- all of it -------------------------------------------------------------------------------------------------------


def _start_agent(h: Host) -> None:
    h.start_agent(
        "--log-level", "info", "--ipalloc-init", f"seed={h.agent_name}", "--dns-upstream", "127.0.0.1:1",
    )  # fmt: skip
    h.wait_ready(timeout=30)
    from weft.api.client import Client

    client = Client(str(h.api_socket), timeout=10.0)
    wait_until(
        lambda: (
            client.request("GET", "/status/dns").get("serving")
            and client.request("GET", "/status/ipam").get("state") == "ready"
        ),
        timeout=30,
        message=lambda: f"the agent does not serve DNS or has no ring: {h.agent_log()[-2000:]}",
    )


def targets(report: dict) -> list[dict]:
    """The targets next to what was measured (``met`` None when not measured)."""
    out = []
    variants = (report.get("server") or {}).get("variants") or {}
    for variant, v in variants.items():
        p99 = v["fixed"]["weft"]["ms"]["p99"]
        out.append(
            {
                "figure": f"DNS p99, {variant}, {v['fixed']['weft']['rate']:,}/s",
                "target": f"<= {TARGETS['dns_p99_ms']:g} ms",
                "measured": p99,
                "met": p99 <= TARGETS["dns_p99_ms"],
            }
        )
    if not variants:
        out.append({"figure": "DNS p99", "target": f"<= {TARGETS['dns_p99_ms']:g} ms", "measured": None, "met": None})
    add = ((report.get("cni") or {}).get("add") or {}).get("ms")
    for key in ("median", "p99"):
        value = add[key] if add else None
        out.append(
            {
                "figure": f"CNI ADD, {key}",
                "target": f"<= {TARGETS['cni_add_ms']:g} ms",
                "measured": value,
                "met": None if value is None else value <= TARGETS["cni_add_ms"],
            }
        )
    return out


def run(log: Log = print, *, names: int = NAMES, seconds: float = 10.0, cycles: int = CYCLES) -> dict:
    """Every DNS and CNI figure (JSON-ready)."""
    report: dict = {}
    log("DNS: gossip per registration, 100 simulated peers ...")
    try:
        report["gossip"] = gossip_per_registration()
    except Exception as exc:
        report["gossip"] = {"error": _error(exc)}
    reason = netns_unavailable_reason()
    if reason is not None:
        report["server"] = {"skipped": reason}
        report["cni"] = {"skipped": reason}
    else:
        with Lab(1) as lab:
            h = lab.hosts[0]
            log("DNS: starting an agent in a namespace ...")
            try:
                _start_agent(h)
            except Exception as exc:
                report["server"] = report["cni"] = {"error": f"the agent did not start: {_error(exc)}"}
            else:
                for part, measure in (
                    ("server", lambda: server_vs_dnsmasq(lab, h, log, names=names, seconds=seconds)),
                    ("cni", lambda: cni_latency(lab, h, log, cycles=cycles)),
                ):
                    busy = _wait_quiet(log)
                    try:
                        report[part] = {**measure(), "machine_busy_before_pct": busy}
                    except Exception as exc:
                        report[part] = {"error": _error(exc), "agent_log": h.agent_log()[-2000:]}
                    if not h.agent_running():
                        report[part]["agent_exited"] = h.agent.returncode if h.agent else None
    report["targets"] = targets(report)
    return report


def main() -> int:
    with contextlib.suppress(BrokenPipeError):
        report = run(log=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps(report, indent=2))
        return 1 if any("error" in report.get(k, {}) for k in ("server", "cni", "gossip")) else 0
    return 1


if __name__ == "__main__":
    sys.exit(main())

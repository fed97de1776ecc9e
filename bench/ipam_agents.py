#!/usr/bin/env python3
"""IPAM on real agents in network namespaces (root): how long `weft attach` with no address takes, and how soon a
fresh seeded mesh allocates.

Three scenarios, the first two on one lab (agent/tests/harness/lab.py), with the data plane on as a user runs it:

- **local space**: three agents seeded with all three names; containers attached on h1 one after another, each
  from h1's own part of the ring, each once the agent is idle again, in turn through the agent's API (HTTP over
  its unix socket, what the CLI sends) and as a user runs it (the `weft attach --netns X` process, start to exit),
  so both meet as many containers already attached. The agent logs (at debug) the time it spent in IPAM, on the
  devices and on the port guard for each request; those are read back from its log. Then as many again through
  the API back to back, each asked as soon as the last is answered, as an orchestrator starting containers does.
- **space from another peer**: a fourth agent started with ``--ipalloc-init observer`` owns nothing; each attach
  there asks for an address of a /24 it owns nothing of (``net:SUBNET``, a new one each time), so every allocation
  first gets space from the peer that owns that /24.
- **first allocation**: five fresh agents, seeded with all five names, started at once; every host asks its agent
  for an address (POST /attach) from its process start until one is given. The time from the start of the mesh
  to the first address, and per host from its own process start to its first address.

The CLI runs with its bytecode cached (as an installed agent has it: pip compiles at install), in a cache of the
bench's own (PYTHONPYCACHEPREFIX), so a tree run with PYTHONDONTWRITEBYTECODE measures the same thing and is left
unchanged.

Figures only, nothing asserts on time. ``run()`` returns them (JSON-ready) for bench/run.py; this file also runs
alone: ``python bench/ipam_agents.py [--containers N] [--baseline REV,...] [--no-tree]`` prints the JSON
(``--baseline`` first measures the agent of each git revision, the same way, on the same machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "agent" / "tests" / "harness"))  # the netns lab harness of the agent's tests

from lab import Container, Host, Lab, netns_unavailable_reason, wait_until  # noqa: E402
from weft.api.client import ApiError, Client  # noqa: E402

Log = Callable[[str], None]

TARGETS = {"agent_local": "<= 1 ms", "cli_local": "<= 20 ms", "space": "<= 50 ms"}
# Before each timed attach the agent is idle again: no CPU used for IDLE_FOR seconds (at most IDLE_MAX): what one
# `weft attach` meets, rather than the work the last one set off (MAC watcher, FDBs, port guard, gossip).
IDLE_FOR, IDLE_MAX = 0.1, 3.0
# The agent logs, at debug, where an overlay request's time went (weft.ipam.holders and weft.datapath.plane).
_IPAM_LINE = re.compile(r"\battach [^:]*: IPAM ([0-9.]+) ms")
_DEVICES_LINE = re.compile(r"\battach: devices ([0-9.]+) ms, port guard ([0-9.]+) ms")


def _percentiles(values: list[float]) -> dict:
    """Samples, median, p99 and max (the shape of bench/ipam_sim.py's figures)."""
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "samples": len(ordered),
        "median": round(statistics.median(ordered), 3),
        "p99": round(p99, 3),
        "max": round(ordered[-1], 3),
    }


def _figure(label: str, values: list[float], target: str = "", **extra: object) -> dict:
    out: dict = {"label": label}
    if target:
        out["target"] = target
    if values:
        out["ms"] = _percentiles(values)
    else:
        out["missing"] = "no samples"
    out.update(extra)
    return out


# -- lab helpers -------------------------------------------------------------------------------------------------


class Bench:
    """One lab's agents, and how this bench runs the CLI against them."""

    def __init__(self, lab: Lab, pycache: Path) -> None:
        self.lab = lab
        # A bytecode cache of the bench's own, written by the first runs: later ones start as installed code does.
        self.cli_env = {"PYTHONPYCACHEPREFIX": str(pycache), "PYTHONDONTWRITEBYTECODE": ""}

    def start(self, hosts: list[Host], init: str, peers: list[Host], *extra: str) -> None:
        for h in hosts:
            h.start_agent(
                "--log-level", "debug", "--ipalloc-init", init, *extra,
                peers=[p for p in peers if p is not h], env=self.cli_env,
            )  # fmt: skip

    def cli(self, h: Host, *args: str, check: bool = True) -> tuple[float, subprocess.CompletedProcess[str]]:
        """Run ``weft ARGS`` against ``h``'s agent; (milliseconds from start to exit, the result)."""
        cmd = [h.python, "-m", "weft.cli", "--api-socket", str(h.api_socket), *args]
        env = self.lab.process_env(self.cli_env, agent_src=h.agent_src)
        began = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
        took = 1e3 * (time.perf_counter() - began)
        if check and proc.returncode != 0:
            raise RuntimeError(f"weft {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return took, proc


def _client(h: Host) -> Client:
    return Client(str(h.api_socket), timeout=45.0)


def _ipam(h: Host) -> dict:
    return _client(h).request("GET", "/status/ipam")


def _mesh_ready(hosts: list[Host], timeout: float = 60.0) -> None:
    """Every agent answers, sees every host, reaches every owner of the ring, and has a ring."""
    names = {h.name for h in hosts}

    def ready(h: Host) -> bool:
        s = _client(h).status()
        return (
            {p["nickname"] for p in s["peers"]} == names
            and all(p["reachable"] for p in s["ipam"]["peers"])
            and s["ipam"]["state"] == "ready"
        )

    for h in hosts:
        h.wait_ready(timeout=timeout)
    wait_until(
        lambda: all(ready(h) for h in hosts),
        timeout=timeout,
        interval=0.2,
        message=lambda: "mesh not ready: " + "; ".join(f"{h.name}: {h.agent_log()[-300:]}" for h in hosts),
    )


def _namespace(h: Host) -> Container:
    """A container namespace on ``h``, not attached yet."""
    return h.add_container("0.0.0.0/0", attach=False)


def _log_size(h: Host) -> int:
    try:
        return h.agent_log_path.stat().st_size
    except FileNotFoundError:
        return 0


def _log_since(h: Host, offset: int) -> list[str]:
    with h.agent_log_path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()


def _agent_side(lines: list[str]) -> dict[str, list[float]]:
    """What the agent logged about the attaches in ``lines``: IPAM, devices and port guard times, in order."""
    out: dict[str, list[float]] = {"ipam": [], "devices": [], "port_guard": []}
    for line in lines:
        m = _IPAM_LINE.search(line)
        if m:
            out["ipam"].append(float(m[1]))
        m = _DEVICES_LINE.search(line)
        if m:
            out["devices"].append(float(m[1]))
            out["port_guard"].append(float(m[2]))
    return out


def _attach_api(h: Host, c: Container, *cidrs: str) -> float:
    body = {"netns": c.netns, "ifname": "ethwe", "cidrs": list(cidrs)}
    began = time.perf_counter()
    result = _client(h).request("POST", "/attach", body)
    took = 1e3 * (time.perf_counter() - began)
    c.cidr = result["addresses"][0]
    c.ip = c.cidr.split("/")[0]
    return took


def _attach_cli(bench: Bench, h: Host, c: Container, *cidrs: str) -> tuple[float, float]:
    """(wall ms, CPU ms of the CLI process)."""
    cpu0 = _children_cpu()
    took, proc = bench.cli(h, "attach", "--netns", c.netns, *cidrs)
    cpu = 1e3 * (_children_cpu() - cpu0)
    c.cidr = proc.stdout.strip().rsplit(": ", 1)[-1].split()[0]  # "attached ethwe (MAC): 10.32.0.1/12"
    c.ip = c.cidr.split("/")[0]
    return took, cpu


def _children_cpu() -> float:
    """CPU seconds of this process's reaped children (a CLI run just finished counts; the agents, running, not)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait_idle(pid: int) -> None:
    """Until the process has used no CPU for IDLE_FOR seconds (its clock ticks 10 ms), at most IDLE_MAX."""
    deadline = time.monotonic() + IDLE_MAX
    last, since = _proc_cpu(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(IDLE_FOR / 4)
        now = _proc_cpu(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= IDLE_FOR:
            return


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _series(
    bench: Bench, h: Host, n: int, cidrs: Callable[[int], list[str]], log: Log, what: str
) -> dict[str, list[float] | float]:
    """``2n`` attaches on ``h`` one after another, each of a fresh namespace, alternately through the API and by
    the CLI (so both meet the same number of containers already attached). Returns lists of milliseconds: "api",
    "cli" (as the caller saw them), "cli_cpu" (the CLI process's CPU), "ipam", "devices", "port_guard" (what the
    agent logged), and "agent_cpu_per_attach" (the agent's CPU from the first attach until it is idle after the
    last, per attach), "machine_busy_pct" (all CPUs, in % of one core, over the series) and "failures" (the
    attaches refused, API and CLI alike: why, in order; they are left out of the times)."""
    assert h.agent is not None
    containers = [_namespace(h) for _ in range(2 * n)]  # made first: `ip netns add` is not part of an attach
    offset = _log_size(h)
    out: dict[str, list] = {"api": [], "cli": [], "cli_cpu": [], "failures": []}
    busy0, total0 = _machine_busy()
    agent0 = _proc_cpu(h.agent.pid)
    for i, c in enumerate(containers):
        _wait_idle(h.agent.pid)
        try:
            if i % 2 == 0:
                out["api"].append(_attach_api(h, c, *cidrs(i)))
            else:
                took, cpu = _attach_cli(bench, h, c, *cidrs(i))
                out["cli"].append(took)
                out["cli_cpu"].append(cpu)
        except (ApiError, RuntimeError) as exc:
            out["failures"].append(f"{'API' if i % 2 == 0 else 'CLI'} {' '.join(cidrs(i))}: {exc}"[:300])
    _wait_idle(h.agent.pid)  # what the attaches set off in the agent (MAC watcher, FDB, port guard sync) is done
    agent_cpu = 1e3 * (_proc_cpu(h.agent.pid) - agent0) / len(containers)
    busy1, total1 = _machine_busy()
    out.update(_agent_side(_log_since(h, offset)))
    log(
        f"    {what}: {2 * n - len(out['failures'])} attached ({len(out['failures'])} refused), "
        f"median API {statistics.median(out['api'] or [0]):.1f} ms, CLI {statistics.median(out['cli'] or [0]):.1f} ms"
    )
    pct = (busy1 - busy0) / max(1, total1 - total0) * 100 * (os.cpu_count() or 1)
    return {**out, "agent_cpu_per_attach": round(agent_cpu, 1), "machine_busy_pct": round(pct, 1)}


def _burst(h: Host, n: int) -> tuple[list[float], float]:
    """``n`` attaches through the API back to back, each asked as soon as the last is answered (what an
    orchestrator starting many containers does); (each one's ms, attaches per second)."""
    containers = [_namespace(h) for _ in range(n)]
    assert h.agent is not None
    _wait_idle(h.agent.pid)
    began = time.perf_counter()
    times = []
    for c in containers:
        with contextlib.suppress(ApiError):  # left out; the count of those timed says how many
            times.append(_attach_api(h, c))
    return times, round(len(times) / (time.perf_counter() - began), 1)


def _distinct(containers: list[Container]) -> bool:
    """Whether the containers given an address were given distinct ones."""
    addresses = [c.ip for c in containers if c.ip and c.ip != "0.0.0.0"]
    return len(set(addresses)) == len(addresses)


# -- scenarios ---------------------------------------------------------------------------------------------------


def attach_latency(
    pycache: Path,
    containers: int = 60,
    *,
    agent_src: Path | None = None,
    log: Log = print,
    out: dict | None = None,
) -> dict:
    """Local space and space from another peer, on one mesh: h1..h3 seeded, h4 an observer. Figures go into
    ``out`` (returned) as they are made, so an exception keeps those made so far."""
    out = {} if out is None else out
    extra = (agent_src,) if agent_src else ()
    with Lab(extra_pythonpath=extra) as lab:
        bench = Bench(lab, pycache)
        hosts = lab.add_hosts(4)
        seeded, observer = hosts[:3], hosts[3]
        init = "seed=" + ",".join(h.agent_name for h in seeded)
        bench.start(seeded, init, hosts)
        bench.start([observer], "observer", hosts)
        _mesh_ready(hosts)
        h1 = hosts[0]

        # The CLI alone, and a warm-up that fills its bytecode cache.
        bench.cli(h1, "--help")
        help_ms, help_cpu = [], []
        for _ in range(10):
            cpu0 = _children_cpu()
            help_ms.append(bench.cli(h1, "--help")[0])
            help_cpu.append(1e3 * (_children_cpu() - cpu0))
        status_ms = [bench.cli(h1, "status", "--json")[0] for _ in range(10)]
        out["cli_help"] = _figure("`weft --help` (the CLI process alone)", help_ms, cpu_ms=_percentiles(help_cpu))
        out["cli_status"] = _figure("`weft status --json` (the CLI and one API call)", status_ms)

        log(f"  local space: {2 * containers} containers on h1, through the API and by the CLI in turn")
        local = _series(bench, h1, containers, lambda i: [], log, "local")
        common = {
            "hosts": 3,
            "agent_cpu_ms_per_attach": local["agent_cpu_per_attach"],
            "machine_busy_pct": local["machine_busy_pct"],
            "refused": local["failures"],
        }
        out["local_api"] = _figure("local space, POST /attach (HTTP on the API socket)", local["api"], **common)
        out["local_cli"] = _figure(
            "local space, `weft attach` end to end (the CLI process)",
            local["cli"],
            TARGETS["cli_local"],
            cpu_ms=_percentiles(local["cli_cpu"]) if local["cli_cpu"] else None,
        )
        out["local_agent_ipam"] = _figure("local space, IPAM inside the agent", local["ipam"], TARGETS["agent_local"])
        out["local_agent_devices"] = _figure("  devices (veth, addresses, static FDB entry)", local["devices"])
        out["local_agent_port_guard"] = _figure("  port guard (nftables) after the devices", local["port_guard"])
        burst, rate = _burst(h1, containers)
        out["local_api_burst"] = _figure(
            "local space, POST /attach back to back", burst, per_second=rate, attached_before=2 * containers
        )
        log(f"    local, back to back: {containers} attached, {rate} a second")
        mine = h1.containers

        def subnet(i: int) -> list[str]:
            # A /24 the observer owns nothing of, a new one each time, spread over the three seeds' parts.
            return [f"net:10.{32 + i % 16}.{100 + i // 16}.0/24"]

        log(f"  space from another peer: {2 * containers} containers on the observer h4, each in a new /24")
        space = _series(bench, observer, containers, subnet, log, "space")
        common = {
            "requester": "observer",
            "donors": 3,
            "agent_cpu_ms_per_attach": space["agent_cpu_per_attach"],
            "machine_busy_pct": space["machine_busy_pct"],
            "refused": space["failures"],
        }
        out["space_api"] = _figure("space from another peer, POST /attach", space["api"], TARGETS["space"], **common)
        out["space_cli"] = _figure(
            "space from another peer, `weft attach` end to end",
            space["cli"],
            cpu_ms=_percentiles(space["cli_cpu"]) if space["cli_cpu"] else None,
        )
        out["space_agent_ipam"] = _figure("space from another peer, IPAM inside the agent", space["ipam"])
        out["distinct_addresses"] = _distinct(mine + observer.containers)
        # Ring updates an agent refused whole because they give away an address it allocated: the rings differ.
        out["ring_refusals"] = {h.name: h.agent_log().count("IPAM: refusing a ring update") for h in hosts}
        if any(out["ring_refusals"].values()):
            log(f"    ring updates refused: {out['ring_refusals']}")
    return out


def _first_round(pycache: Path, hosts_n: int, agent_src: Path | None) -> dict:
    """One fresh mesh: every agent started at once, each host asking its own for an address meanwhile."""
    with Lab(extra_pythonpath=(agent_src,) if agent_src else ()) as lab:
        bench = Bench(lab, pycache)
        hosts = lab.add_hosts(hosts_n)
        init = "seed=" + ",".join(h.agent_name for h in hosts)
        boxes = {h.name: _namespace(h) for h in hosts}
        started: dict[str, float] = {}
        api_up: dict[str, float] = {}
        done: dict[str, float] = {}
        address: dict[str, str] = {}
        errors: list[str] = []
        stop = threading.Event()

        def ask(h: Host) -> None:
            client = Client(str(h.api_socket), timeout=45.0)
            body = {"netns": boxes[h.name].netns, "ifname": "ethwe", "cidrs": []}
            last = ""
            while not stop.is_set():
                try:
                    result = client.request("POST", "/attach", body)
                except ApiError as exc:
                    last = str(exc)
                    if not last.startswith(("no agent API", "cannot talk")):
                        api_up.setdefault(h.name, time.monotonic())  # it answered, with a refusal
                    time.sleep(0.005)
                    continue
                done[h.name] = time.monotonic()
                api_up.setdefault(h.name, done[h.name])
                address[h.name] = result["addresses"][0]
                return
            errors.append(f"{h.name}: no address ({last})")

        threads = [threading.Thread(target=ask, args=(h,), daemon=True) for h in hosts]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        for h in hosts:
            started[h.name] = time.monotonic()
            bench.start([h], init, hosts)
        deadline = time.monotonic() + 60
        while len(done) < len(hosts) and time.monotonic() < deadline:
            if any(not h.agent_running() for h in hosts):
                break
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(50)
        dead = [h.name for h in hosts if not h.agent_running()]
        row: dict = {
            "first_s": round(min(done.values()) - t0, 3) if done else None,
            "all_s": round(max(done.values()) - t0, 3) if len(done) == len(hosts) else None,
            "per_host": {
                h.name: {
                    "since_own_start_s": round(done[h.name] - started[h.name], 3),
                    "api_answered_s": round(api_up[h.name] - started[h.name], 3),
                    "address": address[h.name],
                }
                for h in hosts
                if h.name in done
            },
        }
        if errors or dead:
            row["errors"] = errors + [f"{n}: agent exited" for n in dead]
        return row


def first_allocation(
    pycache: Path, hosts_n: int = 5, rounds: int = 3, *, agent_src: Path | None = None, log: Log = print
) -> dict:
    """A fresh seeded mesh started at once, ``rounds`` times; per round, the time to its first address, and per
    host from its own process start to its first address (POST /attach retried every 5 ms from the start)."""
    per_round: list[dict] = []
    for r in range(rounds):
        row = {"round": r + 1, **_first_round(pycache, hosts_n, agent_src)}
        per_round.append(row)
        log(f"  first allocation, round {r + 1}/{rounds}: first {row['first_s']} s, all {row['all_s']} s")
    firsts = [r["first_s"] for r in per_round if r["first_s"] is not None]
    own = [1e3 * h["since_own_start_s"] for r in per_round for h in r["per_host"].values()]
    best = next((r for r in per_round if r["per_host"]), None)
    return {
        "label": f"{hosts_n} agents, seed= all {hosts_n}, started at once (median of {rounds})",
        "hosts": hosts_n,
        "rounds": per_round,
        "s": round(statistics.median(firsts), 3) if firsts else None,
        "address": next(iter(best["per_host"].values()))["address"] if best else None,
        "since_own_start": {"ms": _percentiles(own)} if own else None,
        "detail": None if firsts else "no address in any round",
    }


def run(log: Log = print, *, containers: int = 60, first_rounds: int = 3, agent_src: Path | None = None) -> dict:
    """Every real-agent IPAM figure. Top-level entries with ``ms`` are latency rows (``label``, optional
    ``target``, ``ms``: samples, median, p99, max in milliseconds); ``first_allocation`` holds the fresh mesh's
    figures (``s``: median seconds to the first address). ``skipped`` or ``error`` when nothing could be measured."""
    reason = netns_unavailable_reason()
    if reason:
        return {"skipped": reason}
    report: dict = {"containers": containers, "idle_before_each_s": IDLE_FOR}
    began = time.monotonic()
    # One bytecode cache for every agent and CLI run here, shared by the scenarios: the first fills it.
    pycache = Path(tempfile.mkdtemp(prefix="weft-bench-pycache-"))
    errors: list[str] = []
    try:
        try:
            log("IPAM, real agents: attach latency ...")
            attach_latency(pycache, containers, agent_src=agent_src, log=log, out=report)
        except Exception as exc:  # the figures made so far are kept; the error says what stopped the rest
            errors.append(f"attach latency: {type(exc).__name__}: {exc}"[:2000])
        try:
            log("IPAM, real agents: a fresh seeded mesh's first allocation ...")
            report["first_allocation"] = first_allocation(pycache, rounds=first_rounds, agent_src=agent_src, log=log)
        except Exception as exc:
            errors.append(f"first allocation: {type(exc).__name__}: {exc}"[:2000])
    finally:
        shutil.rmtree(pycache, ignore_errors=True)
    if errors:
        report["error"] = "; ".join(errors)
    report["wall_s"] = round(time.monotonic() - began, 1)
    return report


@contextlib.contextmanager
def _exported(rev: str) -> Iterator[Path]:
    """The agent's source of git revision ``rev``, or ``rev`` itself when it is a directory holding one (``src``
    with the ``weft`` package, or a tree with ``agent/src``)."""
    given = Path(rev)
    if given.is_dir():
        yield next((p for p in (given / "agent" / "src", given / "src", given) if (p / "weft").is_dir()), given)
        return
    import restart  # it exports a revision's agent with git archive

    with restart.exported_agent(rev) as src:
        yield src


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


def main() -> int:
    # SIGTERM unwinds like Ctrl-C, so the labs still remove their namespaces and agents.
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=60, help="containers per timed series (default 60)")
    parser.add_argument("--first-rounds", type=int, default=3, help="fresh meshes started (default 3)")
    parser.add_argument(
        "--baseline",
        default="",
        help="REV[,REV...]: measure the agent of these git revisions (or source directories) first",
    )
    parser.add_argument("--no-tree", action="store_true", help="only the --baseline revisions, not this tree")
    parser.add_argument("--output", type=Path, help="write the JSON here too")
    args = parser.parse_args()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    revs = [r.strip() for r in args.baseline.split(",") if r.strip()]
    result: dict = {}
    for rev in revs:
        log(f"the agent of {rev}")
        with _exported(rev) as src:
            result[rev] = run(log, containers=args.containers, first_rounds=args.first_rounds, agent_src=src)
    if not args.no_tree or not revs:
        log("the agent of this tree")
        result["this tree"] = run(log, containers=args.containers, first_rounds=args.first_rounds)
    text = json.dumps(result if len(result) > 1 else next(iter(result.values())), indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 1 if any("error" in r for r in result.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Agent memory: the resident set of a real agent, alone and with the data plane serving many peers, and what each of
the agent's imports costs.

RSS is the kernel's own figure for the agent's process, read from /proc/PID/status: VmRSS (resident now: anonymous
memory plus the pages of files it maps, such as shared libraries) and VmHWM (the highest it has been). The target
is <= 45 MiB with the data plane on and 100 peers (DESIGN.md, "Numbers we chase").

Method. One lab (network namespaces on one underlay bridge, agent/tests/lab.py) holds N peers: real agents of the
tree under test with a mesh secret, discovery and DNS off, owning no address space (IPAM observers), started alone.
D of them run their data plane (so each has an encrypted sleeve path with the measured agent); the other N - D run
the control plane alone (``--no-datapath``): a connected data-plane agent costs this 2-core machine about 1% of a
core, so 100 of them would measure the machine, not the agent. Each agent measured gets a fresh host of its own
with the default configuration (data plane and DNS on) and the same secret: it is measured alone once its API
answers and it has settled; then the peers are told of it through their API (``weft connect``), ten at a time, and
it is measured again once it has an established connection to each of the N peers and a chosen data path to each
of the D, and has settled again: N control connections, D encrypted data paths (and path state for all N), N + 1
peers in its topology. Then the peers forget it and it stops, and the next agent measured gets its own host. The
agents of git revisions (``baseline``, e.g. HEAD~5) run that way too, in the same lab, before the tree under test:
before and after, from one run on one machine.

Every agent runs from compiled bytecode, cached for the run (``bytecode_cached``), as an installed agent does: pip
compiles at install.

The peers form a star around the measured agent (they are told only of it and do not discover each other), so the
measured agent's view is a full mesh's from its side: a connection to every peer.

The import costs are measured in fresh interpreters: each package's import on top of the standard library the agent
always loads (asyncio, json, logging, socket, sqlite3), its RSS added (anonymous and file-backed) and its import
time (median of 3).

Figures only: nothing here fails on a number. A variant that cannot be measured is returned as ``{"failed": reason}``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mesh
import restart

sys.path.insert(0, str(mesh.REPO / "agent" / "tests" / "harness"))  # the netns lab harness

from lab import Host, Lab, netns_unavailable_reason
from weft.api.client import ApiError, Client

TARGET_MIB = 45.0
SECRET_PREFIX = "bench-memory-"
# Peers own no address space (observers), so the measured agent's ring is the one ring whichever agent it is.
PEER_ARGS = ("--no-discovery", "--no-dns", "--ipalloc-init", "observer", "--log-level", "info")
CONTROL_ONLY = ("--no-datapath",)  # the peers beyond the first D
BATCH = 10  # peers told of the measured agent at a time, each batch once the one before has its data paths
MEASURED_ARGS = ("--log-level", "info")
AGENT_SRC = mesh.REPO / "agent" / "src"
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads")

# The agent's dependencies, as the agent imports them (package, statement), and those it dropped (aiohttp,
# pydantic, prometheus-client: measured where they are installed, e.g. in an older venv).
IMPORTS = [
    ("aiohttp (dropped)", "import aiohttp.web"),
    ("pydantic (dropped)", "from pydantic import BaseModel, Field"),
    ("prometheus-client (dropped)", "import prometheus_client"),
    ("cryptography", "from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305"),
    ("pyroute2, whole package", "import pyroute2"),
    ("pyroute2, rtnetlink alone", "import weft.footprint as f; f.pyroute2_package(); import pyroute2.iproute.linux"),
    ("dnspython", "import dns.message, dns.asyncquery"),
    (
        "dnspython, optional features off",
        "import weft.footprint as f; f.dnspython_plain(); import dns.message, dns.asyncquery",
    ),
    ("msgpack", "import msgpack"),
    ("yaml", "import yaml"),
    ("click", "import click"),
    ("h11", "import h11"),
]
IMPORT_BASE = "import asyncio, json, logging, socket, sqlite3"
_PROBE = (
    "{base}\nimport time as _t\n_s=_t.perf_counter()\n{stmt}\n_e=_t.perf_counter()\n"
    "_d=dict(l.split(':',1) for l in open('/proc/self/status'))\n"
    "print(*(int(_d[k].split()[0]) for k in ('VmRSS','RssAnon','RssFile')), _e-_s)"
)


def proc_status(pid: int) -> dict[str, int] | None:
    """VmRSS, VmHWM, RssAnon, RssFile (KiB) and Threads of a process; None once it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in STATUS_FIELDS:
                    out[key] = int(value.split()[0])
    except OSError:
        return None
    return out


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _figures(status: dict[str, int] | None) -> dict:
    if status is None:
        return {"failed": "the agent is gone"}
    return {
        "rss_mib": _mib(status.get("VmRSS")),
        "hwm_mib": _mib(status.get("VmHWM")),
        "anon_mib": _mib(status.get("RssAnon")),
        "file_mib": _mib(status.get("RssFile")),
        "threads": status.get("Threads"),
    }


# -- import costs -----------------------------------------------------------------------------------


def _probe(python: str, stmt: str, pythonpath: str, base: str = IMPORT_BASE) -> tuple[int, int, int, float]:
    """RSS, anonymous and file-backed KiB after the base imports and ``stmt``, and the seconds ``stmt`` took."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    code = _PROBE.format(base=base, stmt=stmt)
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["failed"])[-1])
    rss, anon, file, seconds = proc.stdout.split()
    return int(rss), int(anon), int(file), float(seconds)


def import_costs(python: str = sys.executable, agent_src: Path = AGENT_SRC, runs: int = 3) -> dict:
    """What each dependency's import adds to a fresh interpreter that already holds the standard library the agent
    always uses: RSS (anonymous and file-backed, MiB) and import time (ms, median of ``runs``)."""
    path = str(agent_src)
    base = [_probe(python, "pass", path) for _ in range(runs)]
    base_rss, base_anon, base_file = (statistics.median(b[i] for b in base) for i in range(3))
    rows = []
    for name, stmt in IMPORTS:
        try:
            samples = [_probe(python, stmt, path) for _ in range(runs)]
        except (RuntimeError, subprocess.SubprocessError) as exc:
            missing = "No module named" in str(exc)
            rows.append({"package": name, "statement": stmt, "failed": "not installed" if missing else str(exc)})
            continue
        rss, anon, file = (statistics.median(s[i] for s in samples) for i in range(3))
        rows.append(
            {
                "package": name,
                "statement": stmt,
                "rss_mib": round((rss - base_rss) / 1024, 1),
                "anon_mib": round((anon - base_anon) / 1024, 1),
                "file_mib": round((file - base_file) / 1024, 1),
                "import_ms": round(1000 * statistics.median(s[3] for s in samples), 1),
            }
        )
    # The same base as the agent's process imports it: without the system's OpenSSL (weft.footprint).
    lean = [_probe(python, "pass", path, f"import weft.footprint as f; f.keep_openssl_out()\n{IMPORT_BASE}")]
    return {
        "base": IMPORT_BASE,
        "base_rss_mib": round(base_rss / 1024, 1),
        "base_without_openssl_rss_mib": round(lean[0][0] / 1024, 1),
        "imports": rows,
    }


# -- real agents ------------------------------------------------------------------------------------


def bytecode_cached(pyc: str) -> dict[str, str]:
    """The environment that runs an agent from compiled bytecode, cached in ``pyc``, as an installed agent runs (pip
    compiles at install) even where PYTHONDONTWRITEBYTECODE is set: compiling the agent's modules from source at
    start makes allocations no installed agent makes (the data plane's imports left 2 MiB more resident in a fresh
    interpreter)."""
    return {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": pyc}


def _client(host: Host, timeout: float = 10.0) -> Client:
    return Client(str(host.api_socket), timeout=timeout)


def _wait_apis(hosts: list[Host], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(hosts)
    while pending:
        dead = [h for h in pending if not h.agent_running()]
        if dead:
            raise restart.datapath.BenchError(f"{dead[0].name}: agent exited: {dead[0].agent_log()[-500:]}")
        if time.monotonic() > deadline:
            raise restart.datapath.BenchError(f"{len(pending)} peer API(s) not up after {timeout:g}s")
        still = []
        for h in pending:
            try:
                _client(h, 2.0).request("GET", "/status/peers")
            except ApiError:
                still.append(h)
        pending = still
        time.sleep(0.5)


def _served(host: Host) -> tuple[int, int]:
    """(established connections, of them those with a data path chosen) on ``host``."""
    rows = _client(host, 20.0).request("GET", "/status/connections")
    established = [r for r in rows if r.get("state") == "established"]
    paths = [r for r in established if (r.get("datapath") or {}).get("path") not in (None, "down")]
    return len(established), len(paths)


def _measure_one(
    host: Host,
    peers: list[Host],
    *,
    datapath_peers: int = 0,
    args: tuple[str, ...],
    secret: str,
    settle: float,
    timeout: float,
    log: Callable[[str], None],
    env: dict[str, str] | None = None,
) -> dict:
    """One agent: alone, then with every peer connected; the peers forget it afterwards and it stops."""
    result: dict = {}
    host.start_agent(*args, secrets=[secret], env=env)
    try:
        host.wait_ready(timeout=timeout)
        time.sleep(settle)
        result["alone"] = _figures(proc_status(host.agent.pid))
        if not peers:
            return result
        t0 = time.monotonic()
        deadline = t0 + timeout
        last = time.monotonic()
        for told in range(BATCH, len(peers) + BATCH, BATCH):
            for p in peers[told - BATCH : told]:
                _client(p).connect([host.listen_addr])
            wanted, wanted_paths = min(told, len(peers)), min(told, datapath_peers)
            while True:
                if not host.agent_running():
                    raise restart.datapath.BenchError(f"{host.name}: agent exited: {host.agent_log()[-500:]}")
                with contextlib.suppress(ApiError, KeyError, TypeError):
                    established, paths = _served(host)
                    if established >= wanted and paths >= wanted_paths:
                        break
                    if time.monotonic() - last > 15:
                        last = time.monotonic()
                        log(f"    {established}/{wanted} connections, {paths}/{wanted_paths} data paths ...")
                if time.monotonic() > deadline:
                    raise restart.datapath.BenchError(
                        f"{host.name}: not every peer connected with a data path after {timeout:g}s"
                    )
                time.sleep(0.5)
        result["peers_connected_s"] = round(time.monotonic() - t0, 1)
        time.sleep(settle)
        result["with_peers"] = _figures(proc_status(host.agent.pid))
        result["peers"] = len(peers)
        result["datapath_peers"] = datapath_peers
        return result
    finally:
        for p in peers:
            with contextlib.suppress(ApiError):
                _client(p).forget([host.listen_addr])
        host.kill_agent()


def agent_rss(
    *,
    peers: int = 100,
    datapath_peers: int = 20,
    baseline: str | None = None,
    settle: float = 10.0,
    timeout: float = 300.0,
    log: Callable[[str], None] = print,
) -> dict:
    """RSS of the agents of each revision in ``baseline`` (comma-separated git revisions), then of the tree under
    test: alone without the data plane, alone with it, and with it serving ``peers`` peers (``datapath_peers`` of
    them with their data plane on)."""
    datapath_peers = min(datapath_peers, peers)
    report: dict = {
        "peers": peers,
        "datapath_peers": datapath_peers,
        "settle_s": settle,
        "target_mib": TARGET_MIB,
        "variants": {},
    }
    reason = netns_unavailable_reason()
    if reason:
        report["skipped"] = reason
        return report
    revisions = [r.strip() for r in (baseline or "").split(",") if r.strip()]
    secret = SECRET_PREFIX + secrets.token_hex(12)
    with tempfile.TemporaryDirectory(prefix="weft-bench-pyc-") as pyc, Lab(stop_grace=5.0) as lab:
        env = bytecode_cached(pyc)
        t = time.monotonic()
        peer_hosts = lab.add_hosts(peers) if peers else []
        log(f"  {peers} peer namespaces in {time.monotonic() - t:.0f}s; starting their agents ...")
        for i, h in enumerate(peer_hosts):
            h.start_agent(*PEER_ARGS, *(() if i < datapath_peers else CONTROL_ONLY), secrets=[secret], env=env)
        _wait_apis(peer_hosts, timeout)
        log(f"  {peers} peers up after {time.monotonic() - t:.0f}s")
        for rev in [*revisions, None]:
            name = rev or "this tree"
            log(f"  {name} ...")
            try:
                with contextlib.ExitStack() as stack:
                    src = stack.enter_context(restart.exported_agent(rev)) if rev else AGENT_SRC
                    variant: dict = {}
                    (bare,) = lab.add_hosts(1)
                    bare.agent_src = src
                    variant["no_datapath"] = _measure_one(
                        bare, [], args=(*MEASURED_ARGS, "--no-datapath"), secret=secret, settle=settle,
                        timeout=timeout, log=log, env=env,
                    )["alone"]  # fmt: skip
                    (host,) = lab.add_hosts(1)
                    lab.pin_neighbours()
                    host.agent_src = src
                    variant.update(
                        _measure_one(
                            host, peer_hosts, datapath_peers=datapath_peers, args=MEASURED_ARGS, secret=secret,
                            settle=settle, timeout=timeout, log=log, env=env,
                        )
                    )  # fmt: skip
            except (restart.datapath.BenchError, AssertionError, OSError, subprocess.SubprocessError) as exc:
                variant = {"failed": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}
            report["variants"][name] = variant
            log(f"    {variant}")
        live = [s for s in (proc_status(h.agent.pid) for h in peer_hosts if h.agent_running()) if s]
        if live:
            report["peer_rss_mean_mib"] = _mib(round(sum(s["VmRSS"] for s in live) / len(live)))
    return report


def run(
    *,
    peers: int = 100,
    datapath_peers: int = 20,
    baseline: str | None = None,
    settle: float = 10.0,
    timeout: float = 300.0,
    log: Callable[[str], None] = print,
) -> dict:
    """The import costs, then the agents' RSS."""
    log("  import costs ...")
    report: dict = {"imports": import_costs()}
    report.update(
        agent_rss(
            peers=peers, datapath_peers=datapath_peers, baseline=baseline, settle=settle, timeout=timeout, log=log
        )
    )
    return report

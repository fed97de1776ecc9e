"""Restart gap on the encrypted path: how long traffic stops while one agent restarts the way systemd does it.

Three hosts in network namespaces with a mesh secret (so every pair uses the sleeve), a container on each. A
container on h1 sends numbered UDP datagrams at a steady rate (1,000 a second by default) to an echo in the
container on h2, and another flow at the same rate to the container on h3. Then h2's agent is restarted several
times as systemd restarts a unit: SIGTERM, wait for the process to exit, start ``weft run`` again. For each
restart the figures are the longest gap in the echoes h1 got back (both directions), the longest gap in what h2's
container got (h1 to h2 alone), the datagrams lost, and where the time went: the old process exiting, the new one
from exec to its connection with h1 and to ready (and the CPU time it used for each, which a busy machine
stretches much less than the wall clock), and from the connection to the first echo. The h1-h3 flow shows what
the restart costs hosts that did not restart.

With ``baseline=REV`` (or ``REV,REV,...``) the same scenario runs first against the agent of each git revision
(exported with ``git archive``, first on PYTHONPATH), so all the sets of figures come from one run on one machine.

Figures only: nothing here fails on a number. A scenario that cannot be measured returns ``{"failed": reason}``.
"""

from __future__ import annotations

import contextlib
import json
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
from pathlib import Path

import datapath
import mesh

sys.path.insert(0, str(mesh.REPO / "agent" / "tests" / "harness"))

from lab import Host, Lab, LabProcess

FLOW = str(mesh.REPO / "agent" / "tests" / "harness" / "udpflow.py")
ECHO_PORT = 7001
SECRET_PREFIX = "bench-restart-"
TARGET_GAP_S = 1.0  # the goal: at most this long without traffic per restarted host
# Log lines of the agent that mark the steps of a restart.
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
_NEW_RUN = "=== lab: starting agent"


def _log_time(line: str) -> float | None:
    """The wall-clock time of an agent log line (its asctime, to the millisecond)."""
    m = _STAMP.match(line)
    if m is None:
        return None
    return time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000


def _first(lines: list[str], *needles: str) -> float | None:
    for line in lines:
        if all(n in line for n in needles):
            t = _log_time(line)
            if t is not None:
                return t
    return None


def _read_from(path: Path, offset: int) -> list[str]:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").splitlines()


def _ifindex(host: Host, name: str) -> int | None:
    proc = host.exec("ip", "-j", "link", "show", "dev", name, check=False)
    with contextlib.suppress(ValueError, IndexError, KeyError):
        return json.loads(proc.stdout)[0]["ifindex"]
    return None


@contextlib.contextmanager
def exported_agent(rev: str) -> Iterator[Path]:
    """The agent source of git revision ``rev`` in a temporary directory (removed afterwards)."""
    tmp = Path(tempfile.mkdtemp(prefix="weft-bench-rev-"))
    try:
        archive = subprocess.run(
            ["git", "-C", str(mesh.REPO), "archive", rev, "agent/src"],
            capture_output=True,
            check=False,
            timeout=60,
        )
        if archive.returncode != 0:
            raise datapath.BenchError(f"git archive {rev}: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True, timeout=60)
        yield tmp / "agent" / "src"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- flows ------------------------------------------------------------------------------------------


def _flow_result(proc: LabProcess) -> dict:
    for line in reversed(proc.read_log().strip().splitlines()):
        if line.startswith('{"done"'):
            return json.loads(line)
    raise datapath.BenchError(f"no result from udpflow: {proc.read_log()[-300:]}")


def _stop_flow(proc: LabProcess) -> dict:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired as exc:
        raise datapath.BenchError("udpflow did not stop") from exc
    return _flow_result(proc)


def _wait_log(proc: LabProcess, needle: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in proc.read_log():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise datapath.BenchError(f"udpflow did not start: {proc.read_log()[-300:]}")
        time.sleep(0.05)


# -- one restart ------------------------------------------------------------------------------------


def _restart(h: Host, peer: Host, start: Callable[[], None], timeout: float) -> dict[str, float | int | None]:
    """SIGTERM, wait for the exit, start again; the wall-clock times of each step (from the logs too)."""
    assert h.agent is not None
    offset = h.agent_log_path.stat().st_size
    peer_offset = peer.agent_log_path.stat().st_size
    t: dict[str, float | int | None] = {
        "tap_ifindex_before": _ifindex(h, "weft-tap"),
        "bridge_ifindex_before": _ifindex(h, "weft"),
    }
    t["term"] = time.time()
    h.agent.send_signal(signal.SIGTERM)
    try:
        h.agent.wait(30)
    except subprocess.TimeoutExpired as exc:
        raise datapath.BenchError(f"{h.name}: the agent did not exit within 30 s of SIGTERM") from exc
    t["exit"] = time.time()
    t["exit_code"] = h.agent.returncode
    t["exec"] = time.time()
    start()
    deadline = time.monotonic() + timeout
    new: list[str] = []
    t["cpu_at_ready"] = t["cpu_at_connected"] = None
    while time.monotonic() < deadline:
        lines = _read_from(h.agent_log_path, offset)
        cut = next((i for i, line in enumerate(lines) if line.startswith(_NEW_RUN)), len(lines))
        new = lines[cut:]
        # The CPU the new agent had used by each step (to within one 20 ms poll): a busy machine stretches the
        # wall-clock figures, much less these.
        if t["cpu_at_ready"] is None and _first(new, "running as"):
            t["cpu_at_ready"] = mesh._cpu_seconds(h.agent.pid)
        if t["cpu_at_connected"] is None and _first(new, "connection established with", f"({peer.name})"):
            t["cpu_at_connected"] = mesh._cpu_seconds(h.agent.pid)
        if t["cpu_at_ready"] is not None and t["cpu_at_connected"] is not None:
            break
        if h.agent is not None and h.agent.poll() is not None:
            raise datapath.BenchError(f"{h.name}: the restarted agent exited with {h.agent.returncode}")
        time.sleep(0.02)
    time.sleep(3.0)  # traffic back, and a few heartbeats, before the logs are read for the later steps
    lines = _read_from(h.agent_log_path, offset)
    cut = next((i for i, line in enumerate(lines) if line.startswith(_NEW_RUN)), len(lines))
    old, new = lines[:cut], lines[cut:]
    t["shutting_down"] = _first(old, "shutting down")
    t["logging"] = _first(new, "starting weft")
    t["ready"] = _first(new, "running as")
    t["connected"] = _first(new, "connection established with", f"({peer.name})")
    t["path_sleeve"] = _first(new, f"peer {peer.agent_name}: data path now sleeve")
    peer_lines = _read_from(peer.agent_log_path, peer_offset)
    t["peer_saw_close"] = _first(peer_lines, "connection to", f"({h.name}) ended")
    t["peer_connected"] = _first(peer_lines, "connection established with", f"({h.name})")
    t["tap_ifindex_after"] = _ifindex(h, "weft-tap")
    t["bridge_ifindex_after"] = _ifindex(h, "weft")
    return t


def _gap_in(gaps: list[list[float]], start: float, end: float) -> list[float] | None:
    """The longest gap that overlaps [start, end]."""
    overlapping = [g for g in gaps if g[1] >= start and g[0] <= end]
    return max(overlapping, key=lambda g: g[1] - g[0], default=None)


def _lost_in(runs: list[list[float]], start: float, end: float) -> int:
    return int(sum(n for first, _, n in runs if start <= first < end))


def _since(a: float | int | None, b: float | int | None) -> float | None:
    return None if a is None or b is None else round(float(b) - float(a), 3)


def _figures(t: dict, window_end: float, rt: dict, one_way: dict) -> dict:
    """One restart's figures from its step times and the two flows' results."""
    start = float(t["term"])
    gap = _gap_in(rt["gaps"], start - 0.2, window_end)
    gap_1 = _gap_in(one_way["gaps"], start - 0.2, window_end)
    f = {
        "gap_s": round(gap[1] - gap[0], 3) if gap else 0.0,
        "gap_h1_to_h2_s": round(gap_1[1] - gap_1[0], 3) if gap_1 else 0.0,
        "lost": _lost_in(rt["lost_runs"], start - 1.0, window_end),
        "exit_s": _since(t["term"], t["exit"]),
        "exec_to_logging_s": _since(t["exec"], t["logging"]),
        "exec_to_ready_s": _since(t["exec"], t["ready"]),
        "cpu_to_ready_s": t["cpu_at_ready"],
        "cpu_to_connected_s": t["cpu_at_connected"],
        "ready_to_connected_s": _since(t["ready"], t["connected"]),
        "exec_to_connected_s": _since(t["exec"], t["connected"]),
        "connected_to_forwarding_s": _since(t["connected"], gap[1] if gap else None),
        "term_to_gap_start_s": _since(t["term"], gap[0] if gap else None),
        "term_to_forwarding_s": _since(t["term"], gap[1] if gap else None),
        "peer_saw_close_s": _since(t["term"], t["peer_saw_close"]),
        "connected_to_sleeve_s": _since(t["connected"], t["path_sleeve"]),  # as the restarted agent logs it
        "tap_kept": t["tap_ifindex_before"] is not None and t["tap_ifindex_before"] == t["tap_ifindex_after"],
        "bridge_kept": t["bridge_ifindex_before"] is not None
        and t["bridge_ifindex_before"] == t["bridge_ifindex_after"],
        "exit_code": t["exit_code"],
    }
    return f


FIGURES = [
    "gap_s",
    "gap_h1_to_h2_s",
    "lost",
    "exit_s",
    "exec_to_logging_s",
    "exec_to_ready_s",
    "cpu_to_ready_s",
    "cpu_to_connected_s",
    "ready_to_connected_s",
    "exec_to_connected_s",
    "connected_to_forwarding_s",
    "term_to_gap_start_s",
    "term_to_forwarding_s",
    "peer_saw_close_s",
]


def _summarise(per_restart: list[dict]) -> dict:
    out: dict = {}
    for key in FIGURES:
        values = [r[key] for r in per_restart if r.get(key) is not None]
        out[key] = {
            "median": round(statistics.median(values), 3) if values else None,
            "max": max(values, default=None),
        }
    return out


# -- the scenario -----------------------------------------------------------------------------------


def scenario(
    *,
    restarts: int,
    rate: float,
    settle_timeout: float,
    log: Callable[[str], None],
    extra_pythonpath: tuple[str, ...] = (),
) -> dict:
    """h1, h2, h3 with a secret; flows h1->h2 and h1->h3; h2's agent restarted ``restarts`` times."""
    result: dict = {"restarts": restarts, "rate": rate}
    with tempfile.TemporaryDirectory(prefix="weft-bench-pyc-") as pyc, Lab(extra_pythonpath=extra_pythonpath) as lab:
        # Bytecode cached as an installed agent has it (pip compiles at install): a restart must not pay for
        # compiling the agent's modules, even where PYTHONDONTWRITEBYTECODE is set.
        env = {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": pyc}
        try:
            hosts = lab.add_hosts(3)
            h1, h2, h3 = hosts
            secret = [SECRET_PREFIX + secrets.token_hex(12)]
            # As systemd runs it: info logging (the lab's default is debug), peers from the config.
            args = ("--log-level", "info")
            for h in hosts:
                h.start_agent(*args, peers=[o for o in hosts if o is not h], secrets=secret, env=env)
            for h in hosts:
                h.wait_ready(timeout=settle_timeout)
            cs = [h.add_container(f"10.32.{h.index}.1/16") for h in hosts]
            for a, b in ((h1, h2), (h2, h1), (h1, h3)):
                datapath._wait_path(a, b, "sleeve", settle_timeout, hold=1.0)
            for dst in cs[1:]:
                datapath._wait_ping(datapath.Endpoints(cs[0].netns, dst.netns, dst.ip), timeout=settle_timeout)
            echoes = [
                c.popen(sys.executable, FLOW, "echo", str(ECHO_PORT), log_name=f"echo-{c.name}.log") for c in cs[1:]
            ]
            for e in echoes:
                _wait_log(e, "listening")
            flow = (sys.executable, FLOW, "send")
            senders = [
                cs[0].popen(*flow, dst.ip, str(ECHO_PORT), "--rate", f"{rate:g}", log_name=f"send-{dst.name}.log")
                for dst in cs[1:]
            ]
            for s in senders:
                _wait_log(s, "sending")
            time.sleep(2.0)
            steps = []
            for i in range(restarts):

                def start() -> None:
                    h2.start_agent(*args, peers=[h1, h3], secrets=secret, env=env)

                t = _restart(h2, h1, start, settle_timeout)
                steps.append(t)
                for a, b in ((h1, h2), (h2, h1)):
                    datapath._wait_path(a, b, "sleeve", settle_timeout, hold=1.0)
                time.sleep(1.0)
                log(f"    restart {i + 1}/{restarts} done")
            rt = [_stop_flow(s) for s in senders]
            one_way = [_stop_flow(e) for e in echoes]
            per = []
            for i, t in enumerate(steps):
                end = float(steps[i + 1]["term"]) - 0.2 if i + 1 < len(steps) else rt[0]["last"]
                per.append(_figures(t, end, rt[0], one_way[0]))
                p = per[-1]
                log(
                    f"    restart {i + 1}: gap {p['gap_s']} s (h1->h2 {p['gap_h1_to_h2_s']} s), lost {p['lost']},"
                    f" exit {p['exit_s']} s, exec->ready {p['exec_to_ready_s']} s,"
                    f" ready->connected {p['ready_to_connected_s']} s,"
                    f" connected->forwarding {p['connected_to_forwarding_s']} s"
                )
            result["per_restart"] = per
            result["summary"] = _summarise(per)
            result["flow_h1_h2"] = {k: rt[0][k] for k in ("sent", "echoed", "send_errors", "longest_gap")}
            result["flow_h1_h3"] = {
                **{k: rt[1][k] for k in ("sent", "echoed", "send_errors", "longest_gap")},
                "lost": rt[1]["sent"] - rt[1]["echoed"],
            }
            result["tap_kept"] = all(p["tap_kept"] for p in per)
            result["bridge_kept"] = all(p["bridge_kept"] for p in per)
            datapath._check_alive(hosts)
        except Exception as exc:  # the reason goes in the report; the next variant still runs
            result["failed"] = datapath._reason(exc)
            result["log_tail"] = datapath._log_tails(lab.hosts)
    return result


def run(
    *,
    restarts: int = 6,
    rate: float = 1000.0,
    settle_timeout: float = 60.0,
    baseline: str | None = None,
    rounds: int = 2,
    log: Callable[[str], None] = print,
) -> dict:
    """The scenario against the agent of each git revision in ``baseline`` (comma-separated, if given) and against
    this tree's, in ``rounds`` rounds that split the restarts between them: each round runs every variant, in turn
    forwards and backwards, so a machine that gets busier or quieter meanwhile weighs on all of them alike."""
    report: dict = {"restarts": restarts, "rate": rate, "rounds": rounds, "target_gap_s": TARGET_GAP_S}
    reason = datapath.netns_unavailable_reason()
    if reason:
        report["skipped"] = reason
        return report
    variants: list[tuple[str, str | None]] = []
    for rev in (r.strip() for r in (baseline or "").split(",")):
        if rev:
            variants.append((rev, rev))
    variants.append(("this tree", None))
    rounds = max(1, min(rounds, restarts))
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    with contextlib.ExitStack() as stack:
        sources = {rev: str(stack.enter_context(exported_agent(rev))) for _, rev in variants if rev}
        for k in range(rounds):
            n = restarts // rounds + (1 if k < restarts % rounds else 0)
            for name, rev in variants if k % 2 == 0 else variants[::-1]:
                log(f"  restart gap, encrypted path: {name}, round {k + 1}/{rounds} ...")
                busy = datapath._wait_quiet(log)
                extra = (sources[rev],) if rev else ()
                r = scenario(restarts=n, rate=rate, settle_timeout=settle_timeout, log=log, extra_pythonpath=extra)
                r["machine_busy_before_pct"] = busy
                runs[name].append(r)
                if "failed" in r:
                    log(f"    failed: {r['failed']}")
    report["variants"] = {name: _merge(rs) for name, rs in runs.items()}
    return report


def _merge(runs: list[dict]) -> dict:
    """One variant's rounds as one result."""
    failed = [r for r in runs if "failed" in r]
    if failed:
        return {**failed[0], "rounds": runs}
    per = [p for r in runs for p in r["per_restart"]]
    flow_h1_h3 = {k: sum(r["flow_h1_h3"][k] for r in runs) for k in ("sent", "echoed", "send_errors", "lost")}
    flow_h1_h3["longest_gap"] = max(r["flow_h1_h3"]["longest_gap"] for r in runs)
    return {
        "restarts": len(per),
        "per_restart": per,
        "summary": _summarise(per),
        "flow_h1_h3": flow_h1_h3,
        "tap_kept": all(r["tap_kept"] for r in runs),
        "bridge_kept": all(r["bridge_kept"] for r in runs),
        "machine_busy_before_pct": [r["machine_busy_before_pct"] for r in runs],
    }

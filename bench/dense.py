"""A dense mesh of real agents with the data plane on: N agents (100 by default) in network namespaces, each with a
mesh secret and one IPAM seed (h1's name, as the role gives every host the mesh's seed), all running alone, then
each told of h1 through its API at once (`weft connect`). Discovery makes a full mesh of them.

Figures per variant: the time until every agent's view lists all N peers and until every agent has N-1 connections
(from the moment the first is told; the views by the agents' own record of when their view last changed, read by the
polls that find them complete, so the figure is not late by the polling), the topology gossip each agent sent
meanwhile, then, once the mesh has been quiet for ``settle`` seconds, the CPU each agent uses over ``window``
seconds (utime + stime from /proc/PID/stat: the settled cost of heartbeats, probes and anti-entropy) and its RSS.
Nothing polls the agents during the window. Next to them, the sum of the agents' CPU and the CPU the whole machine
was busy for in the window (from /proc/stat): the first cannot exceed the second.

With ``baseline=REV[,REV...]`` the same runs first against the agent of each git revision (``git archive``, first
on PYTHONPATH, as the restart benchmark does), so every variant comes from one run on one machine. The machine's
load average is recorded before and after each variant: other jobs on it move every figure.

Figures only: nothing here fails on a number.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import os
import statistics
import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

import mesh
import restart

TARGET_VIEWS_S = 5.0
TARGET_CPU_PCT = 2.0
_QUIET_CHECK = 2.0  # seconds between looks at whether the mesh is quiet (no connection count changing)
QUIET_LIMIT = 120.0  # seconds to wait for quiet at most: a mesh that never settles is measured as it is


def _summary(values: list[float]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "mean": round(statistics.fmean(ordered), 2),
        "median": round(statistics.median(ordered), 2),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 2),
        "max": round(ordered[-1], 2),
        "min": round(ordered[0], 2),
    }


def _gossip_out(host: mesh.Host) -> dict[str, float]:
    """Gossip bytes the agent has sent, by channel (topology, macs, ipam, dns...); empty if it does not answer."""
    with contextlib.suppress(mesh.ApiError, OSError, http.client.HTTPException):
        text = mesh._client(host).request("GET", "/metrics")
        return {
            s.labels["channel"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name in ("weft_gossip_bytes", "weft_gossip_bytes_total") and s.labels.get("direction") == "out"
        }
    return {}


def _gossip_of(hosts: list[mesh.Host]) -> dict[str, dict[str, float]]:
    """Every agent's gossip sent so far, asked of all at once: a saturated agent takes seconds to answer, and asking
    a hundred of them one after the other took longer than the run."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        return dict(zip((h.name for h in hosts), pool.map(_gossip_out, hosts), strict=True))


def _gossip_since(before: dict[str, dict[str, float]], hosts: list[mesh.Host]) -> dict[str, dict[str, float]]:
    """Each agent's gossip sent since ``before``, by channel."""
    after = _gossip_of(hosts)
    return {name: {ch: v - before.get(name, {}).get(ch, 0.0) for ch, v in sent.items()} for name, sent in after.items()}


def _by_channel(sent: dict[str, dict[str, float]]) -> dict[str, dict | None]:
    """The summary of the agents' totals, and of each channel's share."""
    channels = sorted({ch for per in sent.values() for ch in per})
    out: dict[str, dict | None] = {"total": _summary([sum(per.values()) for per in sent.values()])}
    out.update((ch, _summary([per.get(ch, 0.0) for per in sent.values()])) for ch in channels)
    return out


def scenario(
    n: int,
    *,
    settle: float,
    window: float,
    timeout: float,
    poll: float,
    extra_pythonpath: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
) -> dict:
    """One variant: see the module docstring."""
    result: dict = {"agents": n, "loadavg_before": os.getloadavg()}
    secret = "bench-dense-" + os.urandom(12).hex()
    args = ("--log-level", "info")  # as systemd runs it; the lab's default (debug) would measure the logging
    with mesh.Lab(extra_pythonpath=extra_pythonpath) as lab:
        t = time.monotonic()
        hosts = lab.add_hosts(n)
        lab.pin_neighbours()
        result["lab_setup_s"] = round(time.monotonic() - t, 1)
        h1 = hosts[0]
        try:
            t = time.monotonic()
            # One ring for all, as the role templates it (docs/ipam.md, "Seeds"): agents left to seed alone would
            # each make a ring of their own and refuse each other's, logging it, for the whole run.
            seed = ("--ipalloc-init", f"seed={h1.agent_name}")
            for h in hosts:
                h.start_agent(*args, *seed, secrets=[secret])
            mesh._wait_apis(hosts, timeout)
            result["agents_up_s"] = round(time.monotonic() - t, 1)
            log(f"    {n} agents running alone (started in {result['agents_up_s']} s); telling h2..h{n} of h1")
            gossip0 = _gossip_of(hosts)
            t0 = time.monotonic()
            # All at once, as the issue asks: told one after the other, the last heard of h1 a second or more after
            # the first on a busy machine, and that lag counted in every figure.
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda h: mesh._client(h).connect([h1.listen_addr]), hosts[1:]))
            result["told_s"] = round(time.monotonic() - t0, 2)
            recorded: dict[str, float] = {}
            _, knows_all, meshed = mesh.watch_formation(
                hosts, t0, timeout=timeout, poll=poll, log=log, view_changed=recorded
            )
            result["agents_knowing_all"] = len(knows_all)
            result["agents_fully_connected"] = len(meshed)
            # By the agents' own record where they keep one (exact), else when a look first found the view whole.
            views = recorded if len(recorded) == n else knows_all
            result["views_complete_from"] = "agents" if views is recorded else "polls"
            result["views_complete_s"] = round(max(views.values()), 2) if len(views) == n else None
            result["views_complete_each_s"] = sorted(round(v, 2) for v in views.values())
            result["views_seen_complete_s"] = round(max(knows_all.values()), 2) if len(knows_all) == n else None
            result["full_mesh_s"] = round(max(meshed.values()), 2) if len(meshed) == n else None
            result["full_mesh_each_s"] = sorted(round(v, 2) for v in meshed.values())
            dead = mesh._dead(hosts)
            if dead:
                result["error"] = f"{len(dead)} agent(s) exited, e.g. {dead[0].name}:\n{mesh._log_tail(dead[0])}"
                return result
            gossip = _by_channel(_gossip_since(gossip0, hosts))
            result["gossip_bytes_per_agent"] = gossip["total"]
            result["gossip_bytes_per_agent_by_channel"] = gossip
            quiet_after = _until_quiet(hosts, settle, QUIET_LIMIT)
            result["quiet_after_s"] = round(quiet_after - t0, 1)
            cpu0 = {h.name: mesh._cpu_seconds(h.agent.pid) for h in hosts if h.agent is not None}
            g0 = _gossip_of(hosts)
            busy0 = _machine_busy_seconds()
            w0 = time.monotonic()
            time.sleep(window)
            elapsed = time.monotonic() - w0
            busy1 = _machine_busy_seconds()
            cpu1 = {h.name: mesh._cpu_seconds(h.agent.pid) for h in hosts if h.agent is not None}
            pct = [100 * (cpu1[k] - cpu0[k]) / elapsed for k in cpu0 if cpu0[k] is not None and cpu1.get(k) is not None]
            result["settled_window_s"] = round(elapsed, 1)
            result["settled_cpu_pct"] = _summary(pct)
            # A cross-check of the per-agent figures: their sum cannot exceed what the whole machine was busy for.
            result["settled_agents_cpu_cores"] = round(sum(pct) / 100, 2)
            result["settled_machine_busy_cores"] = round((busy1 - busy0) / elapsed, 2)
            settled = _by_channel(_gossip_since(g0, hosts))
            result["settled_gossip_bytes_per_agent"] = settled["total"]
            result["settled_gossip_bytes_per_agent_by_channel"] = settled
            rss = [mesh._rss_kib(h.agent.pid) for h in hosts if h.agent is not None]
            result["rss_mib"] = _summary([r / 1024 for r in rss if r is not None])
            dead = mesh._dead(hosts)
            if dead:
                result["error"] = f"{len(dead)} agent(s) exited, e.g. {dead[0].name}:\n{mesh._log_tail(dead[0])}"
        except Exception as exc:  # the reason goes in the report; the next variant still runs
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            result["loadavg_after"] = os.getloadavg()
    return result


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all but idle and iowait) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _until_quiet(hosts: list[mesh.Host], settle: float, timeout: float) -> float:
    """Wait ``settle`` seconds, then until no agent's connection count changes between two looks (a few
    seconds apart), at most ``timeout``; returns when."""
    time.sleep(settle)
    deadline = time.monotonic() + timeout
    before: list[float] | None = None
    while time.monotonic() < deadline:
        now = []
        for h in hosts:
            if time.monotonic() >= deadline:  # a saturated mesh answers slowly: a look at 100 agents can take minutes
                return time.monotonic()
            try:
                now.append(mesh._mesh_gauges(mesh._client(h).request("GET", "/metrics"))[1])
            except (mesh.ApiError, OSError, http.client.HTTPException):
                now.append(-1)
        if now == before:
            break
        before = now
        time.sleep(_QUIET_CHECK)
    return time.monotonic()


def run(
    n: int = 100,
    *,
    baseline: str | None = None,
    settle: float = 15.0,
    window: float = 30.0,
    timeout: float = 600.0,
    poll: float = 0.5,
    log: Callable[[str], None] = print,
) -> dict:
    """Every variant (the revisions in ``baseline``, then this tree), one after the other."""
    report: dict = {
        "agents": n,
        "settle_s": settle,
        "window_s": window,
        "poll_s": poll,
        "target_views_complete_s": TARGET_VIEWS_S,
        "target_settled_cpu_pct": TARGET_CPU_PCT,
        "cpus": os.cpu_count(),
    }
    reason = mesh.netns_unavailable_reason()
    if reason:
        report["skipped"] = reason
        return report
    variants: list[tuple[str, str | None]] = [(r.strip(), r.strip()) for r in (baseline or "").split(",") if r.strip()]
    variants.append(("this tree", None))
    report["variants"] = {}
    with contextlib.ExitStack() as stack:
        sources = {rev: str(stack.enter_context(restart.exported_agent(rev))) for _, rev in variants if rev}
        for name, rev in variants:
            log(f"  dense mesh, {n} agents with the data plane: {name} (load average {os.getloadavg()[0]:.1f}) ...")
            extra = (sources[rev],) if rev else ()
            r = scenario(n, settle=settle, window=window, timeout=timeout, poll=poll, extra_pythonpath=extra, log=log)
            report["variants"][name] = r
            if "error" in r:
                log(f"    error: {r['error'].splitlines()[0]}")
    return report

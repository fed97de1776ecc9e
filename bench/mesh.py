"""Mesh benchmarks: convergence and gossip cost in the simulator, and real agents in network namespaces.

Nothing here asserts on time: each function returns figures (plain dicts, JSON-ready) for run.py to print.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from weft.api.client import ApiError, Client
from weft.mesh.router import Router
from weft.sim import SimNetwork, chain_of_strangers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent" / "tests" / "harness"))  # the netns lab harness

from lab import Host, Lab, metric_value, netns_unavailable_reason

REPO = Path(__file__).resolve().parents[1]

# -- simulator ---------------------------------------------------------------------------------------


class _AnnounceCounter:
    """Counts local topology changes as the router announces them, and how many peers each announcer
    knew at that moment: what a protocol that gossips the whole topology on every change would send."""

    def __init__(self) -> None:
        self.announces = 0
        self.known_peers = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[_AnnounceCounter]:
        original = Router._announce

        def counting(router: Router) -> None:
            self.announces += 1
            self.known_peers += len(router.topology.peers)
            original(router)

        Router._announce = counting  # type: ignore[method-assign]
        try:
            yield self
        finally:
            Router._announce = original  # type: ignore[method-assign]

    def snapshot(self) -> tuple[int, int]:
        return self.announces, self.known_peers


def _run_until_converged(net: SimNetwork, deadline: float, resolution: float) -> float | None:
    """Advance virtual time in ``resolution`` steps and check ``net.converged()`` after each step.

    The result is the end of the first step at which every view was complete (at most ``resolution``
    late), or None if that did not happen by ``deadline``. ``VirtualScheduler.run_until(done, deadline,
    resolution)`` is not used for the timing: it checks ``done`` only before running an event, so when
    the queue's next event is far away (a periodic gossip round 24-36 s out) it reports that event's time.
    """
    scheduler = net.scheduler
    start = scheduler.now()
    step = 0
    while True:
        step += 1
        until = round(start + step * resolution, 9)
        if until > deadline:
            return None
        scheduler.run_until(lambda: False, until)
        if net.converged():
            return until


def _full_state_bytes(net: SimNetwork, index: int = 0) -> int:
    return len(net.peers[index].router.topology.full_update().encode())


def _anti_entropy_fanout(router: Router) -> int:
    """The number of neighbours a router sends its full state to per gossip interval (as Router does)."""
    n_conns = len(router.connections)
    if not n_conns:
        return 0
    return min(n_conns, 2 * max(1, math.ceil(math.log2(len(router.topology.peers) + 1))))


def sim_convergence(n: int, *, latency: float = 0.01, seed: int = 1, deadline: float = 60.0) -> dict:
    """``n`` peers, each told of one earlier peer: time and bytes until every view is complete, then the
    cost of one change (a peer joining; a new link between two peers) once the mesh has settled."""
    counter = _AnnounceCounter()
    with counter.installed():
        wall0, cpu0 = time.perf_counter(), time.process_time()
        net = chain_of_strangers(n, seed=seed, latency=latency)
        converged_at = _run_until_converged(net, deadline, resolution=0.01)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        result: dict = {
            "peers": n,
            "latency_s": latency,
            "converged": converged_at is not None,
            "virtual_s": converged_at,
            # The simulator's own speed: wall clock, and CPU time (what the wall clock would be on an idle core).
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "messages": net.messages,
            "gossip_bytes_per_peer": round(net.gossip_bytes_out() / n, 1),
            "connections": sum(len(p.router.connections) for p in net.peers) // 2,
        }
        if converged_at is None:
            return result

        full = _full_state_bytes(net)
        entry_bytes = full / n
        announces, known = counter.snapshot()
        # A Weave-style protocol sends the whole topology (as big as the announcer's view) on every
        # change, and every peer passes it on at least once: a lower bound per peer.
        baseline = known * entry_bytes
        result.update(
            {
                "full_state_bytes": full,
                "changes": announces,
                "gossip_bytes_per_peer_per_change": round(result["gossip_bytes_per_peer"] / announces, 1),
                "full_topology_baseline_bytes_per_peer": round(baseline, 1),
                "baseline_ratio": round(baseline / result["gossip_bytes_per_peer"], 2),
                "anti_entropy_bytes_per_peer_per_interval": round(
                    sum(_anti_entropy_fanout(p.router) for p in net.peers) / n * full, 1
                ),
                "gossip_interval_s": net.gossip_interval,
            }
        )

        rng = random.Random(seed + 1)
        contact = rng.randrange(n)
        result["join"] = _one_change(net, counter, lambda: net.add_peer([f"sim{contact}:6783"], discovery=False))
        result["join"]["contact"] = f"sim{contact}"
        a, b = _unconnected_pair(net, rng)
        result["new_link"] = _one_change(net, counter, lambda: net.peers[a].maker.connect([net.peers[b].address]))
        result["new_link"]["between"] = [f"sim{a}", f"sim{b}"]
        result["total_wall_s"] = round(time.perf_counter() - wall0, 3)
        result["total_cpu_s"] = round(time.process_time() - cpu0, 3)
    return result


def _unconnected_pair(net: SimNetwork, rng: random.Random) -> tuple[int, int]:
    while True:
        a, b = rng.sample(range(len(net.peers)), 2)
        if net.peers[b].info.name not in net.peers[a].router.connections:
            return a, b


def _one_change(
    net: SimNetwork,
    counter: _AnnounceCounter,
    change: Callable[[], object],
    quiet: float = 0.5,
    limit: float = 20.0,
) -> dict:
    """Apply ``change`` to a converged mesh and measure what it costs until no gossip has been sent for
    ``quiet`` seconds (virtual)."""
    scheduler = net.scheduler
    start = scheduler.now()
    bytes0, messages0 = net.gossip_bytes_out(), net.messages
    announces0, _ = counter.snapshot()
    change()
    last_count, last_send, step = net.messages, start, 0
    while True:
        step += 1
        until = round(start + step * 0.01, 9)
        scheduler.run_until(lambda: False, until)
        if net.messages != last_count:
            last_count, last_send = net.messages, until
        if until - last_send >= quiet or until - start >= limit:
            break
    end = until
    n = len(net.peers)
    extra = (net.gossip_bytes_out() - bytes0) / n
    changes = counter.snapshot()[0] - announces0
    full = _full_state_bytes(net)
    # Anti-entropy rounds start no earlier than 0.8 x the gossip interval after a peer starts; a window
    # that reaches that far would mix periodic full-state gossip into the figure.
    return {
        "settled_s": round(last_send - start, 3),
        "views_current": net.converged(exact=True),
        "window_s": [round(start, 3), round(end, 3)],
        "window_clear_of_anti_entropy": end < 0.8 * net.gossip_interval,
        "extra_bytes_per_peer": round(extra, 1),
        "extra_messages": net.messages - messages0,
        "changes": changes,
        "full_topology_baseline_bytes_per_peer": changes * full,
        "baseline_ratio": round(changes * full / extra, 1) if extra else None,
    }


# -- real agents ----------------------------------------------------------------------------------


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _mesh_gauges(metrics_text: str) -> tuple[float, float]:
    """``weft_peers`` and the established ``weft_connections`` from a scrape (a cheap line scan)."""
    peers = established = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("weft_peers "):
            peers = float(line.split()[1])
        elif line.startswith("weft_connections{") and 'state="established"' in line:
            established += float(line.rsplit(" ", 1)[1])
    return peers, established


def _view_changed_at(metrics_text: str) -> float | None:
    """``weft_peers_changed_timestamp_seconds`` (Unix time), or None from an agent that does not report it."""
    for line in metrics_text.splitlines():
        if line.startswith("weft_peers_changed_timestamp_seconds "):
            return float(line.split()[1])
    return None


def _client(host: Host) -> Client:
    return Client(str(host.api_socket), timeout=10.0)


def watch_formation(
    hosts: list[Host],
    t0: float,
    *,
    timeout: float,
    poll: float,
    log: Callable[[str], None],
    api_up: dict[str, float] | None = None,
    view_changed: dict[str, float] | None = None,
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Watch a mesh form: when (seconds from ``t0``) each agent's API first answered, its view listed every peer,
    and it had a connection to each. A thread per agent polls it every ``poll`` seconds, so a busy agent delays
    only its own answer; the watch ends when all are done, at ``timeout``, or when an agent exits. ``api_up``:
    agents already known to answer. ``view_changed`` is filled with when each complete view became complete by the
    agent's own record (``weft_peers_changed_timestamp_seconds``, seconds from ``t0``), where it keeps one: exact,
    where the poll's figure is late by up to ``poll`` and by the answer's wait."""
    n = len(hosts)
    wall0 = time.time() - (time.monotonic() - t0)  # t0 as Unix time, which the agents' record is in
    api_up = dict(api_up or {})
    knows_all: dict[str, float] = {}
    meshed: dict[str, float] = {}
    stop = threading.Event()

    def watch(h: Host) -> None:
        client = _client(h)
        while not stop.is_set() and (h.name not in knows_all or h.name not in meshed):
            try:
                text = client.request("GET", "/metrics")
                stamp = time.monotonic() - t0
                api_up.setdefault(h.name, stamp)
                peers, established = _mesh_gauges(text)
                if (
                    h.name not in knows_all
                    and peers >= n
                    and len(client.request("GET", "/status/peers")) == n  # what `weft status --json` lists
                ):
                    knows_all[h.name] = stamp
                    changed = _view_changed_at(text)
                    if view_changed is not None and changed is not None:
                        view_changed[h.name] = changed - wall0
                if h.name not in meshed and established >= n - 1:
                    meshed[h.name] = stamp
            except (ApiError, OSError, http.client.HTTPException):
                pass  # not up yet, or too busy to hand over a whole answer in time: the next look counts
            stop.wait(poll)

    watchers = [threading.Thread(target=watch, args=(h,), daemon=True) for h in hosts]
    for w in watchers:
        w.start()
    last_report = t0
    try:
        while (len(knows_all) < n or len(meshed) < n) and time.monotonic() - t0 <= timeout and not _dead(hosts):
            if time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                log(
                    f"  t={last_report - t0:5.1f}s  APIs up {len(api_up)}/{n}  "
                    f"knowing all peers {len(knows_all)}/{n}  fully connected {len(meshed)}/{n}"
                )
            time.sleep(0.1)
    finally:
        stop.set()
        deadline = time.monotonic() + 15  # the watchers are daemons: a saturated agent's answer is not awaited
        for w in watchers:
            w.join(max(0.0, deadline - time.monotonic()))
    return dict(api_up), dict(knows_all), dict(meshed)


def _dead(hosts: list[Host]) -> list[Host]:
    return [h for h in hosts if not h.agent_running()]


def _log_tail(host: Host, lines: int = 30) -> str:
    return "\n".join(host.agent_log().splitlines()[-lines:])


def _wait_apis(hosts: list[Host], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(hosts)
    while pending:
        dead = _dead(pending)
        if dead:
            raise RuntimeError(f"{dead[0].name}: agent exited:\n{_log_tail(dead[0])}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} agent API(s) not up after {timeout:g}s")
        still = []
        for h in pending:
            try:
                _client(h).request("GET", "/metrics")
            except ApiError:
                still.append(h)
        pending = still
        time.sleep(0.2)


AGENT_ARGS = ("--no-datapath",)


def real_agents(
    n: int = 50,
    *,
    scenario: str = "launch",
    timeout: float = 300.0,
    poll: float = 0.25,
    extra_pythonpath: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
) -> dict:
    """``n`` agents in network namespaces, all told only of h1: how long until every agent's status
    lists all ``n`` peers, until the full mesh is up, and how much memory and CPU an agent uses.

    ``scenario`` "launch": h2..hN are started with ``--peer h1`` at once, so the time includes starting
    ``n - 1`` Python processes on this machine. "connect": all agents are started alone first and, once
    every API answers, each is told of h1 through its API (``weft connect``): the mesh alone.

    The agents run without the data plane (``--no-datapath``): this measures the control plane, and
    50 data planes heartbeating each other on one 2-core machine would measure the machine instead.
    The data plane has its own benchmark (datapath.py).
    """
    reason = netns_unavailable_reason()
    if reason:
        return {"skipped": reason}
    result: dict = {"agents": n, "scenario": scenario, "encrypted": True}
    secret = "bench-" + os.urandom(12).hex()
    with Lab(extra_pythonpath=extra_pythonpath) as lab:
        t = time.monotonic()
        hosts = lab.add_hosts(n)
        lab.pin_neighbours()
        result["lab_setup_s"] = round(time.monotonic() - t, 2)
        h1, rest = hosts[0], hosts[1:]

        h1.start_agent(*AGENT_ARGS, secrets=[secret])
        h1.wait_ready(timeout=60)
        result["rss_alone_kib"] = _rss_kib(h1.agent.pid)  # the baseline: the same agent with no peers

        if scenario == "connect":
            for h in rest:
                h.start_agent(*AGENT_ARGS, secrets=[secret])
            _wait_apis(rest, timeout)
            cpu0 = {h.name: _cpu_seconds(h.agent.pid) or 0.0 for h in hosts}
            log(f"  {n} agents running alone; telling h2..h{n} of h1 through the API")
            t0 = time.monotonic()
            for h in rest:
                _client(h).connect([h1.listen_addr])
        else:
            cpu0 = {h.name: 0.0 for h in hosts}
            log(f"  {n} namespaces up in {result['lab_setup_s']}s; starting {n - 1} agents told only of h1")
            t0 = time.monotonic()
            for h in rest:
                h.start_agent(*AGENT_ARGS, peers=[h1], secrets=[secret])
        result["launch_s"] = round(time.monotonic() - t0, 2)

        api_up: dict[str, float] = {h.name: 0.0 for h in (hosts if scenario == "connect" else [h1])}
        api_up, knows_all, meshed = watch_formation(hosts, t0, timeout=timeout, poll=poll, log=log, api_up=api_up)
        dead = _dead(hosts)
        if dead:
            result["error"] = f"{len(dead)} agent(s) exited, e.g. {dead[0].name}:\n{_log_tail(dead[0])}"

        cpu = {h.name: (_cpu_seconds(h.agent.pid) or 0.0) - cpu0[h.name] for h in hosts if h.agent is not None}
        result["all_apis_up_s"] = round(max(api_up.values()), 2) if len(api_up) == n else None
        result["all_know_all_s"] = round(max(knows_all.values()), 2) if len(knows_all) == n else None
        result["full_mesh_s"] = round(max(meshed.values()), 2) if len(meshed) == n else None
        result["agents_knowing_all"] = len(knows_all)
        result["agents_fully_connected"] = len(meshed)
        if result["all_know_all_s"] is not None and result["all_apis_up_s"] is not None:
            result["know_all_after_last_api_s"] = round(result["all_know_all_s"] - result["all_apis_up_s"], 2)

        if "error" not in result:
            connections = 0
            gossip_out = []
            for h in hosts:
                with contextlib.suppress(ApiError):
                    status = _client(h).status()
                    connections += sum(1 for c in status["connections"] if c["state"] == "established")
                    text = _client(h).request("GET", "/metrics")
                    gossip_out.append(metric_value(text, "weft_gossip_bytes", direction="out"))
            result["connections"] = connections // 2
            result["gossip_bytes_out_per_agent"] = round(sum(gossip_out) / len(gossip_out)) if gossip_out else None

        rss = {h.name: _rss_kib(h.agent.pid) for h in hosts if h.agent is not None}
        known = [v for v in rss.values() if v is not None]
        result["rss_h1_kib"] = rss.get(h1.name)
        result["rss_max_kib"] = max(known) if known else None
        result["rss_mean_kib"] = round(sum(known) / len(known)) if known else None
        if result["rss_h1_kib"] and result["rss_alone_kib"]:
            result["rss_h1_ratio_to_alone"] = round(result["rss_h1_kib"] / result["rss_alone_kib"], 2)
        result["cpu_s_h1"] = round(cpu[h1.name], 2)
        result["cpu_s_mean"] = round(sum(cpu.values()) / len(cpu), 2)
        result["cpu_s_total"] = round(sum(cpu.values()), 1)
    return result

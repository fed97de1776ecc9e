#!/usr/bin/env python3
"""Weft benchmarks: prints tables of figures and writes them as JSON to bench/results/ (mesh.json, datapath.json,
restart.json, ipam.json, dns.json).

    make bench                                    # everything (as root for the real-agent and data-path parts)
    make bench BENCH_ARGS="--sim-sizes 100,300 --agents 0 --no-datapath"
    make bench BENCH_ARGS="--sim-sizes '' --agents 0 --datapath-seconds 5"   # the data path alone
    make bench BENCH_ARGS="--sim-sizes '' --agents 0 --no-datapath --restart-baseline HEAD~3"  # restarts
    make bench BENCH_ARGS="--sim-sizes '' --agents 0 --no-datapath --no-restart --no-ipam --no-dns-bench \\
                           --dense-baseline main~5"  # 100 agents with the data plane, two versions

The data-path part measures TCP throughput (iperf3, 1 and 4 streams) and ping RTT (100 x 10 ms) from a
container on h1 to one on another host: over plain routed veth (the baseline, no agent), then over weft's
fast (kernel VXLAN), encrypted (sleeve, with one forwarding worker and with the default) and relayed (sleeve
through h2, once sealed end to end) paths; medians of --datapath-runs runs, the agents' CPU per Gb/s, and the
machine's load average (it is shared: the figures move with it). It prints the targets next to the figures.

The restart part (bench/restart.py) measures the restart gap on the encrypted path: how long UDP traffic between
containers stops while one agent is restarted as systemd does it (SIGTERM, exit, start), and where the time goes;
with --restart-baseline REV[,REV...] the same runs first against the agent of each git revision.

The dense part (bench/dense.py) runs 100 real agents with the data plane on, each told only of h1 through its API
once all run: the time until every view is complete and the full mesh formed, gossip bytes per agent, then the CPU
per agent once settled (from /proc/PID/stat over a window nothing polls the agents in) and RSS; with
--dense-baseline REV the agent of that revision first, in the same run.

The IPAM part (bench/ipam_sim.py on the simulator, bench/ipam_agents.py on real agents as root) measures how long
an allocation takes (in the agent's code, through the API, `weft attach` end to end, and when space must come from
another peer first), the ring gossip one allocation costs next to sending the whole ring, and how soon a fresh
seeded mesh allocates.

The DNS part (bench/names.py) measures the agent's DNS server against dnsmasq serving the same names (dnsperf in a
container: queries per second at saturation, p50/p99 at a fixed rate), the CNI plugin's ADD and DEL, and the gossip
one DNS registration costs at 100 simulated peers; bench/results/dns.json. A part that could not be measured at all
makes the exit status non-zero.

The memory part (bench/memory.py) measures what each of the agent's imports costs, then the RSS of a real agent
(VmRSS and VmHWM) alone without and with the data plane, and with the data plane serving 100 peers, next to the
target (<= 45 MiB); with --memory-baseline REV[,REV...] the same first for the agent of each git revision (before
and after in one run); bench/results/memory.json.

    make bench BENCH_ARGS="--sim-sizes '' --agents 0 --no-datapath --no-restart --no-ipam --no-dns-bench \
        --memory-baseline main"                                                   # memory alone, before and after

Figures, not tests: nothing here fails on a number. The exit status is non-zero only when a mesh did
not converge at all (or an agent died), or a data-path scenario could not be measured, because then the
figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datapath
import datapath_workers
import dense
import ipam_sim
import memory
import mesh
import names
import restart

RESULTS = Path(__file__).resolve().parent / "results"


# The columns both simulator tables share: what the gossip cost, next to the whole-topology baseline.
_GOSSIP_COLUMNS = [
    "messages",
    "changes",
    "gossip/peer",
    "full-topology baseline/peer",
    "baseline/weft",
]


def _fmt(value: object, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text}{unit}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)


def _kib_to_mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def print_sim(results: list[dict]) -> None:
    print("\nSimulator: chain of strangers (each peer told of one earlier peer), 10 ms links, discovery off")
    rows = []
    for r in results:
        rows.append(
            [
                f"{r['peers']:,} peers",
                _fmt(r["virtual_s"], " s"),
                _fmt(r["wall_s"], " s"),
                _fmt(r.get("cpu_s"), " s"),
                _fmt(r["messages"]),
                _fmt(r.get("changes")),
                _fmt(r["gossip_bytes_per_peer"], " B"),
                _fmt(r.get("gossip_bytes_per_peer_per_change"), " B"),
                _fmt(r.get("full_topology_baseline_bytes_per_peer"), " B"),
                _fmt(r.get("baseline_ratio"), "x"),
            ]
        )
    print(
        _table(
            [
                "mesh",
                "converged (virtual)",
                "wall clock",
                "CPU",
                *_GOSSIP_COLUMNS[:3],
                "gossip/peer/change",
                *_GOSSIP_COLUMNS[3:],
            ],
            rows,
        )
    )
    print(
        "  wall clock and CPU: the simulator's own time to convergence; the whole size, with the changes"
        " below: "
        + ", ".join(
            f"{r['peers']:,} peers {_fmt(r.get('total_wall_s'), ' s')} ({_fmt(r.get('total_cpu_s'), ' s')} CPU)"
            for r in results
        )
    )
    print("\nOne change after convergence (bytes every peer sends on average, until the mesh is quiet again)")
    rows = []
    for r in results:
        for key, label in (("join", "a peer joins"), ("new_link", "a new link")):
            c = r.get(key)
            if not c:
                continue
            rows.append(
                [
                    f"{r['peers']:,} peers, {label}",
                    _fmt(c["settled_s"], " s") + ("" if c["views_current"] else " (views NOT current)"),
                    _fmt(c["extra_messages"]),
                    _fmt(c["changes"]),
                    _fmt(c["extra_bytes_per_peer"], " B"),
                    _fmt(c["full_topology_baseline_bytes_per_peer"], " B"),
                    _fmt(c["baseline_ratio"], "x"),
                ]
            )
    print(
        _table(
            ["change", "settled", *_GOSSIP_COLUMNS],
            rows,
        )
    )
    print(
        "\n  full-topology baseline: what gossiping the whole topology on every change would cost (Weave's way):\n"
        "  each change x the size of the topology the announcing peer knew then, sent once per peer (a lower\n"
        "  bound). weft sends deltas. Anti-entropy (full state to a few neighbours every"
        f" {results[0].get('gossip_interval_s', 30):g} s) is not in\n"
        "  these windows; its cost per peer per round is in the JSON (anti_entropy_bytes_per_peer_per_interval)."
    )


SCENARIOS = {
    "launch": "h2..hN started at once with --peer h1 (times include starting the Python processes)",
    "connect": "all agents running alone, then told of h1 through the API at once (the mesh alone)",
}


def print_agents(r: dict) -> None:
    scenario = r.get("scenario", "launch")
    print(f"\nReal agents in network namespaces, encrypted: {r.get('agents', '?')} agents, {SCENARIOS[scenario]}")
    if "skipped" in r:
        print(f"  skipped: {r['skipped']}")
        return
    if "error" in r:
        print(f"  ERROR: {r['error']}")
    n = r["agents"]
    start = "the launch of h2..hN" if scenario == "launch" else "`weft connect` to h2..hN"
    rows = [
        [
            f"{scenario}: h2..h{n} launched / told (wall clock)",
            _fmt(r.get("launch_s"), " s"),
        ],
        ["every agent's API answering", _fmt(r.get("all_apis_up_s"), " s")],
        [f"every status lists all {n} peers", _fmt(r.get("all_know_all_s"), " s")],
        [
            f"full mesh ({n * (n - 1) // 2:,} connections) established",
            _fmt(r.get("full_mesh_s"), " s"),
        ],
        ["connections counted after convergence", _fmt(r.get("connections"))],
        [
            "gossip bytes sent per agent (mean)",
            _fmt(r.get("gossip_bytes_out_per_agent"), " B"),
        ],
        [
            "CPU time: h1 / mean per agent / all agents",
            "{} / {} / {}".format(
                _fmt(r.get("cpu_s_h1"), " s"),
                _fmt(r.get("cpu_s_mean"), " s"),
                _fmt(r.get("cpu_s_total"), " s"),
            ),
        ],
        [
            "RSS of h1 alone (baseline)",
            _fmt(_kib_to_mib(r.get("rss_alone_kib")), " MiB"),
        ],
        [f"RSS of h1 with {n} peers", _fmt(_kib_to_mib(r.get("rss_h1_kib")), " MiB")],
        ["  ratio to h1 alone", _fmt(r.get("rss_h1_ratio_to_alone"), "x")],
        [
            "RSS max / mean over all agents",
            "{} / {}".format(
                _fmt(_kib_to_mib(r.get("rss_max_kib")), " MiB"),
                _fmt(_kib_to_mib(r.get("rss_mean_kib")), " MiB"),
            ),
        ],
    ]
    print(_table([f"figure (times from {start})", "value"], rows))


def _summary_cell(s: dict | None, unit: str) -> str:
    if not s:
        return "-"
    return f"{_fmt(s['median'], unit)} / {_fmt(s['mean'], unit)} / {_fmt(s['max'], unit)}"


def _mb(s: dict | None) -> dict | None:
    return {k: v / 1e6 for k, v in s.items()} if s else None


_DENSE_ROWS = [
    (
        "every view lists all peers (from the first `connect`; by the agents' record, else polled)",
        lambda r: f"{_fmt(r.get('views_complete_s'), ' s')} ({r.get('views_complete_from', 'polls')})",
    ),
    ("every view seen listing all peers by a poll", lambda r: _fmt(r.get("views_seen_complete_s"), " s")),
    ("full mesh formed (every agent has N-1 connections)", lambda r: _fmt(r.get("full_mesh_s"), " s")),
    (
        "agents knowing all / fully connected",
        lambda r: f"{r.get('agents_knowing_all', '-')} / {r.get('agents_fully_connected', '-')}",
    ),
    (
        "gossip sent per agent meanwhile, median / mean / max",
        lambda r: _summary_cell(_mb(r.get("gossip_bytes_per_agent")), " MB"),
    ),
    (
        "settled CPU per agent (% of a core), median / mean / max",
        lambda r: _summary_cell(r.get("settled_cpu_pct"), "%"),
    ),
    (
        "the agents' CPU summed / the machine busy, in the window (cores)",
        lambda r: f"{_fmt(r.get('settled_agents_cpu_cores'))} / {_fmt(r.get('settled_machine_busy_cores'))}",
    ),
    (
        "settled gossip per agent in the window, median / mean / max",
        lambda r: _summary_cell(r.get("settled_gossip_bytes_per_agent"), " B"),
    ),
    (
        "settled gossip per agent by channel (median)",
        lambda r: (
            ", ".join(
                f"{ch} {_fmt(s['median'])} B"
                for ch, s in (r.get("settled_gossip_bytes_per_agent_by_channel") or {}).items()
                if ch != "total" and s
            )
            or "-"
        ),
    ),
    ("RSS per agent, median / mean / max", lambda r: _summary_cell(r.get("rss_mib"), " MiB")),
    ("mesh quiet (connection counts still) after", lambda r: _fmt(r.get("quiet_after_s"), " s")),
    (
        "load average (1 min) before / after",
        lambda r: f"{_fmt((r.get('loadavg_before') or [None])[0])} / {_fmt((r.get('loadavg_after') or [None])[0])}",
    ),
]


def print_dense(report: dict) -> None:
    n = report["agents"]
    print(
        f"\nDense mesh: {n} real agents in network namespaces, data plane on, encrypted, all running alone, then each"
        f" told of h1\nthrough its API (`weft connect`); discovery makes the full mesh ({n * (n - 1) // 2:,}"
        f" connections). Settled: {report['settle_s']:g} s after\nit and once quiet, over {report['window_s']:g} s in"
        f" which nothing polls the agents. {report['cpus']} CPUs, shared with whatever else runs."
    )
    if "skipped" in report:
        print(f"  skipped: {report['skipped']}")
        return
    variants = report["variants"]
    table = [[label, *(f(r) for r in variants.values())] for label, f in _DENSE_ROWS]
    print(_table(["figure", *variants], table))
    print("\nTargets (figures only: nothing fails on them)")
    rows = []
    for name, r in variants.items():
        views = r.get("views_complete_s")
        cpu = (r.get("settled_cpu_pct") or {}).get("median")
        for label, limit, value, unit in (
            ("complete views", report["target_views_complete_s"], views, " s"),
            ("settled CPU per agent (median)", report["target_settled_cpu_pct"], cpu, "% of a core"),
        ):
            met = "-" if value is None else "yes" if value <= limit else "NO"
            rows.append([f"{name}: {label}", f"<= {limit:g}{unit}", _fmt(value, unit), met])
    print(_table(["figure", "target", "measured", "met"], rows))
    for name, r in variants.items():
        summed, busy = r.get("settled_agents_cpu_cores"), r.get("settled_machine_busy_cores")
        if summed is not None and busy is not None and summed > 1.1 * busy:
            print(
                f"\n  {name}: the agents' CPU sums to {summed:g} cores where the machine was busy for {busy:g}: the"
                " kernel's per-process\n  figures overstate each agent's CPU on this saturated machine; at most"
                f" {100 * busy / n:.2f}% a core each were there to be had"
            )
        if "error" in r:
            print(f"\n  {name} ERROR: {r['error']}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _datapath_table_row(r: dict) -> list[str]:
    if "failed" in r:
        return [r["scenario"], "FAILED", *["-"] * 10]
    cpu = r.get("agent_cpu_pct_1") or {}
    return [
        r["scenario"],
        (r.get("datapath") or {}).get("path", r["path"]),
        str(r.get("mtu", "-")),
        _fmt(r.get("gbps_1")),
        _fmt(r.get("gbps_4")),
        _fmt(r.get("ratio_to_baseline_1"), "x"),
        f"{_ms(r.get('rtt_min_ms'))} / {_ms(r.get('rtt_avg_ms'))}",
        _ms(r.get("rtt_added_ms")),
        " / ".join(f"{name} {v:.0f}%" for name, v in cpu.items() if v is not None) or "-",
        _fmt(r.get("cpu_pct_per_gbps_1")),
        _fmt(r.get("cpu_pct_per_gbps_4")),
        f"{_fmt(r.get('machine_cpu_pct_1'))} / {_fmt(r.get('machine_cpu_pct_4'))}",
    ]


def _target_value(t: dict, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ms" if t["figure"].endswith("_ms") else f"{value:.2f} Gb/s"


def print_datapath(report: dict) -> None:
    print(
        f"\nData path: container on h1 to container on h2 (h3 relayed); iperf3 TCP {report['seconds']:g} s,"
        f" ping {report['ping']}; medians of {report['runs']} run(s)"
    )
    if "skipped" in report:
        print(f"  skipped: {report['skipped']}")
        return
    results = report["scenarios"]
    headers = [
        "scenario",
        "path",
        "MTU",
        "Gb/s 1 stream",
        "Gb/s 4 streams",
        "1 stream / baseline",
        "RTT min / avg ms",
        "added RTT (avg) ms",
        "agent CPU, 1 stream (% of a core)",
        "agents' CPU % per Gb/s, 1 stream",
        "4 streams",
        "machine CPU %, 1 / 4 streams",
    ]
    print(f"  machine {report.get('load_before', '?')} before, {report.get('load_after', '?')} after")
    print(_table(headers, [_datapath_table_row(r) for r in results.values()]))
    for r in results.values():
        busy = r.get("machine_busy_before_pct")
        if busy is not None and busy > datapath.QUIET_PCT:
            print(
                f"  note: {r['scenario']}: other processes kept the machine {busy:.0f}% busy"
                f" (of {100 * (os.cpu_count() or 1)}%) before it started: its figures may be low"
            )
    for r in results.values():
        if "failed" in r:
            print(f"\n  {r['scenario']} FAILED: {r['failed']}")
            for host, tail in (r.get("log_tail") or {}).items():
                print(f"    {host} agent log (end):")
                print("\n".join(f"      {line[:160]}" for line in tail.splitlines()[-8:]))
    print("\nTargets (figures only: nothing fails on them)")
    rows = [
        [
            t["scenario"],
            t["target"],
            _target_value(t, t["limit"]),
            _target_value(t, t["measured"]),
            {True: "yes", False: "NO", None: "-"}[t["met"]],
        ]
        for t in report["targets"]
    ]
    print(_table(["scenario", "target", "limit", "measured", "met"], rows))
    cores = 100 * (os.cpu_count() or 1)
    for t in report["targets"]:
        scenario = t["scenario"]
        if t.get("machine_ceiling") is not None:
            print(
                f"  {scenario}: one stream kept the machine {results[scenario]['machine_cpu_pct_1']:.0f}% busy"
                f" (of {cores}%): at the same CPU per byte, more streams can carry at most {t['machine_ceiling']:.2f}x"
                " here, whatever the workers"
            )
        if t.get("cpu_ceiling") is not None:
            ours, theirs = (results[s]["cpu_pct_per_gbps_1"] for s in (scenario, t["reference"]))
            print(
                f"  {scenario}: its agents use {ours:.1f}% of a core per Gb/s, {t['reference']}'s {theirs:.1f}%: while"
                f" the shared CPU is the limit, it can reach at most {t['cpu_ceiling']:.2f}x of {t['reference']} here"
            )


def print_restart(report: dict) -> None:
    print(
        f"\nRestart gap, encrypted path: h2's agent restarted {report['restarts']} times (SIGTERM, exit, start) under"
        f" UDP flows of {report['rate']:g} datagrams/s h1->h2 (echoed) and h1->h3; median / max over the restarts"
        f" ({report.get('rounds', 1)} rounds, each over every variant)"
    )
    if "skipped" in report:
        print(f"  skipped: {report['skipped']}")
        return
    variants = report["variants"]
    rows = [
        ("longest gap, h1->h2->h1 echoes", "gap_s", " s"),
        ("longest gap, h1->h2 alone", "gap_h1_to_h2_s", " s"),
        ("datagrams lost (round trip)", "lost", ""),
        ("  SIGTERM to exit", "exit_s", " s"),
        ("  exec to first log line", "exec_to_logging_s", " s"),
        ("  exec to ready", "exec_to_ready_s", " s"),
        ("  CPU time the new agent used to get ready", "cpu_to_ready_s", " s"),
        ("  CPU time the new agent used to connect with h1", "cpu_to_connected_s", " s"),
        ("  exec to connected with h1", "exec_to_connected_s", " s"),
        ("  connected to first echo", "connected_to_forwarding_s", " s"),
        ("  SIGTERM to first echo", "term_to_forwarding_s", " s"),
        ("  SIGTERM to last echo before the gap", "term_to_gap_start_s", " s"),
    ]
    headers = ["figure", *variants]
    table = []
    for label, key, unit in rows:
        cells = []
        for r in variants.values():
            s = (r.get("summary") or {}).get(key)
            cells.append(
                "FAILED" if "failed" in r else f"{_fmt(s['median'], unit)} / {_fmt(s['max'], unit)}" if s else "-"
            )
        table.append([label, *cells])
    table.append(
        [
            "h1->h3 flow (not restarted): lost / longest gap",
            *(
                "-" if "failed" in r else f"{r['flow_h1_h3']['lost']} / {_fmt(r['flow_h1_h3']['longest_gap'], ' s')}"
                for r in variants.values()
            ),
        ]
    )
    table.append(
        [
            "TAP and bridge kept (same ifindex)",
            *(
                "-" if "failed" in r else "yes" if r["tap_kept"] and r["bridge_kept"] else "NO"
                for r in variants.values()
            ),
        ]
    )
    table.append(
        [
            f"target: longest gap <= {report['target_gap_s']:g} s (max)",
            *(
                "-" if "failed" in r else "yes" if r["summary"]["gap_s"]["max"] <= report["target_gap_s"] else "NO"
                for r in variants.values()
            ),
        ]
    )
    print(_table(headers, table))
    for name, r in variants.items():
        if "failed" in r:
            print(f"\n  {name} FAILED: {r['failed']}")
            for host, tail in (r.get("log_tail") or {}).items():
                print(f"    {host} agent log (end):")
                print("\n".join(f"      {line[:160]}" for line in tail.splitlines()[-8:]))


def _ms_row(label: str, figures: dict | None, target: str) -> list[str]:
    ms = (figures or {}).get("ms") or {}
    return [
        label,
        _fmt(ms.get("samples")),
        _fmt(ms.get("median"), " ms"),
        _fmt(ms.get("p99"), " ms"),
        target,
    ]


def print_ipam(report: dict) -> None:
    print("\nIPAM: allocation latency")
    rows = []
    for r in report.get("local_latency", []):
        where = "with its state database" if r["state_database"] else "code alone"
        rows.append(
            _ms_row(
                f"local space, Ipam.allocate ({where}, ring of {r['ring_tokens']:,} tokens)",
                r,
                "<= 1 ms",
            )
        )
    sr = report.get("space_request")
    if sr:
        rows.append(
            _ms_row(
                f"space from another peer: CPU of the {sr['peers']}-peer simulated mesh",
                {"ms": sr["cpu_ms"]},
                "<= 50 ms",
            )
        )
        rows.append(
            _ms_row(
                f"  the same, virtual time over {sr['link_latency_ms']:g} ms links",
                {"ms": sr["virtual_ms"]},
                "",
            )
        )
    agents = report.get("agents") or {}
    for key, value in agents.items():
        if isinstance(value, dict) and "ms" in value:
            rows.append(
                _ms_row(
                    f"real agents: {value.get('label', key)}",
                    value,
                    value.get("target", ""),
                )
            )
    print(_table(["allocation", "samples", "median", "p99", "target"], rows))
    if "skipped" in agents or "error" in agents:
        print(f"  real agents: {agents.get('skipped') or agents.get('error')}")

    print("\nIPAM: ring gossip for one allocation (bytes every peer sends on average, until the mesh is quiet)")
    rows = []
    for g in report.get("gossip", []):
        seeded = "all" if g["seed_peers"] == g["peers"] else f"{g['seed_peers']}"
        rows.append(
            [
                f"{g['peers']:,} peers, seeded by {seeded}" + (", each with space" if g["grown"] else ""),
                _fmt(g["ring_tokens"]),
                _fmt(g["messages"]),
                _fmt(g["ipam_bytes_per_peer"], " B"),
                _fmt(g["whole_ring_baseline_bytes_per_peer"], " B"),
                _fmt(g["baseline_ratio"], "x"),
                "yes" if g["rings_agree"] else "NO",
            ]
        )
    print(
        _table(
            [
                "mesh",
                "tokens",
                "messages",
                "ipam/peer",
                "whole-ring baseline/peer",
                "baseline/weft",
                "rings agree",
            ],
            rows,
        )
    )
    print(
        "  whole-ring baseline: every peer sending the whole ring once for the change (what a ring without deltas\n"
        "  would cost). Anti-entropy (the whole ring to a few neighbours a round) is outside these windows."
    )

    print("\nIPAM: from a fresh mesh's start to its first allocation")
    rows = []
    for f in report.get("first_allocation", []):
        rows.append(
            [
                f"simulator, {f['peers']} peers, {f['init']} (virtual time)",
                _fmt(f["virtual_s"], " s"),
                f["address"] or f["reason"],
            ]
        )
    first = agents.get("first_allocation") if isinstance(agents, dict) else None
    if isinstance(first, dict):
        rows.append(
            [
                f"real agents: {first.get('label', 'fresh seeded mesh')}",
                _fmt(first.get("s"), " s"),
                str(first.get("address") or first.get("detail") or ""),
            ]
        )
    print(_table(["mesh", "first allocation", "address"], rows))
    own = (first or {}).get("since_own_start") if isinstance(first, dict) else None
    if own:
        ms = own["ms"]
        print(
            f"  per host, from its own process start to its first address: median {_fmt(ms['median'])} ms,"
            f" p99 {_fmt(ms['p99'])} ms over {ms['samples']} (target: within 1 s of its own start)"
        )


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_dns(report: dict) -> None:
    server = report.get("server") or {}
    dnsmasq, dnsperf = (f" {server[k]}" if server.get(k) else "" for k in ("dnsmasq", "dnsperf"))
    print(
        f"\nDNS server: weft against dnsmasq{dnsmasq}, {server.get('names', 1000):,} names, asked by dnsperf{dnsperf}"
        " in a container on the agent's bridge (169.254.53.53: weft on port 53, dnsmasq on 5300)"
    )
    if "skipped" in server or "error" in server:
        print(f"  {'skipped' if 'skipped' in server else 'ERROR'}: {server.get('skipped') or server.get('error')}")
    else:
        rows = []
        labels = {"hits": "every name, A", "nxdomain": "1 in 10 NXDOMAIN"}
        for variant, v in server["variants"].items():
            for name in ("weft", "dnsmasq"):
                sat, fixed = v["saturation"][name], v["fixed"][name]
                rows.append(
                    [
                        f"{labels.get(variant, variant)}: {name}",
                        _fmt(sat["qps"]),
                        "-" if sat.get("server_cpu_pct") is None else f"{sat['server_cpu_pct']:.0f}%",
                        _fmt(fixed["rate"], "/s"),
                        f"{_ms(fixed['ms']['median'])} ms",
                        f"{_ms(fixed['ms']['p99'])} ms",
                        f"{_ms(fixed['ms']['max'])} ms",
                        _fmt(sat["lost"] + fixed["lost"]),
                    ]
                )
            ratios = [_x(v["qps_ratio"]), "", "", _x(v["p50_ratio"]), _x(v["p99_ratio"]), "", ""]
            rows.append(["  weft / dnsmasq", *ratios])
        print(
            _table(
                [
                    "queries, server",
                    "queries/s (100 outstanding)",
                    "its CPU (of a core)",
                    "fixed rate",
                    "p50",
                    "p99",
                    "max",
                    "lost",
                ],
                rows,
            )
        )
        print(
            f"  {server['seconds']:g} s a measure (the NXDOMAIN mix half that), in two runs, the servers taking turns."
            " The fixed rate is 30% of\n  the slower server's saturation on every name (at most 5,000/s), so p99 is"
            " latency, not queueing;\n  latencies from dnsperf -v, per query."
            " Both answer from memory: dnsmasq keeps hosts-file names in its cache, weft its rendered answers."
        )

    cni = report.get("cni") or {}
    print(
        f"\nCNI: {cni.get('plugin', 'weft-cni')} run as a runtime runs it (wall time of the process, start to exit),"
        f" {cni.get('cycles', '?')} ADD/DEL\ncycles, each a fresh namespace with a DNS name (K8S_POD_NAME), the agent"
        " idle before each"
    )
    if "skipped" in cni or "error" in cni:
        print(f"  {'skipped' if 'skipped' in cni else 'ERROR'}: {cni.get('skipped') or cni.get('error')}")
    else:
        rows = [
            _ms_row("ADD", cni["add"], "<= 100 ms"),
            _ms_row("DEL", cni["del"], ""),
            _ms_row("  VERSION (the plugin's process alone, no agent asked)", cni["version"], ""),
            _ms_row("  the agent's part of ADD: POST /attach from this process", cni["api_attach"], ""),
            _ms_row("  the agent's part of DEL: POST /detach from this process", cni["api_detach"], ""),
        ]
        print(_table(["operation", "samples", "median", "p99", "target"], rows))

    g = report.get("gossip") or {}
    print("\nDNS: gossip for one change (all bytes sent, and per peer: each of the others receives it once)")
    if "error" in g:
        print(f"  ERROR: {g['error']}")
    else:
        rows = []
        for key, label, current in (
            ("registration", "a registration", "every_peer_answered"),
            ("removal", "a removal", "every_peer_forgot"),
        ):
            c = g[key]
            rows.append(
                [
                    f"{g['peers']:,} peers, {g['entries']:,} entries, {label}",
                    _fmt(round(c["messages"])),
                    _fmt(c["bytes"], " B"),
                    _fmt(c["bytes_per_peer"], " B"),
                    _fmt(g["whole_table_baseline_bytes_per_peer"], " B"),
                    _fmt(round(g["whole_table_bytes"] / c["bytes_per_peer"], 1) if c["bytes_per_peer"] else None, "x"),
                    "yes" if c[current] else "NO",
                ]
            )
        print(
            _table(
                [
                    "mesh",
                    "messages",
                    "dns bytes",
                    "dns/peer",
                    "whole-table baseline/peer",
                    "baseline/weft",
                    "all current",
                ],
                rows,
            )
        )
        print(
            "  whole-table baseline: the whole table sent to every peer once for the change (what a table without\n"
            "  deltas would cost). A tree of strangers, no anti-entropy in the window (as test_dns_service.py does)."
        )

    print("\nTargets (figures only: nothing fails on them)")
    rows = [
        [
            t["figure"],
            t["target"],
            _fmt(t["measured"], " ms"),
            {True: "yes", False: "NO", None: "-"}[t["met"]],
        ]
        for t in report.get("targets", [])
    ]
    if rows:
        print(_table(["figure", "target", "measured", "met"], rows))
    cores = 100 * (os.cpu_count() or 1)
    for part in ("server", "cni"):
        busy = (report.get(part) or {}).get("machine_busy_before_pct")
        if busy is not None and busy > datapath.QUIET_PCT:
            print(f"  note: {part}: other processes kept the machine {busy:.0f}% busy (of {cores}%) before it started")


def print_memory(report: dict) -> None:
    imports = report.get("imports") or {}
    print(
        f"\nMemory: what each import adds to a fresh interpreter holding {imports.get('base', 'the standard library')}"
        f" ({_fmt(imports.get('base_rss_mib'), ' MiB')}; {_fmt(imports.get('base_without_openssl_rss_mib'), ' MiB')}"
        " without the system's OpenSSL, as the agent runs); medians of 3"
    )
    rows = []
    for r in imports.get("imports", []):
        if "failed" in r:
            rows.append([r["package"], r["statement"], "-", "-", "-", r["failed"][:60]])
            continue
        rows.append(
            [
                r["package"],
                r["statement"],
                _fmt(r["rss_mib"], " MiB"),
                _fmt(r["anon_mib"], " MiB"),
                _fmt(r["file_mib"], " MiB"),
                _fmt(r["import_ms"], " ms"),
            ]
        )
    if rows:
        print(_table(["package", "import", "RSS", "anonymous", "file-backed", "import time"], rows))
    n, d = report.get("peers", 0), report.get("datapath_peers", 0)
    print(
        f"\nMemory: RSS of a real agent (VmRSS; peak VmHWM), alone, then with {n} peers connected ({d} of them with"
        f" their data plane: encrypted sleeve paths); target <= {report.get('target_mib', memory.TARGET_MIB):g} MiB"
        " with the data plane and 100 peers"
    )
    if "skipped" in report:
        print(f"  skipped: {report['skipped']}")
        return
    variants = report.get("variants", {})
    if not variants:
        return

    def cell(figures: dict | None) -> str:
        if not figures or "rss_mib" not in figures:
            return "-"
        return f"{_fmt(figures['rss_mib'], ' MiB')} (peak {_fmt(figures['hwm_mib'], ' MiB')})"

    rows = [
        ["alone, --no-datapath", *(cell(v.get("no_datapath")) for v in variants.values())],
        ["alone, data plane and DNS on (the default)", *(cell(v.get("alone")) for v in variants.values())],
        [f"  with {n} peers", *(cell(v.get("with_peers")) for v in variants.values())],
        [
            "  of which anonymous / file-backed",
            *(
                "{} / {}".format(
                    _fmt((v.get("with_peers") or {}).get("anon_mib"), " MiB"),
                    _fmt((v.get("with_peers") or {}).get("file_mib"), " MiB"),
                )
                for v in variants.values()
            ),
        ],
        ["  peers connected after", *(_fmt(v.get("peers_connected_s"), " s") for v in variants.values())],
        [
            f"target: <= {report.get('target_mib', memory.TARGET_MIB):g} MiB with {n} peers",
            *(
                "-"
                if "with_peers" not in v
                else "yes"
                if v["with_peers"]["rss_mib"] <= report.get("target_mib", memory.TARGET_MIB)
                else "NO"
                for v in variants.values()
            ),
        ],
    ]
    print(_table(["figure", *variants], rows))
    for name, v in variants.items():
        if "failed" in v:
            print(f"  {name} FAILED: {v['failed']}")
    if report.get("peer_rss_mean_mib") is not None:
        print(f"  the peers' own RSS, mean: {_fmt(report['peer_rss_mean_mib'], ' MiB')}")


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


def main() -> int:
    # SIGTERM (a cancelled job) unwinds like Ctrl-C, so the lab still removes its namespaces and agents.
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sim-sizes",
        default="100,300,1000,3000",
        help="simulated mesh sizes, comma-separated ('' to skip)",
    )
    parser.add_argument("--agents", type=int, default=50, help="real agents in namespaces (0 to skip)")
    parser.add_argument(
        "--scenarios",
        default="launch,connect",
        help=f"real-agent scenarios, comma-separated: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "mesh.json", help="mesh JSON")
    parser.add_argument(
        "--datapath",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the data-path benchmark (iperf3 and ping between containers; needs root)",
    )
    parser.add_argument(
        "--datapath-seconds",
        type=float,
        default=10.0,
        help="length of each iperf3 run (iperf3 -t; the reference used 10)",
    )
    parser.add_argument(
        "--datapath-runs",
        type=int,
        default=3,
        help="runs per scenario; the table shows their medians",
    )
    parser.add_argument(
        "--datapath-scenarios",
        default=",".join(datapath.SCENARIOS),
        help="data-path scenarios, comma-separated: " + "; ".join(f"{k}: {v}" for k, v in datapath.SCENARIOS.items()),
    )
    parser.add_argument(
        "--datapath-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the agents to meet and h1 to show the expected path before a scenario"
        " is recorded as failed",
    )
    parser.add_argument(
        "--datapath-output",
        type=Path,
        default=RESULTS / "datapath.json",
        help="data-path JSON",
    )
    parser.add_argument(
        "--restart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the restart-gap benchmark (an agent restarted under UDP flows on the encrypted path; needs root)",
    )
    parser.add_argument(
        "--restart-runs", type=int, default=6, help="restarts of h2's agent (per variant); median and max"
    )
    parser.add_argument(
        "--restart-rounds",
        type=int,
        default=2,
        help="rounds the restarts are split into, each running every variant (in turn forwards and backwards)",
    )
    parser.add_argument("--restart-rate", type=float, default=1000.0, help="datagrams a second in each flow")
    parser.add_argument(
        "--restart-baseline",
        metavar="REV",
        help="also measure the agent of these git revisions first (comma-separated, e.g. HEAD~3,HEAD~1), in the same"
        " run",
    )
    parser.add_argument(
        "--restart-output",
        type=Path,
        default=RESULTS / "restart.json",
        help="restart-gap JSON",
    )
    parser.add_argument(
        "--ipam",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the IPAM benchmark (simulator; real agents too as root)",
    )
    parser.add_argument(
        "--ipam-sizes",
        default="100,1000",
        help="simulated meshes for the IPAM gossip figures, comma-separated",
    )
    parser.add_argument(
        "--ipam-agents",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the IPAM figures of real agents in namespaces (needs root)",
    )
    parser.add_argument("--ipam-output", type=Path, default=RESULTS / "ipam.json", help="IPAM JSON")
    parser.add_argument(
        "--dns-bench",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the DNS and CNI benchmark (DNS server vs dnsmasq and CNI ADD/DEL as root; DNS gossip simulated)",
    )
    parser.add_argument("--dns-output", type=Path, default=RESULTS / "dns.json", help="DNS and CNI JSON")
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the memory benchmark (import costs; RSS of real agents as root)",
    )
    parser.add_argument("--memory-peers", type=int, default=100, help="peers connected to the measured agent")
    parser.add_argument(
        "--memory-datapath-peers",
        type=int,
        default=20,
        help="how many of those peers run their data plane (the others the control plane alone)",
    )
    parser.add_argument(
        "--memory-baseline",
        metavar="REV",
        help="also measure the agent of these git revisions first (comma-separated, e.g. main), in the same run",
    )
    parser.add_argument("--memory-output", type=Path, default=RESULTS / "memory.json", help="memory JSON")
    parser.add_argument(
        "--dense-agents",
        type=int,
        default=100,
        help="real agents with the data plane in the dense mesh (0 to skip; needs root)",
    )
    parser.add_argument(
        "--dense-baseline",
        metavar="REV",
        help="also run the dense mesh with the agent of these git revisions first (comma-separated), in the same run",
    )
    parser.add_argument(
        "--dense-settle", type=float, default=15.0, help="seconds after the full mesh before the settled window"
    )
    parser.add_argument(
        "--dense-window", type=float, default=30.0, help="seconds over which the settled CPU is measured"
    )
    parser.add_argument(
        "--dense-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for complete views and the full mesh before measuring the mesh as it is",
    )
    parser.add_argument(
        "--dense-poll",
        type=float,
        default=0.5,
        help="seconds between two looks at each agent while the mesh forms (every look renders its metrics)",
    )
    parser.add_argument("--dense-output", type=Path, default=RESULTS / "dense.json", help="dense-mesh JSON")
    args = parser.parse_args()
    dp_scenarios = [s.strip() for s in args.datapath_scenarios.split(",") if s.strip()]
    unknown = [s for s in dp_scenarios if s not in datapath.SCENARIOS]
    if unknown:
        parser.error(f"unknown --datapath-scenarios: {', '.join(unknown)}")

    sizes = [int(s) for s in args.sim_sizes.split(",") if s.strip()]
    report: dict = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
    }
    failed = False

    if sizes:
        report["sim"] = []
        for n in sizes:
            print(f"simulating {n:,} peers ...", flush=True)
            r = mesh.sim_convergence(n)
            report["sim"].append(r)
            failed |= not r["converged"] or any(
                not r.get(k, {}).get("views_current", True) for k in ("join", "new_link")
            )
        print_sim(report["sim"])

    if args.agents:
        report["agents"] = {}
        for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
            print(f"\nstarting {args.agents} real agents ({scenario}) ...", flush=True)
            r = mesh.real_agents(args.agents, scenario=scenario, log=lambda line: print(line, flush=True))
            report["agents"][scenario] = r
            failed |= "error" in r or ("skipped" not in r and r.get("all_know_all_s") is None)
            print_agents(r)

    if sizes or args.agents:
        _write(args.output, report)

    if args.dense_agents:
        print(f"\ndense mesh of {args.dense_agents} agents ...", flush=True)
        dn = dense.run(
            args.dense_agents,
            baseline=args.dense_baseline,
            settle=args.dense_settle,
            window=args.dense_window,
            timeout=args.dense_timeout,
            poll=args.dense_poll,
            log=lambda line: print(line, flush=True),
        )
        print_dense(dn)
        _write(args.dense_output, {**{k: report[k] for k in ("when", "machine")}, **dn})
        failed |= any("error" in r for r in dn.get("variants", {}).values())

    if args.datapath and dp_scenarios:
        print("\ndata path ...", flush=True)
        dp = datapath.run(
            dp_scenarios,
            seconds=args.datapath_seconds,
            runs=args.datapath_runs,
            settle_timeout=args.datapath_timeout,
            log=lambda line: print(line, flush=True),
        )
        print("\nsleeve workers: threads or processes ...", flush=True)
        dp["workers"] = datapath_workers.run(
            seconds=min(args.datapath_seconds, 5.0), runs=args.datapath_runs, log=lambda line: print(line, flush=True)
        )
        print_datapath(dp)
        datapath_workers.print_table(dp["workers"])
        _write(args.datapath_output, {**{k: report[k] for k in ("when", "machine")}, **dp})
        failed |= any("failed" in r for r in dp["scenarios"].values())

    if args.restart and args.restart_runs > 0:
        print("\nrestart gap ...", flush=True)
        rs = restart.run(
            restarts=args.restart_runs,
            rate=args.restart_rate,
            settle_timeout=args.datapath_timeout,
            baseline=args.restart_baseline,
            rounds=args.restart_rounds,
            log=lambda line: print(line, flush=True),
        )
        print_restart(rs)
        _write(args.restart_output, {**{k: report[k] for k in ("when", "machine")}, **rs})
        failed |= any("failed" in r for r in rs.get("variants", {}).values())

    if args.ipam:
        print("\nIPAM ...", flush=True)
        ipam_sizes = [int(s) for s in args.ipam_sizes.split(",") if s.strip()]
        ir = ipam_sim.run(ipam_sizes, log=lambda line: print(line, flush=True))
        if not args.ipam_agents:
            ir["agents"] = {"skipped": "--no-ipam-agents"}
        elif os.geteuid() != 0:
            ir["agents"] = {"skipped": "needs root (network namespaces)"}
        else:
            import ipam_agents  # only as root: it builds namespaces

            ir["agents"] = ipam_agents.run(log=lambda line: print(line, flush=True))
        print_ipam(ir)
        _write(args.ipam_output, {**{k: report[k] for k in ("when", "machine")}, **ir})
        failed |= any(not g["rings_agree"] for g in ir["gossip"]) or "error" in ir["agents"]

    if args.dns_bench:
        print("\nDNS and CNI ...", flush=True)
        dr = names.run(log=lambda line: print(line, flush=True))
        print_dns(dr)
        _write(args.dns_output, {**{k: report[k] for k in ("when", "machine")}, **dr})
        failed |= any("error" in dr.get(k, {}) for k in ("server", "cni", "gossip"))

    if args.memory:
        print("\nmemory ...", flush=True)
        mr = memory.run(
            peers=args.memory_peers,
            datapath_peers=args.memory_datapath_peers,
            baseline=args.memory_baseline,
            log=lambda line: print(line, flush=True),
        )
        print_memory(mr)
        _write(args.memory_output, {**{k: report[k] for k in ("when", "machine")}, **mr})
        failed |= any("failed" in v for v in mr.get("variants", {}).values())
    return 1 if failed else 0


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())

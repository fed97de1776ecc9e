#!/usr/bin/env python3
"""Weft benchmarks: prints a table of figures and writes them as JSON to bench/results/mesh.json.

    make bench                                    # everything (as root for the real-agent part)
    make bench BENCH_ARGS="--sim-sizes 100,300 --agents 0"

Figures, not tests: nothing here fails on a number. The exit status is non-zero only when a mesh did
not converge at all (or an agent died), because then the figures mean nothing.
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

import mesh

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
    lines = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _kib_to_mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def print_sim(results: list[dict]) -> None:
    print(
        "\nSimulator: chain of strangers (each peer told of one earlier peer), 10 ms links, discovery off"
    )
    rows = []
    for r in results:
        rows.append(
            [
                f"{r['peers']:,} peers",
                _fmt(r["virtual_s"], " s"),
                _fmt(r["wall_s"], " s"),
                _fmt(r["messages"]),
                _fmt(r.get("changes")),
                _fmt(r["gossip_bytes_per_peer"], " B"),
                _fmt(r.get("full_topology_baseline_bytes_per_peer"), " B"),
                _fmt(r.get("baseline_ratio"), "x"),
            ]
        )
    print(
        _table(
            ["mesh", "converged (virtual)", "wall clock", *_GOSSIP_COLUMNS],
            rows,
        )
    )
    print(
        "\nOne change after convergence (bytes every peer sends on average, until the mesh is quiet again)"
    )
    rows = []
    for r in results:
        for key, label in (("join", "a peer joins"), ("new_link", "a new link")):
            c = r.get(key)
            if not c:
                continue
            rows.append(
                [
                    f"{r['peers']:,} peers, {label}",
                    _fmt(c["settled_s"], " s")
                    + ("" if c["views_current"] else " (views NOT current)"),
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
    print(
        f"\nReal agents in network namespaces, encrypted: {r.get('agents', '?')} agents, {SCENARIOS[scenario]}"
    )
    if "skipped" in r:
        print(f"  skipped: {r['skipped']}")
        return
    if "error" in r:
        print(f"  ERROR: {r['error']}")
    n = r["agents"]
    start = (
        "the launch of h2..hN" if scenario == "launch" else "`weft connect` to h2..hN"
    )
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


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


def main() -> int:
    # SIGTERM (a cancelled job) unwinds like Ctrl-C, so the lab still removes its namespaces and agents.
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sim-sizes",
        default="100,300,1000",
        help="simulated mesh sizes, comma-separated ('' to skip)",
    )
    parser.add_argument(
        "--agents", type=int, default=50, help="real agents in namespaces (0 to skip)"
    )
    parser.add_argument(
        "--scenarios",
        default="launch,connect",
        help=f"real-agent scenarios, comma-separated: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "mesh.json")
    args = parser.parse_args()

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
                not r.get(k, {}).get("views_current", True)
                for k in ("join", "new_link")
            )
        print_sim(report["sim"])

    if args.agents:
        report["agents"] = {}
        for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
            print(f"\nstarting {args.agents} real agents ({scenario}) ...", flush=True)
            r = mesh.real_agents(
                args.agents, scenario=scenario, log=lambda line: print(line, flush=True)
            )
            report["agents"][scenario] = r
            failed |= "error" in r or (
                "skipped" not in r and r.get("all_know_all_s") is None
            )
            print_agents(r)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

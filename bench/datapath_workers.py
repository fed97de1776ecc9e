"""Forwarding workers as threads or as processes: what each gains on this machine, and what it costs in memory.

Runs the sleeve's real send path in one process without root (the seam of agent/tests/harness/sleevemesh.py): feeders
write 64 KiB GSO-sized frames into socketpair "TAP queues" as the kernel would, the workers seal them with
ChaCha20-Poly1305, cut them into 1472-byte datagrams and send them with UDP_SEGMENT to a loopback socket that
reads nothing (the kernel drops what does not fit, so sends never wait). Only the sending side is measured: the
receiving side does the same work mirrored (open instead of seal), and measuring both at once on two cores
would show the cores, not the workers.

    python bench/datapath_workers.py [--seconds 5] [--runs 3] [--workers 1,2]

``threads``: one process, N worker threads sharing the tables (what the agent runs). ``processes``: N forked
processes of one worker each (what the alternative would run, with keys and tables handed to every process).
Figures: UDP payload Gb/s sent (the plaintext is 1 % less), CPU of the process tree, and memory after a garbage
collection (which a long run does anyway, and which copies a fork's shared pages): the proportional set (PSS) of
the whole tree, and the memory private to each forked process (USS), which a process design adds per worker.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "agent" / "tests" / "harness"))

from sleevemesh import LOOPBACK, Kernel, link_keys, mac_of, udp_frame  # noqa: E402
from weft.datapath.sleeve import Forwarding, Link, Sleeve  # noqa: E402
from weft.datapath.udp import open_udp  # noqa: E402

FRAME_PAYLOAD = 64_000


def _sink() -> socket.socket:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sink.bind((LOOPBACK, 0))
    return sink


def _sender(workers: int, sink_addr: tuple[str, int]) -> tuple[Sleeve, Kernel]:
    kernel = Kernel(workers)
    socks = [open_udp((LOOPBACK, 0)) for _ in range(workers)]
    sleeve = Sleeve(1, taps=kernel.sleeve_fds(), socks=socks, on_control=lambda *a: None, on_probe=lambda f: None)
    sleeve.update(
        Forwarding(
            links={2: Link(2, sink_addr, link_keys(1, 2), 1472, 1)},
            next_hop={2: 2},
            flood_origins=frozenset({2}),
            mac_owner={mac_of(2): 2},
            local_macs=frozenset({mac_of(1)}),
        )
    )
    return sleeve, kernel


def _feed(kernel: Kernel, queue: int, stop: threading.Event) -> None:
    frame = udp_frame(1, 2, bytes(FRAME_PAYLOAD), sport=1000 + queue, df=False)
    sock = kernel.pairs[queue][0]
    try:
        while not stop.is_set():
            sock.send(frame)
    except OSError:  # the sleeve closed its end
        pass


def _sent(sleeve: Sleeve) -> int:
    return sum(w["tx"] for w in sleeve.worker_bytes())


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _memory(pid: int) -> dict[str, int]:
    """Resident and private (USS) kilobytes of one process, from smaps_rollup."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                out[key] = int(rest.split()[0])
    return {"rss_kb": out["Rss"], "pss_kb": out["Pss"], "uss_kb": out["Private_Clean"] + out["Private_Dirty"]}


def _run_sender(workers: int, seconds: float, sink_addr: tuple[str, int], report: int | None = None) -> dict:
    """One sleeve with ``workers`` threads, fed for ``seconds``; its bytes sent and its memory."""
    sleeve, kernel = _sender(workers, sink_addr)
    stop = threading.Event()
    sleeve.start()
    feeders = [threading.Thread(target=_feed, args=(kernel, q, stop), daemon=True) for q in range(workers)]
    for t in feeders:
        t.start()
    time.sleep(0.5)  # warm up
    b0, t0, c0 = _sent(sleeve), time.monotonic(), time.process_time()
    time.sleep(seconds)
    b1, t1, c1 = _sent(sleeve), time.monotonic(), time.process_time()
    result = {
        "bytes": b1 - b0,
        "seconds": t1 - t0,
        "cpu_seconds": c1 - c0,
        "per_worker": [w["tx"] for w in sleeve.worker_bytes()],
    }
    gc.collect()  # touches every tracked object, as the collector does in a long run: a fork's pages get copied
    result.update(_memory(os.getpid()))
    stop.set()
    sleeve.stop()
    kernel.close()
    if report is not None:
        os.write(report, json.dumps(result).encode())
        os.close(report)
    return result


def measure(mode: str, workers: int, seconds: float) -> dict:
    """``workers`` workers as threads of this process, or as forked processes of one worker each."""
    sink = _sink()
    try:
        if mode == "threads":
            results = [_run_sender(workers, seconds, sink.getsockname())]
            rss, pss, uss = results[0]["rss_kb"], results[0]["pss_kb"], []
        else:
            children = []
            for _ in range(workers):
                rfd, wfd = os.pipe()
                pid = os.fork()
                if pid == 0:  # a forked worker process, as a process design would run one per queue
                    os.close(rfd)
                    try:
                        _run_sender(1, seconds, sink.getsockname(), report=wfd)
                    finally:
                        os._exit(0)
                os.close(wfd)
                children.append((pid, rfd))
            results = []
            for pid, rfd in children:
                with os.fdopen(rfd) as f:
                    results.append(json.loads(f.read()))
                os.waitpid(pid, 0)
            parent = _memory(os.getpid())
            rss = parent["rss_kb"] + sum(r["rss_kb"] for r in results)
            pss = parent["pss_kb"] + sum(r["pss_kb"] for r in results)
            uss = [r["uss_kb"] for r in results]
        return {
            "gbps": round(sum(r["bytes"] * 8 / r["seconds"] for r in results) / 1e9, 3),
            "cpu_pct": round(sum(r["cpu_seconds"] / r["seconds"] for r in results) * 100, 1),
            "rss_kb": rss,
            "pss_kb": pss,
            "uss_kb_per_process": uss,
            "per_worker_gb": [round(b / 1e9, 2) for r in results for b in r["per_worker"]],
        }
    finally:
        sink.close()


def run(*, seconds: float = 5.0, runs: int = 3, counts: tuple[int, ...] = (1, 2), log: Any = print) -> dict:
    """Every mode and worker count ``runs`` times, interleaved (the machine's load drifts); every run kept."""
    report: dict = {"seconds": seconds, "runs": runs, "load_before": os.getloadavg(), "results": {}}
    for _ in range(runs):
        for mode in ("threads", "processes"):
            for n in counts:
                r = measure(mode, n, seconds)
                report["results"].setdefault(f"{mode} x{n}", []).append(r)
                per = r["per_worker_gb"]
                log(f"    {mode:9} x{n}: {r['gbps']:.2f} Gb/s, CPU {r['cpu_pct']:.0f}%, per worker {per} GB")
    report["load_after"] = os.getloadavg()
    report["table"] = []
    for mode in ("threads", "processes"):
        base = statistics.median(r["gbps"] for r in report["results"][f"{mode} x{counts[0]}"])
        for n in counts:
            rows = report["results"][f"{mode} x{n}"]
            uss = [u for r in rows for u in r["uss_kb_per_process"]]
            med = statistics.median(r["gbps"] for r in rows)
            report["table"].append(
                {
                    "mode": mode,
                    "workers": n,
                    "gbps": round(med, 2),
                    "gbps_min": min(r["gbps"] for r in rows),
                    "gbps_max": max(r["gbps"] for r in rows),
                    "x_first": round(med / base, 2) if base else None,
                    "cpu_pct": statistics.median(r["cpu_pct"] for r in rows),
                    # What one fully busy core would carry: the cost, whatever share of the CPUs the run got.
                    "gbps_per_core": round(
                        statistics.median(r["gbps"] / r["cpu_pct"] * 100 for r in rows if r["cpu_pct"]), 2
                    ),
                    "pss_mib": round(statistics.median(r["pss_kb"] for r in rows) / 1024, 1),
                    "uss_mib_per_process": round(statistics.median(uss) / 1024, 1) if uss else None,
                }
            )
    return report


def print_table(report: dict) -> None:
    load0, load1 = (", ".join(f"{x:.2f}" for x in report[k]) for k in ("load_before", "load_after"))
    print(
        f"\nSleeve workers as threads or processes (send path, in one process, {report['seconds']:g} s x"
        f" {report['runs']} runs, medians); load average {load0} before, {load1} after ({os.cpu_count()} CPUs)"
    )
    head = f"  {'mode':10} {'workers':>7} {'Gb/s':>6} {'range':>11} {'x 1':>5} {'CPU %':>6} {'Gb/s/core':>9}"
    print(head + f" {'PSS MiB':>8} {'USS MiB/process':>15}")
    for t in report["table"]:
        uss = "-" if t["uss_mib_per_process"] is None else f"{t['uss_mib_per_process']:.1f}"
        print(
            f"  {t['mode']:10} {t['workers']:>7} {t['gbps']:>6.2f} {t['gbps_min']:>5.2f}-{t['gbps_max']:<5.2f}"
            f" {t['x_first']:>5.2f} {t['cpu_pct']:>6.0f} {t['gbps_per_core']:>9.2f} {t['pss_mib']:>8.1f} {uss:>15}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    counts = tuple(int(n) for n in args.workers.split(","))
    print_table(run(seconds=args.seconds, runs=args.runs, counts=counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

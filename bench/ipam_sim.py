"""IPAM benchmarks on the simulator (weft.sim): the real router and the real IPAM service in virtual time.

Nothing here asserts: each function returns figures (plain dicts, JSON-ready) for run.py to print.

Virtual time says how many network round trips something takes, not how long: latencies below are either measured
around code that runs without waiting for the network (time.perf_counter around Ipam.allocate served from local
space), or, for an allocation that must ask another peer for space, the CPU time the whole simulated mesh spent from
the request to the answer (time.process_time); that is the work of the real code path, without the network.

Real agents (``weft attach`` end to end, through the API and the data path) are measured by bench/ipam_agents.py.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from weft.ipam.persist import IpamStore
from weft.ipam.wire import RingUpdate
from weft.mesh.peer import format_name
from weft.sim import SimNetwork, add_ipam, chain_of_strangers, start_ipam
from weft.store import Store

BIG_RANGE = "10.0.0.0/8"  # room for thousands of local allocations even on a ring of 1,000 peers


# -- helpers ---------------------------------------------------------------------------------------------------------


def _run(net: SimNetwork, done: Callable[[], bool], seconds: float) -> bool:
    return net.scheduler.run_until(done, net.scheduler.now() + seconds, resolution=0.01)


def _settle(net: SimNetwork, seconds: float) -> None:
    net.scheduler.call_later(seconds, lambda: None)
    net.scheduler.run_until(lambda: False, net.scheduler.now() + seconds)


def _full_mesh(net: SimNetwork) -> bool:
    return all(len(p.router.connections) == len(net.peers) - 1 for p in net.peers)


def _seed(names: list[int]) -> str:
    return "seed=" + ",".join(format_name(n) for n in names)


def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "samples": len(ordered),
        "median": round(statistics.median(ordered), 4),
        "p99": round(p99, 4),
        "max": round(ordered[-1], 4),
    }


def _ipam_bytes_out(net: SimNetwork) -> float:
    total = 0.0
    for peer in net.peers:
        value = peer.router.metrics.registry.get_sample_value(
            "weft_gossip_bytes_total", {"channel": "ipam", "direction": "out"}
        )
        total += value or 0.0
    return total


def _until_quiet(net: SimNetwork, quiet: float = 0.5, limit: float = 20.0) -> float:
    """Run until no message has been sent for ``quiet`` virtual seconds; the time it took."""
    start = last = net.scheduler.now()
    count, step = net.messages, 0
    while True:
        step += 1
        until = round(start + step * 0.01, 9)
        net.scheduler.run_until(lambda: False, until)
        if net.messages != count:
            count, last = net.messages, until
        if until - last >= quiet or until - start >= limit:
            return last - start


# -- allocation latency ----------------------------------------------------------------------------------------------


def local_latency(samples: int = 2000, ring_sizes: tuple[int, ...] = (5, 1000), seed: int = 1) -> list[dict]:
    """Ipam.allocate served from the peer's own space, timed with perf_counter: 5 real peers, a seed of
    ``ring_size`` names (the real five and made-up others), so the ring has that many tokens. Without a state
    database (the code alone) and with one on disk (the agent writes every allocation before it answers)."""
    results = []
    for ring_size in ring_sizes:
        for with_store in (False, True):
            net = chain_of_strangers(5, seed=seed, discovery=True)
            names = [p.info.name for p in net.peers] + [0x060000000000 + i for i in range(max(0, ring_size - 5))]
            tmp = tempfile.TemporaryDirectory(prefix="weft-bench-ipam-") if with_store else None
            store = Store(Path(tmp.name)) if tmp is not None else None
            ipams = [
                start_ipam(net, peer, BIG_RANGE, _seed(names), store=IpamStore(store) if store and i == 0 else None)
                for i, peer in enumerate(net.peers)
            ]
            _run(net, lambda net=net: _full_mesh(net), 10.0)
            _settle(net, 1.0)
            target = ipams[0]
            times: list[float] = []
            got: list[str | None] = []

            def done(cidr: str | None, reason: str | None, got: list = got) -> None:
                got.append(cidr)

            for i in range(samples):
                t0 = time.perf_counter()
                target.allocate(f"bench-{i}", None, f"bench-{i}", done)
                times.append((time.perf_counter() - t0) * 1000)
                if i % 50 == 49:
                    _settle(net, 0.05)  # let the gossip of the counts go out, outside the timing
            failed = sum(1 for c in got if c is None) + samples - len(got)
            results.append(
                {
                    "ring_tokens": len(target.alloc.ring.entries) if target.alloc.ring else 0,
                    "state_database": with_store,
                    "failed": failed,
                    "ms": _percentiles(times),
                }
            )
            if store is not None:
                store.close()
            if tmp is not None:
                tmp.cleanup()
    return results


def space_request_cpu(peers: int = 20, seeds: int = 4, sims: int = 3) -> dict:
    """The first allocation of each peer outside the seed (it owns nothing, so it asks a peer for space): the CPU
    the whole simulated mesh spends from Ipam.allocate to the answer (process_time), and the virtual time it takes
    (round trips over 1 ms links). A full mesh, so the request is one hop."""
    cpu: list[float] = []
    virtual: list[float] = []
    failed = 0
    for s in range(sims):
        net = chain_of_strangers(peers, seed=10 + s, discovery=True)
        init = _seed([p.info.name for p in net.peers[:seeds]])
        ipams = add_ipam(net, BIG_RANGE, init)
        _run(net, lambda net=net: _full_mesh(net) and net.converged(), 30.0)
        _settle(net, 1.0)
        for ipam in ipams[seeds:]:
            outcome: list[tuple[str | None, str | None]] = []
            v0, c0 = net.scheduler.now(), time.process_time()
            ipam.allocate("first", None, "first", lambda c, r, o=outcome: o.append((c, r)))
            _run(net, lambda o=outcome: bool(o), 10.0)
            cpu.append((time.process_time() - c0) * 1000)
            virtual.append((net.scheduler.now() - v0) * 1000)
            failed += not outcome or outcome[0][0] is None
            _until_quiet(net, quiet=0.2)
    return {
        "peers": peers,
        "seed_peers": seeds,
        "failed": failed,
        "cpu_ms": _percentiles(cpu),
        "virtual_ms": _percentiles(virtual),
        "link_latency_ms": 1.0,
    }


# -- gossip per allocation -------------------------------------------------------------------------------------------


def gossip_per_allocation(n: int, seed_peers: int | None = None, grow: bool = False, seed: int = 1) -> dict:
    """Bytes of ``ipam`` gossip every peer sends on average for one allocation (a free count that changed), until
    the mesh is quiet again, next to the whole-ring baseline: every peer sending the whole ring once.

    ``seed_peers``: the ring seeded by that many peers (default all). ``grow``: first let every peer outside the
    seed allocate once (so the ring holds a token or two per peer, as it does after a while)."""
    wall0 = time.perf_counter()
    net = chain_of_strangers(n, seed=seed, latency=0.01)
    names = [p.info.name for p in net.peers]
    chosen = names if seed_peers is None else names[:: max(1, n // seed_peers)][:seed_peers]
    ipams = add_ipam(net, BIG_RANGE, _seed(chosen))
    _run(net, net.converged, 30.0)
    _until_quiet(net)
    if grow:
        for ipam in ipams:
            if ipam.me not in chosen:
                ipam.allocate("grow", None, "grow", lambda c, r: None)
        _until_quiet(net, limit=60.0)
    allocator = ipams[names.index(chosen[len(chosen) // 2])]  # one with space of its own
    ring = allocator.alloc.ring
    assert ring is not None
    before, messages0, start = _ipam_bytes_out(net), net.messages, net.scheduler.now()
    allocator.allocate("measured", None, "measured", lambda c, r: None)
    settled = _until_quiet(net)
    sent = _ipam_bytes_out(net) - before
    whole = len(RingUpdate.of(ring, allocator.me).encode())
    per_peer = sent / n
    rings = {tuple(sorted(i.alloc.ring.entries.items())) for i in ipams if i.alloc.ring is not None}
    return {
        "peers": n,
        "seed_peers": len(chosen),
        "grown": grow,
        "ring_tokens": len(ring.entries),
        "settled_s": round(settled, 3),
        "window_clear_of_anti_entropy": net.scheduler.now() < 0.8 * net.gossip_interval,
        "window_s": [round(start, 3), round(net.scheduler.now(), 3)],
        "messages": net.messages - messages0,
        "ipam_bytes_per_peer": round(per_peer, 1),
        "whole_ring_bytes": whole,
        "whole_ring_baseline_bytes_per_peer": whole,
        "whole_ring_baseline_bytes_total": whole * n,
        "baseline_ratio": round(whole / per_peer, 2) if per_peer else None,
        "rings_agree": len(rings) == 1,
        "wall_s": round(time.perf_counter() - wall0, 1),
    }


# -- the first allocation --------------------------------------------------------------------------------------------


def first_allocation(peers: int = 5, seed: int = 1) -> list[dict]:
    """Virtual time from a fresh mesh's start (every agent started at t=0, none connected yet) to its first
    allocation done, asked at t=0 of the last peer: seeded (every peer computes the ring alone) and, for contrast,
    consensus among all of them (a majority must meet and vote first)."""
    results = []
    for mode in ("seed", "consensus"):
        net = chain_of_strangers(peers, seed=seed, discovery=True)
        init = _seed([p.info.name for p in net.peers]) if mode == "seed" else f"consensus={peers}"
        ipams = add_ipam(net, "10.32.0.0/12", init)
        outcome: list[tuple[str | None, str | None]] = []
        ipams[-1].allocate("first", None, "first", lambda c, r, o=outcome: o.append((c, r)))
        _run(net, lambda o=outcome: bool(o), 60.0)
        results.append(
            {
                "init": init if mode == "consensus" else f"seed= all {peers}",
                "peers": peers,
                "virtual_s": round(net.scheduler.now(), 3) if outcome else None,
                "address": outcome[0][0] if outcome else None,
                "reason": outcome[0][1] if outcome else "no answer in 60 s",
            }
        )
    return results


def run(sizes: list[int], log: Callable[[str], None] = print) -> dict:
    """Every IPAM figure; ``sizes``: the simulated meshes for the gossip figures."""
    report: dict = {}
    log("IPAM: allocation latency from local space ...")
    report["local_latency"] = local_latency()
    log("IPAM: allocations that ask another peer for space ...")
    report["space_request"] = space_request_cpu()
    report["gossip"] = []
    for n in sizes:
        log(f"IPAM: gossip for one allocation, {n:,} peers, seeded by all ...")
        report["gossip"].append(gossip_per_allocation(n))
    if sizes:
        n = min(sizes)
        log(f"IPAM: gossip for one allocation, {n:,} peers, seeded by 3, every peer with space of its own ...")
        report["gossip"].append(gossip_per_allocation(n, seed_peers=3, grow=True))
    log("IPAM: time to the first allocation ...")
    report["first_allocation"] = first_allocation()
    return report

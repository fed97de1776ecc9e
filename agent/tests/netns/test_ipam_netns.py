"""IPAM with real agents in network namespaces: the issue's acceptance tests.

Containers are attached with no address (IPAM picks one) across hosts, through a partition, an agent's kill -9,
exhaustion of a small range, reclaim of a dead peer, each way of making the first ring, and 10,000 hostile gossip
messages. Bulk attaches call the agent's API from this process (one thread per host); the CLI is used where its
output or exit status is what is tested. Each test prints its figures (run with -s to see them).
"""

from __future__ import annotations

import ipaddress
import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from lab import HARNESS, Container, Host, Lab, metric_value, wait_until

from weft.api.client import Client

pytestmark = pytest.mark.netns

RANGE = ipaddress.ip_network("10.32.0.0/12")
QUIET = ("--log-level", "info")  # the lab's debug level logs every netlink message: slow with hundreds of veths
# Peers notice a dead or cut-off peer within seconds, and redial within a second once it is back. (Not the 2 s read
# timeout of the mesh tests: an agent attaching containers back to back on a busy 2-core machine misses that.)
FAST = {"WEFT_HEARTBEAT_INTERVAL": "1", "WEFT_READ_TIMEOUT": "6", "WEFT_MAX_BACKOFF": "1"}
# With 200 containers the data plane reprograms the FDBs on every MAC change, in the event loop, for a second or more
# each time on this machine (several when it is busy): the default read timeout, data-path heartbeats that allow
# for such stalls (a path is down after 3 missed), and redials within a second once the partition heals.
REDIAL = {"WEFT_MAX_BACKOFF": "1", "WEFT_PATH_INTERVAL": "3"}


# -- helpers ---------------------------------------------------------------------------------------------------


def seed_of(hosts: Iterable[Host]) -> str:
    return "seed=" + ",".join(h.agent_name for h in hosts)


def start_mesh(hosts: list[Host], *args: str, env: dict[str, str] | None = None, **kwargs: Any) -> None:
    """Every host seeded with every host's name and told of every other host; waits for the full mesh."""
    for h in hosts:
        h.start_agent(
            *QUIET, "--ipalloc-init", seed_of(hosts), *args, peers=[o for o in hosts if o is not h], env=env, **kwargs
        )
    for h in hosts:
        h.wait_ready(timeout=30)
    wait_until(lambda: all(mesh_complete(h, hosts) for h in hosts), timeout=30, message="no full mesh")


def api(h: Host) -> Client:
    return Client(str(h.api_socket), timeout=45.0)


def ipam(h: Host) -> dict[str, Any]:
    """``status ipam`` as JSON, from the API (the CLI's interpreter start-up is too slow for polling)."""
    return api(h).request("GET", "/status/ipam")


def mesh_complete(h: Host, hosts: list[Host]) -> bool:
    """``h`` sees every host, and every host owning part of the ring is reachable from it."""
    s = api(h).status()
    if {p["nickname"] for p in s["peers"]} != {x.name for x in hosts}:
        return False
    return all(p["reachable"] for p in s["ipam"]["peers"])


def ring_tokens(h: Host) -> list[tuple[int, int, int, int]]:
    """The whole ring as ``h`` holds it: (token, version, owner, free), from its state database (the allocator
    writes every change there before it gossips it; ``status ipam`` shows only the totals per peer)."""
    db = sqlite3.connect(f"file:{h.state_dir / 'weft.db'}?mode=ro", uri=True, timeout=5)
    try:
        return sorted(db.execute("SELECT token, version, owner, free FROM ipam_tokens"))
    finally:
        db.close()


def rings_agree(hosts: list[Host]) -> bool:
    first = ring_tokens(hosts[0])
    return bool(first) and all(ring_tokens(h) == first for h in hosts[1:])


def peer_rows(h: Host) -> list[dict[str, Any]]:
    """``status ipam`` peers without what depends on who is asking."""
    return [{k: v for k, v in p.items() if k not in ("ourself", "reachable")} for p in ipam(h)["peers"]]


def attach_many(plan: dict[Host, int], *, cli_first: bool = True) -> list[tuple[Container, float]]:
    """Attach ``plan[h]`` containers on each host with no address, the hosts in parallel (one thread each): the
    first of each host by the CLI (as an operator would), the rest through the API. Returns each container with
    the seconds its attach took."""
    done: list[tuple[Container, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(h: Host, n: int) -> None:
        try:
            for i in range(n):
                began = time.monotonic()
                c = h.add_container_auto(api=not (cli_first and i == 0))
                with lock:
                    done.append((c, time.monotonic() - began))
        except BaseException as exc:  # reported below, with the host
            errors.append(AssertionError(f"{h.name}: {exc}"))

    threads = [threading.Thread(target=run, args=(h, n)) for h, n in plan.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return done


def addresses_of(containers: Iterable[Container]) -> list[str]:
    return [c.ip for c in containers]


def inside(address: str, network: ipaddress.IPv4Network = RANGE) -> bool:
    return ipaddress.ip_address(address) in network and address not in (
        str(network.network_address),
        str(network.broadcast_address),
    )


def interface_addresses(c: Container) -> list[str]:
    out = c.exec("ip", "-j", "-4", "addr", "show", "dev", "ethwe").stdout
    return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(out) for a in link["addr_info"]]


def ping_pairs(
    pairs: list[tuple[Container, Container]], tries: int = 2
) -> tuple[list[tuple[Container, Container]], int]:
    """Ping each pair once (a second time if the first is lost), 8 at a time; (the pairs that never answered,
    how many needed a second ping)."""

    def one(pair: tuple[Container, Container]) -> int:
        for attempt in range(tries):
            if pair[0].ping(pair[1], count=1, timeout=2.0):
                return attempt
        return -1

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, pairs))
    failed = [p for p, r in zip(pairs, results, strict=True) if r < 0]
    return failed, sum(1 for r in results if r > 0)


def pings_settle(pairs: list[tuple[Container, Container]], timeout: float) -> tuple[float, int]:
    """Ping every pair, then again those that did not answer, until all have or ``timeout`` passes; (seconds
    until the last pair answered, how many pairs missed the first round)."""
    began = time.monotonic()
    waiting, first_missed = pairs, -1
    while True:
        waiting, _ = ping_pairs(waiting, tries=1)
        first_missed = len(waiting) if first_missed < 0 else first_missed
        if not waiting:
            return time.monotonic() - began, first_missed
        assert time.monotonic() - began < timeout, f"{len(waiting)} pairs never answered: {waiting[:5]}"
        time.sleep(1)


def sample_pairs(
    a: list[Container], b: list[Container], n: int, rng: random.Random
) -> list[tuple[Container, Container]]:
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n:
        i, j = rng.randrange(len(a)), rng.randrange(len(b))
        if a[i] is not b[j]:
            pairs.add((i, j))
    return [(a[i], b[j]) for i, j in sorted(pairs)]


def cross_host_ping(a: Container, b: Container) -> None:
    wait_until(lambda: a.ping(b, count=1, timeout=1.0), timeout=30, message=f"{a} never reached {b}")


def refused(res: subprocess.CompletedProcess[str], *mentions: str) -> str:
    """The CLI failed (exit 1) with exactly one line of error that mentions each of ``mentions``."""
    assert res.returncode == 1, f"exit {res.returncode}: {res.stdout!r} {res.stderr!r}"
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"not one line: {res.stderr!r}"
    for m in mentions:
        assert m in lines[0], f"{m!r} not in {lines[0]!r}"
    return lines[0]


def cli_popen(h: Host, *args: str) -> subprocess.Popen[str]:
    cmd = [h.python, "-m", "weft.cli", "--api-socket", str(h.api_socket), *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=h.lab.process_env(agent_src=h.agent_src)
    )


def figures(title: str, **values: object) -> None:
    print(f"\n[{title}] " + ", ".join(f"{k}={v}" for k, v in values.items()))


def stats(values: list[float]) -> str:
    v = sorted(values)
    return f"median {v[len(v) // 2]:.2f}s, p90 {v[int(len(v) * 0.9)]:.2f}s, max {v[-1]:.2f}s (n={len(v)})"


# -- 1. allocation across hosts -----------------------------------------------------------------------------------


def test_fifty_containers_on_five_hosts_get_distinct_addresses_and_reach_each_other(lab: Lab) -> None:
    hosts = lab(5)
    start_mesh(hosts)
    began = time.monotonic()
    attached = attach_many({h: 10 for h in hosts})
    took = time.monotonic() - began
    containers = [c for c, _ in attached]

    addresses = addresses_of(containers)
    assert len(addresses) == 50 and len(set(addresses)) == 50, sorted(addresses)
    assert all(inside(a) for a in addresses), addresses
    for c in containers:
        assert interface_addresses(c) == [c.cidr], c
        assert c.cidr.endswith("/12")
    # Each host lists exactly its own containers' allocations.
    for h in hosts:
        held = {a["address"]: a["holder"] for a in ipam(h)["allocations"]}
        assert held == {c.cidr: c.netns for c in h.containers}, h.name

    rng = random.Random(1)
    cross_host_ping(containers[0], containers[-1])
    pairs = sample_pairs(containers, containers, 100, rng)
    began_ping = time.monotonic()
    failed, retried = ping_pairs(pairs)
    assert not failed, failed
    figures(
        "allocation across hosts",
        attach_50=f"{took:.1f}s",
        attach_latency=stats([t for _, t in attached]),
        pings=f"100 pairs in {time.monotonic() - began_ping:.1f}s, {retried} needed a second ping",
    )


# -- 2. partition ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # 2-3 minutes here: 210 containers, and 20 s for the partition to be noticed
@pytest.mark.timeout(900)
def test_allocations_on_both_sides_of_a_partition_never_collide(lab: Lab) -> None:
    hosts = lab(5)
    side_a, side_b = hosts[:2], hosts[2:]
    start_mesh(hosts, env=REDIAL)
    earlier = [c for c, _ in attach_many({h: 2 for h in hosts}, cli_first=False)]

    lab.partition(side_a, side_b)
    cut = time.monotonic()
    for side, other in ((side_a, side_b), (side_b, side_a)):
        share = len(other) / len(hosts)
        for h in side:
            wait_until(
                lambda h=h, share=share: abs(ipam(h)["unreachable_ratio"] - share) < 0.01,
                timeout=45,
                message=f"{h.name} never saw the other side as unreachable",
            )
    partitioned = time.monotonic()
    noticed = partitioned - cut
    during = attach_many({side_a[0]: 50, side_a[1]: 50, side_b[0]: 34, side_b[1]: 33, side_b[2]: 33}, cli_first=False)
    took = time.monotonic() - partitioned
    assert len(during) == 200

    lab.heal()
    healed = time.monotonic()
    wait_until(lambda: rings_agree(hosts), timeout=5, interval=0.1, message="rings differ 5 s after the heal")
    agreed = time.monotonic() - healed
    wait_until(
        lambda: all(ipam(h)["unreachable_ratio"] == 0 for h in hosts),
        timeout=30,
        message=lambda: f"unreachable after the heal: { {h.name: ipam(h)['unreachable_ratio'] for h in hosts} }",
    )
    rows = peer_rows(hosts[0])
    assert all(peer_rows(h) == rows for h in hosts[1:])
    assert sum(r["in_use"] for r in rows) == 210

    containers = earlier + [c for c, _ in during]
    addresses = addresses_of(containers)
    assert len(set(addresses)) == len(addresses) == 210, "duplicate addresses"
    assert all(inside(a) for a in addresses)
    allocated = [a["address"] for h in hosts for a in ipam(h)["allocations"]]
    assert sorted(allocated) == sorted(c.cidr for c in containers)

    a_side = [c for c in containers if c.host in side_a]
    b_side = [c for c in containers if c.host in side_b]
    cross_host_ping(a_side[0], b_side[0])
    rng = random.Random(2)
    pairs = sample_pairs(a_side, b_side, 30, rng) + [(b, a) for a, b in sample_pairs(a_side, b_side, 30, rng)]
    settled, missed = pings_settle(pairs, timeout=90)
    figures(
        "partition",
        partition_noticed_after=f"{noticed:.1f}s",
        attach_200_during=f"{took:.1f}s",
        attach_latency=stats([t for _, t in during]),
        rings_identical_after_heal=f"{agreed:.2f}s",
        pings=f"60 pairs across: {missed} missed the first round, all answered {settled:.1f}s after the first",
    )


# -- 3. restart -----------------------------------------------------------------------------------------------


def test_a_killed_agent_keeps_its_containers_addresses_and_frees_the_gone(lab: Lab) -> None:
    h1, h2 = hosts = lab(2)
    start_mesh(hosts, env=FAST)
    mine = [h1.add_container_auto(api=True) for _ in range(4)]
    theirs = h2.add_container_auto()
    gone = mine[1]
    exposed = h1.cli("expose").stdout.strip().split(": ", 1)[1]  # the host's own address, allocated too
    cross_host_ping(mine[0], theirs)
    wait_until(lambda: rings_agree(hosts), timeout=5)
    ring_before = ring_tokens(h1)
    allocations_before = ipam(h1)["allocations"]
    assert [(a["address"], a["holder"]) for a in allocations_before] == [
        *((c.cidr, c.netns) for c in mine),
        (exposed, "host"),
    ]

    h1.kill_agent(signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", gone.netns], check=True)  # the container goes while the agent is down
    began = time.monotonic()
    h1.start_agent(*QUIET, "--ipalloc-init", seed_of(hosts), peers=[h2], env=FAST)
    h1.wait_ready(timeout=30)
    restarted = time.monotonic() - began

    kept = [c for c in mine if c is not gone]
    status = ipam(h1)
    assert status["state"] == "ready"
    assert [a["address"] for a in status["allocations"]] == [*(c.cidr for c in kept), exposed]
    assert [a for a in allocations_before if a["address"] != gone.cidr] == status["allocations"]
    for c in kept:
        assert interface_addresses(c) == [c.cidr]
    assert "IPAM: freed " + gone.cidr in h1.agent_log()

    # The ring is the one from before, but for the free count of the range the gone container's address is in.
    ring_after = ring_tokens(h1)
    assert [(t, o) for t, _v, o, _f in ring_after] == [(t, o) for t, _v, o, _f in ring_before]
    changed = [(b, a) for b, a in zip(ring_before, ring_after, strict=True) if b != a]
    assert len(changed) == 1 and changed[0][1][3] == changed[0][0][3] + 1 and changed[0][1][1] > changed[0][0][1]
    wait_until(lambda: rings_agree(hosts), timeout=10, message="h2 never learnt the restarted h1's ring")

    # The gone container's address is the lowest free one again: the next container gets it.
    new = h1.add_container_auto()
    assert new.cidr == gone.cidr
    cross_host_ping(kept[0], theirs)
    cross_host_ping(theirs, new)
    cross_host_ping(theirs, Container(h1, "h1", h1.netns, exposed.split("/")[0], exposed))  # the host, exposed
    figures("restart", api_ready_after_kill9=f"{restarted:.2f}s")


# -- 4. exhaustion --------------------------------------------------------------------------------------------


def test_a_small_range_gives_every_address_once_then_refuses_quickly(lab: Lab) -> None:
    small = ipaddress.ip_network("10.32.0.0/26")
    h1, h2, h3 = hosts = lab(3)
    start_mesh(hosts, "--ipalloc-range", str(small))
    latencies: list[float] = []
    containers = []
    for h, n in ((h1, 55), (h2, 7)):
        for _ in range(n):
            began = time.monotonic()
            containers.append(h.add_container_auto(api=True))
            latencies.append(time.monotonic() - began)
    addresses = addresses_of(containers)
    assert len(set(addresses)) == 62 and all(inside(a, small) for a in addresses)
    assert all(c.cidr.endswith("/26") for c in containers)

    reason = "no free address in 10.32.0.0/26: all 62 are in use"
    refusals = {}
    for h in (h3, h1, h2):
        c = h.add_container(f"{small.network_address}/26", attach=False)  # a namespace only
        began = time.monotonic()
        res = h.cli("attach", "--netns", c.netns, check=False, timeout=60)
        refusals[h.name] = time.monotonic() - began
        refused(res, reason)
        assert refusals[h.name] < 5, f"{h.name} took {refusals[h.name]:.1f}s to refuse"
        assert c.exec("ip", "-o", "link", "show").stdout.count("\n") == 1  # lo only: nothing was left behind
        assert ipam(h)["pending"] == 0
    for h in hosts:
        assert metric_value(h.metrics(), "weft_ipam_addresses", state="allocated") == len(h.containers) - 1
    figures(
        "exhaustion",
        attach_62=stats(latencies),
        first_55_on_h1=f"{sum(latencies[:55]):.1f}s",
        refusal={k: f"{v:.2f}s (CLI included)" for k, v in refusals.items()},
    )


# -- 5. reclaim -----------------------------------------------------------------------------------------------


def name_int(h: Host) -> int:
    return int(h.agent_name.replace(":", ""), 16)


def owners_between(tokens: list[tuple[int, int, int, int]], lo: int, hi: int) -> set[int]:
    return {o for t, _v, o, _f in tokens if lo <= t < hi}


def unreachable(h: Host) -> float:
    return metric_value(h.metrics(), "weft_ipam_unreachable_ratio")


def test_rmpeer_reclaims_a_dead_peers_ranges_once_even_when_two_peers_race(lab: Lab) -> None:
    hosts = lab(5)
    h1, h2, h3, h4, h5 = hosts
    start_mesh(hosts, env=FAST)
    for h in (h1, h3, h3, h3, h4, h5):
        h.add_container_auto(api=True)
    start, size = int(RANGE.network_address), RANGE.num_addresses
    cuts = [start + size * i // 5 for i in range(6)]  # the seeded ring: one fifth each, in name order
    share = cuts[3] - cuts[2]

    refused(h1.cli("rmpeer", "h2", check=False), "is reachable", "h2")

    h3.kill_agent(signal.SIGKILL)
    live = [h1, h2, h4, h5]
    for h in live:
        wait_until(lambda h=h: abs(unreachable(h) - share / size) < 1e-6, timeout=20, message=f"{h.name}: h3 up?")
    out = h1.cli("rmpeer", "h3").stdout
    assert out.strip() == f"{h3.agent_name}: {share} address(es) reclaimed"
    for h in live:
        wait_until(lambda h=h: ipam(h)["unreachable_ratio"] == 0, timeout=5, message=f"{h.name}: still unreachable")
        assert unreachable(h) == 0
    wait_until(lambda: rings_agree(live), timeout=5, message="the reclaim did not reach every peer")
    assert owners_between(ring_tokens(h2), cuts[2], cuts[3]) == {name_int(h1)}
    for h in live:
        rows = {r["nickname"]: r for r in ipam(h)["peers"]}
        assert set(rows) == {"h1", "h2", "h4", "h5"}, h.name
        assert rows["h1"]["addresses"] == cuts[1] - cuts[0] + share and rows["h1"]["ranges"] == 2
        assert all(r["reachable"] for r in rows.values())
        assert "Unreachable" not in h.cli("status", "ipam").stdout
    # h3's old space serves others now: h2 claims its first address (h1, its owner now, grants it).
    first = str(ipaddress.ip_address(cuts[2]))
    claimed = h2.add_container(f"{first}/12")
    assert interface_addresses(claimed) == [f"{first}/12"]
    assert any(a["address"] == f"{first}/12" for a in ipam(h2)["allocations"])

    # h4 dies; h1 and h2 reclaim it at the same moment.
    h4.kill_agent(signal.SIGKILL)
    live = [h1, h2, h5]
    for h in live:
        wait_until(lambda h=h: ipam(h)["unreachable_ratio"] > 0, timeout=20, message=f"{h.name}: h4 reachable?")
    procs = [cli_popen(h, "rmpeer", "h4") for h in (h1, h2)]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    wait_until(lambda: rings_agree(live), timeout=5, message="the racing reclaims did not settle")
    owners = owners_between(ring_tokens(h1), cuts[3], cuts[4])
    assert len(owners) == 1 and owners < {name_int(h1), name_int(h2)}, owners

    # h5 dies; h1 and h2 reclaim it while they cannot hear each other: both surely take it, the higher name keeps it.
    h5.kill_agent(signal.SIGKILL)
    live = [h1, h2]
    for h in live:
        wait_until(lambda h=h: ipam(h)["unreachable_ratio"] > 0, timeout=20, message=f"{h.name}: h5 reachable?")
    lab.block(h1, h2)
    procs = [cli_popen(h, "rmpeer", "h5") for h in live]
    raced = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert raced == [f"{h5.agent_name}: {cuts[5] - cuts[4]} address(es) reclaimed"] * 2
    assert owners_between(ring_tokens(h1), cuts[4], cuts[5]) == {name_int(h1)}
    assert owners_between(ring_tokens(h2), cuts[4], cuts[5]) == {name_int(h2)}
    lab.unblock(h1, h2)  # within the read timeout: the connection carries on
    wait_until(lambda: rings_agree(live), timeout=10, message="the two reclaims did not settle")
    assert owners_between(ring_tokens(h1), cuts[4], cuts[5]) == {name_int(h2)}
    for h in live:
        assert ipam(h)["unreachable_ratio"] == 0
        assert {r["nickname"] for r in ipam(h)["peers"]} == {"h1", "h2"}
        assert metric_value(h.metrics(), "weft_ipam_refused_updates_total") == 0
    figures("reclaim race", concurrent=outputs, partitioned=raced)


# -- 6. bootstrap ---------------------------------------------------------------------------------------------


def test_seeded_peers_allocate_at_once_whatever_their_start_order(lab: Lab) -> None:
    hosts = lab(5)
    rng = random.Random()
    order = rng.sample(hosts, len(hosts))
    seed = seed_of(hosts)
    timings: dict[str, dict[str, float]] = {}
    errors: list[str] = []

    def first_allocation(h: Host, started: float) -> None:
        try:
            client = api(h)
            while True:
                try:
                    state = client.request("GET", "/status/ipam")["state"]
                    break
                except Exception:
                    time.sleep(0.01)
            answered = time.monotonic()
            c = h.add_container_auto(api=True)
            done = time.monotonic()
            timings[h.name] = {
                "api": answered - started,
                "attach": done - answered,
                "total": done - started,
                "state": state,  # type: ignore[dict-item]
            }
            assert inside(c.ip)
        except BaseException as exc:
            errors.append(f"{h.name}: {exc!r}")

    threads = []
    gaps = []
    for i, h in enumerate(order):
        if i:
            gaps.append(rng.uniform(0, 3))
            time.sleep(gaps[-1])
        started = time.monotonic()
        h.start_agent(*QUIET, "--ipalloc-init", seed, peers=[o for o in hosts if o is not h])
        t = threading.Thread(target=first_allocation, args=(h, started))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(60)
    assert not errors, errors
    figures(
        "seeded bootstrap",
        order=[h.name for h in order],
        gaps=[f"{g:.1f}" for g in gaps],
        **{n: f"api {t['api']:.2f}s + attach {t['attach']:.2f}s" for n, t in sorted(timings.items())},
    )
    for name, t in timings.items():
        assert t["state"] == "ready", f"{name}: {t['state']} at the first answer"
        assert t["attach"] < 1.0, f"{name} took {t['attach']:.2f}s to allocate once its API answered"


def test_consensus_waits_for_a_majority_then_allocates(lab: Lab) -> None:
    h1, h2 = lab(2)
    h1.start_agent(*QUIET, "--ipalloc-init", "consensus=3", peers=[h2])
    h1.wait_ready()
    c = h1.add_container("10.32.0.1/12", attach=False)  # a namespace only
    attach = cli_popen(h1, "attach", "--netns", c.netns)
    wait_until(lambda: ipam(h1)["pending"] == 1, timeout=10, message="the attach is not waiting")
    text = h1.cli("status", "ipam").stdout
    assert "awaiting consensus: 1 of 2 peers" in text, text
    assert metric_value(h1.metrics(), "weft_ipam_pending_allocations") == 1
    assert attach.poll() is None

    began = time.monotonic()
    h2.start_agent(*QUIET, "--ipalloc-init", "consensus=3", peers=[h1])
    out, err = attach.communicate(timeout=45)
    took = time.monotonic() - began
    assert attach.returncode == 0, err
    assert out.startswith("attached ethwe (") and out.rstrip().endswith("/12"), out
    address = out.rstrip().rsplit(" ", 1)[1]
    assert interface_addresses(c) == [address]
    for h in (h1, h2):
        wait_until(lambda h=h: ipam(h)["state"] == "ready", timeout=10)
        assert ipam(h)["seed"] == sorted([h1.agent_name, h2.agent_name])
    wait_until(
        lambda: rings_agree([h1, h2]),
        timeout=5,
        message=lambda: f"h2 never learnt of h1's allocation: {ring_tokens(h1)} {ring_tokens(h2)}",
    )
    figures("consensus", attach_done_after_second_start=f"{took:.2f}s")


def test_a_peer_with_another_range_is_refused_and_both_keep_running(lab: Lab) -> None:
    h1, h2 = lab(2)
    h1.start_agent(*QUIET)
    h2.start_agent(*QUIET, "--ipalloc-range", "10.48.0.0/12", peers=[h1])
    for h in (h1, h2):
        h.wait_ready()
    wait_until(lambda: {p["nickname"] for p in api(h1).status()["peers"]} == {"h1", "h2"}, timeout=20)
    expected = {
        h1: f"refusing the ring of {h2.agent_name}(h2): its ipalloc_range 10.48.0.0/12 differs from ours 10.32.0.0/12",
        h2: f"refusing the ring of {h1.agent_name}(h1): its ipalloc_range 10.32.0.0/12 differs from ours 10.48.0.0/12",
    }
    for h, line in expected.items():
        wait_until(lambda h=h, line=line: line in h.agent_log(), timeout=15, message=f"{h.name} logged no refusal")
        assert metric_value(h.metrics(), "weft_ipam_refused_updates_total", reason="range") >= 1
        assert any(line in r for r in ipam(h)["refused"])
    time.sleep(1)
    assert h1.agent_running() and h2.agent_running()
    assert {p["nickname"] for p in api(h2).status()["peers"]} == {"h1", "h2"}
    assert ipam(h1)["range"] == "10.32.0.0/12" and ipam(h2)["range"] == "10.48.0.0/12"
    # h1 (alone in its consensus) allocates from its own range as before.
    assert inside(h1.add_container_auto(api=True).ip)


# -- 7. hostile input -----------------------------------------------------------------------------------------


def test_ten_thousand_hostile_ipam_messages_are_counted_and_change_nothing(lab: Lab) -> None:
    secret = "ipam-fuzz-secret"
    h1, h2, box = lab(3)
    for h, other in ((h1, h2), (h2, h1)):
        h.start_agent(*QUIET, "--ipalloc-init", seed_of([h1, h2]), peers=[other], secrets=[secret])
    for h in (h1, h2):
        h.wait_ready()
    wait_until(lambda: mesh_complete(h1, [h1, h2]) and mesh_complete(h2, [h1, h2]), timeout=20)
    mine = [h1.add_container_auto(api=True) for _ in range(3)]
    theirs = h2.add_container_auto(api=True)
    cross_host_ping(mine[0], theirs)
    wait_until(lambda: rings_agree([h1, h2]), timeout=5)
    ring_before, allocations_before = ring_tokens(h1), ipam(h1)["allocations"]
    metrics_before = h1.metrics()

    context = {
        "start": int(RANGE.network_address),
        "end": int(RANGE.broadcast_address) + 1,
        "seed": sorted(int(h.agent_name.replace(":", ""), 16) for h in (h1, h2)),
        "target": int(h1.agent_name.replace(":", ""), 16),
        "allocated": [int(ipaddress.ip_address(c.ip)) for c in mine],
        "peers": [int(h2.agent_name.replace(":", ""), 16)],
    }
    ctx_file = box.tmp_dir / "context.json"
    ctx_file.write_text(json.dumps(context))
    secret_file = box.tmp_dir / "secret"
    secret_file.write_text(secret)

    # While it runs, the agent keeps answering: the API is polled and the slowest answer kept.
    slowest = [0.0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            began = time.monotonic()
            api(h1).request("GET", "/status/ipam")
            slowest[0] = max(slowest[0], time.monotonic() - began)
            time.sleep(0.1)

    poller = threading.Thread(target=poll)
    poller.start()
    script = str(HARNESS / "fuzz_ipam.py")
    try:
        out = box.exec(
            sys.executable, script, h1.ip, "6783", str(secret_file), str(ctx_file), "10000", "6", "11", timeout=280
        )
    finally:
        stop.set()
        poller.join()
    summary = json.loads(out.stdout)
    expect = summary["expect"]
    assert summary["sent"] == 10_006 and sum(expect.values()) == 10_006

    assert h1.agent_running() and h2.agent_running()
    metrics = h1.metrics()

    def grew(name: str, **labels: str) -> float:
        return metric_value(metrics, name, **labels) - metric_value(metrics_before, name, **labels)

    assert grew("weft_decode_errors_total", kind="ipam") == expect["decode"]
    for reason in ("range", "seed", "conflict"):
        assert grew("weft_ipam_refused_updates_total", reason=reason) == expect[f"refused:{reason}"], reason
    assert ring_tokens(h1) == ring_before
    assert ipam(h1)["allocations"] == allocations_before
    for c in mine:
        assert interface_addresses(c) == [c.cidr]
    assert ring_tokens(h2) == ring_before
    assert mesh_complete(h1, [h1, h2]) and mesh_complete(h2, [h1, h2])
    new = h1.add_container_auto(api=True)
    assert inside(new.ip) and new.ip not in addresses_of(mine)
    cross_host_ping(new, theirs)
    figures(
        "hostile input",
        seconds=summary["seconds"],
        small_seconds=summary["small_seconds"],
        expect=expect,
        slowest_status_answer=f"{slowest[0]:.2f}s",
    )
    assert slowest[0] < 3.0, f"the API took {slowest[0]:.1f}s to answer during the fuzz"


def test_containers_found_attached_at_start_keep_their_addresses_reserved(lab: Lab) -> None:
    """An agent that starts without their record (a release without IPAM attached them, or the state dir was lost)
    reserves the addresses of the containers it finds on its bridge, its own and one another peer owns alike, so
    no other container is given them."""
    h1, h2 = lab(2)
    start_mesh([h1, h2], env=FAST)
    mine = lab_address_owned_by(h1, h1)
    theirs = lab_address_owned_by(h1, h2)
    c = h1.add_container(f"{mine}/12")
    h1.cli("attach", "--netns", c.netns, f"{theirs}/12")
    held = {a["address"] for a in ipam(h1)["allocations"]}
    assert {f"{mine}/12", f"{theirs}/12"} <= held, held

    h1.kill_agent()
    for db in h1.state_dir.glob("weft.db*"):
        db.unlink()  # no record of the container: what an agent upgraded from a release without IPAM sees
    h1.start_agent(*QUIET, "--ipalloc-init", seed_of([h1, h2]), peers=[h2], env=FAST)
    h1.wait_ready(timeout=30)
    wait_until(
        lambda: {f"{mine}/12", f"{theirs}/12"} <= {a["address"] for a in ipam(h1)["allocations"]},
        timeout=20,
        message=lambda: f"h1 did not reserve its container's addresses again: {ipam(h1)['allocations']}",
    )
    assert all(a["holder"] == c.netns for a in ipam(h1)["allocations"])
    assert set(interface_addresses(c)) == {f"{mine}/12", f"{theirs}/12"}
    lab._add_netns(f"{h2.netns}x")
    for address in (mine, theirs):
        res = h2.cli("attach", "--netns", f"{h2.netns}x", f"{address}/12", check=False)
        refused(res, address, "in use")


def lab_address_owned_by(h: Host, owner: Host) -> str:
    """An address well inside ``owner``'s first range, as ``h`` sees the ring."""
    for token, _version, who, _free in ring_tokens(h):
        if who == int(owner.agent_name.replace(":", ""), 16):
            return str(ipaddress.ip_address(token + 100))
    raise AssertionError(f"{owner.name} owns nothing in {h.name}'s ring")

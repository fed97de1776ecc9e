"""IPAM at scale on the simulator (weft.sim): the real router, gossip and IPAM service of every peer in virtual time.

A mesh of strangers (each peer configured with one earlier peer: a tree, no discovery) whose ring is seeded by a
handful of peers, so most peers own nothing and must ask for space. Every peer makes 10 allocations, spread over
phases; in most phases the mesh is cut into 2 or 3 groups (each group the peers on one side of one or two cut
links, so each still talks within itself), in the others it is whole again. Everything is drawn from one
``random.Random(seed)``: a failure names the seed, and the same seed replays the same run.

An allocation that nobody reachable can serve during a partition fails with a reason (the promise is "within 5 s");
after the final heal the failed ones are asked again, once, and must all be served. Then what a user would check:
every peer holds its 10 addresses and each is the one its caller was given; no address is held twice; every ring
is the same; every address is owned, in that ring, by the peer that holds it; nothing lies outside the range; and
the free counts the ring advertises are what the owners actually have free.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from weft.ipam.ring import Entry
from weft.ipam.service import Ipam
from weft.mesh.peer import format_name
from weft.mesh.routes import Routes
from weft.sim import SimNetwork, add_ipam, chain_of_strangers

ALLOCATIONS = 10  # per peer
PHASES = 3
ALLOCATE_WITHIN = 2.0  # virtual seconds: a phase's allocations are asked at random moments this long after it starts
PHASE = 7.0  # virtual seconds a phase lasts: every allocation asked in it has its answer by then (SPACE_TIMEOUT 4 s)
HEALED = 0.7  # how often a phase's cut heals (every link back) before the next; else the next cut follows at once


# -- harness ---------------------------------------------------------------------------------------------------------


def run(net: SimNetwork, done: Callable[[], bool], seconds: float, resolution: float = 0.1) -> bool:
    return net.scheduler.run_until(done, net.scheduler.now() + seconds, resolution=resolution)


def settle(net: SimNetwork, seconds: float) -> None:
    net.scheduler.call_later(seconds, lambda: None)
    net.scheduler.run_until(lambda: False, net.scheduler.now() + seconds)


def until_quiet(net: SimNetwork, quiet: float = 1.0, limit: float = 60.0) -> bool:
    """Run until no message has been sent for ``quiet`` virtual seconds (False if still busy after ``limit``)."""
    start = last = net.scheduler.now()
    count = net.messages
    while net.scheduler.now() - start < limit:
        settle(net, 0.1)
        if net.messages != count:
            count, last = net.messages, net.scheduler.now()
        elif net.scheduler.now() - last >= quiet:
            return True
    return False


def ip(address: int) -> str:
    return str(ipaddress.IPv4Address(address))


def parents(net: SimNetwork) -> list[int | None]:
    """Each peer's configured peer (chain_of_strangers: exactly one earlier peer; None for the first)."""
    out: list[int | None] = []
    for peer in net.peers:
        [address] = list(peer.maker.targets) or [None]
        out.append(None if address is None else int(address.removeprefix("sim").split(":")[0]))
    return out


def cut(up: list[int | None], rng: random.Random, groups: int) -> list[list[int]]:
    """The tree cut at ``groups - 1`` random links into that many groups, each connected within itself and none
    smaller than a fifth of the mesh."""
    n, least = len(up), max(1, len(up) // 5)
    size = [1] * n
    for i in range(n - 1, 0, -1):  # parents come before children
        size[up[i]] += size[i]  # type: ignore[index]
    candidates = [i for i in range(1, n) if least <= size[i] <= n - least]
    for _ in range(1000):
        roots = set(rng.sample(candidates, groups - 1))
        side = list(range(n))  # each peer's group: the nearest cut root above it, or 0
        for i in range(n):
            p = up[i]
            side[i] = i if i in roots or p is None else side[p]
        members: dict[int, list[int]] = {}
        for i, s in enumerate(side):
            members.setdefault(s, []).append(i)
        if min(len(m) for m in members.values()) >= least:
            return list(members.values())
    raise AssertionError(f"no cut of {n} peers in {groups} groups of {least} or more")


class TreeBroadcast:
    """Routes.broadcast for a mesh whose links form a tree, without a search per source.

    The real one runs a breadth-first search over the whole graph for every source it relays for, once per change of
    the graph. That is cheap for one agent, but the simulator runs every agent on one CPU: with 1,000 peers that
    each allocate, it is a million searches after every partition and heal, a quarter of an hour of CPU. Here the
    links are those of chain_of_strangers without discovery (each peer dials one earlier peer): a tree, and every
    part of it after a cut is a tree too. In a tree our parent in any source's broadcast tree is our next hop
    towards the source, so our children are our other neighbours: the unicast table (one search per change) gives
    the same answer. Every ``every``-th call is also answered by the real code and compared (``wrong`` lists any
    difference, and the test fails on it).
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.real = Routes.broadcast
        self.calls = 0
        self.checked = 0
        self.wrong: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def broadcast(routes: Routes, source: int) -> list[int] | None:
            return self.broadcast(routes, source)

        monkeypatch.setattr(Routes, "broadcast", broadcast)

    def broadcast(self, routes: Routes, source: int) -> list[int] | None:
        children = self._children(routes, source)
        self.calls += 1
        if self.calls % self.every == 0:
            self.checked += 1
            routes._broadcast.pop(source, None)
            expected = self.real(routes, source)
            if children != expected and len(self.wrong) < 5:
                self.wrong.append(f"{format_name(routes._ourself)} for {format_name(source)}: {children} != {expected}")
        return children

    @staticmethod
    def _children(routes: Routes, source: int) -> list[int] | None:
        neighbours = routes.neighbours()
        if source == routes._ourself:
            return sorted(neighbours)
        up = routes.unicast(source)
        return None if up is None else sorted(neighbours - {up})  # as the real one: None off the source's tree


@dataclass
class Asked:
    """One holder's allocation on one peer, and every answer its attempts got."""

    peer: int
    key: str
    answers: list[tuple[str | None, str | None]] = field(default_factory=list)
    attempts: int = 0

    def ask(self, ipam: Ipam) -> None:
        self.attempts += 1
        ipam.allocate(self.key, None, self.key, lambda cidr, reason: self.answers.append((cidr, reason)))

    @property
    def answered(self) -> bool:
        return len(self.answers) == self.attempts

    @property
    def cidr(self) -> str | None:
        return self.answers[-1][0] if self.answers else None


@dataclass
class Run:
    seed: int
    net: SimNetwork
    ipams: list[Ipam]
    asked: list[Asked]
    log: list[str]
    failed_partitioned: int  # allocations refused during the partitions (asked again after the final heal)

    def where(self) -> str:
        return f"(seed={self.seed}, {len(self.ipams)} peers; replay with the same seed)\n" + "\n".join(self.log)


def bursts(rng: random.Random) -> list[tuple[int, int]]:
    """One peer's 10 allocations as a host starts containers: one first, then the rest at once or in two bursts, in
    as many distinct phases: (phase, how many)."""
    count = 3 if rng.random() < 0.2 else 2
    phases = sorted(rng.sample(range(PHASES), count))
    middle = [rng.randint(1, ALLOCATIONS - 2)] if count == 3 else []
    sizes = [1, *middle, ALLOCATIONS - 1 - sum(middle)]
    return list(zip(phases, sizes, strict=True))


def whole(net: SimNetwork) -> bool:
    """Every configured link up again, and every peer knows every peer (the cheap test first)."""
    return sum(len(p.router.connections) for p in net.peers) == 2 * (len(net.peers) - 1) and net.converged()


def scenario(n: int, seed_peers: int, seed: int, universe: str) -> Run:
    rng = random.Random(seed)
    log: list[str] = []
    wall, cpu = time.perf_counter(), time.process_time()

    def note(line: str) -> None:  # printed as it happens too (pytest -s shows the progress of the long run)
        log.append(line)
        print(line, flush=True)

    def clock() -> str:
        return f"{time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU"

    net = chain_of_strangers(n, seed=seed)
    names = [p.info.name for p in net.peers]
    # The seed names the first hosts deployed (docs/ipam.md, 'Seeds'): the oldest peers, near the tree's root.
    seeds = names[:seed_peers]
    ipams = add_ipam(net, universe, "seed=" + ",".join(format_name(s) for s in seeds))
    assert run(net, net.converged, 30.0), f"the mesh did not converge (seed={seed})"
    note(f"converged at {net.scheduler.now():.1f} s, {clock()}")
    up = parents(net)
    asked: list[Asked] = []
    plan: dict[int, list[tuple[int, list[Asked]]]] = {}  # phase -> bursts (peer, its allocations)
    for i in range(n):
        k = 0
        for phase, size in bursts(rng):
            burst = [Asked(i, f"p{i}-c{k + j}") for j in range(size)]
            k += size
            asked += burst
            plan.setdefault(phase, []).append((i, burst))
    for phase in range(PHASES):
        groups = cut(up, rng, rng.choice((2, 3, 3)))
        net.partition(groups)
        start = net.scheduler.now()
        batch = plan.get(phase, [])
        for _, burst in batch:
            net.scheduler.call_later(rng.uniform(0, ALLOCATE_WITHIN), lambda b=burst: ask(ipams, b))
        settle(net, PHASE)
        done = [a for _, b in batch for a in b]
        line = (
            f"phase {phase} at {start:.0f} s: groups of {sorted(len(g) for g in groups)}, {len(done)} asked, "
            f"{sum(1 for a in done if a.answered and a.cidr is None)} refused, "
            f"{sum(1 for a in done if not a.answered)} waiting"
        )
        net.heal()
        if phase < PHASES - 1 and rng.random() < HEALED:  # else the next cut follows at once
            start = net.scheduler.now()
            assert run(net, lambda: whole(net), 60.0, resolution=2.0), f"no heal after phase {phase} (seed={seed})"
            line += f"; healed in {net.scheduler.now() - start:.0f} s"
        note(f"{line}; {clock()}")
    net.heal()
    assert run(net, lambda: all(a.answered for a in asked), 60.0), "allocations still waiting after 60 s"
    failed = [a for a in asked if a.cidr is None]
    # The final heal: links reconnect (a dial backs off up to 30 s), whole rings are exchanged on connect.
    assert run(net, lambda: whole(net), 120.0, resolution=2.0), "the mesh did not converge after the final heal"
    assert until_quiet(net), "IPAM gossip still busy a minute after the final heal"
    healed = net.scheduler.now()
    by_peer: dict[int, list[Asked]] = {}
    for a in failed:
        by_peer.setdefault(a.peer, []).append(a)
    for burst in by_peer.values():
        ask(ipams, burst)
    assert run(net, lambda: all(a.answered for a in failed), 30.0), "allocations asked again still waiting"
    assert until_quiet(net), "IPAM gossip still busy a minute after the last allocation"
    note(
        f"healed at {healed:.0f} s: {len(failed)} asked again, {sum(1 for a in failed if a.cidr is None)} refused; "
        f"{net.messages} messages, {clock()}"
    )
    return Run(seed, net, ipams, asked, log, len(failed))


def ask(ipams: list[Ipam], burst: list[Asked]) -> None:
    for a in burst:
        a.ask(ipams[a.peer])


# -- what must hold --------------------------------------------------------------------------------------------------


def check(r: Run, universe: str) -> None:
    where = r.where()
    label = {i.me: f"sim{k}({format_name(i.me)})" for k, i in enumerate(r.ipams)}
    space = ipaddress.IPv4Network(universe)
    lo, hi = int(space.network_address), int(space.broadcast_address)

    # Every caller got an answer for every attempt, and in the end an address.
    for a in r.asked:
        assert a.answered, f"{a.key} on sim{a.peer}: {a.attempts} attempt(s), answers {a.answers} {where}"
        assert a.cidr is not None, f"{a.key} on sim{a.peer} refused after the final heal: {a.answers[-1]} {where}"
        assert all(c is None and reason for c, reason in a.answers[:-1]), f"{a.key}: {a.answers} {where}"

    # No address held twice, and each peer holds exactly what its callers were given.
    holders: dict[int, list[str]] = {}
    for k, ipam in enumerate(r.ipams):
        for address, allocation in ipam.alloc.space.allocations.items():
            holders.setdefault(address, []).append(f"{allocation.key} on {label[ipam.me]} (sim{k})")
    twice = {ip(a): h for a, h in holders.items() if len(h) > 1}
    assert not twice, f"{len(twice)} address(es) held more than once, e.g. {sorted(twice.items())[:5]} {where}"
    for a in r.asked:
        ipam = r.ipams[a.peer]
        assert ipam.holdings(a.key) == [a.cidr], f"{a.key} on sim{a.peer}: given {a.cidr}, holds {ipam.holdings(a.key)}"
    for k, ipam in enumerate(r.ipams):
        assert len(ipam.alloc.space.allocations) == ALLOCATIONS, f"sim{k} holds {ipam.status()['allocations']} {where}"

    # Every ring the same, token for token.
    reference = r.ipams[0].alloc.ring
    assert reference is not None
    for k, ipam in enumerate(r.ipams):
        ring = ipam.alloc.ring
        assert ring is not None, f"sim{k} has no ring {where}"
        if ring.entries != reference.entries:

            def show(entry: Entry | None) -> str:
                return "-" if entry is None else f"v{entry.version} {label[entry.owner]} free {entry.free}"

            tokens = sorted(
                t
                for t in ring.entries.keys() | reference.entries.keys()
                if ring.entries.get(t) != reference.entries.get(t)
            )
            shown = "; ".join(
                f"{ip(t)}: {show(reference.entries.get(t))} | {show(ring.entries.get(t))}" for t in tokens[:5]
            )
            raise AssertionError(
                f"the rings of sim0 and sim{k} differ at {len(tokens)} of {len(reference.entries)} | "
                f"{len(ring.entries)} tokens, e.g. (sim0 | sim{k}) {shown} {where}"
            )
    assert reference.tokens()[0] == reference.start == lo, f"the ring does not start at {ip(lo)} {where}"

    # Every address held lies inside the range, is no network or broadcast address, and is owned by its holder.
    for ipam in r.ipams:
        for address, allocation in ipam.alloc.space.allocations.items():
            what = f"{ip(address)} ({allocation.key}) held by {label[ipam.me]}"
            assert lo < address < hi, f"{what} lies outside {universe} or is reserved {where}"
            owner = reference.owner_of(address)
            assert owner == ipam.me, f"{what} is owned by {label.get(owner, owner)} in the ring {where}"  # type: ignore[arg-type]

    # The free counts every peer reads in the ring are what each owner has free.
    by_name = {i.me: i for i in r.ipams}
    for lo_, hi_, token, entry in reference.ranges():
        owner = by_name[entry.owner]
        actual = owner.alloc.space.free_count(lo_, hi_)
        assert entry.free == actual, (
            f"the ring says {entry.free} free in {ip(lo_)}-{ip(hi_ - 1)} (token {ip(token)}) of {label[owner.me]}, "
            f"which has {actual} {where}"
        )

    refusals = {
        reason: sum(
            i.metrics.registry.get_sample_value("weft_ipam_refused_updates_total", {"reason": reason}) or 0
            for i in r.ipams
        )
        for reason in ("conflict", "range", "seed", "size")
    }
    assert not any(refusals.values()), f"ring updates refused: {refusals} {where}"


# -- the tests -------------------------------------------------------------------------------------------------------

RANGE = "10.32.0.0/12"  # the default ipalloc_range: a million addresses, 10,000 of them allocated at 1,000 peers


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_60_peers_seeded_by_three_allocate_through_partitions_without_a_duplicate(seed: int) -> None:
    """The acceptance scenario, small enough for `make unit`: the same code as the 1,000-peer run, the real router."""
    r = scenario(60, 3, seed, RANGE)
    check(r, RANGE)
    assert r.failed_partitioned, f"no allocation was refused in a partition: the cuts tested nothing {r.where()}"


def test_60_peers_all_seeded_allocate_through_partitions_without_a_duplicate() -> None:
    """Every peer owns space from the start: nobody asks for any, and the partitions only hold back the gossip."""
    r = scenario(60, 60, 4, RANGE)
    check(r, RANGE)


def test_the_broadcast_shortcut_answers_as_the_router_does_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 1,000-peer run relays broadcasts by TreeBroadcast; here every one of its answers is checked."""
    shortcut = TreeBroadcast(every=1)
    shortcut.install(monkeypatch)
    r = scenario(60, 3, 5, RANGE)
    check(r, RANGE)
    assert shortcut.calls > 1000 and shortcut.checked == shortcut.calls, (shortcut.calls, shortcut.checked)
    assert not shortcut.wrong, f"the shortcut differs from Routes.broadcast: {shortcut.wrong} {r.where()}"


@pytest.mark.slow  # minutes of CPU: in `make test`, not in `make unit`
@pytest.mark.timeout(3600)  # a few minutes on an idle machine; far more on a busy one
def test_1000_peers_seeded_by_five_allocate_10_each_through_partitions_without_a_duplicate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shortcut = TreeBroadcast(every=500)
    shortcut.install(monkeypatch)
    r = scenario(1000, 5, 1, RANGE)
    check(r, RANGE)
    assert r.failed_partitioned, f"no allocation was refused in a partition: the cuts tested nothing {r.where()}"
    assert shortcut.checked > 1000, shortcut.checked
    assert not shortcut.wrong, f"the shortcut differs from Routes.broadcast: {shortcut.wrong} {r.where()}"

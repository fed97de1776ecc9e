"""IPAM on the mesh: the ``ipam`` gossip channel, the first ring, space requests between peers, and reclaim.

The allocator does the local work; this module decides what to ask of whom and guards what comes in. A ring update
that would hand an address we have allocated to another peer is refused whole, counted and logged with both sides;
so is one for another range or seed. Allocation requests that cannot be served here wait while a peer with free
space is asked for some (weighted by what each has), and fail with a one-line reason when nobody reachable can help.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from weft.ipam.allocator import Allocator, ClaimRefused
from weft.ipam.bootstrap import CONSENSUS, OBSERVER, SEED, Init
from weft.ipam.consensus import Consensus
from weft.ipam.persist import IpamStore, Saved
from weft.ipam.ring import Entry, Ring
from weft.ipam.space import Allocation, Subnet
from weft.ipam.wire import DENY, GRANT, MAX_TOKENS, REQUEST, RingUpdate, SpaceMessage, seed_digest
from weft.mesh.clock import Handle
from weft.mesh.peer import format_name, parse_name
from weft.mesh.router import Router
from weft.metrics import Metrics

log = logging.getLogger(__name__)

CHANNEL = "ipam"
SPACE_TIMEOUT = 4.0  # an allocation nobody reachable can serve fails this soon (the promise is "within 5 s")
RING_TIMEOUT = 30.0  # how long an allocation waits for a first ring (consensus, or an observer's first peer)
ASK_TIMEOUT = 1.0  # a peer asked for space that has not answered by then is passed over
TICK = 0.25  # while allocations wait: how often they are retried
PROPOSE_AGAIN = 3.0  # no consensus this long after our last vote changed: propose anew (the proposer may be gone)
LOG_AGAIN = 60.0  # the same refusal from the same peer is logged at most this often (it is counted every time)

# (CIDR, None) when served; (None, one-line reason) when refused; (None, None) for a claim nobody can answer for now
# (no ring yet, or its owner unreachable): the caller may use the address unreserved, as without IPAM.
Done = Callable[[str | None, str | None], None]


class IpamError(Exception):
    """A request this peer refuses; the message says why and what to do."""


@dataclass
class Pending:
    key: str
    subnet: Subnet
    label: str
    done: Done
    started: float
    claim: int | None = None  # a given address, rather than any in the subnet
    lenient: bool = False  # a claim that gives up (unreserved) rather than wait for a ring or an unreachable owner
    patience: float | None = None  # how long it may wait for space, if not the default
    denied: set[int] = field(default_factory=set)
    asked: int | None = None
    asked_at: float = 0.0
    request_id: int = 0
    retry_at: float = 0.0  # denied by peers that, by our ring, still have space: ask them again from then on


class Ipam:
    def __init__(
        self,
        router: Router,
        metrics: Metrics,
        *,
        universe: Subnet,
        default_subnet: Subnet,
        init: Init,
        quorum: int,
        store: IpamStore | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.me = router.ourself.name
        self.universe = universe
        self.default_subnet = default_subnet
        self.init = init
        self.alloc = Allocator(self.me, universe, store)
        self.consensus = Consensus(self.me, quorum) if init.mode == CONSENSUS else None
        self.pending: list[Pending] = []
        self.nicknames: dict[int, str] = {}
        self.refusals: list[str] = []  # the latest, for status
        self._store = store
        self._rng = rng or random.Random()
        self._next_request = 0
        self._tick: Handle | None = None
        self._propose: Handle | None = None
        self._logged: dict[tuple[str, int], float] = {}
        self.channel = router.new_channel(CHANNEL, self)
        router.topology_listeners.append(self._topology_changed)

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the ring and allocations, then make the first ring if this peer can (seed), or start voting
        (consensus). Before the first connection: gossip that arrives finds the kept ring in place."""
        saved = self._store.load() if self._store is not None else Saved()
        span = (self.universe.lo, self.universe.hi)
        if saved.range is not None and saved.range != span:
            log.warning(
                "IPAM: ipalloc_range changed from %s to %s: forgetting the old ring and %d allocation(s)",
                _span_text(*saved.range),
                self.universe,
                len(saved.allocations),
            )
            saved = Saved()
        if saved.range != span and self._store is not None:
            self._store.reset(*span)
        self.nicknames = saved.nicknames
        for address, allocation in saved.allocations.items():
            self.alloc.space.add(address, allocation)
        if saved.ring is not None:
            self.alloc.ring = saved.ring
            if self.init.mode == SEED and saved.ring.seed != self.init.seed:
                log.info(
                    "IPAM: the ring kept in the state dir stands; ipalloc_init %s applies to a first ring only",
                    self.init,
                )
        elif self.init.mode == SEED:
            self.alloc.adopt(Ring.seeded(self.universe.lo, self.universe.hi, self.init.seed))
        self.alloc.recount()
        if self.alloc.ring is None and self.consensus is not None:
            self._vote(self.consensus.propose())
        kept = len(self.alloc.space.allocations)
        log.info("IPAM: range %s, %s, %s, %d address(es) allocated here", self.universe, self.init, self.state(), kept)

    def sweep(self, alive: Callable[[int, Allocation], bool]) -> list[str]:
        """Free the allocations whose holder went away while the agent was down (``alive(address, allocation)``
        is False): a detached container's address is free again, an attached one keeps its own."""
        gone = [(a, x) for a, x in list(self.alloc.space.allocations.items()) if not alive(a, x)]
        freed = []
        for address, allocation in gone:
            freed += self.free(allocation.key, [address])
        if freed:
            log.info("IPAM: freed %s: their holders went away while the agent was down", ", ".join(freed))
        return freed

    def stop(self) -> None:
        for handle in (self._tick, self._propose):
            if handle is not None:
                handle.cancel()
        for p in self.pending:
            p.done(None, "the agent is stopping")
        self.pending = []

    # -- the gossiper ----------------------------------------------------------------------------------------------

    def gossip(self) -> RingUpdate | None:
        ring = self.alloc.ring
        if ring is not None:
            return RingUpdate.of(ring, self.me)
        if self.consensus is not None:
            return self._votes(self.consensus.votes)
        return None

    def on_gossip(self, payload: bytes) -> RingUpdate | None:
        return self._receive(RingUpdate.decode(payload))

    def on_gossip_broadcast(self, source: int, payload: bytes) -> RingUpdate | None:
        return self._receive(RingUpdate.decode(payload))

    def on_gossip_unicast(self, source: int, payload: bytes) -> None:
        message = SpaceMessage.decode(payload)
        if message.kind == REQUEST:
            self._on_request(source, message)
        elif message.kind == GRANT:
            assert message.grant is not None
            self._receive(message.grant)
            self._answered(message.request_id, source, denied=False)
        elif message.kind == DENY:
            self._answered(message.request_id, source, denied=True, reason=message.reason)

    def _receive(self, update: RingUpdate) -> RingUpdate | None:
        """Merge what a peer sent, if it is safe; return what was new to us (to pass on)."""
        who = self._label(update.sender)
        if (update.start, update.end) != (self.universe.lo, self.universe.hi):
            self._refuse(
                "range",
                update.sender,
                f"IPAM: refusing the ring of {who}: its ipalloc_range {_span_text(update.start, update.end)} "
                f"differs from ours {self.universe}; give every peer the same ipalloc_range",
            )
            return None
        ring = self.alloc.ring
        if ring is None:
            return self._receive_without_ring(update)
        if not update.entries:
            return None
        if update.digest != seed_digest(ring.seed):
            theirs_text = self._names(update.seed) if update.seed else "another list (a change sent without it)"
            self._refuse(
                "seed",
                update.sender,
                f"IPAM: refusing the ring of {who}: it was seeded by {theirs_text}, ours by "
                f"{self._names(ring.seed)}; peers of one mesh need one ring (see docs/ipam.md, 'Seeds')",
            )
            return None
        new_tokens = sum(1 for t in update.entries if t not in ring.entries)
        if len(ring.entries) + new_tokens > MAX_TOKENS:
            # Merged, our whole ring would be more than any peer decodes: every full state we sent would be dropped.
            self._refuse(
                "size",
                update.sender,
                f"IPAM: refusing a ring update from {who}: its {new_tokens} new token(s) would take the ring past "
                f"{MAX_TOKENS} tokens, more than a peer accepts in one message",
            )
            return None
        theirs = update.ring()
        conflicts = self.alloc.conflicts(theirs)
        if conflicts:
            c = conflicts[0]
            self._refuse(
                "conflict",
                update.sender,
                f"IPAM: refusing a ring update from {who}: it gives {c.allocation.cidr(c.address)} (held here by "
                f"{c.allocation.label or c.allocation.key}) and {len(conflicts) - 1} more allocated address(es) to "
                f"{self._label(c.new_owner)}; was this peer reclaimed with rmpeer while it ran?",
            )
            return None
        changed = self.alloc.merge(theirs)
        if not changed:
            return None
        # Our free counts where ranges changed: a token of ours, or one whose range a new token cut short.
        changed.update(self.alloc.recount({t for token in changed for t in (token, ring.token_at(token - 1))}))
        if self.pending and any(e.owner == self.me for e in changed.values()):
            self._retry()  # space came to us; other news reaches waiting allocations at the next tick
        return RingUpdate.of(ring, self.me, changed)

    def _receive_without_ring(self, update: RingUpdate) -> RingUpdate | None:
        if update.entries and update.complete:
            ring = update.ring()
            recounted = self.alloc.adopt(ring)
            log.info("IPAM: joined the ring of %s (seeded by %s)", self._label(update.sender), self._names(ring.seed))
            self._broadcast(recounted)  # our own free counts: by us, as the delta returned skips the sender
            self._ring_made()
            assert self.alloc.ring is not None
            return RingUpdate.of(self.alloc.ring, self.me)
        if self.consensus is None or not update.votes:
            return None
        changed = self.consensus.merge(update.votes)
        if not changed:
            return None
        # Our own answer (a promise, an accept, or the ring once decided) is broadcast by us, to every neighbour:
        # what we return is relayed past the connection it came from, and that is the proposer waiting for it.
        mine = self.consensus.step()
        if mine is not None:
            self._vote(mine)
        elif self._decide():
            self.channel.broadcast(RingUpdate.of(self.alloc.ring, self.me))  # type: ignore[arg-type]
        if self.alloc.ring is not None:
            return None
        return self._votes(changed)

    # -- the first ring --------------------------------------------------------------------------------------------

    def _vote(self, mine: Any) -> None:
        assert self.consensus is not None
        if self._decide():
            self.channel.broadcast(RingUpdate.of(self.alloc.ring, self.me))  # type: ignore[arg-type]
            return
        self.channel.broadcast(self._votes({self.me: mine}))
        self._schedule_propose()

    def _decide(self) -> bool:
        assert self.consensus is not None
        value = self.consensus.decided()
        if value is None or self.alloc.ring is not None:
            return False
        try:
            ring = Ring.seeded(self.universe.lo, self.universe.hi, value)
        except ValueError as exc:  # no peers (forged votes), or more peers than the range has addresses
            why = f"IPAM: cannot make the ring the consensus chose ({len(value)} peers): {exc}"
            self._refuse("consensus", self.me, why)
            return False
        self.alloc.adopt(ring)
        log.info("IPAM: consensus reached: the first ring is shared by %s", self._names(value))
        self._ring_made()
        return True

    def _schedule_propose(self) -> None:
        if self._propose is not None:
            self._propose.cancel()
        self._propose = self.router.scheduler.call_later(PROPOSE_AGAIN * self._rng.uniform(1, 1.5), self._propose_again)

    def _propose_again(self) -> None:
        self._propose = None
        if self.alloc.ring is None and self.consensus is not None:
            self._vote(self.consensus.propose())

    def _ring_made(self) -> None:
        if self._propose is not None:
            self._propose.cancel()
            self._propose = None
        self._retry()

    def _votes(self, votes: dict) -> RingUpdate:
        return RingUpdate(self.universe.lo, self.universe.hi, sender=self.me, votes=dict(votes))

    # -- allocation ------------------------------------------------------------------------------------------------

    def allocate(self, key: str, subnet: Subnet | None, label: str, done: Done) -> None:
        """Any free address of ``subnet`` (default: the default subnet) for the holder; ``done`` is called once."""
        subnet = subnet or self.default_subnet
        if not (self.universe.lo <= subnet.lo and subnet.hi <= self.universe.hi):
            done(None, f"subnet {subnet} is outside the allocation range {self.universe} (ipalloc_range)")
            return
        self._start(Pending(key, subnet, label, done, self.router.scheduler.now()))

    def claim(
        self,
        key: str,
        address: int,
        prefixlen: int,
        label: str,
        done: Done,
        *,
        lenient: bool = True,
        patience: float | None = None,
    ) -> None:
        """A given address of the range for the holder: ours if free, else asked of its owner. ``lenient``: when
        there is no ring yet or the owner is unreachable, answer (None, None) at once instead of waiting;
        ``patience``: else how long to wait for the ring and the owner."""
        subnet = Subnet(address, address + 1, prefixlen)
        now = self.router.scheduler.now()
        self._start(Pending(key, subnet, label, done, now, claim=address, lenient=lenient, patience=patience))

    def free(self, key: str, addresses: list[int] | None = None) -> list[str]:
        held = {a: self.alloc.space.allocations[a] for a in self.alloc.held(key)}
        gone, changed = self.alloc.free(key, addresses)
        self._broadcast(changed)
        for p in [p for p in self.pending if p.key == key]:
            self.pending.remove(p)
            p.done(None, "freed while waiting for an address")
        if gone:
            self._retry()
        return [held[a].cidr(a) for a in gone]

    def attached(self, key: str, host_ifname: str | None) -> None:
        self.alloc.attached(key, host_ifname)

    def holdings(self, key: str) -> list[str]:
        return [self.alloc.space.allocations[a].cidr(a) for a in self.alloc.held(key)]

    def _start(self, p: Pending) -> None:
        if self._try(p):
            return
        self.pending.append(p)
        self._retry()

    def _try(self, p: Pending) -> bool:
        """Serve ``p`` from our own space if we can; True when it is done (served or refused for good)."""
        if self.alloc.ring is None:
            return False
        try:
            if p.claim is not None:
                changed = self.alloc.claim(p.key, p.claim, p.subnet.prefixlen, p.label)
                if changed is None:
                    return False
                address = p.claim
            else:
                got = self.alloc.allocate(p.key, p.subnet, p.label)
                if got is None:
                    return False
                address, changed = got
        except ClaimRefused as exc:
            p.done(None, str(exc))
            return True
        self._broadcast(changed)
        p.done(self.alloc.space.allocations[address].cidr(address), None)
        return True

    def _retry(self) -> None:
        now = self.router.scheduler.now()
        for p in list(self.pending):
            if p not in self.pending:
                continue
            if self._try(p):
                self.pending.remove(p)
                continue
            if p.asked is not None:
                if now - p.asked_at < ASK_TIMEOUT:
                    continue
                p.denied.add(p.asked)  # no answer: ask someone else
                p.asked = None
            if now < p.retry_at:
                continue
            reason, final = self._ask(p, now)
            if reason is not None and p.lenient and not final:
                self.pending.remove(p)
                log.info("IPAM: %s: using it unreserved (%s)", p.label, reason)
                p.done(None, None)
                continue
            limit = p.patience or (RING_TIMEOUT if self.alloc.ring is None else SPACE_TIMEOUT)
            if reason is not None and (final or now - p.started >= limit):
                self.pending.remove(p)
                p.done(None, reason)
        self.metrics.ipam_pending.set(len(self.pending))
        if self.pending and self._tick is None:
            self._tick = self.router.scheduler.call_later(TICK, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        self._retry()

    def _ask(self, p: Pending, now: float) -> tuple[str | None, bool]:
        """Ask a peer for space for ``p``; (None, _) once asked, else (why nobody can help, whether for good)."""
        ring = self.alloc.ring
        if ring is None:
            return f"no address yet: {self.state()}", False
        where = _ip(p.claim) if p.claim is not None else f"in {p.subnet}"
        free: dict[int, int] = {}
        surely: dict[int, int] = {}  # free addresses that must lie inside the subnet, by the free counts
        extra = [r for r in p.subnet.reserved() if r not in self.universe.reserved()]
        for lo, hi, _token, entry in ring.ranges():
            if entry.owner != self.me and hi > p.subnet.lo and lo < p.subnet.hi and (entry.free or p.claim is not None):
                free[entry.owner] = free.get(entry.owner, 0) + max(entry.free, 1 if p.claim is not None else 0)
                outside = hi - lo - (min(hi, p.subnet.hi) - max(lo, p.subnet.lo))
                inside = entry.free - outside - sum(1 for r in extra if lo <= r < hi)
                surely[entry.owner] = surely.get(entry.owner, 0) + max(inside, 0)
        reachable = {o: n for o, n in free.items() if self.reachable(o) and o not in p.denied}
        if reachable:
            owners = sorted(reachable)
            donor = self._rng.choices(owners, weights=[reachable[o] for o in owners])[0]
            self._next_request += 1
            p.request_id, p.asked, p.asked_at = self._next_request, donor, now
            message = SpaceMessage(REQUEST, p.request_id, p.subnet.lo, p.subnet.hi)
            if self.channel.unicast(donor, message.encode()):
                self.metrics.ipam_space_requests.labels("sent").inc()
                return None, False
            p.asked = None
            p.denied.add(donor)
        away = [o for o in free if not self.reachable(o)]
        if p.claim is not None:
            owner = ring.owner_of(p.claim)
            if owner in away:
                return f"{where} belongs to {self._label(owner)}, which is unreachable (rmpeer it if it is gone)", False
            return f"{where} is in use on {self._label(owner)}", True
        again = sorted(o for o, n in surely.items() if n and self.reachable(o))
        if again:
            # They said no, yet by our ring they have free addresses in the subnet: the space moved while we asked (a
            # burst of allocations on several peers). Ask them again shortly rather than call the subnet full.
            p.denied.difference_update(again)
            p.retry_at = now + TICK
            return f"no free address {where}: {', '.join(self._label(o) for o in again)} had none to spare", False
        if away:
            return (
                f"no free address {where}: the {len(away)} peer(s) with free space are unreachable "
                f"({', '.join(self._label(o) for o in sorted(away))}; weft rmpeer them if they are gone)",
                False,
            )
        return f"no free address {where}: all {p.subnet.usable()} are in use", True

    # -- space requests between peers ------------------------------------------------------------------------------

    def _on_request(self, source: int, message: SpaceMessage) -> None:
        ring = self.alloc.ring
        span = _span_subnet(message.lo, message.hi)
        if ring is None:
            self._reply(source, SpaceMessage(DENY, message.request_id, reason="no ring yet"))
            return
        if message.hi - message.lo == 1:  # a claim of one address
            address = message.lo
            if ring.owner_of(address) != self.me:
                self._reply(source, SpaceMessage(DENY, message.request_id, reason=f"{_ip(address)} is not ours"))
                return
            taken = self.alloc.space.allocations.get(address)
            if taken is not None or address in self.universe.reserved():
                why = f"{_ip(address)} is held by {taken.label or taken.key}" if taken else "reserved"
                self._reply(source, SpaceMessage(DENY, message.request_id, reason=why))
                return
            given: tuple[int, int] | None = (address, address + 1)
        else:
            given = self.alloc.space.donation(self.alloc.our_ranges(), span)
        if given is not None and len(ring.entries) + 2 > MAX_TOKENS:
            given = None  # a grant adds up to two tokens: the ring must stay small enough to send whole
        if given is None:
            self.metrics.ipam_space_requests.labels("denied").inc()
            self._reply(source, SpaceMessage(DENY, message.request_id, reason=f"no free address in {span}"))
            return
        changed = self.alloc.grant(given[0], given[1], source)
        self.metrics.ipam_space_requests.labels("granted").inc()
        log.info("IPAM: gave %s (%d address(es)) to %s", _span_text(*given), given[1] - given[0], self._label(source))
        self._broadcast(changed)
        self._reply(source, SpaceMessage(GRANT, message.request_id, grant=RingUpdate.of(ring, self.me, changed)))

    def _reply(self, dest: int, message: SpaceMessage) -> None:
        self.channel.unicast(dest, message.encode())

    def _answered(self, request_id: int, source: int, *, denied: bool, reason: str = "") -> None:
        for p in self.pending:
            if p.request_id == request_id and p.asked == source:
                p.asked = None
                if denied:
                    p.denied.add(source)
                    log.debug("IPAM: %s had no space for %s: %s", self._label(source), p.label, reason)
        self._retry()

    # -- reclaim ---------------------------------------------------------------------------------------------------

    def rmpeer(self, names: list[str], force: bool = False) -> dict[str, int]:
        """Take the ranges of dead peers over; per peer, how many addresses came to us."""
        ring = self.alloc.ring
        if ring is None:
            raise IpamError(f"no ring yet ({self.state()}): there is nothing to reclaim")
        peers = [self.resolve(n) for n in names]
        for peer in peers:
            if peer == self.me:
                raise IpamError("rmpeer names this peer itself: run it on another peer of the mesh")
            if self.reachable(peer) and not force:
                raise IpamError(
                    f"{self._label(peer)} is reachable: rmpeer is for peers that are gone for good (stop it first, "
                    "or use --force if you are sure it will never allocate again)"
                )
        result: dict[str, int] = {}
        changed: dict[int, Entry] = {}
        for peer in peers:
            size = sum(hi - lo for lo, hi in ring.owned_by(peer))
            changed.update(self.alloc.take_over(peer))
            result[format_name(peer)] = size
            if size:
                log.info("IPAM: reclaimed %d address(es) of %s", size, self._label(peer))
        self._broadcast(changed)
        self._retry()
        return result

    def resolve(self, text: str) -> int:
        """A peer by name, or by nickname when only one peer known to us has it."""
        try:
            return parse_name(text)
        except ValueError:
            pass
        known = dict(self.nicknames)
        known.update({n: e.nickname for n, e in self.router.topology.peers.items()})
        matches = sorted(n for n, nick in known.items() if nick == text)
        if not matches:
            raise IpamError(f"no peer named or nicknamed {text!r} is known here (see weft status ipam)")
        if len(matches) > 1:
            names = ", ".join(format_name(m) for m in matches)
            raise IpamError(f"nickname {text!r} is ambiguous ({names}): give the peer name")
        return matches[0]

    # -- the mesh around us ----------------------------------------------------------------------------------------

    def reachable(self, peer: int) -> bool:
        return peer == self.me or self.router.routes.unicast(peer) is not None

    def _topology_changed(self) -> None:
        changed = False
        for name, entry in self.router.topology.peers.items():
            if self.nicknames.get(name) != entry.nickname:
                self.nicknames[name] = entry.nickname
                changed = True
        if changed and self._store is not None:
            self._store.save_nicknames(self.nicknames)
        if self.pending:
            self._retry()

    def _broadcast(self, changed: dict[int, Entry]) -> None:
        if changed and self.alloc.ring is not None:
            self.channel.broadcast(RingUpdate.of(self.alloc.ring, self.me, changed))

    def _refuse(self, reason: str, peer: int, message: str) -> None:
        self.metrics.ipam_refused.labels(reason).inc()
        now = self.router.scheduler.now()
        if now - self._logged.get((reason, peer), -LOG_AGAIN) >= LOG_AGAIN:
            self._logged[(reason, peer)] = now
            log.error("%s", message)
            self.refusals = [*self.refusals[-4:], message]

    # -- status ----------------------------------------------------------------------------------------------------

    def state(self) -> str:
        if self.alloc.ring is not None:
            if self.pending:
                return "waiting for space from other peers"
            return "ready"
        if self.init.mode == OBSERVER:
            return "observer: waiting for a peer that has a ring"
        if self.consensus is not None:
            return f"awaiting consensus: {len(self.consensus.votes)} of {self.consensus.quorum} peers"
        return "no ring"

    def status(self) -> dict[str, Any]:
        ring = self.alloc.ring
        peers: dict[int, dict[str, Any]] = {}
        total = self.universe.hi - self.universe.lo
        reserved = self.universe.reserved()
        if ring is not None:
            for lo, hi, _token, entry in ring.ranges():
                row = peers.setdefault(entry.owner, {"addresses": 0, "free": 0, "ranges": 0, "reserved": 0})
                row["addresses"] += hi - lo
                row["free"] += entry.free
                row["ranges"] += 1
                row["reserved"] += sum(1 for r in reserved if lo <= r < hi)
        rows = []
        for owner, row in sorted(peers.items()):
            rows.append(
                {
                    "name": format_name(owner),
                    "nickname": self._nickname(owner),
                    "addresses": row["addresses"],
                    "share": round(100.0 * row["addresses"] / total, 2),
                    "in_use": row["addresses"] - row["free"] - row["reserved"],
                    "free": row["free"],
                    "ranges": row["ranges"],
                    "reachable": self.reachable(owner),
                    "ourself": owner == self.me,
                }
            )
        allocations = [
            {"address": a.cidr(address), "holder": a.label or a.key, "key": a.key, "interface": a.host_ifname}
            for address, a in sorted(self.alloc.space.allocations.items())
        ]
        return {
            "range": str(self.universe),
            "default_subnet": str(self.default_subnet),
            "init": str(self.init),
            "state": self.state(),
            "seed": [format_name(n) for n in ring.seed] if ring is not None else [],
            "tokens": len(ring.entries) if ring is not None else 0,
            "peers": rows,
            "unreachable_ratio": self.unreachable_ratio(),
            "allocations": allocations,
            "pending": len(self.pending),
            "refused": list(self.refusals),
        }

    def unreachable_ratio(self) -> float:
        ring = self.alloc.ring
        if ring is None:
            return 0.0
        away = sum(hi - lo for lo, hi, _t, e in ring.ranges() if not self.reachable(e.owner))
        return away / (self.universe.hi - self.universe.lo)

    def update_metrics(self) -> None:
        m = self.metrics
        owned = self.alloc.owned()
        allocated = len(self.alloc.space.allocations)
        free = sum(self.alloc.space.free_count(lo, hi) for lo, hi in self.alloc.our_ranges())
        m.ipam_addresses.labels("owned").set(owned)
        m.ipam_addresses.labels("allocated").set(allocated)
        m.ipam_addresses.labels("free").set(free)
        m.ipam_unreachable_ratio.set(self.unreachable_ratio())
        m.ipam_pending.set(len(self.pending))

    def _nickname(self, peer: int) -> str:
        entry = self.router.topology.peers.get(peer)
        return entry.nickname if entry is not None else self.nicknames.get(peer, "")

    def _label(self, peer: int) -> str:
        nickname = self._nickname(peer)
        return f"{format_name(peer)}({nickname})" if nickname else format_name(peer)

    def _names(self, names: tuple[int, ...]) -> str:
        return ",".join(format_name(n) for n in names) or "(none)"


def _ip(address: int) -> str:
    return str(ipaddress.IPv4Address(address))


def _span_text(lo: int, hi: int) -> str:
    """``[lo, hi)`` as a CIDR when it is one, else as a first-last range."""
    size = hi - lo
    if size & (size - 1) == 0 and lo % size == 0:
        return f"{_ip(lo)}/{32 - size.bit_length() + 1}"
    return f"{_ip(lo)}-{_ip(hi - 1)}"


def _span_subnet(lo: int, hi: int) -> Subnet:
    """The subnet a space request names; an unaligned span reserves nothing."""
    size = hi - lo
    if size & (size - 1) == 0 and lo % size == 0:
        return Subnet(lo, hi, 32 - size.bit_length() + 1)
    return Subnet(lo, hi, 32)

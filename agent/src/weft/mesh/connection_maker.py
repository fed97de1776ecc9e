"""The connection maker: which addresses to dial, when, and how long to back off after a failure.

Targets are direct (from config or ``weft connect``) or discovered (addresses other peers report for
peers we are not connected to). A target whose peer is connected is left alone; a failing one is
retried with growing, jittered backoff; a connection that lived a while is retried at once, and so is
one the peer closed in order after it had worked (its agent restarting): the first dial goes out at once,
and should it fail, the backoff grows as for any failure, so a peer restarting again and again costs a
few dials per restart, never a storm.

Discovery has a ceiling: at the connection limit, discovered targets are held rather than dialled (direct ones are
still dialled: an operator asked for them), and a discovered peer that answers that it is at its own limit is not
dialled again until its entry shows it lost a connection, or after ``full_hold`` seconds. Held targets show in the
status with the reason and in ``weft_discovery_held{reason}``.

Discovered peers are dialled a few at a time, and how many adapts as TCP's window does: it starts at two, grows by
one with each handshake that succeeds, up to ``max_dialling``, and halves when one times out. A handshake timeout
means this agent or its peer is too busy to finish one in time: more at once would only time out too, and each one
lost costs both ends the work and a retry. A connect that times out does not count: the kernel accepts for a busy
agent, so that is an address nothing answers at (common in a hybrid mesh). A host joining a large mesh, or a
hundred hosts joining each other on shared cores, then dial as fast as they can complete handshakes
(``weft_discovery_dial_window``).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from weft.mesh.address import AddressError, peer_address
from weft.mesh.clock import Handle, Scheduler
from weft.mesh.router import Router

log = logging.getLogger(__name__)

FULL_PEER = "the peer is at its connection limit"
FIRST_WINDOW = 2  # discovered peers dialled at a time at first (see the module docstring)


@functools.lru_cache(maxsize=4096)
def _discovered_address(text: str) -> str | None:
    """A peer-reported address in canonical form, or None when it is not one we would accept from an operator
    (a peer's gossip is input too: it must not make us dial something ``weft connect`` would refuse). Cached: each
    check reads every address of every entry, ten thousand in a mesh of a hundred."""
    try:
        return peer_address(text) if isinstance(text, str) else None
    except AddressError:
        return None


@dataclass(slots=True)
class Target:
    address: str
    origin: str  # "config", "api" (weft connect) or "discovered"
    state: str = "waiting"  # waiting | connecting | connected | retrying | failed | held
    last_error: str | None = None
    next_try: float = 0.0
    interval: float = 0.0
    attempts: int = 0
    peer: int | None = None
    full_since: float | None = None  # when the peer said it is at its connection limit (held until it has room)
    full_conns: int = 0  # how many connections its entry listed then

    @property
    def direct(self) -> bool:
        return self.origin != "discovered"


class ConnectionMaker:
    def __init__(
        self,
        router: Router,
        scheduler: Scheduler,
        dial: Callable[[str], None],
        *,
        discovery: bool = True,
        initial_interval: float = 1.0,
        max_interval: float = 30.0,
        reset_after: float = 60.0,
        full_hold: float = 600.0,
        defer: float = 2.0,
        max_dialling: int = 8,
        on_direct_changed: Callable[[list[Target]], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._router = router
        self._scheduler = scheduler
        self._dial = dial
        self.discovery = discovery
        self.initial_interval = initial_interval
        self.max_interval = max_interval
        self.reset_after = reset_after
        self.full_hold = full_hold
        self.defer = defer
        self.max_dialling = max_dialling
        self._on_direct_changed = on_direct_changed
        self._rng = rng or random.Random()
        self.targets: dict[str, Target] = {}
        self._timer: Handle | None = None
        self._connected_since: dict[int, float] = {}
        self.window = float(min(FIRST_WINDOW, max_dialling))  # discovered peers dialled at a time, for now
        router.metrics.discovery_window.set(int(self.window))
        router.topology_listeners.append(self.check)

    # -- direct targets ---------------------------------------------------------------------------

    def set_origin_targets(self, origin: str, addresses: Iterable[str]) -> None:
        """Make the direct targets of one origin exactly ``addresses`` (config reload, --replace)."""
        wanted = {peer_address(a) for a in addresses}
        for address, target in list(self.targets.items()):
            if target.origin == origin and address not in wanted:
                del self.targets[address]
        for address in wanted:
            self._add_direct(address, origin)
        self._direct_changed()

    def connect(self, addresses: Iterable[str], replace: bool = False) -> list[str]:
        normalized = [peer_address(a) for a in addresses]
        if replace:
            for address, target in list(self.targets.items()):
                if target.direct and address not in normalized:
                    del self.targets[address]
        for address in normalized:
            self._add_direct(address, "api")
        self._direct_changed()
        return normalized

    def forget(self, addresses: Iterable[str]) -> list[str]:
        forgotten = []
        for address in [peer_address(a) for a in addresses]:  # all valid, or nothing changes
            target = self.targets.get(address)
            if target is not None and target.direct:
                del self.targets[address]
                forgotten.append(address)
        self._direct_changed()
        return forgotten

    def _add_direct(self, address: str, origin: str) -> None:
        target = self.targets.get(address)
        if target is None:
            self.targets[address] = Target(address, origin, next_try=self._scheduler.now())
        elif not target.direct or (origin == "api" and target.origin == "config"):
            target.origin = origin

    def _direct_changed(self) -> None:
        if self._on_direct_changed is not None:
            self._on_direct_changed([t for t in self.targets.values() if t.direct])
        self.check()

    # -- results from the transport ----------------------------------------------------------------

    def dial_finished(
        self, address: str, peer: int | None, error: str | None, *, full: bool = False, timed_out: bool = False
    ) -> None:
        """The transport's answer to a dial: the peer it reached (if any), why it failed (if so), whether the
        peer said it is at its connection limit (``full``), and whether its handshake ran out of time (``timed_out``:
        one end too busy)."""
        target = self.targets.get(address)
        if target is None:
            return
        if not target.direct:
            self._adapt_window(success=error is None, timed_out=timed_out)
        now = self._scheduler.now()
        if peer is not None:
            target.peer = peer
        if error is None or (peer is not None and peer in self._router.connections):
            target.state, target.last_error, target.attempts = "connected", None, 0
            target.interval = self.initial_interval
            if peer is not None:
                self._connected_since.setdefault(peer, now)
        elif peer == self._router.ourself.name:
            target.state, target.last_error, target.next_try = "failed", error, float("inf")
        elif full and not target.direct:
            # Retrying would only be refused again: wait until the peer has room (see _release_full).
            entry = self._router.topology.peers.get(target.peer) if target.peer is not None else None
            target.state, target.last_error, target.next_try = "held", FULL_PEER, float("inf")
            target.full_since, target.full_conns = now, len(entry.connections) if entry is not None else 0
            log.info("not dialling %s again for now: the peer is at its connection limit", address)
        else:
            target.interval = min(self.max_interval, max(self.initial_interval, target.interval * 1.5))
            target.next_try = now + self._jittered(target.interval)
            target.last_error = error
            target.state = "retrying" if target.attempts < 3 else "failed"
            log.debug("dial %s failed (%s); next try in %.1fs", address, error, target.next_try - now)
        self.check()

    def _adapt_window(self, *, success: bool, timed_out: bool) -> None:
        """Grow the number of discovered peers dialled at a time by one on a success, halve it on a timeout."""
        if success:
            self.window = min(float(self.max_dialling), self.window + 1)
        elif timed_out:
            self.window = max(1.0, self.window / 2)
        self._router.metrics.discovery_window.set(int(self.window))

    def connection_closed(self, peer: int, *, clean: bool = False) -> None:
        """A connection ended: retry its targets at once if it had lived long, or if the peer closed it in order
        (``clean``) after it had worked for at least the initial interval; else after backoff."""
        now = self._scheduler.now()
        lived = now - self._connected_since.pop(peer, now)
        for target in self.targets.values():
            if target.peer == peer:
                target.state = "waiting"
                if lived >= self.reset_after:
                    target.interval, target.next_try = self.initial_interval, now
                elif clean and lived >= self.initial_interval:
                    # Most likely its agent restarting: the first dial now, the backoff as it stands after that.
                    target.interval, target.next_try = max(self.initial_interval, target.interval), now
                else:
                    target.interval = max(self.initial_interval, target.interval)
                    target.next_try = now + self._jittered(target.interval)
        self.check()

    def _jittered(self, interval: float) -> float:
        """Between half and all of ``interval`` (capped): peers that failed together retry apart."""
        return min(self.max_interval, interval) * self._rng.uniform(0.5, 1.0)

    def connection_opened(self, peer: int) -> None:
        self._connected_since.setdefault(peer, self._scheduler.now())

    # -- deciding what to dial --------------------------------------------------------------------

    def _discover(self) -> None:
        """Add targets for peers we know of but are not connected to; drop stale discovered ones."""
        topology = self._router.topology
        ourself = self._router.ourself.name
        wanted: dict[str, int] = {}
        if self.discovery:
            for entry in topology.peers.values():
                for c in entry.connections:
                    if c.peer != ourself and c.peer in topology.peers and c.peer not in self._router.connections:
                        address = _discovered_address(c.address)
                        if address is not None:
                            wanted.setdefault(address, c.peer)
        for address, target in list(self.targets.items()):
            if target.origin == "discovered" and address not in wanted and target.state != "connecting":
                del self.targets[address]
        now = self._scheduler.now()
        for address, peer in wanted.items():
            target = self.targets.get(address)
            if target is None:
                # Of two peers that discover each other, the lower name dials; the other waits a moment for that
                # connection and dials only if none came (it may not be reachable that way): a forming dense mesh
                # then pays for one handshake per pair, not two, half of them thrown away as duplicates.
                wait = 0.0 if ourself < peer else self._rng.uniform(self.defer, 2 * self.defer)
                self.targets[address] = Target(address, "discovered", next_try=now + wait, peer=peer)
            elif target.peer is None:
                target.peer = peer

    def check(self) -> None:
        self._discover()
        now = self._scheduler.now()
        connected = self._router.connections
        room = self._router.conn_limit - len(connected)
        room -= sum(1 for t in self.targets.values() if t.state == "connecting")
        # Discovered peers are dialled a few at a time: a peer told of one member of a mesh of a hundred learns of
        # them all at once, and a hundred handshakes at once on every peer leave the CPU to none of them (they time
        # out, and are dialled again later); the rest wait for a dial to end (check runs then).
        slots = int(self.window) - sum(1 for t in self.targets.values() if t.state == "connecting" and not t.direct)
        soonest: float | None = None
        held = {"own_limit": 0, "peer_full": 0, "view_settling": 0}
        # While our view still grows, discovered peers wait for it to settle (Router.view_settles_in): the peers
        # that tell us of the others need the CPU first.
        settling = self._router.view_settles_in()
        for target in sorted(self.targets.values(), key=lambda t: not t.direct):  # direct ones first
            if target.state == "connecting":
                continue
            if target.peer is not None and target.peer in connected:
                target.state, target.last_error, target.full_since = "connected", None, None
                continue
            if target.full_since is not None and not self._release_full(target, now):
                held["peer_full"] += 1
                soonest = _sooner(soonest, target.full_since + self.full_hold)
                continue
            if target.state in ("connected", "held"):
                target.state = "waiting"
                if target.last_error == self._own_limit():
                    target.last_error = None
            if not target.direct and room <= 0:
                target.state, target.last_error = "held", self._own_limit()
                held["own_limit"] += 1
                continue  # dialled when a connection ends (check runs then)
            if target.next_try <= now:
                if not target.direct:
                    if settling > 0:
                        held["view_settling"] += 1
                        soonest = _sooner(soonest, now + settling)
                        continue
                    if slots <= 0:
                        continue
                    slots -= 1
                target.state = "connecting"
                target.attempts += 1
                room -= 1
                self._dial(target.address)
            else:
                soonest = _sooner(soonest, target.next_try)
        for reason, count in held.items():
            self._router.metrics.discovery_held.labels(reason).set(count)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if soonest is not None and soonest != float("inf"):
            self._timer = self._scheduler.call_later(soonest - now, self._on_timer)

    def _own_limit(self) -> str:
        return f"connection limit ({self._router.conn_limit}) reached: not dialling discovered peers"

    def _release_full(self, target: Target, now: float) -> bool:
        """Whether a peer that said it was full may have room now: its entry lists fewer connections than then (it
        lost one), or ``full_hold`` has passed. Released, it is dialled after a jittered pause, so the peers it
        refused do not all take the one free place at once."""
        assert target.full_since is not None
        entry = self._router.topology.peers.get(target.peer) if target.peer is not None else None
        fewer = entry is not None and len(entry.connections) < target.full_conns
        if not fewer and now - target.full_since < self.full_hold:
            return False
        target.full_since, target.last_error = None, None
        target.next_try = now + self._jittered(self.initial_interval)
        return True

    def _on_timer(self) -> None:
        self._timer = None
        self.check()

    def dialling(self) -> set[int]:
        """The peers we are dialling or about to dial, and have not given up on yet: soon our neighbours."""
        active = ("waiting", "connecting", "retrying")
        return {t.peer for t in self.targets.values() if t.peer is not None and t.state in active}

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def status(self) -> list[dict]:
        now = self._scheduler.now()
        return [
            {
                "address": t.address,
                "origin": t.origin,
                "state": t.state,
                "last_error": t.last_error,
                "next_try": None
                if t.state in ("connected", "connecting", "held") or t.next_try == float("inf")
                else max(0.0, round(t.next_try - now, 2)),
            }
            for t in sorted(self.targets.values(), key=lambda t: (not t.direct, t.address))
        ]


def _sooner(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)

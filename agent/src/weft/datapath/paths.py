"""Per-connection path choice: which way frames to a direct neighbour go, and why not faster.

Each neighbour gets heartbeats on every path it may use: sealed control messages over the userspace
path (UDP, the listen port), VXLAN probes on the kernel fast path, and padded probes of several
sizes that find the path MTU. The neighbour reports back what it heard, and traffic goes on the
best path that is up: fast, then the userspace path ("sleeve"); a peer with neither is reached
through a relay, if the mesh has one. Both ends decide from the same evidence, so they agree, and a
broadcast that takes the kernel path to a peer is not delivered to it again over the sleeve.

Probing is paced per path (``PathState.pace``): a path that carried traffic lately, or that is new, is probed
every interval; an idle one every ``IDLE_EVERY`` intervals, so a host with a hundred quiet neighbours does not
spend its CPU on heartbeats. Each round asks the neighbour to answer at once (``rq``), so a path's evidence comes
at the rate its own end chose, whatever the other end's rate; rounds start at random phases and are jittered, so
the neighbours' heartbeats never come in one burst. A peer that never asks (an older version) is probed every
interval, as it probes us.
"""

from __future__ import annotations

import ipaddress
import random
from collections import deque
from dataclasses import dataclass, field, replace

from weft.datapath.probe import VXLAN_OVERHEAD
from weft.mesh.crypto import SessionKeys

FAST = "fast"
SLEEVE = "sleeve"
RELAY = "relay"
PATHS = (FAST, SLEEVE, RELAY)

UDP_IP_OVERHEAD = 28
# Path MTUs tried, largest first; the local route's MTU is tried as well.
PMTU_LADDER = (1500, 1400, 1280, 1000, 576)
REPORTS_KEPT = 2  # probe rounds to remember: one lost probe must not shrink the MTU
IDLE_EVERY = 10  # intervals between probe rounds on a path that carries no traffic
BUSY_FOR = 10  # intervals a path counts as carrying traffic after the last unicast frame crossed it
FIRST_ROUNDS = 3  # a new connection's first rounds come every interval: its path and MTU are found at once
JITTER = 0.25  # a round comes between (1 - JITTER) and 1 times the pace after the last one


def ladder(route_mtu: int) -> list[int]:
    """The IP packet sizes to probe on a path whose first hop has ``route_mtu``."""
    return sorted({route_mtu, *(s for s in PMTU_LADDER if s < route_mtu)}, reverse=True)


def trusted(ip: str, subnets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in subnets)


@dataclass(slots=True)
class PathState:
    """What we know of the paths to one direct neighbour (one control connection)."""

    peer: int
    ip: str
    udp_addr: tuple[str, int]
    keys: SessionKeys | None
    epoch: int  # the control connection's id: new keys mean a new state
    we_trust: bool  # its underlay address is in our trusted subnets
    route_mtu: int
    assume_fast_until: float = 0.0  # after a restart, keep the kernel's fast path until probes decide
    assume_sleeve_until: float = 0.0  # after a reconnection, carry data on the sleeve until heartbeats decide
    answered: bool = False  # we answered this connection's first heartbeat (the far end need not wait a round)
    remote_uid: int = 0  # the peer's run: its probe sequence starts again when it restarts
    peer_trusts: bool = False
    # Whether the peer's kernel floods to us over the fast path (its heartbeats' "kf"); None: it never said (an
    # older version). Its broadcasts and multicasts that come over the sleeve reach our containers only if not.
    peer_floods: bool | None = None
    # The trust of the peer's previous run, while a fast path is held across its restart (assume_fast_until) and
    # until the new run's first heartbeat says what it trusts now: the kernel keeps forwarding, and the first
    # word of the new run (which may be "no") decides.
    held_trust: bool = False
    last_heard: float | None = None  # last authenticated control message over UDP
    fast_seq: int = 0  # our last fast-path probe
    fast_acked: int = 0  # the newest of our probes the peer reported hearing
    fast_acked_at: float | None = None
    heard_fast_seq: int = 0  # the newest probe of theirs we heard
    heard_fast_at: float | None = None
    max_rx_size: int = 0  # largest path-MTU probe heard from them since our last heartbeat
    ticks: int = 0  # heartbeat rounds sent, to pace the path-MTU probes
    pmtu_reports: deque[int] = field(default_factory=lambda: deque(maxlen=REPORTS_KEPT))
    path: str | None = None
    reason: str = ""
    announced_size: int = 0  # the datagram size the sleeve was last given
    e2e: bool = False  # the neighbour reads end-to-end datagrams and passes them on (handshake capability)
    echoes: bool = False  # the peer answers a heartbeat that asks (rq): it may be probed at our own pace
    pace_s: float = 0.0  # seconds between our probe rounds to it, as last chosen
    next_round: float = 0.0  # when our next probe round to it is due
    asked_at: float | None = None  # when the peer's last round (a heartbeat that asks) reached us
    turn_at: float = 0.0  # when our last round was due (sent, or left to the peer's: see covered_by_peer)
    last_traffic: float | None = None  # when frames last crossed this path (either way)
    traffic_mark: tuple[int, int] = (0, 0)  # the sleeve's and the fast path's counters for it, at the last look

    @property
    def encrypted(self) -> bool:
        return self.keys is not None

    def fast_allowed(self) -> bool:
        """Unencrypted traffic is allowed: no mesh secret, or both ends trust each other's subnet."""
        return not self.encrypted or (self.we_trust and self.peer_trusts)

    def fast_holdable(self) -> bool:
        """As fast_allowed, with the peer's previous run's trust standing in until its new run speaks."""
        return not self.encrypted or (self.we_trust and (self.peer_trusts or self.held_trust))

    def pmtu(self) -> int | None:
        """The largest IP packet the neighbour reports getting from us lately, if it reported any."""
        best = max(self.pmtu_reports, default=0)
        return best + UDP_IP_OVERHEAD if best else None

    def datagram_size(self) -> int:
        pmtu = self.pmtu() or self.route_mtu
        return min(pmtu, self.route_mtu) - UDP_IP_OVERHEAD

    def heard_fast(self, now: float, dead: float) -> int:
        """The probe sequence to report back: the newest we heard, while it is fresh."""
        if self.heard_fast_at is not None and now - self.heard_fast_at <= dead:
            return self.heard_fast_seq
        return 0

    def on_heartbeat(self, now: float, trusts: bool, fast_seq: int, max_size: int, floods: bool | None = None) -> None:
        self.peer_trusts = trusts
        self.peer_floods = floods  # every heartbeat of a version that knows says it: None is an older one
        self.held_trust = False
        if fast_seq > self.fast_acked or (fast_seq and fast_seq == self.fast_acked):
            self.fast_acked = fast_seq
            self.fast_acked_at = now
        if max_size:
            self.pmtu_reports.append(max_size)

    def resumed(self, now: float, *, keys: SessionKeys | None, epoch: int, remote_uid: int, hold: float) -> PathState:
        """The state for a new connection to the same peer at the same address, keeping what still holds.

        A re-key (same run of the peer) keeps all the evidence. A new run of the peer keeps what we learnt
        of the path itself (MTU, whether it carried our probes), but not the sequence of its probes, which
        starts again: comparing the new run's probes with the old run's numbers would ignore them, and the
        peer would never hear that we get its probes. A path that was fast stays fast for ``hold`` seconds
        while fresh probes decide, so traffic the kernel carries does not stop for a moment; a path that was the
        sleeve carries data with the new keys at once, for ``hold`` seconds unless heartbeats confirm it, so a
        restarted peer's traffic does not wait for a heartbeat round.
        """
        fresh = replace(self, keys=keys, epoch=epoch, remote_uid=remote_uid, answered=False)
        was_fast = self.path == FAST and self.fast_allowed()
        if remote_uid != self.remote_uid:
            fresh.heard_fast_seq, fresh.heard_fast_at = 0, None
            fresh.echoes = False  # the new run may be another version: it says so in its first heartbeat
            if keys is not None:
                fresh.peer_trusts = False  # the new run's trust comes with its first heartbeat...
                fresh.held_trust = was_fast  # ...and until then, the hold goes on the old run's
        if was_fast and fresh.fast_holdable():
            fresh.assume_fast_until = max(fresh.assume_fast_until, now + hold)
        elif self.path == SLEEVE:
            fresh.assume_sleeve_until = max(fresh.assume_sleeve_until, now + hold)
        return fresh

    def sleeve_up(self, now: float, dead: float) -> bool:
        heard = self.last_heard is not None and now - self.last_heard <= dead
        return heard or now < self.assume_sleeve_until

    def fast_up(self, now: float, dead: float) -> bool:
        return (
            self.fast_allowed()
            and self.fast_acked_at is not None
            and now - self.fast_acked_at <= dead
            and self.fast_acked >= self.fast_seq - 3
        )

    # -- pacing ---------------------------------------------------------------------------------------------

    def busy(self, now: float, interval: float) -> bool:
        """Frames crossed this path lately, or it is being held across a restart: it is probed every interval."""
        recent = self.last_traffic is not None and now - self.last_traffic <= BUSY_FOR * interval
        return recent or now < max(self.assume_fast_until, self.assume_sleeve_until)

    def note_traffic(self, now: float, sleeve: int, fast: int) -> bool:
        """Take the counters of frames that crossed this path (sleeve, fast); True if they moved since last time."""
        moved = (sleeve, fast) != self.traffic_mark
        self.traffic_mark = (sleeve, fast)
        if moved:
            self.last_traffic = now
        return moved

    def pace(self, now: float, interval: float, dead_rounds: int) -> bool:
        """Choose the time between our probe rounds to this peer; True if a round is due now.

        Every interval while the path carries traffic, is new, or the peer does not answer requests (an older
        version expects a heartbeat every interval); every ``IDLE_EVERY`` intervals otherwise. Speeding up brings
        a round at once, and what was still fresh at the slow pace counts from now at the fast one (``dead_rounds``
        of the new pace for the answers to come), so a path that carries traffic again is judged in seconds.
        """
        idle = self.echoes and self.ticks >= FIRST_ROUNDS and not self.busy(now, interval)
        pace = interval * IDLE_EVERY if idle else interval
        if pace < self.pace_s:
            old_dead = dead_rounds * self.pace_s
            if self.last_heard is not None and now - self.last_heard <= old_dead:
                self.last_heard = now
            if self.fast_acked_at is not None and now - self.fast_acked_at <= old_dead:
                self.fast_acked_at = now
            self.next_round = now
        self.pace_s = pace
        return now >= self.next_round

    def round_done(self, now: float, rng: random.Random) -> None:
        self.ticks += 1
        self.turn_at = now
        self.next_round = now + self.pace_s * rng.uniform(1 - JITTER, 1.0)

    def covered_by_peer(self, interval: float) -> bool:
        """Whether our round due now can be left out: the path is idle and sealed with no fast path to probe, and the
        peer's own round has asked us since our last turn. Its ask told us we hear it, and our answer told it it hears
        us: a second round the other way would say the same again. Of two peers, the first to run a round then keeps
        running them and the other answers, so an idle pair costs two datagrams a round instead of four. A round
        left out counts as our turn, so if the peer leaves its next one to us, ours goes out."""
        return (
            self.echoes
            and self.pace_s > interval
            and self.encrypted
            and not self.fast_allowed()
            and self.asked_at is not None
            and self.asked_at > self.turn_at
        )

    def round_covered(self, now: float, rng: random.Random) -> None:
        """Our round was left out (``covered_by_peer``): the next is due a pace from now."""
        self.turn_at = now
        self.next_round = now + self.pace_s * rng.uniform(1 - JITTER, 1.0)

    def dead_after(self, dead_rounds: int, interval: float) -> float:
        """Silence after which this path is down: ``dead_rounds`` of our rounds at the pace we chose."""
        return dead_rounds * (self.pace_s or interval)

    def choose(self, now: float, dead: float, mtu: int, vxlan_port: int, udp_port: int) -> bool:
        """Set ``path`` and ``reason``; True if the path changed."""
        before = self.path
        if self.fast_up(now, dead) or (self.fast_holdable() and now < self.assume_fast_until):
            self.path, self.reason = FAST, ""
        else:
            self.reason = self._why_not_fast(mtu, vxlan_port)
            if self.sleeve_up(now, dead):
                self.path = SLEEVE
            else:
                self.path = None
                self.reason += f"; no heartbeat over UDP {udp_port} for {dead:g}s"
        return self.path != before

    def _why_not_fast(self, mtu: int, vxlan_port: int) -> str:
        if self.encrypted and not self.we_trust:
            return f"encryption required: {self.ip} is not in a trusted subnet"
        if self.encrypted and not self.peer_trusts:
            return "encryption required: the peer does not trust this host's subnet"
        pmtu = self.pmtu()
        if pmtu is not None and pmtu < mtu + VXLAN_OVERHEAD:
            return f"path MTU {pmtu} is below the {mtu + VXLAN_OVERHEAD} the fast path needs"
        return f"no answer to fast-path probes (is UDP {vxlan_port} blocked?)"

    def frame_mtu(self, mtu: int, sleeve_overhead: int) -> int:
        """The largest IP packet that crosses to this neighbour in one datagram on its path."""
        if self.path == FAST:
            return mtu
        return min(mtu, self.datagram_size() - sleeve_overhead)

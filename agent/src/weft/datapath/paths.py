"""Per-connection path choice: which way frames to a direct neighbour go, and why not faster.

Each neighbour gets heartbeats on every path it may use: sealed control messages over the userspace
path (UDP, the listen port), VXLAN probes on the kernel fast path, and padded probes of several
sizes that find the path MTU. The neighbour reports back what it heard, and traffic goes on the
best path that is up: fast, then the userspace path ("sleeve"); a peer with neither is reached
through a relay, if the mesh has one. Both ends decide from the same evidence, so they agree, and a
broadcast that takes the kernel path to a peer is not delivered to it again over the sleeve.
"""

from __future__ import annotations

import ipaddress
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


def ladder(route_mtu: int) -> list[int]:
    """The IP packet sizes to probe on a path whose first hop has ``route_mtu``."""
    return sorted({route_mtu, *(s for s in PMTU_LADDER if s < route_mtu)}, reverse=True)


def trusted(ip: str, subnets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in subnets)


@dataclass
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

    def on_heartbeat(self, now: float, trusts: bool, fast_seq: int, max_size: int) -> None:
        self.peer_trusts = trusts
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

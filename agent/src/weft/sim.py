"""An in-process mesh simulator: the real router, gossip and connection maker over a fake transport.

Time is virtual (a discrete-event clock), links have a fixed latency, and a dial reaches the peer
listening at the address unless the two are partitioned. Everything above the transport is the
same code the agent runs, so what converges here converges for real.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from weft.mesh.clock import VirtualScheduler
from weft.mesh.connection_maker import ConnectionMaker
from weft.mesh.gossip import GossipSender
from weft.mesh.handshake import CAPABILITIES
from weft.mesh.peer import PeerInfo, format_name
from weft.mesh.router import Router
from weft.metrics import Metrics

if TYPE_CHECKING:
    from weft.dns.service import Dns
    from weft.ipam.persist import IpamStore
    from weft.ipam.service import Ipam

SIM_EPOCH = 1_700_000_000.0  # the wall clock (seconds) at virtual time 0, for what takes the time of day


class SimConn:
    """One end of a simulated control connection."""

    def __init__(self, net: SimNetwork, owner: SimPeer, remote: SimPeer, outbound: bool, conn_uid: int) -> None:
        self.net = net
        self.owner = owner
        self.remote = remote.info
        self.remote_address = remote.address
        self.outbound = outbound
        self.conn_uid = conn_uid
        self.encrypted = False
        self.remote_ip: str | None = None  # no socket, no data path
        self.data_keys = None
        self.secret = None
        self.caps = net.caps  # what the remote peer reads beyond protocol 1 (handshake.CAPABILITIES)
        self.info = "simulated"
        self.other: SimConn | None = None
        self.closed = False
        self._flush_scheduled = False
        self.sender = GossipSender(self._wake)

    def _wake(self) -> None:
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self.net.scheduler.call_later(0.0, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or self.other is None:
            return
        messages = self.sender.take()
        self.owner.router.count_sent(messages)
        self.net.messages += len(messages)
        other = self.other
        self.net.scheduler.call_later(self.net.latency, lambda: other.deliver(messages))

    def deliver(self, messages: list[dict]) -> None:
        if self.closed:
            return
        for msg in messages:
            self.owner.router.handle_message(self, msg)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.owner.router.remove_connection(self, reason)
        self.owner.maker.connection_closed(self.remote.name)
        if self.other is not None:
            self.other.close(reason)


@dataclass
class SimPeer:
    info: PeerInfo
    address: str
    router: Router
    maker: ConnectionMaker


@dataclass
class SimNetwork:
    """Peers addressed ``simN:6783``; ``blocked`` holds unordered pairs of peer indexes that cannot talk."""

    latency: float = 0.001
    gossip_interval: float = 30.0
    seed: int = 1
    scheduler: VirtualScheduler = field(default_factory=VirtualScheduler)
    peers: list[SimPeer] = field(default_factory=list)
    blocked: set[frozenset[int]] = field(default_factory=set)
    messages: int = 0
    conn_limit: int = 1000  # each peer's; a peer at its limit refuses a dial as the transport does (``full``)
    # What every peer says it reads beyond protocol 1: the agent's own (an empty set: peers of an older release).
    caps: frozenset[str] = frozenset(CAPABILITIES)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._by_address: dict[str, int] = {}

    def add_peer(self, targets: list[str], discovery: bool = True) -> SimPeer:
        index = len(self.peers)
        info = PeerInfo(0x020000000000 + index + 1, f"sim{index}", self.rng.getrandbits(63) + 1)
        address = f"sim{index}:6783"
        router = Router(
            info,
            self.scheduler,
            Metrics(),
            gossip_interval=self.gossip_interval,
            conn_limit=self.conn_limit,
            rng=random.Random(self.rng.random()),
        )
        maker = ConnectionMaker(
            router,
            self.scheduler,
            lambda a, i=index: self._dial(i, a),
            discovery=discovery,
            rng=random.Random(self.rng.random()),
        )
        peer = SimPeer(info, address, router, maker)
        self.peers.append(peer)
        self._by_address[address] = index
        router.start()
        maker.set_origin_targets("config", targets)
        return peer

    def _dial(self, index: int, address: str) -> None:
        self.scheduler.call_later(self.latency, lambda: self._connect(index, address))

    def _connect(self, index: int, address: str) -> None:
        dialer = self.peers[index]
        remote_index = self._by_address.get(address)
        if remote_index is None:
            dialer.maker.dial_finished(address, None, "no such host")
            return
        if frozenset((index, remote_index)) in self.blocked:
            dialer.maker.dial_finished(address, None, "timed out")  # a connect that no answer came to: not load
            return
        acceptor = self.peers[remote_index]
        if remote_index != index and len(acceptor.router.connections) >= acceptor.router.conn_limit:
            dialer.maker.dial_finished(address, None, "peer_full: the peer is at its connection limit", full=True)
            return
        uid = self.rng.getrandbits(64)
        out = SimConn(self, dialer, acceptor, True, uid)
        inc = SimConn(self, acceptor, dialer, False, uid)
        out.other, inc.other = inc, out
        refused = acceptor.router.add_connection(inc) if remote_index != index else "connection to self"
        if refused is None:
            acceptor.maker.connection_opened(dialer.info.name)
            refused = dialer.router.add_connection(out)
            if refused is None:
                dialer.maker.connection_opened(acceptor.info.name)
            else:
                inc.closed = True
                acceptor.router.remove_connection(inc, refused)
        dialer.maker.dial_finished(address, acceptor.info.name, refused)

    def partition(self, groups: list[list[int]]) -> None:
        """Cut every link between groups, closing connections that cross."""
        for i, a in enumerate(groups):
            for b in groups[i + 1 :]:
                for x in a:
                    for y in b:
                        self.blocked.add(frozenset((x, y)))
        for peer_index, peer in enumerate(self.peers):
            for conn in list(peer.router.connections.values()):
                other = self._by_address[conn.remote_address]
                if frozenset((peer_index, other)) in self.blocked:
                    conn.close("partitioned")  # type: ignore[attr-defined]

    def heal(self) -> None:
        self.blocked.clear()

    def converged(self, exact: bool = False) -> bool:
        """Every peer knows every peer with its current UID (``exact``: and its latest version)."""
        n = len(self.peers)
        if any(len(p.router.topology.peers) != n for p in self.peers):
            return False  # the cheap test first: it is checked often, and fails until the very end
        # Compared as dicts of (uid, version) by name, built without a Python loop: this is N views of N peers.
        key = operator.attrgetter("uid", "version") if exact else operator.attrgetter("uid")
        owners = {p.info.name: key(p.router.topology.our_entry) for p in self.peers}
        for peer in self.peers:
            view = peer.router.topology.peers
            if dict(zip(view.keys(), map(key, view.values()), strict=True)) != owners:
                return False
        return True

    def gossip_bytes_out(self) -> float:
        total = 0.0
        for peer in self.peers:
            total += sum(n for (_, direction), n in peer.router.metrics.gossip_bytes.items() if direction == "out")
        return total


def chain_of_strangers(n: int, seed: int = 1, discovery: bool = False, **kwargs) -> SimNetwork:
    """``n`` peers where each knows exactly one earlier peer, chosen at random."""
    net = SimNetwork(seed=seed, **kwargs)
    rng = random.Random(seed)
    for i in range(n):
        targets = [] if i == 0 else [f"sim{rng.randrange(i)}:6783"]
        net.add_peer(targets, discovery=discovery)
    return net


def start_ipam(
    net: SimNetwork,
    peer: SimPeer,
    universe: str = "10.32.0.0/12",
    init: str | None = None,
    peers: int | None = None,
    store: IpamStore | None = None,
) -> Ipam:
    """The real IPAM on one peer (``store``: a state database, none by default). ``init`` defaults to a seed of every
    peer of ``net``; ``peers`` (for a consensus quorum) to the peers of ``net``."""
    from weft.ipam.bootstrap import parse_init, parse_range
    from weft.ipam.service import Ipam
    from weft.mesh.peer import format_name

    space = parse_range(universe)
    how = parse_init(init or "seed=" + ",".join(format_name(p.info.name) for p in net.peers))
    ipam = Ipam(
        peer.router,
        peer.router.metrics,
        universe=space,
        default_subnet=space,
        init=how,
        quorum=how.quorum((peers or len(net.peers)) - 1),
        store=store,
        rng=random.Random(net.rng.random()),
    )
    ipam.start()
    return ipam


def add_ipam(net: SimNetwork, universe: str = "10.32.0.0/12", init: str | None = None) -> list[Ipam]:
    """The real IPAM on every peer of ``net``: seeded by all of them unless ``init`` says otherwise."""
    init = init or "seed=" + ",".join(format_name(p.info.name) for p in net.peers)
    return [start_ipam(net, peer, universe, init) for peer in net.peers]


def start_dns(net: SimNetwork, peer: SimPeer, domain: str = "weft.local.") -> Dns:
    """The real DNS name table on one peer; its wall clock is the virtual one, from SIM_EPOCH."""
    from weft.dns.service import Dns

    return Dns(peer.router, peer.router.metrics, domain=domain, wall=lambda: SIM_EPOCH + net.scheduler.now())


def add_dns(net: SimNetwork, domain: str = "weft.local.") -> list[Dns]:
    """The real DNS name table on every peer of ``net``."""
    return [start_dns(net, peer, domain) for peer in net.peers]

"""A mesh where some peers lack a gossip channel (a later version added it) still carries that channel.

Real routers in the simulator: the outer peers have a channel, the ones between them do not, and the outer
peers still hear each other's broadcasts and unicasts through them. The rule is in docs/protocol.md,
"Compatibility between versions".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from weft.mesh.codec import expect, pack, unpack
from weft.mesh.gossip import GossipChannel, SeenPayloads
from weft.sim import SimNetwork, SimPeer

CHANNEL = "names"  # a channel "of a later version": only some peers have it


@dataclass
class Names:
    """A grow-only set of names: the smallest CRDT there is."""

    items: set[str] = field(default_factory=set)

    def merge(self, other: Names) -> None:
        self.items |= other.items

    def encode(self) -> bytes:
        return pack(sorted(self.items))


class NamesGossiper:
    def __init__(self) -> None:
        self.state = Names()
        self.unicasts: list[tuple[int, bytes]] = []

    def gossip(self) -> Names | None:
        return Names(set(self.state.items)) if self.state.items else None

    def on_gossip(self, payload: bytes) -> Names | None:
        return self._merge(payload)

    def on_gossip_broadcast(self, source: int, payload: bytes) -> Names | None:
        return self._merge(payload)

    def on_gossip_unicast(self, source: int, payload: bytes) -> None:
        self.unicasts.append((source, payload))

    def _merge(self, payload: bytes) -> Names | None:
        new = {expect(n, str, CHANNEL, "name") for n in expect(unpack(payload, CHANNEL), list, CHANNEL, "names")}
        new -= self.state.items
        if not new:
            return None
        self.state.items |= new
        return Names(new)


class NamesPeer:
    def __init__(self, peer: SimPeer) -> None:
        self.peer = peer
        self.gossiper = NamesGossiper()
        self.channel: GossipChannel = peer.router.new_channel(CHANNEL, self.gossiper)

    def add(self, name: str) -> None:
        self.gossiper.state.items.add(name)
        self.channel.broadcast(Names({name}))


def sample(peer: SimPeer, name: str, **labels: str) -> float:
    return peer.router.metrics.registry.get_sample_value(name, labels) or 0.0


def line(n: int) -> SimNetwork:
    """``n`` peers in a line, each told only of the one before it: no other path between the ends."""
    net = SimNetwork(latency=0.01)
    for i in range(n):
        net.add_peer([] if i == 0 else [f"sim{i - 1}:6783"], discovery=False)
    return net


def settle(net: SimNetwork, seconds: float = 1.0) -> None:
    """Let virtual time pass with nothing new happening (routes may be recomputed lazily, on a timer)."""
    net.scheduler.call_later(seconds, lambda: None)
    net.scheduler.run_until(lambda: False, net.scheduler.now() + seconds)


def run(net: SimNetwork, done, seconds: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    return net.scheduler.run_until(done, net.scheduler.now() + seconds, resolution=0.01)


@pytest.mark.parametrize("between", [1, 2])
def test_the_outer_peers_exchange_a_channel_the_peers_between_them_do_not_have(between: int) -> None:
    net = line(between + 2)
    assert run(net, lambda: net.converged(exact=True))
    first, last = NamesPeer(net.peers[0]), NamesPeer(net.peers[-1])
    middle = net.peers[1:-1]

    first.add("web-1")
    assert run(net, lambda: "web-1" in last.gossiper.state.items), "a broadcast did not cross the older peers"
    last.add("db-1")
    assert run(net, lambda: "db-1" in first.gossiper.state.items), "the answer did not cross back"
    settle(net)
    assert first.channel.unicast(last.peer.info.name, b"hello")
    assert run(net, lambda: bool(last.gossiper.unicasts))
    assert last.gossiper.unicasts == [(first.peer.info.name, b"hello")]

    for peer in middle:
        # Passed on as it came (bytes of a channel it does not know count as channel "unknown"), never merged.
        assert sample(peer, "weft_gossip_unknown_relayed_total", type="broadcast") == 2
        assert sample(peer, "weft_gossip_unknown_relayed_total", type="unicast") == 1
        assert sample(peer, "weft_gossip_bytes_total", channel="unknown", direction="out") > 0
        assert CHANNEL not in peer.router.channels
    for end in (first, last):
        assert sample(end.peer, "weft_gossip_unknown_relayed_total", type="broadcast") == 0
        assert sample(end.peer, "weft_decode_errors_total", kind=CHANNEL) == 0


def test_a_flood_of_a_channel_nobody_has_stops_after_one_round() -> None:
    """Four peers in a ring, none with the channel, and a broadcast from a source none of them has in its view:
    no tree, so each floods it to every neighbour but the one it came from. Each passes it on once; the peer
    that started it sees it come round and stops it."""
    net = SimNetwork(latency=0.01)
    for i in range(4):
        net.add_peer([f"sim{(i + 1) % 4}:6783"], discovery=False)
    assert run(net, lambda: net.converged(exact=True) and all(len(p.router.connections) == 2 for p in net.peers))
    start, came_from = net.peers[0], net.peers[3]
    conn = start.router.connections[came_from.info.name]
    unknown_source = 0x02FF00000001

    start.router.handle_message(conn, {"t": "gb", "ch": CHANNEL, "src": unknown_source, "d": b"\x91\xa3web"})
    net.scheduler.run_until(lambda: False, net.scheduler.now() + 5.0)

    relayed = [sample(p, "weft_gossip_unknown_relayed_total", type="broadcast") for p in net.peers]
    repeats = [sample(p, "weft_gossip_dropped_total", reason="repeat") for p in net.peers]
    assert relayed == [1, 1, 1, 1]
    assert repeats == [1, 0, 0, 0]


def test_the_same_payload_from_the_same_source_is_seen_once_and_others_are_not_confused_with_it() -> None:
    seen = SeenPayloads(size=2)
    assert seen.first_time("names", 1, b"a")
    assert not seen.first_time("names", 1, b"a")
    assert seen.first_time("names", 2, b"a")  # another source
    assert seen.first_time("other", 1, b"a")  # another channel
    assert seen.first_time("names", 1, b"b")  # pushes the oldest ("names", 1, b"a") out
    assert seen.first_time("names", 1, b"a")

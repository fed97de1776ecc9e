"""Anti-entropy by digest: a settled mesh repairs what a delta missed for the price of a summary, not of its state.

The real router, topology and gossip in the simulator (virtual time); a neighbour of an older release, which does
not name the "digest" capability, still gets full states.
"""

from __future__ import annotations

import msgpack
import pytest

from weft.mesh.gossip import BROADCAST, DIGEST, GOSSIP
from weft.mesh.router import TOPOLOGY
from weft.sim import SimConn, SimNetwork, SimPeer, chain_of_strangers

ROUND = 40.0  # virtual seconds: one anti-entropy round (30 s, jittered by up to 20%) and some


def full_mesh(net: SimNetwork) -> bool:
    want = len(net.peers) - 1
    return all(len(p.router.connections) == want for p in net.peers)


def settled(n: int, caps: frozenset[str] | None = None) -> SimNetwork:
    net = chain_of_strangers(n, discovery=True) if caps is None else chain_of_strangers(n, discovery=True, caps=caps)
    assert net.scheduler.run_until(lambda: full_mesh(net) and net.converged(exact=True), 30.0, resolution=0.01)
    net.scheduler.run_until(lambda: False, net.scheduler.now() + 5.0)  # the last announcements land
    return net


def topology_out(net: SimNetwork) -> float:
    return sum(p.router.metrics.gossip_bytes.get((TOPOLOGY, "out"), 0.0) for p in net.peers)


def record(peer: SimPeer) -> list[dict]:
    """Every message ``peer`` receives from now on (on the connections it has now)."""
    seen: list[dict] = []
    for conn in peer.router.connections.values():
        assert isinstance(conn, SimConn)

        def deliver(messages: list[dict], conn: SimConn = conn, original=conn.deliver) -> None:  # type: ignore[no-untyped-def]
            seen.extend(messages)
            original(messages)

        conn.deliver = deliver  # type: ignore[method-assign]
    return seen


def deaf_to_broadcasts(peer: SimPeer) -> list[SimConn]:
    """``peer`` stops hearing broadcasts (a delta lost on the way); returns its connections, to hear again."""
    conns = [c for c in peer.router.connections.values() if isinstance(c, SimConn)]
    for conn in conns:

        def deliver(messages: list[dict], original=conn.deliver) -> None:  # type: ignore[no-untyped-def]
            original([m for m in messages if m["t"] != BROADCAST])

        conn.deliver = deliver  # type: ignore[method-assign]
    return conns


def hears_again(conns: list[SimConn]) -> None:
    for conn in conns:
        del conn.deliver  # type: ignore[attr-defined]  # back to the class's


def bump(peer: SimPeer) -> int:
    """A new version of ``peer``'s own entry, announced as a delta (what any local change does)."""
    peer.router._local_connections_changed()
    peer.router.scheduler.run_until(lambda: False, peer.router.scheduler.now() + 1.0)
    return peer.router.topology.our_entry.version


@pytest.mark.slow  # seconds of CPU: in `make test`, not in `make unit`
def test_a_settled_mesh_sends_a_tenth_of_the_topology_gossip_a_full_state_one_does() -> None:
    """30 peers, three anti-entropy rounds with nothing changing: digests against full states, same seed."""
    figures = {}
    for name, caps in (("digest", None), ("full state", frozenset())):
        net = settled(30, caps)
        before = topology_out(net)
        net.scheduler.run_until(lambda: False, net.scheduler.now() + 3 * ROUND)
        assert net.converged(exact=True)
        figures[name] = topology_out(net) - before
    assert figures["full state"] > 0
    assert figures["digest"] < figures["full state"] / 10, figures


def test_a_missed_delta_is_repaired_by_digests_alone() -> None:
    net = settled(6)
    late = net.peers[5]
    conns = deaf_to_broadcasts(late)
    source = net.peers[0]
    version = bump(source)
    assert late.router.topology.peers[source.info.name].version < version  # the delta did not reach it
    hears_again(conns)
    seen = record(late)
    assert net.scheduler.run_until(lambda: net.converged(exact=True), net.scheduler.now() + ROUND, resolution=0.1)
    assert late.router.topology.peers[source.info.name].version == version
    kinds = {(m["t"], m.get("rp", False)) for m in seen if m["ch"] == TOPOLOGY}
    assert (DIGEST, False) in kinds
    assert (GOSSIP, True) in kinds  # the repair: what its digest showed it lacked
    assert (GOSSIP, False) not in kinds  # no full state crossed


def test_what_the_digests_sender_lacks_reaches_it_too() -> None:
    """The peer that missed the delta sends its digest: the neighbour answers with what it lacks."""
    net = settled(4)
    late, source = net.peers[3], net.peers[0]
    conns = deaf_to_broadcasts(late)
    version = bump(source)
    hears_again(conns)
    neighbour = next(c for c in late.router.connections.values() if c.remote.name != source.info.name)
    neighbour.sender.send_digest(TOPOLOGY, late.router._topology_channel.digester.digest(), reply=False)  # type: ignore[union-attr]
    net.scheduler.run_until(lambda: False, net.scheduler.now() + 0.1)  # a round trip, well before any periodic round
    assert late.router.topology.peers[source.info.name].version == version


def test_a_neighbour_of_an_older_release_gets_full_states_and_no_digest() -> None:
    net = settled(4, frozenset())
    late, source = net.peers[3], net.peers[0]
    conns = deaf_to_broadcasts(late)
    version = bump(source)
    hears_again(conns)
    seen = record(late)
    assert net.scheduler.run_until(lambda: net.converged(exact=True), net.scheduler.now() + ROUND, resolution=0.1)
    assert late.router.topology.peers[source.info.name].version == version
    assert {m["t"] for m in seen} == {GOSSIP}


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # not msgpack
        msgpack.packb({"a": 1}),
        msgpack.packb([[1, 2]]),
        msgpack.packb([["x", 1, 2]]),
        msgpack.packb([[1, -1, 2]]),
        msgpack.packb([[2**48, 1, 2]]),  # a name wider than 48 bits
        msgpack.packb([1, 2, 3]),
    ],
)
def test_a_malformed_digest_is_counted_and_changes_nothing(payload: bytes) -> None:
    net = settled(3)
    peer = net.peers[0]
    conn = next(iter(peer.router.connections.values()))
    before = dict(peer.router.topology.peers)
    errors = peer.router.metrics.decode_errors.labels("topology").value
    peer.router.handle_message(conn, {"t": DIGEST, "ch": TOPOLOGY, "d": payload})
    assert peer.router.metrics.decode_errors.labels("topology").value == errors + 1
    assert peer.router.topology.peers == before
    assert conn.sender.take() == []


def test_a_digest_a_thousand_times_larger_than_the_mesh_is_refused_unread() -> None:
    """100,000 headers where a mesh of 100 sends 100: refused at the array's header, counted, nothing answered."""
    net = settled(3)
    peer = net.peers[0]
    conn = next(iter(peer.router.connections.values()))
    conn.sender.take()
    huge = msgpack.packb([[0x030000000000 + i, 1, 1] for i in range(100_000)])
    assert len(huge) < 16 * 1024 * 1024  # one frame carries it
    errors = peer.router.metrics.decode_errors.labels("topology").value
    peer.router.handle_message(conn, {"t": DIGEST, "ch": TOPOLOGY, "d": huge})
    assert peer.router.metrics.decode_errors.labels("topology").value == errors + 1
    assert conn.sender.take() == []
    assert len(peer.router.topology.peers) == 3


def test_a_digest_on_a_channel_without_digests_is_dropped_and_counted() -> None:
    net = settled(3)
    peer = net.peers[0]
    conn = next(iter(peer.router.connections.values()))
    for channel in ("no-such-channel", "other"):
        if channel == "other":

            class Plain:
                def gossip(self) -> None:
                    return None

            peer.router.new_channel("other", Plain())  # type: ignore[arg-type]
        dropped = peer.router.metrics.gossip_dropped.labels("unknown_channel").value
        peer.router.handle_message(conn, {"t": DIGEST, "ch": channel, "d": msgpack.packb([])})
        assert peer.router.metrics.gossip_dropped.labels("unknown_channel").value == dropped + 1
    assert conn.sender.take() == []


def test_a_neighbour_that_floods_digests_gets_one_answer_a_second() -> None:
    """An empty digest asks for everything we hold: a neighbour repeating it must not make us send it again and
    again."""
    net = settled(4)
    peer = net.peers[0]
    conn = next(iter(peer.router.connections.values()))
    conn.sender.take()
    dropped = peer.router.metrics.gossip_dropped.labels("digest_too_soon").value
    for _ in range(100):
        peer.router.handle_message(conn, {"t": DIGEST, "ch": TOPOLOGY, "d": msgpack.packb([])})
    (answer,) = conn.sender.take()
    assert (answer["t"], answer["rp"]) == (GOSSIP, True)
    assert len(msgpack.unpackb(answer["d"])) == 4  # every entry, once
    assert peer.router.metrics.gossip_dropped.labels("digest_too_soon").value == dropped + 99
    net.scheduler.call_later(1.5, lambda: None)  # virtual time moves from event to event
    net.scheduler.run_until(lambda: False, net.scheduler.now() + 1.5)
    conn.sender.take()
    peer.router.handle_message(conn, {"t": DIGEST, "ch": TOPOLOGY, "d": msgpack.packb([])})
    assert [m["t"] for m in conn.sender.take()] == [GOSSIP]  # a second later, answered again


def test_in_a_mixed_mesh_the_older_neighbour_gets_full_states_and_the_others_digests() -> None:
    net = settled(4)
    old, new = net.peers[3], net.peers[1]
    for peer in net.peers:
        for conn in peer.router.connections.values():
            if old.info.name in (peer.info.name, conn.remote.name):
                conn.caps = frozenset()  # type: ignore[misc]  # an older release names nothing, and sends no digest
    to_old, to_new = record(old), record(new)
    net.scheduler.run_until(lambda: False, net.scheduler.now() + ROUND)
    to_old_topology = [m for m in to_old if m["ch"] == TOPOLOGY]
    assert {m["t"] for m in to_old_topology} == {GOSSIP}  # an older release reads no digest
    assert any(len(msgpack.unpackb(m["d"])) == 4 for m in to_old_topology)  # the full state
    assert (DIGEST, False) in {(m["t"], m.get("rp", False)) for m in to_new if m["ch"] == TOPOLOGY}
    assert net.converged(exact=True)


class Counted:
    """A channel without digests whose full state is never empty (as the MAC and IPAM channels)."""

    def __init__(self) -> None:
        self.state = Blob()

    def gossip(self) -> Blob:
        return self.state

    def on_gossip(self, payload: bytes) -> None:
        return None


class Blob:
    def merge(self, other: object) -> None:
        pass

    def encode(self) -> bytes:
        return b"x" * 100


def test_anti_entropy_on_a_channel_without_digests_does_not_make_neighbours_answer_with_their_topology() -> None:
    """A full state sent in anti-entropy does not take the neighbour for new: it is flagged, and the neighbour does
    not answer with all of its own state (the topology's 230 KB at 100 peers) on each connection in turn."""
    net = settled(20)
    for peer in net.peers:
        peer.router.new_channel("other", Counted())  # type: ignore[arg-type]
    seen = record(net.peers[3])
    before = topology_out(net)
    net.scheduler.run_until(lambda: False, net.scheduler.now() + 3 * ROUND)
    other = [m for m in seen if m["ch"] == "other"]
    assert other and all(m.get("rp") is True for m in other)
    # Digests alone: 20 peers x 3 or 4 rounds x 10 neighbours x a digest of 20 headers (about 400 B), and the
    # answers; one full state answered on each connection would be 20 x 19 x 8 KB.
    assert topology_out(net) - before < 20 * 4 * 10 * 500, topology_out(net) - before

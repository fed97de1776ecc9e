"""The DNS name table on the simulated mesh (weft.sim): the real router, gossip and name service in virtual time.
Registration and removal across the mesh, peers that leave and come back, late joiners, purge, stale entries
(Weave's 215_stale_dns), restarts, hostile input, and the gossip a registration costs."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable

import pytest

from weft import sim
from weft.dns.service import Dns
from weft.dns.table import MAX_ENTRIES, PURGE_AGE, Entry
from weft.dns.wire import DnsUpdate
from weft.mesh.codec import pack
from weft.mesh.connection_maker import ConnectionMaker
from weft.mesh.gossip import BROADCAST, GOSSIP, UNICAST
from weft.mesh.peer import PeerInfo
from weft.mesh.router import Router
from weft.metrics import Metrics
from weft.sim import SimNetwork, SimPeer, add_dns, chain_of_strangers

PURGED = PURGE_AGE + 2 * 60.0  # past the purge age and the minute between purges, with room

# -- harness ---------------------------------------------------------------------------------------------------------


def run(net: SimNetwork, done: Callable[[], bool], seconds: float) -> bool:
    return net.scheduler.run_until(done, net.scheduler.now() + seconds, resolution=0.01)


def settle(net: SimNetwork, seconds: float = 1.0) -> None:
    net.scheduler.call_later(seconds, lambda: None)
    net.scheduler.run_until(lambda: False, net.scheduler.now() + seconds)


def full_mesh(net: SimNetwork) -> bool:
    return all(len(p.router.connections) == len(net.peers) - 1 for p in net.peers)


def mesh(n: int, seed: int = 1, **kwargs: object) -> tuple[SimNetwork, list[Dns]]:
    """``n`` peers that find each other (discovery), each running the name service."""
    net = chain_of_strangers(n, seed=seed, discovery=True, **kwargs)  # type: ignore[arg-type]
    tables = add_dns(net)
    assert run(net, lambda: net.converged() and full_mesh(net), 60.0)
    settle(net)
    return net, tables


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def answering(tables: list[Dns], name: str) -> list[int]:
    """The indexes of the peers that answer ``name``."""
    return [i for i, t in enumerate(tables) if t.lookup(name)]


def all_answer(tables: list[Dns], name: str, addresses: list[int]) -> Callable[[], bool]:
    return lambda: all(t.lookup(name) == addresses for t in tables)


def none_answer(tables: list[Dns], name: str) -> Callable[[], bool]:
    return lambda: not answering(tables, name)


def counter(table: Dns, metric: str, **labels: str) -> float:
    return table.metrics.registry.get_sample_value(metric, labels) or 0.0


def refused(table: Dns, reason: str) -> float:
    return counter(table, "weft_dns_refused_updates_total", reason=reason)


def dns_bytes_out(net: SimNetwork) -> float:
    return sum(
        p.router.metrics.registry.get_sample_value("weft_gossip_bytes_total", {"channel": "dns", "direction": "out"})
        or 0.0
        for p in net.peers
    )


def kill(net: SimNetwork, index: int) -> None:
    """kill -9 of a peer's agent: its connections end (the kernel closes its sockets) and it never dials again."""
    victim = net.peers[index]
    victim.maker.discovery = False
    victim.maker.targets.clear()
    victim.maker.stop()
    net.partition([[index], [i for i in range(len(net.peers)) if i != index]])
    victim.router.stop()


def restart(net: SimNetwork, index: int) -> SimPeer:
    """A fresh run of a peer after a crash: same name and address, new UID, no state. Its old connections end."""
    old = net.peers[index]
    old.maker.discovery = False
    old.maker.targets.clear()
    old.maker.stop()
    for conn in list(old.router.connections.values()):
        conn.close("the agent was killed")
    old.router.stop()
    info = PeerInfo(old.info.name, old.info.nickname, old.info.uid + 1_000_003)
    router = Router(info, net.scheduler, Metrics(), gossip_interval=net.gossip_interval, conn_limit=1000)
    router.rng = random.Random(index)
    maker = ConnectionMaker(router, net.scheduler, lambda a: net._dial(index, a), rng=random.Random(index))
    peer = SimPeer(info, old.address, router, maker)
    net.peers[index] = peer
    router.start()
    return peer


def connect(peer: SimPeer, net: SimNetwork) -> None:
    peer.maker.set_origin_targets("config", [p.address for p in net.peers if p is not peer])


class Gag:
    """Drops every ``dns`` message to and from the given peers (their other gossip flows): a host whose name-table
    gossip is delayed, as Weave's 215_stale_dns test does with iptables."""

    def __init__(self, net: SimNetwork, gagged: set[int]) -> None:
        self.names = {net.peers[i].info.name for i in gagged}
        self.on = True
        for peer in net.peers:
            original = peer.router.handle_message

            def handle(conn, msg, original=original, me=peer.info.name):  # type: ignore[no-untyped-def]
                if self.on and msg.get("ch") == "dns" and (me in self.names or conn.remote.name in self.names):
                    return
                original(conn, msg)

            peer.router.handle_message = handle  # type: ignore[method-assign]


# -- registration and removal ----------------------------------------------------------------------------------------


def test_a_name_registered_on_one_peer_resolves_on_every_peer_at_once() -> None:
    net, tables = mesh(5)
    start = net.scheduler.now()
    got = tables[2].register("netns:web1", "web", ["10.32.0.5", ip("10.40.0.9")])

    assert [(e.name, e.address, e.key, e.live) for e in got] == [
        ("web.weft.local.", ip("10.32.0.5"), "netns:web1", True),
        ("web.weft.local.", ip("10.40.0.9"), "netns:web1", True),
    ]
    assert run(net, all_answer(tables, "web", [ip("10.32.0.5"), ip("10.40.0.9")]), 1.0)
    assert net.scheduler.now() - start < 0.1
    for table in tables:
        assert table.lookup("WEB.weft.local") == table.lookup("web.weft.local.") == [ip("10.32.0.5"), ip("10.40.0.9")]
        assert table.reverse("10.40.0.9") == ["web.weft.local."]
        assert table.lookup("web.other.") == []
        assert table.lookup("not a name") == []
    # A second container with the same name: both answered, each address once.
    tables[4].register("netns:web2", "web.weft.local.", [ip("10.32.0.7")])
    tables[2].register("netns:web1", "web", [ip("10.32.0.5")])  # again: nothing changes
    want = [ip("10.32.0.5"), ip("10.32.0.7"), ip("10.40.0.9")]
    assert run(net, all_answer(tables, "web", want), 1.0)
    tables[0].update_metrics()
    assert counter(tables[0], "weft_dns_entries") == 3


def test_register_refuses_what_no_peer_should_answer_and_changes_nothing() -> None:
    net, tables = mesh(2)
    t = tables[0]
    for name, addresses, says in [
        ("web.example.com", ["10.32.0.5"], "not in the domain weft.local."),
        ("weft.local.", ["10.32.0.5"], "not in the domain"),
        ("we b", ["10.32.0.5"], "character ' '"),
        ("web", ["127.0.0.1"], "loopback"),
        ("web", ["169.254.169.254"], "link-local"),
        ("web", ["10.32.0.5", "224.0.0.1"], "multicast"),
        ("web", ["0.0.0.0"], "unspecified"),
        ("web", ["255.255.255.255"], "reserved"),
        ("web", ["10.32.0.300"], "not an IPv4 address"),
    ]:
        with pytest.raises(ValueError, match=says):
            t.register("netns:a", name, addresses)
    with pytest.raises(ValueError, match="empty"):
        t.register("", "web", ["10.32.0.5"])
    assert t.entries() == []
    settle(net)
    assert tables[1].entries() == []
    # A key longer than the wire carries stands for its container all the same.
    long_key = "netns:" + "x" * 250
    (entry,) = t.register(long_key, "long", ["10.32.0.6"])
    assert entry.key.startswith("sha256:")
    assert run(net, all_answer(tables, "long", [ip("10.32.0.6")]), 1.0)
    assert [e.live for e in t.unregister(long_key)] == [False]
    assert run(net, none_answer(tables, "long"), 2.0)


def test_after_unregister_no_peer_answers_within_2_seconds() -> None:
    net, tables = mesh(5)
    tables[1].register("netns:c1", "web", ["10.32.0.5"])
    tables[1].register("netns:c1", "alias", ["10.32.0.5"])
    tables[3].register("netns:c2", "db", ["10.32.0.6"])
    assert run(net, lambda: all(t.lookup("web") and t.lookup("alias") and t.lookup("db") for t in tables), 1.0)

    gone = tables[1].unregister("netns:c1", "web")

    assert [(e.name, e.live) for e in gone] == [("web.weft.local.", False)]
    assert run(net, none_answer(tables, "web"), 2.0), f"still answered by {answering(tables, 'web')}"
    assert all(t.lookup("alias") == [ip("10.32.0.5")] for t in tables)  # the container's other name stays
    assert all(t.reverse("10.32.0.5") == ["alias.weft.local."] for t in tables)
    assert tables[1].unregister("netns:c1", "web") == []  # idempotent
    tables[1].unregister("netns:c1")  # the rest of the container: detach
    assert run(net, none_answer(tables, "alias"), 2.0)
    assert all(t.lookup("db") == [ip("10.32.0.6")] for t in tables)
    # Registered again after removal: answered again (its version beats the tombstone).
    tables[1].register("netns:c1", "web", ["10.32.0.5"])
    assert run(net, all_answer(tables, "web", [ip("10.32.0.5")]), 1.0)


def test_one_address_of_a_container_can_go_and_the_others_stay() -> None:
    net, tables = mesh(3)
    tables[0].register("netns:c1", "web", ["10.32.0.5", "10.40.0.5"])
    assert run(net, all_answer(tables, "web", [ip("10.32.0.5"), ip("10.40.0.5")]), 1.0)
    tables[0].unregister("netns:c1", addresses=["10.40.0.5"])
    assert run(net, all_answer(tables, "web", [ip("10.32.0.5")]), 2.0)


# -- peers that leave ------------------------------------------------------------------------------------------------


def test_a_killed_peers_names_go_when_it_leaves_the_topology_and_come_back_with_it() -> None:
    net, tables = mesh(5)
    tables[4].register("netns:c4", "four", ["10.32.0.4"])
    tables[0].register("netns:c0", "zero", ["10.32.0.1"])
    assert run(net, lambda: all(t.lookup("four") and t.lookup("zero") for t in tables), 1.0)

    start = net.scheduler.now()
    kill(net, 4)
    survivors = tables[:4]

    assert run(net, none_answer(survivors, "four"), 5.0), f"still answered by {answering(survivors, 'four')}"
    assert all(net.peers[4].info.name not in net.peers[i].router.topology.peers for i in range(4))
    assert net.scheduler.now() - start < 3.0
    assert all(t.lookup("zero") == [ip("10.32.0.1")] for t in survivors)
    status = survivors[0].status()
    assert status["entries"] == {"answered": 1, "hidden": 1, "tombstones": 0}
    (four,) = [o for o in status["origins"] if o["nickname"] == "sim4"]
    assert not four["in_topology"] and four["absent_for"] is not None
    survivors[0].update_metrics()
    assert counter(survivors[0], "weft_dns_entries") == 1

    # The same agent back (a partition that heals): its names come back.
    net.heal()
    connect(net.peers[4], net)
    assert run(net, all_answer(tables, "four", [ip("10.32.0.4")]), 10.0)


def test_a_partition_hides_each_sides_names_from_the_other_until_it_heals() -> None:
    net, tables = mesh(5)
    for i, t in enumerate(tables):
        t.register(f"netns:c{i}", f"host{i}", [f"10.32.0.{i + 1}"])
    assert run(net, lambda: all(t.lookup(f"host{i}") for t in tables for i in range(5)), 1.0)
    left, right = [0, 1, 2], [3, 4]

    net.partition([left, right])

    def split() -> bool:
        return all(
            bool(tables[i].lookup(f"host{j}")) == ((i in left) == (j in left)) for i in range(5) for j in range(5)
        )

    assert run(net, split, 5.0)
    # Removed on one side meanwhile: after the heal the other side learns that too.
    tables[3].unregister("netns:c3")
    net.heal()
    assert run(net, lambda: net.converged() and full_mesh(net), 30.0)
    want = {f"host{i}": [ip(f"10.32.0.{i + 1}")] for i in (0, 1, 2, 4)}
    assert run(net, lambda: all(t.lookup(n) == a for t in tables for n, a in want.items()), 5.0)
    assert run(net, none_answer(tables, "host3"), 1.0)


def test_entries_of_a_peer_gone_for_the_purge_age_are_dropped() -> None:
    net, tables = mesh(3)
    tables[2].register("netns:c", "gone", ["10.32.0.9"])
    assert run(net, all_answer(tables, "gone", [ip("10.32.0.9")]), 1.0)
    kill(net, 2)
    settle(net, PURGE_AGE - 60.0)
    assert all(len(t.entries()) == 1 for t in tables[:2])  # hidden, still held
    settle(net, 3 * 60.0)
    assert all(t.entries() == [] for t in tables[:2])


# -- late joiners ------------------------------------------------------------------------------------------------------


def test_a_peer_joining_later_learns_the_whole_table() -> None:
    net, tables = mesh(4)
    rng = random.Random(3)
    live: dict[str, list[int]] = {}
    for i in range(60):
        address = ip("10.32.1.0") + i
        tables[rng.randrange(4)].register(f"netns:c{i}", f"c{i}", [address])
        live[f"c{i}"] = [address]
    for i in range(0, 60, 4):
        for t in tables:
            t.unregister(f"netns:c{i}")
        del live[f"c{i}"]
    settle(net)

    joiner = net.add_peer([net.peers[2].address])
    late = sim.start_dns(net, joiner)
    tables.append(late)

    assert run(net, lambda: all(late.lookup(n) == a for n, a in live.items()), 5.0)
    assert all(late.lookup(f"c{i}") == [] for i in range(0, 60, 4))
    assert sorted(map(str, late.entries())) == sorted(map(str, tables[0].entries())) or _same_but_times(late, tables[0])
    assert late.status()["entries"] == {"answered": 45, "hidden": 0, "tombstones": 15}


def _same_but_times(a: Dns, b: Dns) -> bool:
    """Tombstones' removal times are each peer's estimate; everything else must be equal."""

    def key(e: Entry) -> tuple:
        return (e.identity, e.version, e.live)

    return sorted(map(key, a.entries())) == sorted(map(key, b.entries()))


# -- purge and stale entries (Weave's 215_stale_dns) -------------------------------------------------------------------


def test_a_tombstone_is_kept_for_the_purge_age_then_dropped_everywhere() -> None:
    net, tables = mesh(3)
    tables[0].register("netns:c", "web", ["10.32.0.5"])
    assert run(net, all_answer(tables, "web", [ip("10.32.0.5")]), 1.0)
    tables[0].unregister("netns:c")
    settle(net, PURGE_AGE - 60.0)
    assert all([e.live for e in t.entries()] == [False] for t in tables)
    settle(net, 3 * 60.0)
    assert all(t.entries() == [] for t in tables)
    assert all(t.lookup("web") == [] for t in tables)


def test_a_stale_entry_held_by_a_peer_that_missed_its_tombstone_never_comes_back() -> None:
    """215_stale_dns: a host's name-table gossip is cut while the name is removed; the tombstone is purged
    everywhere after 30 minutes while that host still holds the live entry. When its gossip flows again, it sends
    the stale entry; the origin answers with a tombstone of a higher version, and the name is answered nowhere,
    then or ever after."""
    net, tables = mesh(3)
    origin, witness, stale = 0, 1, 2
    tables[origin].register("netns:c", "web", ["10.32.0.5"])
    tables[origin].register("netns:d", "db", ["10.32.0.6"])
    assert run(net, lambda: all(t.lookup("web") and t.lookup("db") for t in tables), 1.0)
    gag = Gag(net, {stale})

    tables[origin].unregister("netns:c")
    assert run(net, lambda: answering(tables, "web") == [stale], 2.0)
    settle(net, PURGED)
    # The tombstone is gone where it was known; the gagged host still answers from its stale entry.
    assert tables[origin].entries() == tables[witness].entries() != []
    assert all(e.name != "web.weft.local." for e in tables[origin].entries())
    assert answering(tables, "web") == [stale]

    gag.on = False
    back: list[tuple[float, int]] = []  # (time, peer) whenever a peer but the stale one answers
    fixed_at: list[float] = []

    def watch() -> bool:
        who = answering(tables, "web")
        back.extend((net.scheduler.now(), i) for i in who if i != stale)
        if not who and not fixed_at:
            fixed_at.append(net.scheduler.now())
        return False

    net.scheduler.run_until(watch, net.scheduler.now() + 10 * 60.0)  # checked at every event

    assert fixed_at, "the stale entry was never put down"
    assert all(t > fixed_at[0] - 0.01 for t, _ in back) and not [t for t, _ in back if t > fixed_at[0]]
    assert answering(tables, "web") == []
    assert all(t.lookup("db") == [ip("10.32.0.6")] for t in tables)  # what is still registered stays
    assert refused(tables[origin], "ours") >= 1


def test_an_agent_restarted_without_state_asserts_what_it_registers_again_and_puts_down_the_rest() -> None:
    """A restarted agent registers its attached containers before it connects; a container detached while it was
    down is gone everywhere once it has met the mesh."""
    net, tables = mesh(4)
    tables[1].register("netns:kept", "kept", ["10.32.0.5"])
    tables[1].register("netns:detached", "detached", ["10.32.0.6"])
    assert run(net, lambda: all(t.lookup("kept") and t.lookup("detached") for t in tables), 1.0)
    old = next(e for e in tables[0].entries() if e.name == "kept.weft.local.")

    settle(net, 5.0)
    peer = restart(net, 1)
    tables[1] = sim.start_dns(net, peer)
    tables[1].register("netns:kept", "kept", ["10.32.0.5"])
    connect(peer, net)

    assert run(net, lambda: net.converged() and full_mesh(net), 30.0)
    assert run(net, none_answer(tables, "detached"), 2.0)
    assert all(t.lookup("kept") == [ip("10.32.0.5")] for t in tables)
    new = next(e for e in tables[0].entries() if e.name == "kept.weft.local.")
    assert new.version > old.version
    settle(net, 5 * 60.0)  # anti-entropy rounds change nothing
    assert answering(tables, "detached") == []
    assert all(t.lookup("kept") == [ip("10.32.0.5")] for t in tables)


def test_a_tombstone_past_the_purge_age_ends_what_it_beats_but_is_neither_kept_nor_passed_on() -> None:
    """A peer that has not purged yet (purges run every minute) sends a tombstone older than the purge age: the
    receiver must not take it as news, or peers that purged at different moments would hand it round forever."""
    net, tables = mesh(3)
    target, sender = tables[0], tables[1]
    conn = net.peers[0].router.connections[sender.me]
    held = Entry("held.weft.local.", ip("10.32.0.7"), "netns:h", sender.me, 5)
    target.table.merge(held)
    now = net.scheduler.now()
    old = [
        Entry("held.weft.local.", ip("10.32.0.7"), "netns:h", sender.me, 6, tombstone=now - PURGE_AGE - 10),
        Entry("gone.weft.local.", ip("10.32.0.8"), "netns:g", sender.me, 6, tombstone=now - PURGE_AGE - 10),
    ]
    payload = DnsUpdate.of(old, sender.me, net.scheduler.now).encode()
    assert target.on_gossip(payload) is None
    assert target.entries() == []
    net.peers[0].router.handle_message(conn, {"t": GOSSIP, "ch": "dns", "d": payload})
    settle(net)
    assert tables[2].entries() == []


def test_a_restarted_agent_whose_clock_went_back_still_wins_over_its_last_run() -> None:
    net, tables = mesh(3)
    tables[1].register("netns:kept", "kept", ["10.32.0.5"])
    tables[1].register("netns:gone", "gone", ["10.32.0.6"])
    tables[1].unregister("netns:kept")  # its newest word on "kept" is a tombstone...
    settle(net)
    peer = restart(net, 1)
    behind = sim.start_dns(net, peer)
    behind._wall = lambda: sim.SIM_EPOCH - 3600 + net.scheduler.now()  # an hour behind the last run's clock
    tables[1] = behind
    behind.register("netns:kept", "kept", ["10.32.0.5"])  # ...and the new run registers it again
    connect(peer, net)

    assert run(net, lambda: net.converged() and full_mesh(net), 30.0)
    assert run(net, all_answer(tables, "kept", [ip("10.32.0.5")]), 2.0)
    assert run(net, none_answer(tables, "gone"), 2.0)
    settle(net, 2 * 60.0)
    assert all(t.lookup("kept") == [ip("10.32.0.5")] for t in tables)
    assert answering(tables, "gone") == []


# -- hostile input -----------------------------------------------------------------------------------------------------


class Hostile:
    """Builds malformed and hostile ``dns`` messages for one target and says how each must be counted."""

    def __init__(self, target: Dns, sender: int, rng: random.Random) -> None:
        self.target = target
        self.sender = sender
        self.rng = rng
        self.valid = target.gossip().encode()  # type: ignore[union-attr]
        self.forged = 0
        self.huge_sent = 0
        first = ["x.weft.local.", ip("10.32.0.1"), "k", 1, 0]
        more = [[0, ip("10.32.0.1") + i, 1, 1, 0] for i in range(1, MAX_ENTRIES + 1)]
        # Each costs tens of milliseconds to unpack: a few are enough. One entry more than a message may carry, and
        # one origin group more (with no entries: the count is refused before anything else is looked at).
        self.huge = [
            pack({"f": sender, "o": [[sender, [first, *more]]]}),
            pack({"f": sender, "o": [[sender, []]] * (MAX_ENTRIES + 1)}),
        ]

    def update(self, entries: list[list], origin: int | None = None, **overrides: object) -> bytes:
        raw: dict = {"f": self.sender, "o": [[origin or self.sender, entries]]}
        raw.update(overrides)
        return pack(raw)

    def make(self) -> tuple[str, bytes, str]:
        """(message type, payload, expected: "decode" / "refused:<reason>" / "ignored")."""
        r = self.rng
        kind = r.randrange(12)
        if kind == 1:  # truncated
            return r.choice([GOSSIP, BROADCAST]), self.valid[: r.randrange(1, len(self.valid))], "decode"
        if kind == 2 and self.huge_sent < 10:
            self.huge_sent += 1
            return r.choice([GOSSIP, BROADCAST]), self.huge[self.huge_sent % 2], "decode"
        if kind in (0, 2):
            return r.choice([GOSSIP, BROADCAST, UNICAST]), r.randbytes(r.randrange(0, 64)), "decode"
        if kind == 3:  # invalid names
            name = r.choice(["Web.weft.local.", "web", "a..b.", "x" * 64 + ".weft.local.", "w b.", "é.", "", "."])
            return r.choice([GOSSIP, BROADCAST]), self.update([[name, 5, "k", 1, 0]]), "decode"
        if kind == 4:  # wrong shapes and values
            payload = pack(
                r.choice(
                    [
                        [],
                        7,
                        {"f": self.sender, "o": "everything"},
                        {"f": 0, "o": []},
                        {"f": self.sender, "o": [[self.sender, [["a.weft.local.", 5, 7, 1, 0]]]]},
                        {"f": self.sender, "o": [[self.sender, [["a.weft.local.", 5, "k", 0, 0]]]]},
                        {"f": self.sender, "o": [[0, [["a.weft.local.", 5, "k", 1, 0]]]]},
                        {"f": self.sender, "o": [[self.sender, [["a.weft.local.", -5, "k", 1, 0]]]]},
                        {"f": self.sender, "o": [[self.sender, [["a.weft.local.", 5, "k\n", 1, 0]]]]},
                        {"f": self.sender, "o": [[self.sender, [["a.weft.local.", 5, "k", 1, 0], [0, 5, 1, 1, 0]]]]},
                    ]
                )
            )
            return r.choice([GOSSIP, BROADCAST]), payload, "decode"
        if kind == 5:  # a unicast: the channel has none
            return UNICAST, self.valid, "decode"
        if kind in (6, 7):  # well-formed, pointing a name at the host itself or a cloud's metadata service
            address = ip(r.choice(["127.0.0.1", "169.254.169.254", "224.0.0.251", "0.0.0.0", "255.255.255.255"]))
            name = r.choice(["evil.weft.local.", "web.weft.local."])
            payload = self.update([[name, address, "netns:x", r.randrange(1, 1 << 62), 0]])
            return r.choice([GOSSIP, BROADCAST]), payload, "refused:address"
        if kind in (8, 9):  # entries claiming to be the target's own
            self.forged += 1
            name = f"forged{self.forged}.weft.local."
            version = r.choice([1, r.randrange(1, 1 << 62), (1 << 63) - 2])
            payload = self.update([[name, ip("10.32.0.99"), "netns:x", version, 0]], origin=self.target.me)
            return r.choice([GOSSIP, BROADCAST]), payload, "refused:ours"
        # What the target already holds, sent again: nothing to count, nothing changes.
        return GOSSIP, self.valid, "ignored"


def test_hostile_dns_input_is_counted_and_dropped_and_answers_stay() -> None:
    net, tables = mesh(3)
    target, peer = tables[0], tables[1]
    registered = {f"c{i}": [ip("10.32.0.10") + i] for i in range(8)}
    for i, (name, addresses) in enumerate(registered.items()):
        tables[i % 3].register(f"netns:{name}", name, addresses)
    settle(net)
    assert all(t.lookup(n) == a for t in tables for n, a in registered.items())
    router = net.peers[0].router
    conn = router.connections[peer.me]
    hostile = Hostile(target, peer.me, random.Random(5))
    expected: dict[str, int] = {}

    for _ in range(10_000):
        kind, payload, outcome = hostile.make()
        msg = {"t": kind, "ch": "dns", "d": payload}
        if kind == BROADCAST:
            msg["src"] = peer.me
        elif kind == UNICAST:
            msg.update(src=peer.me, dst=target.me)
        router.handle_message(conn, msg)  # nothing may escape
        expected[outcome] = expected.get(outcome, 0) + 1

    assert counter(target, "weft_decode_errors_total", kind="dns") == expected["decode"]
    for reason in ("address", "ours"):
        assert refused(target, reason) == expected[f"refused:{reason}"], reason
    assert expected["ignored"] > 100 and expected["refused:ours"] > 100
    # Logged at most once a minute per peer and reason, not 10,000 times.
    assert len(target.refusals) <= 2
    # Answers are what they were, on the target and everywhere: no forged name, no hostile address.
    settle(net, 2.0)
    for t in tables:
        assert all(t.lookup(n) == a for n, a in registered.items())
        assert t.lookup("evil") == []
        assert all(t.lookup(f"forged{i}") == [] for i in range(1, hostile.forged + 1))
        assert all(e.address == ip("10.32.0.99") or e.name.startswith("c") for e in t.entries())
    # The mesh goes on: names registered now resolve everywhere.
    target.register("netns:after", "after", ["10.32.0.50"])
    tables[2].register("netns:after2", "after2", ["10.32.0.51"])
    assert run(net, lambda: all(t.lookup("after") and t.lookup("after2") for t in tables), 1.0)


def test_a_full_table_refuses_more_entries_and_every_peer_still_decodes_it_whole() -> None:
    net, tables = mesh(2)
    target, peer = tables[0], tables[1]
    for i in range(MAX_ENTRIES - 1):
        target.table.merge(Entry(f"c{i}.weft.local.", ip("10.64.0.0") + i, f"netns:c{i}", peer.me, 1))
    target.register("netns:last", "last", ["10.32.0.1"])  # the last place
    assert len(target.entries()) == MAX_ENTRIES
    with pytest.raises(ValueError, match="the name table holds 32768 entries"):
        target.register("netns:more", "more", ["10.32.0.2"])
    conn = net.peers[0].router.connections[peer.me]
    more = [
        Entry("new.weft.local.", ip("10.32.0.3"), "netns:new", peer.me, 1),  # from a peer: refused, size
        Entry("forged.weft.local.", ip("10.32.0.4"), "netns:f", target.me, 1),  # ours: refused, not answered
    ]
    net.peers[0].router.handle_message(
        conn, {"t": GOSSIP, "ch": "dns", "d": DnsUpdate.of(more, peer.me, net.scheduler.now).encode()}
    )
    assert refused(target, "size") == 1 and refused(target, "ours") == 1
    assert len(target.entries()) == MAX_ENTRIES
    assert target.lookup("new") == [] and target.lookup("forged") == []
    assert "the most one message carries" in target.refusals[-1]
    full = target.gossip()
    assert full is not None
    assert len(DnsUpdate.decode(full.encode(), 0.0).entries) == MAX_ENTRIES


# -- cost ------------------------------------------------------------------------------------------------------------


def test_gossip_bytes_per_registration_at_100_peers() -> None:
    """A registration travels as a delta of one entry, once to every peer, whatever the table's size."""
    peers, entries = 100, 1000
    # A tree of strangers (each peer configured with one earlier one), as bench/ipam_sim.py measures IPAM: a
    # broadcast reaches each peer once over a tree or a full mesh alike, and a full mesh of 100 costs minutes of
    # topology gossip to simulate. No anti-entropy during the measure: deltas only.
    net = chain_of_strangers(peers, seed=1, latency=0.01, gossip_interval=1e6)
    tables = add_dns(net)
    assert run(net, net.converged, 30.0)
    settle(net, 5.0)
    # The table, put in place directly: 1,000 registrations gossiped would cost minutes of simulation.
    for i in range(entries):
        entry = tables[i % peers].table.add(f"netns:c{i}", f"container-{i}.weft.local.", ip("10.32.0.0") + 1 + i, i)
        assert entry is not None
        for t in tables:
            if t.me != entry.origin:
                t.table.merge(entry)
    assert all(len(t.entries()) == entries and t.lookup("container-999") for t in tables)

    rounds = 20
    before = dns_bytes_out(net)
    for i in range(rounds):
        tables[(7 * i) % peers].register(f"netns:new{i}", f"new-container-{i}", [ip("10.33.0.0") + 1 + i])
        assert run(net, lambda i=i: all(t.lookup(f"new-container-{i}") for t in tables), 1.0)
    per_registration = (dns_bytes_out(net) - before) / rounds
    before = dns_bytes_out(net)
    for i in range(rounds):
        tables[(7 * i) % peers].unregister(f"netns:new{i}")
        assert run(net, lambda i=i: not any(t.lookup(f"new-container-{i}") for t in tables), 2.0)
    per_removal = (dns_bytes_out(net) - before) / rounds
    whole = len(tables[0].gossip().encode())  # type: ignore[union-attr]

    print(
        f"\nDNS gossip at {peers} peers with {entries} entries: {per_registration:.0f} bytes per registration "
        f"({per_registration / (peers - 1):.1f} per peer), {per_removal:.0f} per removal; the whole table is "
        f"{whole} bytes, {whole * (peers - 1)} to every peer"
    )
    assert per_registration < whole * (peers - 1) / 10
    assert per_registration / (peers - 1) < whole / 100  # per peer: a delta of one entry, not the table
    assert per_removal / (peers - 1) < whole / 100

"""The topology channel's CRDT: what every peer knows of every other peer and its connections.

Each peer owns its own entry and bumps its version on every change, so a merge is "newer
(version, uid) wins" per peer and never conflicts. A change is gossiped as a delta holding only the
entries that changed, so its cost does not grow with the size of the mesh.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgpack

from weft.mesh.codec import MAX_MESSAGE, DecodeError, expect, expect_uint, pack, unpack
from weft.mesh.peer import NAME_BITS, PeerInfo
from weft.safetext import refuse_control

KIND = "topology"
MAX_NICKNAME = 255
MAX_ADDRESS = 300


@dataclass(frozen=True, slots=True)
class ConnectionSummary:
    """One connection as its owner reports it: the address is one the remote can be dialled at."""

    peer: int
    address: str
    outbound: bool
    established: bool


@dataclass(frozen=True, slots=True)
class PeerEntry:
    name: int
    nickname: str
    uid: int
    version: int
    connections: tuple[ConnectionSummary, ...] = ()
    # Derived once, as the entry is shared by every merge, route computation and relay that reads it: the edges
    # (peer, established) that the graph is made of, the peers of the established ones (as a set, and in order),
    # and (when first sent) the entry's msgpack encoding.
    edges: frozenset[tuple[int, bool]] = field(init=False, repr=False, compare=False)
    established: frozenset[int] = field(init=False, repr=False, compare=False)
    established_order: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _packed: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        edges = frozenset((c.peer, c.established) for c in self.connections)
        object.__setattr__(self, "edges", edges)
        established = frozenset(peer for peer, up in edges if up)
        object.__setattr__(self, "established", established)
        object.__setattr__(self, "established_order", tuple(sorted(established)))

    def beats(self, other: PeerEntry) -> bool:
        return (self.version, self.uid) > (other.version, other.uid)

    def packed(self) -> bytes:
        """``to_wire()`` as msgpack, encoded once: an entry is relayed to every peer of the mesh."""
        if self._packed is None:
            object.__setattr__(self, "_packed", pack(self.to_wire()))
        return self._packed  # type: ignore[return-value]

    def to_wire(self) -> list:
        return [
            self.name,
            self.nickname,
            self.uid,
            self.version,
            [[c.peer, c.address, c.outbound, c.established] for c in self.connections],
        ]

    @classmethod
    def from_wire(cls, raw: object) -> PeerEntry:
        expect(raw, list, KIND, "entry")
        if len(raw) != 5:
            raise DecodeError(KIND, f"entry has {len(raw)} fields, expected 5")
        name = expect_uint(raw[0], NAME_BITS, KIND, "name")
        if name == 0:
            raise DecodeError(KIND, "name 0 is reserved")
        nickname = _printable(expect(raw[1], str, KIND, "nickname")[:MAX_NICKNAME], "nickname")
        uid = expect_uint(raw[2], 64, KIND, "uid")
        version = expect_uint(raw[3], 64, KIND, "version")
        seen = _SEEN_CONNECTIONS
        conns = []
        for c in expect(raw[4], list, KIND, "connections"):
            # A new version of an entry repeats all but one or two of its connections: one read before is taken as
            # it was, without checking and building it again (exact types only, so 1 is never taken for True).
            if type(c) is list and len(c) == 4 and type(c[1]) is str and type(c[2]) is bool and type(c[3]) is bool:
                known = seen.get((c[0], c[1], c[2], c[3])) if type(c[0]) is int else None
                if known is not None:
                    conns.append(known)
                    continue
            conns.append(_connection(c))
        return cls(name, nickname, uid, version, tuple(conns))


SEEN_CONNECTIONS_MAX = 16_384  # every connection of a full mesh of 128 peers
SEEN_ADDRESS_MAX = 64  # longer addresses (names, not host:port) are read every time: the table stays small (~4 MiB)
_SEEN_CONNECTIONS: dict[tuple[int, str, bool, bool], ConnectionSummary] = {}


def _connection(c: object) -> ConnectionSummary:
    """One connection of an entry, checked; remembered for the next version of the entry."""
    expect(c, list, KIND, "connection")
    assert isinstance(c, list)
    if len(c) != 4:
        raise DecodeError(KIND, "connection must have 4 fields")
    peer = expect_uint(c[0], NAME_BITS, KIND, "connection peer")
    address = expect(c[1], str, KIND, "connection address")
    if len(address) > MAX_ADDRESS:
        raise DecodeError(KIND, "connection address too long")
    _printable(address, "connection address")
    summary = ConnectionSummary(
        peer, address, expect(c[2], bool, KIND, "outbound"), expect(c[3], bool, KIND, "established")
    )
    if len(address) <= SEEN_ADDRESS_MAX:  # a neighbour sending 300-character addresses cannot make it hold more
        if len(_SEEN_CONNECTIONS) >= SEEN_CONNECTIONS_MAX:  # nor made-up peers grow it without bound
            _SEEN_CONNECTIONS.clear()
        _SEEN_CONNECTIONS[(summary.peer, summary.address, summary.outbound, summary.established)] = summary
    return summary


@dataclass(slots=True)
class TopologyUpdate:
    """Gossip data of the topology channel: a set of peer entries, merged by newest-wins."""

    entries: dict[int, PeerEntry] = field(default_factory=dict)

    def merge(self, other: TopologyUpdate) -> None:
        if not self.entries:  # every entry is new (a copy for a sender): no comparisons
            self.entries.update(other.entries)
            return
        for name, entry in other.entries.items():
            mine = self.entries.get(name)
            if mine is None or entry.beats(mine):
                self.entries[name] = entry

    def encode(self) -> bytes:
        # The msgpack of a list is its header and then each item's msgpack: the same bytes as packing it whole.
        return _PACKER.pack_array_header(len(self.entries)) + b"".join(e.packed() for e in self.entries.values())

    @classmethod
    def decode(cls, payload: bytes, known: Callable[[int, int, int], bool] | None = None) -> TopologyUpdate:
        """The entries of ``payload``. ``known(name, uid, version)`` (the receiver's view) skips an entry it already
        has as new before its connections are read: a full state from a neighbour is mostly known, and reading
        each connection of each entry is most of what merging it costs (tens of milliseconds at a hundred peers).
        Small payloads (deltas) are read whole, once, and kept (see ``_decoded``)."""
        small = len(payload) <= MEMO_MAX_BYTES
        if small:
            memo = _decoded.get(payload)
            if memo is not None:
                _decoded.move_to_end(payload)
                return cls(dict(memo))
        items = _unknown_items(payload, known) if not small and known is not None else _items(payload)
        entries: dict[int, PeerEntry] = {}
        for item in items:
            entry = PeerEntry.from_wire(item)
            mine = entries.get(entry.name)
            if mine is None or entry.beats(mine):
                entries[entry.name] = entry
        if small:
            _decoded[payload] = entries
            if len(_decoded) > MEMO_SIZE:
                _decoded.popitem(last=False)
        return cls(dict(entries))


# Recently decoded deltas, by their bytes. A delta crosses the mesh byte for byte as its source encoded it, so a
# peer that hears it again (from another neighbour while broadcast trees settle) or a process that holds many
# peers (the simulator: each delta reaches all of them) decodes it once. Entries are immutable, so they are shared.
_PACKER = msgpack.Packer(use_bin_type=True)
MEMO_SIZE = 1024
MEMO_MAX_BYTES = 1024  # full states are big and rarely repeat
_decoded: OrderedDict[bytes, dict[int, PeerEntry]] = OrderedDict()


class Topology:
    """This peer's view of the mesh. Only the owner of an entry changes it; others merge."""

    def __init__(self, ourself: PeerInfo) -> None:
        self.ourself = ourself
        self.peers: dict[int, PeerEntry] = {ourself.name: PeerEntry(ourself.name, ourself.nickname, ourself.uid, 1)}
        # Bumped whenever the graph (who is connected to whom) changes, so routes know when to recompute;
        # ``dirty`` names the peers whose edges changed, so routes can update just those.
        self.graph_version = 0
        self.dirty: set[int] = {ourself.name}
        # Reachability is asked after every change, so it is kept up to date rather than walked afresh: while
        # peers only arrive and report more connections, every peer we reached stays reached.
        self._reached: set[int] = {ourself.name}
        self._wanted: set[int] = set()  # peers that reached peers report connections to, not in our view yet
        self._grown: set[int] = {ourself.name}  # peers new to us or with more connections since the last walk
        self._shrunk = False  # a peer left, or reported fewer peers: walk again from us
        self.graph_listeners: list[Callable[[], None]] = []  # told of each change of the graph, at once

    @property
    def our_entry(self) -> PeerEntry:
        return self.peers[self.ourself.name]

    def set_local_connections(self, connections: Iterable[ConnectionSummary]) -> PeerEntry:
        """Record our connections (a new version of our entry) and return the entry to gossip."""
        old = self.our_entry
        conns = tuple(sorted(connections, key=lambda c: c.peer))
        entry = PeerEntry(old.name, old.nickname, old.uid, old.version + 1, conns)
        self.peers[old.name] = entry
        if old.edges != entry.edges:
            self._graph_changed(old.name, old, entry)
        return entry

    def _graph_changed(self, name: int, old: PeerEntry | None, new: PeerEntry | None) -> None:
        self.graph_version += 1
        self.dirty.add(name)
        if new is None or (
            old is not None
            and not old.edges <= new.edges
            and not {p for p, _ in old.edges} <= {p for p, _ in new.edges}
        ):
            self._shrunk = True
        else:
            self._grown.add(name)
        for listener in self.graph_listeners:
            listener()

    def full_update(self) -> TopologyUpdate:
        return TopologyUpdate(dict(self.peers))

    def merge(self, update: TopologyUpdate) -> tuple[TopologyUpdate, bool]:
        """Merge gossip; return (what was new to us, whether our own entry must be re-announced).

        Gossip about ourselves with another UID means an earlier run of this peer is still
        remembered; we jump our version past it so our current entry wins everywhere.
        """
        delta = TopologyUpdate()
        reannounce = False
        for name, entry in update.entries.items():
            if name == self.ourself.name:
                ours = self.our_entry
                if entry.uid != ours.uid and entry.version >= ours.version:
                    self.peers[name] = PeerEntry(
                        ours.name, ours.nickname, ours.uid, entry.version + 1, ours.connections
                    )
                    reannounce = True
                continue
            mine = self.peers.get(name)
            if mine is not None and not entry.beats(mine):
                continue
            self.peers[name] = entry
            delta.entries[name] = entry
            if mine is None or mine.edges != entry.edges:
                self._graph_changed(name, mine, entry)
        return delta, reannounce

    def knows(self, name: int, uid: int, version: int) -> bool:
        """Whether merging an entry with this header would change nothing (for TopologyUpdate.decode)."""
        mine = self.peers.get(name)
        if mine is None:
            return False
        if name == self.ourself.name:  # another run of ours, at least as new, makes us announce past it
            return uid == mine.uid or version < mine.version
        return (version, uid) <= (mine.version, mine.uid)

    def unreachable(self) -> set[int]:
        """Peers we cannot reach over any chain of reported connections."""
        peers = self.peers
        if self._shrunk:
            self._reached, self._wanted, grown = {self.ourself.name}, set(), {self.ourself.name}
        else:
            grown = self._grown
        self._shrunk, self._grown = False, set()
        reached, wanted = self._reached, self._wanted
        # Walk on from the reached peers that report more connections, and from the peers new to us that a
        # reached peer already reported a connection to.
        stack = [name for name in grown if name in reached]
        for name in grown:
            if name in wanted and name in peers:
                wanted.discard(name)
                reached.add(name)
                stack.append(name)
        while stack:
            entry = peers.get(stack.pop())
            if entry is None:
                continue
            for c in entry.connections:
                if c.peer not in reached:
                    if c.peer in peers:
                        reached.add(c.peer)
                        stack.append(c.peer)
                    else:
                        wanted.add(c.peer)
        # Every peer we reached is in our view (a peer that left made us walk afresh): equal sizes, no one is out.
        return set() if len(reached) == len(peers) else peers.keys() - reached

    def forget(self, names: set[int]) -> list[PeerEntry]:
        gone = [self.peers.pop(name) for name in names if name in self.peers and name != self.ourself.name]
        for entry in gone:
            self._graph_changed(entry.name, entry, None)
        return gone


def _items(payload: bytes) -> list:
    raw = unpack(payload, KIND)
    return expect(raw, list, KIND, "update")


def _unknown_items(payload: bytes, known: Callable[[int, int, int], bool]) -> list:
    """The raw entries of a full state that ``known`` does not already have, read as a stream: each entry's header
    first, and the connections of a known one skipped unread (no lists, no strings made), as most of a neighbour's
    full state is known to its receiver. Malformed msgpack, or a payload that is not one list of entries, is refused
    as :func:`unpack` would."""
    if len(payload) > MAX_MESSAGE:
        raise DecodeError(KIND, f"{len(payload)} bytes is over the {MAX_MESSAGE}-byte limit")
    stream = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(payload), 1))
    stream.feed(payload)
    items: list = []
    try:
        try:
            count = stream.read_array_header()
        except ValueError:  # the payload is msgpack, but not a list
            return _items(payload)
        for _ in range(count):
            try:
                fields = stream.read_array_header()
            except ValueError:  # not a list: read whole, and refused as such
                items.append(stream.unpack())
                continue
            head = [stream.unpack() for _ in range(min(fields, 4))]
            if fields == 5 and _known([*head, None], known):
                stream.skip()
                continue
            items.append(head + [stream.unpack() for _ in range(fields - len(head))])
        if stream.tell() != len(payload):
            raise DecodeError(KIND, "malformed msgpack (ExtraData)")
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several exception types on hostile input
        raise DecodeError(KIND, f"malformed msgpack ({exc.__class__.__name__})") from None
    return items


def _known(item: object, known: Callable[[int, int, int], bool]) -> bool:
    """The header of a raw entry (name, nickname, uid, version, ...) says the receiver has it already. A malformed
    header is not known: the entry is read, and refused, as any other."""
    if not isinstance(item, list) or len(item) != 5:
        return False
    name, uid, version = item[0], item[2], item[3]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (name, uid, version)):
        return False
    return known(name, uid, version)


def _printable(text: str, what: str) -> str:
    """Refuse a string with control characters: it would forge log lines or drive a terminal."""
    try:
        return refuse_control(text, what)
    except ValueError as exc:
        raise DecodeError(KIND, str(exc)) from None

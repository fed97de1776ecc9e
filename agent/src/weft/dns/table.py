"""The name table: every peer's registrations, replicated to every peer as a CRDT. Pure data, no I/O, no clock.

An entry says that a name has an address, for a container (its key) on a peer (its origin), at a version. Its
identity is ``(origin, key, name, address)``; the table holds one entry per identity, live or a tombstone. Entries
are merged per identity: the higher version wins; at the same version a tombstone wins over a live entry, and of two
tombstones the earlier removal time is kept. That is a join, so merging is commutative, associative and idempotent.

Only the origin makes versions for its entries. A peer that receives an entry naming itself as origin and
disagreeing with what it holds (a stale entry from before a restart or a purge, or a forgery) does not take it: it
asserts its own state instead at a higher version (a tombstone when it holds nothing). That is what keeps a stale
entry from coming back after its tombstone was purged everywhere.

Times (a tombstone's removal time, and how long an origin has been out of the topology) are on the holder's own
monotonic clock; the wire carries a tombstone's age instead, so no two clocks need agree (docs/dns.md, "Table").
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass, replace

PURGE_AGE = 30 * 60.0  # seconds a tombstone is kept, and entries of an origin absent from the topology
MAX_VERSION = (1 << 63) - 1
MAX_ENTRIES = 1 << 15  # in a table, and so in one message: a full table must always fit one message

Identity = tuple[int, str, str, int]  # (origin, key, name, address)


@dataclass(frozen=True, slots=True)
class Entry:
    name: str  # absolute, normalised (weft.dns.names)
    address: int  # IPv4
    key: str  # the container's key on its origin (e.g. "netns:web1")
    origin: int  # the peer that registered it
    version: int
    tombstone: float | None = None  # None: live; else when it was removed, on this peer's monotonic clock

    @property
    def identity(self) -> Identity:
        return (self.origin, self.key, self.name, self.address)

    @property
    def live(self) -> bool:
        return self.tombstone is None


def wins(a: Entry, b: Entry) -> bool:
    """Whether ``a`` replaces ``b`` (of the same identity): a higher version, or a tombstone at the same version."""
    if a.version != b.version:
        return a.version > b.version
    return not a.live and b.live


def join(a: Entry, b: Entry) -> Entry:
    """The merge of two entries of one identity; the same whatever the order."""
    if wins(a, b):
        return a
    if wins(b, a):
        return b
    if a.tombstone is not None and b.tombstone is not None and b.tombstone < a.tombstone:
        return b  # one removal seen along two paths: keep the older estimate, so ages never go back
    return a


def next_version(previous: int, wall_ms: int) -> int:
    """A version beating ``previous`` that a later run of this peer, knowing nothing, also beats: the wall clock
    in milliseconds, unless that is not above ``previous``. Capped at MAX_VERSION."""
    return min(max(previous + 1, wall_ms), MAX_VERSION)


class Table:
    """This peer's replica. ``me`` is this peer's name: the origin whose entries only this table changes."""

    def __init__(self, me: int) -> None:
        self.me = me
        self._entries: dict[Identity, Entry] = {}
        self._by_name: dict[str, set[Identity]] = {}
        self._by_address: dict[int, set[Identity]] = {}
        self._by_origin: dict[int, set[Identity]] = {}
        self._absent: dict[int, float] = {}  # origin -> since when it has been out of the topology

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, identity: Identity) -> Entry | None:
        return self._entries.get(identity)

    def entries(self, origins: Container[int] | None = None) -> list[Entry]:
        """Every entry (of ``origins`` only, if given), live or not, shown or hidden."""
        if origins is None:
            return list(self._entries.values())
        return [e for o, ids in self._by_origin.items() if o in origins for e in map(self._entries.__getitem__, ids)]

    def origins(self) -> dict[int, list[Entry]]:
        return {o: [self._entries[i] for i in ids] for o, ids in self._by_origin.items()}

    def absent_since(self, origin: int) -> float | None:
        return self._absent.get(origin)

    # -- merging -------------------------------------------------------------------------------------------------------

    def merge(self, entry: Entry) -> Entry | None:
        """Merge an entry from a peer, by the join alone (the caller keeps entries naming us out: see ``answer``).
        Returns the entry if it was news (it changed what the entry says), else None."""
        assert entry.origin != self.me, "entries naming us go to answer()"
        mine = self._entries.get(entry.identity)
        if mine is None:
            self._put(entry)
            return entry
        joined = join(mine, entry)
        if joined is not mine:
            self._entries[entry.identity] = joined
            if wins(joined, mine):
                return joined
        return None  # the same, or an older estimate of the same removal's time: not worth passing on

    def contradicts(self, entry: Entry) -> bool:
        """Whether ``entry``, naming us as origin, says other than we do: it would win over what we hold, or it
        says live what we do not hold. Such an entry is stale (from before a restart or a purge) or forged."""
        mine = self._entries.get(entry.identity)
        return entry.live if mine is None else wins(entry, mine)

    def answer(self, entry: Entry, wall_ms: int, now: float) -> Entry | None:
        """An entry naming us as origin came from a peer. We take nothing from it; if it would change what we hold
        (or say live what we do not hold), our own state goes out at a version above it: ours again, or a tombstone
        removed ``now``. Returns that (also stored), or None when there is nothing to say or it cannot be beaten."""
        assert entry.origin == self.me
        mine = self._entries.get(entry.identity)
        if mine is None:
            if not entry.live:
                return None  # it says dead, and so do we
            state: float | None = now
        elif wins(entry, mine):
            state = mine.tombstone
        else:
            return None
        ours = replace(entry, version=next_version(entry.version, wall_ms), tombstone=state)
        if not wins(ours, entry):
            return None  # a version at the maximum, made by a forger: it cannot be outdone
        self._put(ours)
        return ours

    # -- this peer's own entries -----------------------------------------------------------------------------------

    def add(self, key: str, name: str, address: int, wall_ms: int) -> Entry | None:
        """Make our entry live; None if it already is."""
        mine = self._entries.get((self.me, key, name, address))
        if mine is not None and mine.live:
            return None
        entry = Entry(name, address, key, self.me, next_version(mine.version if mine else 0, wall_ms))
        self._put(entry)
        return entry

    def remove(self, identity: Identity, wall_ms: int, now: float) -> Entry | None:
        """Make our live entry a tombstone removed ``now``; None if it is not live."""
        mine = self._entries.get(identity)
        if mine is None or not mine.live or mine.origin != self.me:
            return None
        entry = replace(mine, version=next_version(mine.version, wall_ms), tombstone=now)
        self._put(entry)
        return entry

    def own(self, key: str, name: str | None = None) -> list[Entry]:
        """Our live entries for a container key (and name)."""
        ids = self._by_origin.get(self.me, ())
        return sorted(
            (e for e in map(self._entries.__getitem__, ids) if e.live and e.key == key and name in (None, e.name)),
            key=lambda e: (e.name, e.address),
        )

    # -- answers ---------------------------------------------------------------------------------------------------

    def lookup(self, name: str, live_origins: Container[int]) -> list[int]:
        """The addresses of ``name`` (normalised) whose origin is in the topology now, each once, in order."""
        found = {e.address for e in self._select(self._by_name.get(name, ())) if e.origin in live_origins}
        return sorted(found)

    def reverse(self, address: int, live_origins: Container[int]) -> list[str]:
        """The names with ``address``, for PTR queries, as ``lookup`` answers them."""
        return sorted({e.name for e in self._select(self._by_address.get(address, ())) if e.origin in live_origins})

    def shown(self, live_origins: Container[int]) -> int:
        """How many live entries are answered now."""
        return sum(1 for o, ids in self._by_origin.items() if o in live_origins for i in ids if self._entries[i].live)

    def _select(self, ids: Iterable[Identity]) -> Iterable[Entry]:
        return (e for e in map(self._entries.__getitem__, ids) if e.live)

    # -- forgetting ------------------------------------------------------------------------------------------------

    def track(self, present: Container[int], now: float) -> None:
        """Note which origins are in the topology now: absence is timed from the first call that finds one out."""
        for origin in self._by_origin:
            if origin == self.me or origin in present:
                self._absent.pop(origin, None)
            else:
                self._absent.setdefault(origin, now)

    def purge(self, now: float) -> list[Entry]:
        """Drop tombstones removed PURGE_AGE or more ago, and every entry of an origin out of the topology for that
        long (by ``track``). Returns what was dropped."""
        gone = [o for o, since in self._absent.items() if now - since >= PURGE_AGE]
        dropped = [self._entries[i] for o in gone for i in self._by_origin.get(o, ())]
        dropped += [
            e
            for e in self._entries.values()
            if e.tombstone is not None and now - e.tombstone >= PURGE_AGE and e.origin not in gone
        ]
        for entry in dropped:
            self.drop(entry.identity)
        for origin in gone:
            self._absent.pop(origin, None)
        return dropped

    def drop(self, identity: Identity) -> None:
        entry = self._entries.pop(identity, None)
        if entry is None:
            return
        _unindex(self._by_name, entry.name, identity)
        _unindex(self._by_address, entry.address, identity)
        _unindex(self._by_origin, entry.origin, identity)
        if entry.origin not in self._by_origin:
            self._absent.pop(entry.origin, None)

    def _put(self, entry: Entry) -> None:
        identity = entry.identity
        if identity not in self._entries:
            self._by_name.setdefault(entry.name, set()).add(identity)
            self._by_address.setdefault(entry.address, set()).add(identity)
            self._by_origin.setdefault(entry.origin, set()).add(identity)
        self._entries[identity] = entry


def _unindex(index: dict, k: object, identity: Identity) -> None:
    ids = index[k]
    ids.discard(identity)
    if not ids:
        del index[k]

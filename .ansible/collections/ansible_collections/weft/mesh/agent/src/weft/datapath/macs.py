"""MAC gossip: which MAC addresses live behind which peer's bridge.

Each peer owns one entry (its MACs and a version) and is the only one to change it, so merging is
"newest version wins" and never conflicts. Every agent programs its kernel forwarding state from the
merged table. Versions start from the wall clock in milliseconds, so a restarted agent's entry beats
the one its previous run left in the mesh.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from weft.mesh.codec import DecodeError, expect, expect_uint, pack, unpack
from weft.mesh.peer import NAME_BITS

KIND = "macs"
MAX_MACS_PER_PEER = 65536


@dataclass(frozen=True)
class MacEntry:
    version: int
    macs: frozenset[bytes]


@dataclass
class MacUpdate:
    """Gossip data of the ``macs`` channel: peer name -> entry."""

    entries: dict[int, MacEntry] = field(default_factory=dict)

    def merge(self, other: MacUpdate) -> None:
        for name, entry in other.entries.items():
            mine = self.entries.get(name)
            if mine is None or entry.version > mine.version:
                self.entries[name] = entry

    def encode(self) -> bytes:
        return pack([[name, e.version, sorted(e.macs)] for name, e in self.entries.items()])

    @classmethod
    def decode(cls, payload: bytes) -> MacUpdate:
        raw = expect(unpack(payload, KIND), list, KIND, "update")
        update = cls()
        for item in raw:
            if not isinstance(item, list) or len(item) != 3:
                raise DecodeError(KIND, "entry: expected [name, version, macs]")
            name = expect_uint(item[0], NAME_BITS, KIND, "name")
            version = expect_uint(item[1], 64, KIND, "version")
            macs = expect(item[2], list, KIND, "macs")
            if len(macs) > MAX_MACS_PER_PEER:
                raise DecodeError(KIND, f"{len(macs)} MACs for one peer is over the limit")
            if not all(isinstance(m, bytes) and len(m) == 6 for m in macs):
                raise DecodeError(KIND, "macs: expected 6-byte binary addresses")
            update.merge(cls({name: MacEntry(version, frozenset(macs))}))
        return update


class MacTable:
    """The merged table plus this peer's own entry; a gossiper for the ``macs`` channel."""

    def __init__(self, ourself: int, on_change: Callable[[], None]) -> None:
        self.ourself = ourself
        self._on_change = on_change
        self.entries: dict[int, MacEntry] = {ourself: MacEntry(time.time_ns() // 1_000_000, frozenset())}
        self.owner: dict[bytes, int] = {}

    # -- our own entry --------------------------------------------------------------------------

    def set_local(self, macs: Iterable[bytes]) -> MacUpdate | None:
        """Replace our MACs; returns the delta to broadcast, or None if nothing changed."""
        macs = frozenset(macs)
        mine = self.entries[self.ourself]
        if macs == mine.macs:
            return None
        entry = MacEntry(max(mine.version + 1, time.time_ns() // 1_000_000), macs)
        self.entries[self.ourself] = entry
        self._reindex()
        return MacUpdate({self.ourself: entry})

    @property
    def local(self) -> frozenset[bytes]:
        return self.entries[self.ourself].macs

    def forget(self, name: int) -> None:
        """A peer left the mesh for good: its MACs go with it."""
        if name != self.ourself and self.entries.pop(name, None) is not None:
            self._reindex()
            self._on_change()

    # -- gossiper -------------------------------------------------------------------------------

    def gossip(self) -> MacUpdate:
        return MacUpdate(dict(self.entries))

    def on_gossip(self, payload: bytes) -> MacUpdate | None:
        return self._merge(payload)

    def on_gossip_broadcast(self, source: int, payload: bytes) -> MacUpdate | None:
        return self._merge(payload)

    def on_gossip_unicast(self, source: int, payload: bytes) -> None:
        return None

    def _merge(self, payload: bytes) -> MacUpdate | None:
        delta = MacUpdate()
        for name, entry in MacUpdate.decode(payload).entries.items():
            mine = self.entries.get(name)
            if name == self.ourself:
                if mine is not None and entry.version >= mine.version:
                    # An older run of ours left this in the mesh: move past it with what we have now.
                    self.entries[name] = MacEntry(entry.version + 1, mine.macs)
                    delta.entries[name] = self.entries[name]
                continue
            if mine is None or entry.version > mine.version:
                self.entries[name] = entry
                delta.entries[name] = entry
        if not delta.entries:
            return None
        self._reindex()
        self._on_change()
        return delta

    def _reindex(self) -> None:
        owner: dict[bytes, int] = {}
        for name, entry in self.entries.items():
            for mac in entry.macs:
                # A MAC claimed by two peers (a container moved): the newer claim wins.
                current = owner.get(mac)
                if current is None or entry.version > self.entries[current].version:
                    owner[mac] = name
        self.owner = owner

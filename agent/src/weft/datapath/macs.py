"""MAC gossip: which MAC addresses live behind which peer's bridge.

Each peer owns one entry (its MACs and a version) and is the only one to change it, so merging is
"newest version wins" per peer. Every agent programs its kernel forwarding state from the merged table.
Versions start from the wall clock in milliseconds, so a restarted agent's entry beats the one its
previous run left in the mesh.

Two peers can still claim the same MAC (a container moving between hosts for a moment, the same MAC
attached twice, or a peer lying). That is a conflict, reported, and never decided by versions, which
the claimant chooses: every host sends the MAC to the claimant with the lowest peer name, whatever
order the claims arrived in, and a claimant always keeps delivering to the container it attached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from weft.mesh.codec import DecodeError, expect, expect_uint, pack, unpack
from weft.mesh.peer import NAME_BITS, format_name

log = logging.getLogger(__name__)

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
        self.conflicts: dict[bytes, tuple[int, ...]] = {}  # MAC -> every peer claiming it, lowest name first

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
                # Our own entry coming back (anti-entropy, a neighbour's full state) is no news. An older run of ours
                # left one at least as new (another set of MACs at our version, or a later version): move past it
                # with what we have now.
                if mine is not None and (
                    entry.version > mine.version or (entry.version == mine.version and entry.macs != mine.macs)
                ):
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
        claims: dict[bytes, list[int]] = {}
        for name, entry in self.entries.items():
            for mac in entry.macs:
                claims.setdefault(mac, []).append(name)
        local = self.entries[self.ourself].macs
        owner: dict[bytes, int] = {}
        conflicts: dict[bytes, tuple[int, ...]] = {}
        for mac, names in claims.items():
            if len(names) > 1:
                conflicts[mac] = tuple(sorted(names))
            # Ours stays ours (we attached it); otherwise the lowest name, so every host picks the same one.
            owner[mac] = self.ourself if mac in local else min(names)
        self.owner = owner
        self._report(conflicts)

    def _report(self, conflicts: dict[bytes, tuple[int, ...]]) -> None:
        """One log line when a conflict starts (or its claimants change), one when it ends."""
        for mac, names in sorted(conflicts.items()):
            if self.conflicts.get(mac) != names:
                log.warning(
                    "MAC conflict: %s is claimed by peers %s; other hosts send it to %s (lowest name)",
                    mac.hex(":"),
                    ", ".join(format_name(n) for n in names),
                    format_name(names[0]),
                )
        for mac in sorted(self.conflicts.keys() - conflicts.keys()):
            log.info("MAC conflict over: %s is claimed by one peer again", mac.hex(":"))
        self.conflicts = conflicts

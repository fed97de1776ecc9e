"""The ``dns`` gossip channel's data, and its total decoding (anything malformed is a DecodeError).

A :class:`DnsUpdate` holds entries of the name table: all of them (of the origins its sender sees) on connect and in
anti-entropy, only the changed ones otherwise. Entries are grouped by origin, and each name and key is sent once per
message: its first appearance is the string, later ones the number of that appearance. A tombstone travels as its
age, not as a time, so peers need no common clock. docs/protocol.md, "The DNS payload", describes the fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from weft.dns import names
from weft.dns.table import MAX_ENTRIES, Entry, Identity, join
from weft.mesh.codec import DecodeError, expect, expect_uint, pack, unpack
from weft.mesh.peer import NAME_BITS
from weft.safetext import has_control

KIND = "dns"
MAX_KEY = 128  # characters of a container key; the service shortens longer keys (weft.dns.service.container_key)
MAX_AGE_MS = 1 << 40  # a tombstone's age on the wire: 34 years, far past any purge
ENTRY_FIELDS = 5


@dataclass(slots=True)
class DnsUpdate:
    """Gossip data of the ``dns`` channel. Pending updates for one connection merge per identity, as the table does.

    ``clock`` is the sender's monotonic clock, read when the update is encoded to turn removal times into ages."""

    entries: dict[Identity, Entry] = field(default_factory=dict)
    sender: int = 0
    clock: Callable[[], float] | None = None

    @classmethod
    def of(cls, entries: list[Entry], sender: int, clock: Callable[[], float]) -> DnsUpdate:
        return cls({e.identity: e for e in entries}, sender, clock)

    def merge(self, other: DnsUpdate) -> None:
        if not self.sender:
            self.sender = other.sender
        if self.clock is None:
            self.clock = other.clock
        for identity, entry in other.entries.items():
            mine = self.entries.get(identity)
            self.entries[identity] = entry if mine is None else join(mine, entry)

    def encode(self) -> bytes:
        now = self.clock() if self.clock is not None else 0.0
        seen: dict[str, int] = {}

        def text(value: str) -> str | int:
            """A string the first time, then the number of its first appearance in the message."""
            index = seen.get(value)
            if index is None:
                seen[value] = len(seen)
                return value
            return index

        groups: dict[int, list[list]] = {}
        for entry in sorted(self.entries.values(), key=lambda e: (e.origin, e.name, e.key, e.address)):
            if entry.tombstone is None:
                tomb = 0
            else:
                tomb = min(max(0, round((now - entry.tombstone) * 1000)), MAX_AGE_MS - 1) + 1
            group = groups.setdefault(entry.origin, [])
            group.append([text(entry.name), entry.address, text(entry.key), entry.version, tomb])
        return pack({"f": self.sender, "o": [[o, g] for o, g in groups.items()]})

    @classmethod
    def decode(cls, payload: bytes, now: float) -> DnsUpdate:
        """Decode, turning tombstone ages into removal times on the clock that reads ``now``."""
        raw = unpack(payload, KIND)
        expect(raw, dict, KIND, "update")
        update = cls(sender=_name(raw.get("f"), "sender"))
        groups = expect(raw.get("o", []), list, KIND, "o")
        if len(groups) > MAX_ENTRIES:  # each group holds an entry at least
            raise DecodeError(KIND, f"more than {MAX_ENTRIES} origin groups")
        total = 0
        for group in groups:
            expect(group, list, KIND, "origin group")
            if len(group) != 2:
                raise DecodeError(KIND, f"origin group has {len(group)} fields, expected 2")
            total += len(expect(group[1], list, KIND, "entries"))
            if total > MAX_ENTRIES:
                raise DecodeError(KIND, f"more than {MAX_ENTRIES} entries")
        strings: list[str] = []  # in order of first appearance
        checked: dict[tuple[int, str], str] = {}  # (string, what) -> the string, once checked as a name or a key

        def text(value: object, check: Callable[[str], str], what: str) -> str:
            if isinstance(value, str):
                index = len(strings)
                strings.append(value)
            else:
                index = expect_uint(value, 32, KIND, what)
                if index >= len(strings):
                    raise DecodeError(KIND, f"{what}: string {index} of {len(strings)} sent so far")
            done = checked.get((index, what))
            if done is None:
                try:
                    done = checked[(index, what)] = check(strings[index])
                except ValueError as exc:
                    raise DecodeError(KIND, f"{what}: {exc}") from None
            return done

        seen: set[int] = set()
        for origin_raw, items in groups:
            origin = _name(origin_raw, "origin")
            if origin in seen:
                raise DecodeError(KIND, "origin repeated")
            seen.add(origin)
            if not items:
                raise DecodeError(KIND, "origin group without entries")
            for item in items:
                expect(item, list, KIND, "entry")
                if len(item) != ENTRY_FIELDS:
                    raise DecodeError(KIND, f"entry has {len(item)} fields, expected {ENTRY_FIELDS}")
                name = text(item[0], names.check, "name")
                address = expect_uint(item[1], 32, KIND, "address")
                key = text(item[2], check_key, "key")
                version = expect_uint(item[3], 63, KIND, "version")
                if version == 0:
                    raise DecodeError(KIND, "version 0 is reserved")
                tomb = expect_uint(item[4], 41, KIND, "tombstone age")
                if tomb > MAX_AGE_MS:
                    raise DecodeError(KIND, "tombstone age out of range")
                entry = Entry(name, address, key, origin, version, None if tomb == 0 else now - (tomb - 1) / 1000)
                if entry.identity in update.entries:
                    raise DecodeError(KIND, "entry repeated")
                update.entries[entry.identity] = entry
        return update


def check_key(key: str) -> str:
    """A container key as the wire allows it: 1-128 characters, none of them a control character."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY:
        raise ValueError(f"a container key is 1 to {MAX_KEY} characters")
    if has_control(key):
        raise ValueError("a container key cannot hold control characters")
    return key


def _name(value: object, what: str) -> int:
    name = expect_uint(value, NAME_BITS, KIND, what)
    if name == 0:
        raise DecodeError(KIND, f"{what}: name 0 is reserved")
    return name

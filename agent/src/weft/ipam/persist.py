"""The ring and the allocations in the agent's SQLite store: every change is one transaction, written before it is
gossiped or answered, so a ``kill -9`` never loses an address that was handed out."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field

from weft.ipam.ring import Entry, Ring
from weft.ipam.space import Allocation
from weft.store import Store, StoreError

RANGE_KEY = "ipam_range"
SEED_KEY = "ipam_seed"
NICKNAMES_KEY = "ipam_nicknames"


@dataclass
class Saved:
    range: tuple[int, int] | None = None
    ring: Ring | None = None
    allocations: dict[int, Allocation] = field(default_factory=dict)
    nicknames: dict[int, str] = field(default_factory=dict)


class IpamStore:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._db = store.db

    def load(self) -> Saved:
        saved = Saved()
        raw_range = self._store.get(RANGE_KEY)
        if raw_range:
            start, end = (int(v) for v in raw_range.split("-"))
            saved.range = (start, end)
            seed = tuple(int(v) for v in (self._store.get(SEED_KEY) or "").split(",") if v)
            ring = Ring(start, end, seed)
            for token, version, owner, free in self._db.execute("SELECT token, version, owner, free FROM ipam_tokens"):
                ring.put(token, Entry(version, owner, free))
            saved.ring = None if ring.empty else ring
        for address, key, prefixlen, label, host_ifname in self._db.execute(
            "SELECT address, key, prefixlen, label, host_ifname FROM ipam_allocations"
        ):
            saved.allocations[address] = Allocation(key, prefixlen, label, host_ifname)
        try:
            saved.nicknames = {int(k): v for k, v in json.loads(self._store.get(NICKNAMES_KEY) or "{}").items()}
        except (ValueError, AttributeError):
            saved.nicknames = {}
        return saved

    def reset(self, start: int, end: int) -> None:
        """Forget the ring and the allocations: the range changed, so none of it applies any more."""
        with self._tx() as db:
            db.execute("DELETE FROM ipam_tokens")
            db.execute("DELETE FROM ipam_allocations")
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (RANGE_KEY, f"{start}-{end}"))
            db.execute("DELETE FROM meta WHERE key = ?", (SEED_KEY,))

    def commit(
        self,
        *,
        seed: tuple[int, ...] | None = None,
        tokens: dict[int, Entry] | None = None,
        add: dict[int, Allocation] | None = None,
        remove: Iterable[int] = (),
    ) -> None:
        with self._tx() as db:
            if seed is not None:
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (SEED_KEY, ",".join(map(str, seed)))
                )
            if tokens:
                db.executemany(
                    "INSERT OR REPLACE INTO ipam_tokens (token, version, owner, free) VALUES (?, ?, ?, ?)",
                    [(t, e.version, e.owner, e.free) for t, e in tokens.items()],
                )
            if add:
                db.executemany(
                    "INSERT OR REPLACE INTO ipam_allocations (address, key, prefixlen, label, host_ifname) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(a, x.key, x.prefixlen, x.label, x.host_ifname) for a, x in add.items()],
                )
            removed = list(remove)
            if removed:
                db.executemany("DELETE FROM ipam_allocations WHERE address = ?", [(a,) for a in removed])

    def save_nicknames(self, nicknames: dict[int, str]) -> None:
        self._store.put(NICKNAMES_KEY, json.dumps({str(k): v for k, v in nicknames.items()}))

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        try:
            self._db.execute("COMMIT" if kind is None else "ROLLBACK")
        except sqlite3.Error as error:
            raise StoreError(f"cannot write IPAM state to {self._db}: {error}") from None

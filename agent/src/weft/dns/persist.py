"""The names this host registered, in the agent's SQLite store, so a restarted agent registers them again.

Only our own registrations are kept (who asked for which name, with which addresses, on which veth): the table's
other entries come back by gossip from their origins. Names of containers detached while the agent was down are
not kept anywhere: peers that still hold them learn they are gone when they send them back to us (we answer an
entry of ours we do not hold with a tombstone, see weft.dns.table), and once they are unregistered at start.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from weft.store import Store, StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS dns_names (
    key TEXT NOT NULL, name TEXT NOT NULL, addresses TEXT NOT NULL, host_ifname TEXT,
    PRIMARY KEY (key, name));
"""


@dataclass(frozen=True)
class Registration:
    key: str
    name: str  # absolute, as the table holds it
    addresses: tuple[int, ...]
    host_ifname: str | None  # the container's veth; None: not a container's (weft dns-add)


class DnsStore:
    def __init__(self, store: Store) -> None:
        self._db = store.db
        try:
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prepare the names in the state database: {exc}") from None

    def load(self) -> list[Registration]:
        rows = self._db.execute("SELECT key, name, addresses, host_ifname FROM dns_names ORDER BY key, name")
        out = []
        for key, name, addresses, host_ifname in rows:
            try:
                parsed = tuple(int(a) for a in addresses.split(",") if a)
            except ValueError:
                continue  # not written by us: skip it rather than refuse to start
            out.append(Registration(key, name, parsed, host_ifname))
        return out

    def save(self, reg: Registration) -> None:
        self._write(
            "INSERT OR REPLACE INTO dns_names (key, name, addresses, host_ifname) VALUES (?, ?, ?, ?)",
            (reg.key, reg.name, ",".join(map(str, reg.addresses)), reg.host_ifname),
        )

    def delete(self, key: str, name: str | None = None) -> None:
        if name is None:
            self._write("DELETE FROM dns_names WHERE key = ?", (key,))
        else:
            self._write("DELETE FROM dns_names WHERE key = ? AND name = ?", (key, name))

    def _write(self, sql: str, args: tuple) -> None:
        try:
            with self._db:
                self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the names to the state database: {exc}") from None

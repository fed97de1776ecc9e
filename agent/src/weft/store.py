"""Agent state on disk: SQLite in WAL mode, one transaction per change, so a crash loses nothing
that was reported as done."""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS targets (address TEXT PRIMARY KEY, origin TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ipam_tokens (
    token INTEGER PRIMARY KEY, version INTEGER NOT NULL, owner INTEGER NOT NULL, free INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ipam_allocations (
    address INTEGER PRIMARY KEY, key TEXT NOT NULL, prefixlen INTEGER NOT NULL, label TEXT NOT NULL,
    host_ifname TEXT);
"""


class StoreError(Exception):
    pass


class Store:
    def __init__(self, state_dir: Path) -> None:
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.path = state_dir / "weft.db"
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the state database in {state_dir}: {exc}") from None

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def targets(self) -> list[tuple[str, str]]:
        return list(self._db.execute("SELECT address, origin FROM targets ORDER BY address"))

    def set_targets(self, targets: list[tuple[str, str]]) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM targets")
            self._db.executemany("INSERT INTO targets (address, origin) VALUES (?, ?)", targets)

    @property
    def db(self) -> sqlite3.Connection:
        """For the modules that keep their own tables here (weft.ipam.persist); one transaction per change."""
        return self._db

    def close(self) -> None:
        self._db.close()

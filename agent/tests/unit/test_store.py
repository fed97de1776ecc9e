"""Agent state on disk: what the agent records survives a restart, and target lists change all at once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from weft.store import Store, StoreError


def test_peer_name_and_targets_survive_reopening(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.put("peer_name", "02:1f:aa:00:00:01")
    store.set_targets([("10.0.0.2:6783", "config"), ("[fd00::3]:6783", "api")])
    store.close()

    reopened = Store(tmp_path / "state")
    try:
        assert reopened.get("peer_name") == "02:1f:aa:00:00:01"
        assert sorted(reopened.targets()) == [("10.0.0.2:6783", "config"), ("[fd00::3]:6783", "api")]
        assert reopened.get("missing") is None
    finally:
        reopened.close()


def test_writes_are_visible_to_another_process_without_closing(tmp_path: Path) -> None:
    """Each change is committed when the call returns: a crash right after loses nothing."""
    store = Store(tmp_path)
    store.put("peer_name", "02:00:00:00:00:09")
    store.set_targets([("h:1", "api")])
    other = Store(tmp_path)
    try:
        assert other.get("peer_name") == "02:00:00:00:00:09"
        assert other.targets() == [("h:1", "api")]
    finally:
        other.close()
        store.close()


def test_put_overwrites(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.put("peer_name", "a")
    store.put("peer_name", "b")
    assert store.get("peer_name") == "b"
    store.close()


def test_set_targets_replaces_the_whole_list(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.set_targets([("a:6783", "config"), ("b:6783", "api")])
    store.set_targets([("c:6783", "api")])
    assert store.targets() == [("c:6783", "api")]
    store.set_targets([])
    assert store.targets() == []
    store.close()


def test_a_failed_set_targets_leaves_the_old_list(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.set_targets([("a:6783", "config"), ("b:6783", "api")])
    # The second row collides with the first, after the old rows were deleted inside the transaction.
    with pytest.raises(sqlite3.Error):
        store.set_targets([("c:6783", "api"), ("c:6783", "config")])
    assert sorted(store.targets()) == [("a:6783", "config"), ("b:6783", "api")]
    store.close()
    reopened = Store(tmp_path)
    assert sorted(reopened.targets()) == [("a:6783", "config"), ("b:6783", "api")]
    # And the store still works afterwards.
    reopened.set_targets([("d:6783", "api")])
    assert reopened.targets() == [("d:6783", "api")]
    reopened.close()


def test_state_dir_is_created_private(tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "weft"
    Store(state).close()
    assert (state / "weft.db").is_file()
    assert state.stat().st_mode & 0o077 == 0


def test_an_unusable_state_dir_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as info:
        Store(blocker)
    assert str(blocker) in str(info.value)

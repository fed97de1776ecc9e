"""The fast-path guard's ruleset and set changes, without touching the kernel (nft is faked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weft.datapath import fastguard
from weft.datapath.fastguard import FastGuard, GuardError, render, render_changes


class FakeNft:
    """Records scripts; answers list commands like nft -j would."""

    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.fail_next = False
        self.packets = {"unknown_sender": 7, "unknown_dest": 2}

    def __call__(self, *args: str, script: str | None = None) -> str:
        if script is not None:
            if self.fail_next:
                self.fail_next = False
                raise GuardError("No such file or directory")
            self.scripts.append(script)
            return ""
        if args[:3] == ("-j", "list", "counters"):
            items = [{"counter": {"name": n, "packets": p, "bytes": 0}} for n, p in self.packets.items()]
            return json.dumps({"nftables": [{"metainfo": {}}, *items]})
        if args[:3] == ("-j", "list", "set"):
            elem = ["10.0.0.9"] if args[-1] == "fast4" else []
            return json.dumps({"nftables": [{"metainfo": {}}, {"set": {"name": args[-1], "elem": elem}}]})
        raise AssertionError(args)


def test_the_ruleset_admits_fast_peers_and_probes_and_drops_the_rest() -> None:
    text = render(6784, 6783, ["10.0.0.2", "fd00::2"], ["10.0.0.3", "10.0.0.4"], ["10.0.0.4"])
    assert text.startswith("table inet weft_fast_6784 {}\ndelete table inet weft_fast_6784\n")  # atomic replace
    assert "set fast4 { type ipv4_addr; elements = { 10.0.0.2 }; }" in text
    assert "set fast6 { type ipv6_addr; elements = { fd00::2 }; }" in text
    assert "set probe4 { type ipv4_addr; elements = { 10.0.0.3, 10.0.0.4 }; }" in text
    assert "udp dport 6784 ip saddr @fast4 accept" in text
    # Probes cross from the peers whose subnet we trust; all a peer may send us in clear (both ends trust each
    # other) is taken, as it may choose the fast path before we do...
    assert "udp dport 6784 ip saddr @probe4 @th,128,48 0x0180c200000f @th,224,16 0x88b5 accept\n" in text
    assert "set peer4 { type ipv4_addr; elements = { 10.0.0.4 }; }" in text
    assert "udp dport 6784 ip saddr @peer4 accept\n" in text
    # ...but only our own probes go to it until we send it fast traffic.
    assert "udp sport 6783 udp dport 6784 ip daddr @probe4 @th,128,48 0x0180c200000f @th,224,16 0x88b5 accept" in text
    assert 'udp dport 6784 counter name "unknown_sender" drop' in text
    assert 'udp dport 6784 counter name "unknown_dest" drop' in text
    assert "weft_lab" not in text
    # The busy sets hold the fast addresses again and count their unicast frames, probes and floods aside.
    assert "set busy4 { type ipv4_addr; counter; elements = { 10.0.0.2 }; }" in text
    assert "set busy6 { type ipv6_addr; counter; elements = { fd00::2 }; }" in text
    assert "udp dport 6784 @th,128,8 & 0x1 == 0x0 ip saddr @busy4\n" in text
    assert "udp dport 6784 @th,128,8 & 0x1 == 0x0 ip daddr @busy4\n" in text
    assert text.index("@busy4\n") < text.index("@fast4 accept")


def test_per_peer_traffic_is_read_from_the_busy_sets_counters() -> None:
    def run(*args: str, script: str | None = None) -> str:
        assert args[:3] == ("-j", "list", "set")
        elem: list = []
        if args[-1] == "busy4":
            elem = [
                {"elem": {"val": "10.0.0.2", "counter": {"packets": 7, "bytes": 900}}},
                {"elem": {"val": "10.0.0.4", "counter": "garbage"}},
                "10.0.0.3",
            ]
        return json.dumps({"nftables": [{"metainfo": {}}, {"set": {"name": args[-1], "elem": elem}}]})

    guard = FastGuard(6784, 6783, run=run)
    assert guard.traffic() == {"10.0.0.2": 7, "10.0.0.3": 0, "10.0.0.4": 0}

    def missing(*args: str, script: str | None = None) -> str:
        raise GuardError("Error: No such file or directory")  # a table an earlier version loaded: no busy sets

    assert FastGuard(6784, 6783, run=missing).traffic() == {}


def test_set_changes_are_diffs_and_nothing_runs_when_nothing_changes() -> None:
    nft = FakeNft()
    guard = FastGuard(6784, 6783, run=nft)
    guard.start(["10.0.0.1"])
    assert len(nft.scripts) == 1
    guard.sync(["10.0.0.1", "10.0.0.2"], ["10.0.0.2"])
    assert nft.scripts[-1] == (
        "add element inet weft_fast_6784 fast4 { 10.0.0.2 }\n"
        "add element inet weft_fast_6784 busy4 { 10.0.0.2 }\n"
        "add element inet weft_fast_6784 probe4 { 10.0.0.2 }\n"
    )
    guard.sync(["10.0.0.1", "10.0.0.2"], ["10.0.0.2"])
    assert len(nft.scripts) == 2
    guard.sync(["10.0.0.1", "10.0.0.2"], ["10.0.0.2"], ["10.0.0.2"])
    assert nft.scripts[-1] == "add element inet weft_fast_6784 peer4 { 10.0.0.2 }\n"
    guard.sync(["10.0.0.1", "10.0.0.2"], ["10.0.0.2"])
    assert nft.scripts[-1] == "delete element inet weft_fast_6784 peer4 { 10.0.0.2 }\n"
    guard.sync(["fd00::1"], [])
    assert nft.scripts[-1] == (
        "add element inet weft_fast_6784 fast6 { fd00::1 }\n"
        "delete element inet weft_fast_6784 fast4 { 10.0.0.1, 10.0.0.2 }\n"
        "add element inet weft_fast_6784 busy6 { fd00::1 }\n"
        "delete element inet weft_fast_6784 busy4 { 10.0.0.1, 10.0.0.2 }\n"
        "delete element inet weft_fast_6784 probe4 { 10.0.0.2 }\n"
    )
    assert render_changes("t", ("a", "b"), [], []) == ""


def test_a_table_removed_under_the_agent_is_loaded_again_whole() -> None:
    nft = FakeNft()
    guard = FastGuard(6784, 6783, run=nft)
    guard.start([])
    nft.fail_next = True
    guard.sync(["10.0.0.5"], [])
    assert nft.scripts[-1].startswith("table inet weft_fast_6784 {}\ndelete table")
    assert "elements = { 10.0.0.5 }" in nft.scripts[-1]
    assert guard.fast == {"10.0.0.5"}


def test_drops_are_read_from_the_counters_and_survive_a_reload_of_the_table() -> None:
    nft = FakeNft()
    guard = FastGuard(6784, 6783, run=nft)
    guard.start([])
    assert guard.kept() == {"10.0.0.9"}
    assert guard.dropped() == {"fast_unknown_sender": 7, "fast_unknown_dest": 2}
    guard.start([])  # counters start from zero in the new table; the metric must not go back
    nft.packets = {"unknown_sender": 1, "unknown_dest": 0}
    assert guard.dropped(fresh=True) == {"fast_unknown_sender": 8, "fast_unknown_dest": 2}


def test_without_nft_the_error_says_to_install_nftables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(fastguard, "_NFT_PATHS", (str(tmp_path / "sbin" / "nft"),))
    with pytest.raises(GuardError, match=r"install it \(apt install nftables\)"):
        FastGuard(6784, 6783)


def test_nft_is_found_on_path_first_then_where_distributions_put_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    on_path, sbin, plain = tmp_path / "bin", tmp_path / "sbin", tmp_path / "plain"
    for d in (on_path, sbin, plain):
        d.mkdir()
        (d / "nft").write_text("#!/bin/sh\n")
    (on_path / "nft").chmod(0o755)
    (sbin / "nft").chmod(0o755)
    monkeypatch.setattr(fastguard, "_NFT_PATHS", (str(sbin / "nft"),))
    monkeypatch.setenv("PATH", f"{plain}:{on_path}")  # a file that is not executable is passed over
    assert fastguard.find_nft() == str(on_path / "nft")
    monkeypatch.setenv("PATH", str(plain))
    assert fastguard.find_nft() == str(sbin / "nft")

"""The container port guard without a kernel: its ruleset, element diffs, and counters turned into log lines
(netns/test_portguard_netns.py runs the libnftables runner on a kernel)."""

from __future__ import annotations

import json

import pytest

from weft.datapath.portguard import NftError, PortGuard, remove_table, ruleset

P1, P2 = "vwe00000001", "vwe00000002"
M1, M2, FORGED = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:99"


class FakeNft:
    """Records scripts; answers listings with the counters a test sets."""

    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.dropped = 0
        self.forged: dict[tuple[str, str], int] = {}
        self.fail_next = False

    def __call__(self, args: list[str], script: str | None) -> str:
        if script is not None:
            if self.fail_next:
                self.fail_next = False
                raise NftError("nft: Error: Could not process rule: No such file or directory")
            self.scripts.append(script)
            return ""
        elem = [
            {"elem": {"val": {"concat": [port, mac]}, "counter": {"packets": n, "bytes": 60 * n}}}
            for (port, mac), n in self.forged.items()
        ]
        return json.dumps(
            {
                "nftables": [
                    {"counter": {"name": "dropped", "packets": self.dropped}},
                    {"set": {"name": "forged", "elem": elem}},
                ]
            }
        )


def test_the_ruleset_allows_each_container_ports_own_macs_and_leaves_other_ports_alone() -> None:
    text = ruleset({P1: {M1}, P2: {M2.upper()}, "vxlan-6784": {M1}, "vwe bad": {M1}, "vwe00000003": {"nonsense"}})
    assert f'"{P1}" . {M1}' in text and f'"{P2}" . {M2}' in text
    assert "vxlan" not in text and "vwe bad" not in text and "nonsense" not in text
    assert 'iifname != "vwe*" accept' in text
    assert text.index("@allowed accept") < text.index("update @forged") < text.index('counter name "dropped" drop')


def test_sync_changes_only_the_pairs_that_differ_and_rebuilds_when_nft_refuses() -> None:
    nft = FakeNft()
    guard = PortGuard(nft)
    guard.start({P1: {M1}})
    assert nft.scripts[-1].startswith("add table bridge weft_portguard\ndelete table bridge weft_portguard\n")
    assert guard.sync({P1: {M1}}) is False and len(nft.scripts) == 1
    assert guard.sync({P1: {M1}, P2: {M2}})
    assert nft.scripts[-1] == f'add element bridge weft_portguard allowed {{ "{P2}" . {M2} }}\n'
    assert guard.sync({P2: {M2}})
    assert nft.scripts[-1] == f'delete element bridge weft_portguard allowed {{ "{P1}" . {M1} }}\n'
    nft.fail_next = True  # someone deleted the table
    assert guard.sync({P2: {M2}, P1: {M1}})
    assert "delete table" in nft.scripts[-1] and f'"{P1}" . {M1}' in nft.scripts[-1]
    assert guard.ports == {P1: frozenset({M1}), P2: frozenset({M2})}


def test_forged_frames_are_counted_and_logged_once_a_minute_per_port(caplog: pytest.LogCaptureFixture) -> None:
    nft = FakeNft()
    guard = PortGuard(nft, log_every=60)
    guard.start({P1: {M1}, P2: {M2}})
    nft.forged = {(P2, M2): 3}  # sent before its port was in the set: counted, but not a forgery to report
    nft.dropped = 3
    with caplog.at_level("WARNING", logger="weft.datapath.portguard"):
        guard.poll(now=100.0)
        assert guard.dropped == 3 and not caplog.records
        nft.forged[(P1, FORGED)] = 5
        nft.dropped = 8
        guard.poll(now=101.0)
        nft.forged[(P1, FORGED)] = 9
        guard.poll(now=130.0)  # within the minute: no second line, the 4 wait for the next one
        nft.forged[(P1, FORGED)] = 10
        guard.poll(now=162.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"dropped frames with a forged source MAC on container port {P1}: {FORGED} x5 (its own: {M1})",
        f"dropped frames with a forged source MAC on container port {P1}: {FORGED} x5 (its own: {M1})",
    ]
    assert guard.dropped == 8


def test_reset_removes_the_table_only_if_there_is_one() -> None:
    calls: list[list[str]] = []

    def present(args: list[str], script: str | None) -> str:
        calls.append(args)
        return ""

    def absent(args: list[str], script: str | None) -> str:
        raise NftError("nft: Error: No such file or directory")

    assert remove_table(present) and calls[-1] == ["delete", "table", "bridge", "weft_portguard"]
    assert remove_table(absent) is False

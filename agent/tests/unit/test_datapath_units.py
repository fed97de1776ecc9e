"""The data plane's decisions, without a kernel: MAC gossip, path choice, FDB state and probes."""

from __future__ import annotations

import pytest

from weft.datapath.fdb import ZERO_MAC, desired_state
from weft.datapath.macs import MacTable, MacUpdate
from weft.datapath.paths import FAST, SLEEVE, PathState, ladder
from weft.datapath.plane import DataPlane
from weft.datapath.probe import GROUP, VXLAN_OVERHEAD, build_probe, parse_probe, probe_mac
from weft.mesh.codec import DecodeError, pack, unpack
from weft.mesh.crypto import SessionKeys
from weft.metrics import Metrics

A, B, C = 0x020000000001, 0x020000000002, 0x020000000003
MAC1, MAC2, MAC3 = b"\x0a" * 6, b"\x0b" * 6, b"\x0c" * 6
KEYS = SessionKeys(b"s" * 32, b"r" * 32)


# -- MAC gossip --------------------------------------------------------------------------------


def test_local_macs_reach_another_peer_and_only_news_is_passed_on() -> None:
    changes: list[str] = []
    a, b = MacTable(A, lambda: changes.append("a")), MacTable(B, lambda: changes.append("b"))
    delta = a.set_local([MAC1, MAC2])
    assert delta is not None and a.set_local([MAC1, MAC2]) is None
    assert b.on_gossip_broadcast(A, delta.encode()) is not None
    assert b.owner == {MAC1: A, MAC2: A}
    assert b.on_gossip(a.gossip().encode()) is None, "old news must not be passed on"
    assert changes == ["b"]


def test_a_newer_entry_replaces_the_old_and_removed_macs_go() -> None:
    a, b = MacTable(A, lambda: None), MacTable(B, lambda: None)
    b.on_gossip(a.set_local([MAC1, MAC2]).encode())  # type: ignore[union-attr]
    b.on_gossip(a.set_local([MAC2]).encode())  # type: ignore[union-attr]
    assert b.owner == {MAC2: A}


def test_a_restarted_peer_moves_past_what_its_last_run_left() -> None:
    old = MacTable(A, lambda: None)
    stale = old.set_local([MAC1])
    stale.entries[A] = type(stale.entries[A])(stale.entries[A].version + 10_000, frozenset([MAC1]))
    fresh = MacTable(A, lambda: None)
    fresh.set_local([MAC2])
    delta = fresh.on_gossip(stale.encode())
    assert delta is not None and delta.entries[A].macs == {MAC2}
    assert delta.entries[A].version > stale.entries[A].version


def test_our_own_entry_gossiped_back_unchanged_is_no_news() -> None:
    """Anti-entropy hands every peer its own entry back: bumping its version for that made every full-state round
    a mesh-wide change (each host reprogramming its kernel tables)."""
    changes: list[str] = []
    a, b = MacTable(A, lambda: changes.append("a")), MacTable(B, lambda: changes.append("b"))
    b.on_gossip(a.set_local([MAC1]).encode())  # type: ignore[union-attr]
    version = a.entries[A].version
    learnt = a.on_gossip(b.gossip().encode())  # b's entry is news to a; a's own, coming back, is not
    assert learnt is not None and set(learnt.entries) == {B}
    assert a.on_gossip(b.gossip().encode()) is None
    assert a.entries[A].version == version and changes == ["b", "a"]
    other = b.gossip()  # the same version with other MACs: an earlier run's, which ours must beat
    other.entries[A] = type(other.entries[A])(version, frozenset([MAC2]))
    delta = a.on_gossip(other.encode())
    assert delta is not None and delta.entries[A].macs == {MAC1} and delta.entries[A].version > version


def test_a_mac_claimed_twice_is_a_conflict_with_the_same_owner_on_every_host_whatever_the_order() -> None:
    a, b, c = MacTable(A, lambda: None), MacTable(B, lambda: None), MacTable(C, lambda: None)
    claim_a = a.set_local([MAC3])
    b.set_local([MAC1])
    b.set_local([MAC2])  # b's entry is now newer than a's: a newer version must not take the MAC
    claim_b = b.set_local([MAC2, MAC3])
    assert claim_a is not None and claim_b is not None
    in_order, reversed_order = MacTable(C, lambda: None), MacTable(C, lambda: None)
    for table, claims in ((in_order, (claim_a, claim_b)), (reversed_order, (claim_b, claim_a))):
        for claim in claims:
            table.on_gossip(claim.encode())
        assert table.owner[MAC3] == A, "the lowest name owns a conflicting MAC"
        assert table.owner[MAC2] == B
        assert table.conflicts == {MAC3: (A, B)}
    c.on_gossip(claim_a.encode())
    c.on_gossip(claim_b.encode())
    c.forget(B)
    assert c.owner[MAC3] == A and c.conflicts == {}


def test_each_claimant_keeps_its_own_container_and_reports_the_conflict_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = MacTable(A, lambda: None), MacTable(B, lambda: None)
    claim_a, claim_b = a.set_local([MAC1]), b.set_local([MAC1, MAC2])
    assert claim_a is not None and claim_b is not None
    with caplog.at_level("INFO", logger="weft.datapath.macs"):
        b.on_gossip(claim_a.encode())
        b.on_gossip(a.gossip().encode())
        b.set_local([MAC1, MAC2, MAC3])
    assert b.owner[MAC1] == B, "b attached MAC1 itself: it never sends that container's traffic away"
    assert b.conflicts == {MAC1: (A, B)}
    lines = [r.getMessage() for r in caplog.records if "MAC conflict" in r.getMessage()]
    assert lines == [
        f"MAC conflict: {MAC1.hex(':')} is claimed by peers 02:00:00:00:00:01, 02:00:00:00:00:02; "
        "other hosts send it to 02:00:00:00:00:01 (lowest name)"
    ]
    a.on_gossip(claim_b.encode())
    assert a.owner[MAC1] == A and a.conflicts == {MAC1: (A, B)}
    caplog.clear()
    with caplog.at_level("INFO", logger="weft.datapath.macs"):
        b.set_local([MAC2])
    assert b.conflicts == {} and any("conflict over" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "payload",
    [b"\xc1", pack({"x": 1}), pack([[1, 2]]), pack([[A, -1, []]]), pack([[A, 1, [b"short"]]]), pack([[A, 1, "x"]])],
)
def test_malformed_mac_gossip_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        MacUpdate.decode(payload)


# -- path choice -------------------------------------------------------------------------------


def _state(keys: SessionKeys | None = None, we_trust: bool = False) -> PathState:
    return PathState(B, "10.0.0.2", ("10.0.0.2", 6783), keys, 1, we_trust, 1500)


def test_without_a_secret_fast_is_chosen_once_probes_are_answered() -> None:
    st = _state()
    st.last_heard = 0.0
    st.choose(0.0, 3.0, 1376, 6784, 6783)
    assert st.path == SLEEVE and "fast-path probes" in st.reason
    st.fast_seq = 1
    st.on_heartbeat(0.5, False, 1, 1472)
    assert st.choose(0.5, 3.0, 1376, 6784, 6783) and st.path == FAST


def test_fast_falls_back_to_the_sleeve_when_probes_stop_and_recovers() -> None:
    st = _state()
    st.fast_seq = 1
    st.on_heartbeat(0.0, False, 1, 1472)
    st.last_heard = 0.0
    st.choose(0.0, 3.0, 1376, 6784, 6783)
    assert st.path == FAST
    st.fast_seq = 5  # four probes unanswered
    st.last_heard = 4.0
    st.choose(4.0, 3.0, 1376, 6784, 6783)
    assert st.path == SLEEVE
    st.on_heartbeat(4.5, False, 5, 1472)
    st.choose(4.5, 3.0, 1376, 6784, 6783)
    assert st.path == FAST


def test_encryption_needs_trust_on_both_ends_for_the_fast_path() -> None:
    st = _state(KEYS, we_trust=True)
    st.fast_seq = 1
    st.on_heartbeat(0.0, False, 1, 1472)
    st.last_heard = 0.0
    st.choose(0.0, 3.0, 1376, 6784, 6783)
    assert st.path == SLEEVE and "does not trust" in st.reason
    st.on_heartbeat(0.1, True, 1, 1472)
    st.choose(0.1, 3.0, 1376, 6784, 6783)
    assert st.path == FAST
    untrusted = _state(KEYS, we_trust=False)
    untrusted.last_heard = 0.0
    untrusted.choose(0.0, 3.0, 1376, 6784, 6783)
    assert untrusted.path == SLEEVE and "not in a trusted subnet" in untrusted.reason


def test_a_small_path_mtu_is_reported_and_shrinks_the_frame_mtu() -> None:
    st = _state()
    st.last_heard = 0.0
    st.on_heartbeat(0.0, False, 0, 972)
    st.choose(0.0, 3.0, 1376, 6784, 6783)
    assert st.pmtu() == 1000 and st.datagram_size() == 972
    assert "path MTU 1000" in st.reason
    assert st.frame_mtu(1376, 80) == 892
    st.on_heartbeat(1.0, False, 0, 0)
    assert st.pmtu() == 1000, "a heartbeat without a report keeps what we know"


def test_nothing_heard_means_down_with_a_reason() -> None:
    st = _state()
    st.choose(10.0, 3.0, 1376, 6784, 6783)
    assert st.path is None and "no heartbeat over UDP 6783" in st.reason


def test_after_a_restart_the_kernel_fast_path_is_kept_until_probes_decide() -> None:
    st = _state()
    st.assume_fast_until = 5.0
    st.choose(1.0, 3.0, 1376, 6784, 6783)
    assert st.path == FAST
    st.choose(6.0, 3.0, 1376, 6784, 6783)
    assert st.path is None


def test_a_reconnection_that_was_on_the_sleeve_carries_data_at_once_with_the_new_keys() -> None:
    """The peer's agent restarted: its new run's keys are used on the sleeve at once, not after a heartbeat round;
    if the new run never answers over UDP, the path goes down once the hold is over."""
    st = _state(KEYS)
    st.last_heard, st.remote_uid, st.answered = 0.0, 1, True
    st.choose(0.0, 3.0, 1376, 6784, 6783)
    assert st.path == SLEEVE
    new_keys = SessionKeys(b"S" * 32, b"R" * 32)
    fresh = st.resumed(10.0, keys=new_keys, epoch=2, remote_uid=2, hold=4.0)
    assert fresh.keys == new_keys and not fresh.answered
    fresh.choose(10.0, 3.0, 1376, 6784, 6783)
    assert fresh.path == SLEEVE, "nothing heard from the new run yet, and already carrying data"
    fresh.choose(14.5, 3.0, 1376, 6784, 6783)
    assert fresh.path is None and "no heartbeat" in fresh.reason


def test_the_probe_ladder_starts_at_the_route_mtu() -> None:
    assert ladder(1500) == [1500, 1400, 1280, 1000, 576]
    assert ladder(9001)[:2] == [9001, 1500]
    assert ladder(1200) == [1200, 1000, 576]


# -- kernel forwarding state -------------------------------------------------------------------


def test_fast_peers_macs_go_to_vxlan_and_sleeve_peers_to_the_tap() -> None:
    want = desired_state(
        fast_ips={B: "10.0.0.2"},
        sleeve_peers={C},
        owner={MAC1: A, MAC2: B, MAC3: C},
        ourself=A,
        vxlan="vxlan-6784",
        tap="weft-tap",
    )
    assert want.vxlan == {ZERO_MAC: {"10.0.0.2"}, "0b:0b:0b:0b:0b:0b": {"10.0.0.2"}}
    assert want.bridge["0b:0b:0b:0b:0b:0b"] == "vxlan-6784"
    assert want.bridge["0c:0c:0c:0c:0c:0c"] == "weft-tap"
    assert "0a:0a:0a:0a:0a:0a" not in want.bridge, "our own MACs are the bridge's business"


def test_with_no_fast_peer_nothing_is_flooded_to_vxlan() -> None:
    want = desired_state(fast_ips={}, sleeve_peers={B}, owner={MAC2: B}, ourself=A, vxlan="vx", tap="tap")
    assert want.vxlan == {}


# -- probes ------------------------------------------------------------------------------------


def test_a_probe_is_a_full_size_vxlan_packet_that_parses_back() -> None:
    packet = build_probe(0x5746, A, 7, 1376)
    assert len(packet) == 8 + 14 + 1376 == 1376 + VXLAN_OVERHEAD - 28
    assert packet[0] == 0x08 and int.from_bytes(packet[4:7], "big") == 0x5746
    frame = packet[8:]
    assert frame[:6] == GROUP and frame[6:12] == probe_mac(A)
    assert frame[0] & 0x01, "a group address: the bridge passes it up instead of forwarding it"
    assert parse_probe(frame) == (A, 7)
    assert parse_probe(b"\x00" * 60) is None


def test_probe_macs_are_locally_administered_unicast() -> None:
    mac = probe_mac(0xFFFFFFFFFFFF)
    assert mac[0] & 0x01 == 0 and mac[0] & 0x02 == 2


# -- the controller's handling of heartbeats -------------------------------------------------------


def _plane() -> tuple[DataPlane, Metrics]:
    from weft.config import AgentConfig
    from weft.mesh.clock import VirtualScheduler
    from weft.mesh.peer import PeerInfo
    from weft.mesh.router import Router

    metrics = Metrics()
    router = Router(PeerInfo(A, "a", 1), VirtualScheduler(), metrics)
    return DataPlane(AgentConfig(), router, metrics), metrics


def test_a_heartbeat_from_a_new_address_moves_the_peer_there() -> None:
    """A peer behind NAT is found where its authenticated heartbeats come from."""
    plane, _ = _plane()
    plane.paths[B] = _state(KEYS)
    plane._on_control(B, ("198.51.100.7", 40000), pack({"t": "hb", "tr": True, "fs": 0, "mx": 0}), 60, 1.0)
    st = plane.paths[B]
    assert st.udp_addr == ("198.51.100.7", 40000) and st.last_heard == 1.0 and st.peer_trusts


def test_only_path_mtu_probes_count_towards_the_reported_size() -> None:
    plane, _ = _plane()
    plane.paths[B] = _state()
    plane._on_control(B, ("10.0.0.2", 6783), pack({"t": "hb"}), 1400, 1.0)
    assert plane.paths[B].max_rx_size == 0
    plane._on_control(B, ("10.0.0.2", 6783), pack({"t": "pm"}), 972, 1.0)
    assert plane.paths[B].max_rx_size == 972


class _Sleeve:
    """What the controller sends through the sleeve, kept."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, dict]] = []

    def send_control(self, peer: int, payload: bytes, *, pad_to: int = 0) -> bool:
        self.sent.append((peer, unpack(payload, "test")))
        return True


def test_the_first_heartbeat_of_a_connection_is_answered_at_once_and_brings_the_path_up() -> None:
    """A restarted peer's first heartbeat: answered now (its side need not wait for our round), and the path is
    chosen now (ours need not wait for our round either). Later heartbeats wait for the rounds."""
    plane, _ = _plane()
    sleeve = _Sleeve()
    plane.sleeve = sleeve  # type: ignore[assignment]
    plane.paths[B] = st = _state(KEYS)
    st.max_rx_size = 1472  # a probe round in progress: an extra heartbeat must not report it early
    hb = pack({"t": "hb", "tr": False, "fs": 0, "mx": 0})
    plane._on_control(B, ("10.0.0.2", 6783), hb, 60, 1.0)
    assert st.path == SLEEVE
    assert [(peer, msg["t"], msg["mx"]) for peer, msg in sleeve.sent] == [(B, "hb", 0)]
    assert st.max_rx_size == 1472
    plane._on_control(B, ("10.0.0.2", 6783), hb, 60, 1.1)
    assert len(sleeve.sent) == 1


def test_a_malformed_heartbeat_is_counted_not_raised() -> None:
    plane, metrics = _plane()
    plane.paths[B] = _state()
    plane._on_control(B, ("10.0.0.2", 6783), b"\xc1\xc1", 10, 1.0)
    plane._on_control(B, ("10.0.0.2", 6783), pack([1, 2]), 10, 1.0)
    assert metrics.decode_errors.labels("datapath").value == 2


def _trusted_fast(keys: SessionKeys | None) -> PathState:
    """A fast path with a secret between hosts that trust each other's subnet, as a run of the peer left it."""
    st = _state(keys)
    st.we_trust, st.remote_uid = True, 1
    st.on_heartbeat(0.0, trusts=True, fast_seq=0, max_size=0)
    st.assume_fast_until = 1.0
    st.choose(0.0, 3.0, 1376, 6784, 6783)
    assert st.path == FAST
    return st


def test_a_peer_restart_keeps_the_trusted_fast_path_until_its_new_run_speaks() -> None:
    """With a secret, fast needs both ends' trust. The peer's new run has not said yet what it trusts: the fast path
    is held on its old run's word (the kernel keeps forwarding), and its first heartbeat decides."""
    fresh = _trusted_fast(KEYS).resumed(10.0, keys=SessionKeys(b"S" * 32, b"R" * 32), epoch=2, remote_uid=2, hold=4.0)
    assert not fresh.peer_trusts and fresh.held_trust
    fresh.choose(10.0, 3.0, 1376, 6784, 6783)
    assert fresh.path == FAST, "traffic the kernel carries stopped while the peer's new run said nothing yet"
    fresh.on_heartbeat(10.2, trusts=False, fast_seq=0, max_size=0)  # the new run no longer trusts us
    fresh.last_heard = 10.2
    fresh.choose(10.2, 3.0, 1376, 6784, 6783)
    assert fresh.path == SLEEVE and "does not trust" in fresh.reason


def test_a_held_trust_ends_with_the_hold_and_never_stands_in_for_our_own() -> None:
    fresh = _trusted_fast(KEYS).resumed(10.0, keys=SessionKeys(b"S" * 32, b"R" * 32), epoch=2, remote_uid=2, hold=4.0)
    fresh.choose(14.5, 3.0, 1376, 6784, 6783)
    assert fresh.path != FAST, "the old run's trust outlived the hold"
    ours = _trusted_fast(KEYS).resumed(10.0, keys=SessionKeys(b"S" * 32, b"R" * 32), epoch=2, remote_uid=2, hold=4.0)
    ours.we_trust = False  # this host no longer trusts the peer's subnet
    ours.choose(10.0, 3.0, 1376, 6784, 6783)
    assert ours.path != FAST

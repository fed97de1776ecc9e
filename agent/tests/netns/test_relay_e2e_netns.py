"""End-to-end sealing through a relay, with real agents: h1 and h3 cannot reach each other (the underlay between them
is cut), so their traffic crosses h2, which passes it on without holding keys for it or opening it."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from lab import Host, Lab, Release, metric_value, wait_until
from test_datapath_netns import all_ping, datapaths, start_mesh, transfer, wait_paths
from test_mixed_versions_netns import PREVIOUS_VERSION, previous_release  # noqa: F401 (a fixture)

from weft import __version__

pytestmark = pytest.mark.netns

MB = 1024 * 1024
E2E_MAGIC = 0x45
E2E_HLEN = 21
MARKER = "WEFT-E2E-MARKER-5be1d0"


def sealed_end_to_end(host: Host, peer: str) -> bool:
    row = datapaths(host).get(peer, {})
    return row.get("path") == "relay" and row.get("sealing") == "end-to-end"


def e2e_rows(host: Host) -> dict[str, dict]:
    return {row["nickname"]: row for row in host.status()["end_to_end"]}


class AnyCapture:
    """tcpdump on every interface of a host (``-i any``), written to a pcap file."""

    def __init__(self, lab: Lab, host: Host, name: str) -> None:
        self.path = host.tmp_dir / f"{name}.pcap"
        cmd = [
            "tcpdump",
            "-n",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-s",
            "0",
            "-B",
            "65536",
            "-i",
            "any",
            "-w",
            str(self.path),
        ]
        self.proc = host.popen(*cmd, log_name=f"{name}.log")
        wait_until(
            lambda: self.proc.poll() is not None or "listening on" in self.proc.read_log(),
            timeout=10,
            message=lambda: f"tcpdump did not start: {self.proc.read_log()}",
        )
        assert self.proc.poll() is None, self.proc.read_log()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def raw(self) -> bytes:
        return self.path.read_bytes()


def udp_packets(pcap: Path) -> list[tuple[str, str, bytes]]:
    """(source IP, destination IP, UDP payload) of the IPv4 UDP packets in a pcap of Ethernet or Linux cooked
    (v1 or v2) captures."""
    data = pcap.read_bytes()
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    (linktype,) = struct.unpack_from(endian + "I", data, 20)
    out = []
    off = 24
    while off + 16 <= len(data):
        (incl,) = struct.unpack_from(endian + "I", data, off + 8)
        pkt = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if linktype == 1:  # Ethernet
            proto, ip = pkt[12:14], 14
        elif linktype == 113:  # Linux cooked v1
            proto, ip = pkt[14:16], 16
        elif linktype == 276:  # Linux cooked v2
            proto, ip = pkt[0:2], 20
        else:
            raise AssertionError(f"unexpected link type {linktype}")
        if proto != b"\x08\x00" or len(pkt) < ip + 28 or pkt[ip + 9] != 17:
            continue
        ihl = (pkt[ip] & 15) * 4
        src = ".".join(str(b) for b in pkt[ip + 12 : ip + 16])
        dst = ".".join(str(b) for b in pkt[ip + 16 : ip + 20])
        out.append((src, dst, pkt[ip + ihl + 8 :]))
    return out


def e2e_datagrams(payload: bytes) -> list[bytes]:
    """The end-to-end datagrams in one captured UDP payload (a GSO or GRO packet holds several of one size)."""
    out = []
    off = 0
    while off + E2E_HLEN <= len(payload) and payload[off] == E2E_MAGIC:
        (csize,) = struct.unpack_from(">H", payload, off + 19)
        end = min(off + E2E_HLEN + csize, len(payload))
        out.append(payload[off:end])
        off = end
    return out


def name_bytes(host: Host) -> bytes:
    return bytes.fromhex(host.agent_name.replace(":", ""))


def test_a_relay_passes_end_to_end_sealed_traffic_on_without_keys_or_opening_it(lab: Lab) -> None:
    hosts, cs = start_mesh(lab, secret=True, blocked=((0, 2),), containers=1)
    h1, h2, h3 = hosts
    a, c = cs[0][0], cs[2][0]
    wait_paths(h1, {"h2": "sleeve", "h3": "relay"})
    wait_paths(h3, {"h2": "sleeve", "h1": "relay"})
    wait_until(lambda: sealed_end_to_end(h1, "h3") and sealed_end_to_end(h3, "h1"), timeout=20, message=lambda: (
        f"h1: {datapaths(h1)}, {h1.status()['end_to_end']}; h3: {datapaths(h3)}, {h3.status()['end_to_end']}"
    ))  # fmt: skip
    all_ping([a, c, cs[1][0]])

    before = {h.name: h.metrics() for h in hosts}
    capture = AnyCapture(lab, h2, "h2-any")
    try:
        transfer(a, c, 8 * MB, marker=MARKER)
        transfer(c, a, 2 * MB, port=5002, marker=MARKER)
    finally:
        capture.stop()
    after = {h.name: h.metrics() for h in hosts}

    def grew(host: str, name: str, **labels: str) -> float:
        return metric_value(after[host], name, **labels) - metric_value(before[host], name, **labels)

    def relayed(path: str, direction: str) -> float:
        return grew("h2", "weft_datapath_bytes_total", path=path, direction=direction)

    # h2 passed the transfer on unopened, and opened (relayed hop by hop) next to nothing of it.
    assert relayed("transit", "rx") > 10 * MB and relayed("transit", "tx") > 10 * MB
    assert relayed("relay", "tx") < 0.01 * relayed("transit", "tx"), (relayed("relay", "tx"), relayed("transit", "tx"))

    # On every interface of h2: the capture saw the transfer, never the marker.
    packets = udp_packets(capture.path)
    assert sum(len(p) for _, _, p in packets) > 10 * MB, "the capture missed the transfer"
    assert MARKER.encode() not in capture.raw()

    # What h2 sent on to h3 is, datagram for datagram, what it got from h1: passed on, not sealed again.
    route = name_bytes(h1) + name_bytes(h3)
    received = {d for src, _, p in packets if src == h1.ip for d in e2e_datagrams(p) if d[1:13] == route}
    forwarded = [d for src, dst, p in packets if dst == h3.ip for d in e2e_datagrams(p) if d[1:13] == route]
    assert len(forwarded) > 1000, len(forwarded)  # a busy machine's capture may miss some
    # (Sealed again, none would match; a busy machine's capture may miss a few packets, counted in its log.)
    missing = sum(1 for d in forwarded if d not in received)
    assert missing <= 0.1 * len(forwarded), (missing, len(forwarded), capture.proc.read_log())

    # Keys: h1 and h3 hold keys for each other; h2 holds none for the pair (it is nobody's relayed peer).
    assert h2.status()["end_to_end"] == []
    assert e2e_rows(h1)["h3"]["keys"] and e2e_rows(h1)["h3"]["sealing"] == "end-to-end"
    assert e2e_rows(h3)["h1"]["keys"] and e2e_rows(h3)["h1"]["sealing"] == "end-to-end"
    assert "sealed end-to-end" in h1.cli("status", "connections").stdout
    assert "1 relayed peer sealed end to end" in h1.cli("status").stdout
    for h in hosts:  # nothing was refused on the way, at either end or at the relay
        for reason in ("auth", "replay", "unknown_pair", "transit_unknown_sender", "transit_no_route", "transit_loop"):
            assert grew(h.name, "weft_datapath_packets_dropped_total", reason=reason) == 0, (h.name, reason)
        assert metric_value(after[h.name], "weft_decode_errors_total") == 0, h.name


def test_end_to_end_keys_follow_restarts_and_go_when_the_peers_meet(lab: Lab) -> None:
    """A restart of either end agrees new keys and traffic flows again; once h1 and h3 reach each other directly,
    neither keeps keys for the other."""
    hosts, cs = start_mesh(lab, secret=True, blocked=((0, 2),), containers=1)
    h1, h2, h3 = hosts
    a, c = cs[0][0], cs[2][0]
    wait_until(lambda: sealed_end_to_end(h1, "h3") and sealed_end_to_end(h3, "h1"), timeout=20)
    all_ping([a, c])
    h3.kill_agent()
    down = time.monotonic()
    time.sleep(1.0)  # h3 stays down a clear second, so keys of its last run are at least that much older
    h3.start_agent(peers=[h1, h2], secrets=["datapath-test-secret"], resume=True)
    h3.wait_ready()
    wait_until(lambda: sealed_end_to_end(h1, "h3") and sealed_end_to_end(h3, "h1"), timeout=30, message=lambda: (
        f"h1: {h1.status()['end_to_end']}; h3: {h3.status()['end_to_end']}"
    ))  # fmt: skip
    age, since_up = e2e_rows(h1)["h3"]["keys_age"], time.monotonic() - down - 1.0
    # Keys agreed with h3's new run are younger than the time since it started again (ages are rounded to 0.1 s);
    # keys of its last run would be older than the time since it went down.
    assert age <= since_up + 0.1, f"h1 kept the keys of h3's last run: {age} s old, h3 up again {since_up:.1f} s"
    wait_until(lambda: a.ping(c), timeout=15, message="no traffic after h3's restart")
    transfer(a, c, 4 * MB, marker=MARKER)

    lab.unblock(h1, h3)
    wait_paths(h1, {"h3": "sleeve"}, timeout=30)
    wait_paths(h3, {"h1": "sleeve"}, timeout=30)
    wait_until(lambda: not e2e_rows(h1) and not e2e_rows(h3), timeout=10, message=lambda: (
        f"h1: {h1.status()['end_to_end']}; h3: {h3.status()['end_to_end']}"
    ))  # fmt: skip
    transfer(c, a, 4 * MB, port=5002)


@pytest.mark.parametrize("old", ["h2", "h3"])
def test_next_to_an_older_agent_the_pair_stays_sealed_hop_by_hop(
    lab: Lab,
    previous_release: Release,  # noqa: F811 (the fixture imported above)
    old: str,
) -> None:
    """A rolling upgrade: with the relay (h2) or the far end (h3) on the previous release, h1 and h3 keep today's
    hop-by-hop sealing, traffic crosses, and neither version finds anything to refuse."""
    hosts = lab(3)
    lab.block(hosts[0], hosts[2])
    for h in hosts:
        if h.name == old:
            h.use_release(previous_release)
    for h in hosts:
        args = ["--log-level", "info"] if h.name == old else []
        h.start_agent(*args, peers=[o for o in hosts if o is not h], secrets=["mixed-relay-secret"])
    for h in hosts:
        assert h.wait_ready()["version"] == (PREVIOUS_VERSION if h.name == old else __version__)
    wait_until(lambda: all(len(h.status()["peers"]) == 3 for h in hosts), timeout=20, message="hosts did not meet")
    h1, h2, h3 = hosts
    a, c = h1.add_container("10.32.1.1/16"), h3.add_container("10.32.3.1/16")
    wait_paths(h1, {"h2": "sleeve", "h3": "relay"})
    wait_until(lambda: a.ping(c), timeout=20, message="no ping across the relay")
    transfer(a, c, 8 * MB, marker=MARKER)
    transfer(c, a, 2 * MB, port=5002)
    assert datapaths(h1)["h3"]["sealing"] == "hop-by-hop"
    assert metric_value(h2.metrics(), "weft_datapath_bytes_total", path="relay", direction="tx") > 10 * MB
    assert metric_value(h2.metrics(), "weft_datapath_bytes_total", path="transit", direction="tx") == 0
    rows = e2e_rows(h1)
    if old == "h2":  # the first hop cannot pass the end-to-end form on: no agreement is even tried
        assert rows == {}
    else:  # h2 can, h3 cannot: h2 passes no init on towards it, and h1 tries again less and less often
        # (h1 tries once it stops dialling h3 directly, or after the data plane's E2E_HOLD)
        wait_until(lambda: "h3" in e2e_rows(h1), timeout=30, message="h1 never tried an agreement with h3")
        rows = e2e_rows(h1)
        assert not rows["h3"]["keys"]
        assert metric_value(h2.metrics(), "weft_e2e_agreements_total", event="unroutable") >= 1
    for h in hosts:
        assert metric_value(h.metrics(), "weft_decode_errors_total") == 0, h.name

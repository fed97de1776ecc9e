"""Containers on different hosts talk over the mesh: real agents, bridges, VXLAN, TAPs, ping and TCP."""

from __future__ import annotations

import itertools
import json
import signal
import sys
import time

import pytest
from lab import HARNESS, Container, Host, Lab, metric_value, wait_until

from weft.datapath.wire import OVERLAY_GSO_MAX

pytestmark = pytest.mark.netns

TRAFFIC = str(HARNESS / "traffic.py")
SECRET = "datapath-test-secret"
MB = 1024 * 1024


# -- helpers ---------------------------------------------------------------------------------------


def start_mesh(
    lab: Lab,
    n: int = 3,
    *,
    secret: bool,
    blocked: tuple[tuple[int, int], ...] = (),
    extra: dict[int, list[str]] | None = None,
    containers: int = 2,
) -> tuple[list[Host], list[list[Container]]]:
    """n hosts, each told of all others, with ``containers`` containers each at 10.32.<host>.<k>/16."""
    hosts = lab(n)
    for a, b in blocked:
        lab.block(hosts[a], hosts[b])
    for h in hosts:
        others = [o for o in hosts if o is not h]
        h.start_agent(*(extra or {}).get(h.index, []), peers=others, secrets=[SECRET] if secret else [])
    for h in hosts:
        h.wait_ready()
    wait_until(lambda: all(len(h.status()["peers"]) == n for h in hosts), timeout=20, message="hosts did not all meet")
    cs = [[h.add_container(f"10.32.{h.index}.{k + 1}/16") for k in range(containers)] for h in hosts]
    return hosts, cs


def datapaths(host: Host) -> dict[str, dict]:
    """Peer nickname -> the data-path part of its connection row."""
    rows = host.status()["connections"]
    return {r["nickname"]: r["datapath"] for r in rows if r.get("datapath") and r.get("nickname")}


def wait_paths(host: Host, expected: dict[str, str], timeout: float = 20) -> dict[str, dict]:
    def check() -> bool:
        got = datapaths(host)
        return all(got.get(peer, {}).get("path") == path for peer, path in expected.items())

    wait_until(check, timeout=timeout, message=lambda: f"{host.name}: paths {datapaths(host)}, wanted {expected}")
    return datapaths(host)


def all_ping(containers: list[Container], timeout: float = 20) -> None:
    for a, b in itertools.permutations(containers, 2):
        wait_until(lambda a=a, b=b: a.ping(b), timeout=timeout, message=f"{a} cannot ping {b}")


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON in output: {text[-2000:]}")


def transfer(src: Container, dst: Container, size: int, *, port: int = 5001, **kw: object) -> dict:
    """Send ``size`` bytes over TCP from src to dst; asserts both ends saw the same bytes and digest."""
    receiver = dst.popen(sys.executable, TRAFFIC, "recv", str(port))
    wait_until(lambda: "listening" in receiver.read_log(), timeout=10, message="receiver did not start")
    args = [sys.executable, TRAFFIC, "send", dst.ip, str(port), str(size)]
    for key, value in kw.items():
        args += [f"--{key}", str(value)]
    sent = _last_json(src.exec(*args, timeout=300).stdout)
    receiver.wait(60)
    got = _last_json(receiver.read_log())
    assert got == sent, f"{src} -> {dst}: sent {sent}, received {got}"
    assert got["bytes"] >= size
    return got


# -- the four ways traffic crosses --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "encrypted", "relayed", "trusted"])
def test_containers_reach_each_other_and_100mb_arrives_intact(lab: Lab, mode: str) -> None:
    secret = mode != "fast"
    blocked = ((0, 2),) if mode == "relayed" else ()
    extra = {}
    if mode == "trusted":
        trusted = ["--trusted-subnet", "10.99.0.11/32", "--trusted-subnet", "10.99.0.12/32"]
        extra = {1: trusted, 2: trusted}
    hosts, cs = start_mesh(lab, secret=secret, blocked=blocked, extra=extra)
    h1, h2, h3 = hosts

    expected = {
        "fast": {"h2": "fast", "h3": "fast"},
        "encrypted": {"h2": "sleeve", "h3": "sleeve"},
        "relayed": {"h2": "sleeve", "h3": "relay"},
        "trusted": {"h2": "fast", "h3": "sleeve"},
    }[mode]
    paths = wait_paths(h1, expected)
    if mode == "relayed":
        assert paths["h3"]["via"] == h2.agent_name
        # h1 and h3 agree end-to-end keys through h2, which then passes their frames on unopened.
        wait_until(lambda: datapaths(h1)["h3"].get("sealing") == "end-to-end", timeout=20, message=lambda: (
            f"h1 does not seal for h3 end to end: {datapaths(h1)}"
        ))  # fmt: skip
    for peer, row in paths.items():
        assert row["encrypted"] == (expected[peer] != "fast"), f"{peer}: {row}"
    if mode == "trusted":
        assert "trusted subnet" in paths["h3"]["reason"]
        wait_paths(h3, {"h1": "sleeve", "h2": "sleeve"})
        # The summary says where a secret is set and traffic still crosses in clear.
        assert "1 peer in clear on trusted subnets" in h1.cli("status").stdout

    # With a secret the containers' packets are sized for the encrypted path (one UDP send each), without one
    # they keep the kernel's 64 KiB, the fast path's best.
    for c in (c for host_cs in cs for c in host_cs):
        link = json.loads(c.exec("ip", "-d", "-j", "link", "show", "ethwe").stdout)[0]
        assert link["gso_max_size"] == (OVERLAY_GSO_MAX if secret else 65536), f"{c.netns}: {link['gso_max_size']}"
    all_ping([c for host_cs in cs for c in host_cs])
    if mode == "fast":  # the kernel's FDB follows a path's change within KERNEL_SPACING: the bytes are counted there
        mac = cs[2][0].mac()
        wait_until(
            lambda: f"{mac} dev vxlan-6784" in h1.exec("bridge", "fdb", "show", "br", "weft").stdout,
            timeout=5,
            message=f"h1's bridge does not send {mac} to the fast path",
        )
    transfer(cs[0][0], cs[2][0], 100 * MB)
    if mode == "trusted":
        transfer(cs[0][1], cs[1][1], 100 * MB, port=5002)

    metrics = h1.metrics()
    if mode == "fast":
        assert metric_value(metrics, "weft_datapath_bytes_total", path="fast", direction="tx") > 100 * MB
    else:
        assert metric_value(metrics, "weft_datapath_bytes_total", path="sleeve", direction="tx") > 100 * MB
    assert metric_value(metrics, "weft_connection_path", peer=h3.agent_name, path=expected["h3"]) == 1
    if mode == "relayed":
        relayed = metric_value(h2.metrics(), "weft_datapath_bytes_total", path="transit", direction="tx")
        assert relayed > 100 * MB


def test_encrypted_capture_holds_neither_marker_nor_vxlan(lab: Lab) -> None:
    hosts, cs = start_mesh(lab, 2, secret=True, containers=1)
    wait_paths(hosts[0], {"h2": "sleeve"})
    all_ping([cs[0][0], cs[1][0]])
    marker = "WEFT-MARKER-7f3a9c"
    with lab.capture("underlay") as capture:
        transfer(cs[0][0], cs[1][0], 4 * MB, marker=marker)
    packets = capture.packets()
    assert len(packets) > 100, "the capture saw no transfer"
    assert marker.encode() not in capture.payload_bytes()
    vxlan = sum(1 for p in packets if _udp_dport(p) == 6784)
    assert vxlan == 0, f"{vxlan} packets on the VXLAN port while encryption is on"


def _udp_dport(frame: bytes) -> int | None:
    """The UDP destination port of an Ethernet/IPv4 frame, if it is one."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    return int.from_bytes(frame[14 + ihl + 2 : 14 + ihl + 4], "big")


# -- multicast ---------------------------------------------------------------------------------


@pytest.mark.parametrize("relayed", [False, True])
def test_multicast_reaches_every_host_exactly_once(lab: Lab, relayed: bool) -> None:
    hosts, cs = start_mesh(lab, secret=True, blocked=((0, 2),) if relayed else (), containers=1)
    wait_paths(hosts[0], {"h2": "sleeve", "h3": "relay" if relayed else "sleeve"})
    sender, receivers = cs[0][0], [cs[1][0], cs[2][0]]
    all_ping([sender, *receivers])
    _multicast_once(sender, receivers, count=300)


def _multicast_once(sender: Container, receivers: list[Container], *, count: int) -> None:
    """``count`` datagrams to a group from ``sender``: every receiver gets each exactly once."""
    procs = [
        r.popen(sys.executable, TRAFFIC, "mcast-recv", "239.1.1.1", "5000", r.ip, "--timeout", "60") for r in receivers
    ]
    for p in procs:
        wait_until(lambda p=p: "joined" in p.read_log(), timeout=10, message="receiver did not join")
    sender.exec(
        sys.executable, TRAFFIC, "mcast-send", "239.1.1.1", "5000", sender.ip, "--count", str(count), timeout=60
    )
    for r, p in zip(receivers, procs, strict=True):
        p.wait(60)
        got = _last_json(p.read_log())
        assert got["duplicates"] == 0, f"{r}: duplicates {got['duplicates']}"
        assert got["unique"] == count, f"{r}: got {got['unique']} of {count}"


def test_a_blocked_fast_path_falls_back_to_the_sleeve_and_recovers(lab: Lab) -> None:
    hosts, cs = start_mesh(lab, 2, secret=False, containers=1)
    h1, h2 = hosts
    a, b = cs[0][0], cs[1][0]
    wait_paths(h1, {"h2": "fast"})
    all_ping([a, b])
    lab.block_udp_port(h1, h2, 6784)
    paths = wait_paths(h1, {"h2": "sleeve"})
    assert "fast-path probes" in paths["h2"]["reason"] and not paths["h2"]["encrypted"]
    assert "UDP 6784 blocked?" in h1.cli("status", "connections").stdout
    wait_until(lambda: a.ping(b), timeout=10, message="no traffic after falling back to the sleeve")
    transfer(a, b, 10 * MB)
    lab.heal()
    wait_paths(h1, {"h2": "fast"})
    wait_paths(h2, {"h1": "fast"})
    assert a.ping(b, count=3)


def test_a_fast_path_open_one_way_carries_that_way_and_the_sleeve_the_other(lab: Lab) -> None:
    """Each end chooses its path from its own probes: when the underlay lets h2's VXLAN packets through to h1 but
    not h1's to h2, h2 sends on the fast path and h1 on the sleeve, and h1 must take what h2 sends. Floods too: each
    end takes the other's from the path the other says it sends them on, so they arrive once, both ways."""
    hosts, cs = start_mesh(lab, 2, secret=False, containers=1)
    h1, h2 = hosts
    a, b = cs[0][0], cs[1][0]
    lab.block_udp_port(h1, h2, 6784, both_ways=False)
    wait_paths(h1, {"h2": "sleeve"}, timeout=30)
    wait_paths(h2, {"h1": "fast"}, timeout=30)
    dropped = metric_value(h1.metrics(), "weft_datapath_packets_dropped_total", reason="fast_unknown_sender")
    wait_until(lambda: b.ping(a), timeout=10, message="no traffic over a path that is fast one way")
    transfer(b, a, 10 * MB)
    transfer(a, b, 10 * MB, port=5002)
    assert datapaths(h1)["h2"]["path"] == "sleeve" and datapaths(h2)["h1"]["path"] == "fast"
    time.sleep(1.1)  # the guard's counters are read at most once a second
    after = metric_value(h1.metrics(), "weft_datapath_packets_dropped_total", reason="fast_unknown_sender")
    assert after == dropped, f"h1's fast-path guard dropped {after - dropped} of h2's packets"
    for sender, receiver in ((a, b), (b, a)):
        _multicast_once(sender, [receiver], count=100)


# -- path MTU ----------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [False, True])
def test_small_underlay_mtu_still_carries_big_packets(lab: Lab, secret: bool) -> None:
    hosts = lab(2)
    lab.limit_udp(hosts[0], hosts[1], 1000)
    hosts[0].start_agent(secrets=[SECRET] if secret else [])
    hosts[1].start_agent(peers=[hosts[0]], secrets=[SECRET] if secret else [])
    for h in hosts:
        h.wait_ready()
    c1 = hosts[0].add_container("10.32.1.1/16")
    c2 = hosts[1].add_container("10.32.2.1/16")

    def small_mtu() -> bool:
        row = datapaths(hosts[0]).get("h2", {})
        # The reason is the one the last data-plane tick chose, while the MTUs are read live: wait for both.
        why = secret or "path MTU 1000" in row.get("reason", "")
        return row.get("path") == "sleeve" and row.get("pmtu") == 1000 and row.get("mtu", 9999) < 1000 and why

    wait_until(small_mtu, timeout=30, message=lambda: f"status: {datapaths(hosts[0])}")
    row = datapaths(hosts[0])["h2"]
    assert metric_value(hosts[0].metrics(), "weft_connection_mtu", peer=hosts[1].agent_name) == row["mtu"]
    wait_until(lambda: c1.ping(c2), timeout=15, message="no ping over the small-MTU path")
    assert c1.ping(c2, size=8000, count=3)
    transfer(c1, c2, 20 * MB)
    assert "mtu=" in hosts[0].cli("status", "connections").stdout


# -- restarts ----------------------------------------------------------------------------------


def _fdb(host: Host) -> str:
    out = (
        host.exec("bridge", "fdb", "show", "br", "weft").stdout
        + host.exec("bridge", "fdb", "show", "dev", "vxlan-6784").stdout
    )
    return "\n".join(
        sorted(line for line in out.splitlines() if "permanent" in line or "static" in line or "dst" in line)
    )


def test_kill_9_during_a_fast_path_transfer_does_not_stop_it(lab: Lab) -> None:
    hosts, cs = start_mesh(lab, 2, secret=False, containers=1)
    wait_paths(hosts[0], {"h2": "fast"})
    wait_paths(hosts[1], {"h1": "fast"})
    a, b = cs[0][0], cs[1][0]
    all_ping([a, b])
    # The FDB follows the path's choice within KERNEL_SPACING: read it once it floods to h2 over VXLAN.
    wait_until(lambda: f"00:00:00:00:00:00 dst {hosts[1].ip}" in _fdb(hosts[0]), timeout=10)
    before = _fdb(hosts[0])
    receiver = b.popen(sys.executable, TRAFFIC, "recv", "5003")
    wait_until(lambda: "listening" in receiver.read_log(), timeout=10)
    sender = a.popen(sys.executable, TRAFFIC, "send", b.ip, "5003", str(64 * MB), "--seconds", "8")
    wait_until(lambda: "started" in sender.read_log(), timeout=10)
    hosts[0].kill_agent(signal.SIGKILL)
    hosts[0].start_agent(resume=True)
    hosts[0].wait_ready()
    assert sender.wait(120) == 0, sender.read_log()
    receiver.wait(30)
    assert _last_json(receiver.read_log()) == _last_json(sender.read_log())
    wait_paths(hosts[0], {"h2": "fast"})
    assert _fdb(hosts[0]) == before, "the restarted agent changed kernel state that was right"


# -- hostile input -----------------------------------------------------------------------------


def test_bad_datagrams_at_the_sleeve_port_are_dropped_and_counted(lab: Lab) -> None:
    hosts, cs = start_mesh(lab, 2, secret=True, containers=1)
    h1, h2 = hosts
    wait_paths(h1, {"h2": "sleeve"})
    a, b = cs[0][0], cs[1][0]
    all_ping([a, b])
    # Replays: record real datagrams from h2 and send them again from h2's address.
    with lab.capture(h1, "udp dst port 6783 and src host " + h2.ip) as capture:
        assert a.ping(b, count=5)
    recorded = [p[42:] for p in capture.packets() if len(p) > 42]
    assert recorded
    script = f"""
import os, socket, sys
recorded = [bytes.fromhex(x) for x in sys.argv[1:]]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{h2.ip}", 0))
dst = ("{h1.ip}", 6783)
for i in range(3000):
    s.sendto(os.urandom(1 + i % 1400), dst)               # random
for r in recorded:
    for cut in (1, 5, 13, len(r) // 2):
        s.sendto(r[:cut], dst)                             # truncated
    s.sendto(r, dst)                                       # replayed
    forged = bytearray(r); forged[-1] ^= 0xFF; s.sendto(bytes(forged), dst)  # tampered (a replayed counter)
    if len(r) > 40:  # a counter never seen, so only the key can refuse it: sealed under another key
        wrong = bytearray(r); wrong[15:23] = (1 << 62 | i).to_bytes(8, "big"); s.sendto(bytes(wrong), dst)
"""
    before = h1.metrics()
    h2.exec(sys.executable, "-c", script, *[r.hex() for r in recorded[:20]], timeout=120)
    after = h1.metrics()
    for reason in ("malformed", "auth", "replay"):
        grew = metric_value(after, "weft_datapath_packets_dropped_total", reason=reason) - metric_value(
            before, "weft_datapath_packets_dropped_total", reason=reason
        )
        assert grew > 0, f"no {reason} drops counted"
    assert h1.agent_running()
    assert a.ping(b, count=3)
    transfer(a, b, 10 * MB)


# -- attach/detach, expose/hide and reset through the CLI ----------------------------------------


def test_attach_detach_expose_hide_are_idempotent(lab: Lab) -> None:
    (h,) = lab(1)
    h.start_agent()
    h.wait_ready()
    c = h.add_container("10.32.1.1/16")
    again = h.cli("attach", "--netns", c.netns, c.cidr)
    assert "nothing to do" in again.stdout
    out = c.exec("ip", "-d", "addr", "show", "ethwe").stdout
    assert "10.32.1.1/16" in out and "mtu 1376" in out
    assert "224.0.0.0/4" in c.exec("ip", "route").stdout
    h.cli("expose", "10.32.0.1/16")
    assert "nothing to do" in h.cli("expose", "10.32.0.1/16").stdout
    wait_until(lambda: c.ping("10.32.0.1"), timeout=10, message="the exposed host address is not reachable")
    h.cli("hide", "10.32.0.1/16")
    assert not c.ping("10.32.0.1")
    h.cli("detach", "--netns", c.netns)
    assert "ethwe" not in c.exec("ip", "link").stdout
    assert "nothing to do" in h.cli("detach", "--netns", c.netns).stdout
    bad = h.cli("attach", "--netns", "no-such-ns", "10.32.1.9/16", check=False)
    assert bad.returncode != 0 and "no-such-ns" in bad.stderr
    reset = [sys.executable, "-m", "weft.cli", "--api-socket", str(h.api_socket), "reset"]
    refused = h.exec(*reset, check=False)  # in the host's namespace: reset acts where it runs
    assert refused.returncode != 0 and "stop it first" in refused.stderr
    h.kill_agent()
    assert "removed" in h.exec(*reset).stdout
    assert "weft" not in h.exec("ip", "link").stdout
    assert "nothing to remove" in h.exec(*reset).stdout

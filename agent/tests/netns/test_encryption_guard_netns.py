"""A secret set by reload or restart encrypts everything at once; the fast path takes only fast-path peers.

Capture tests run a continuous stream of marker datagrams between two containers while the hosts turn
encryption on (SIGHUP on every host, SIGHUP on one host, restart with a secret), capture the underlay
bridge throughout, and check that from the moment a host acknowledges the change (its log line) it sends
nothing in clear: no marker, and no VXLAN datagram carrying a container frame (fast-path probes, whose
inner frame goes to the link-local group 01:80:c2:00:00:0f, are not container frames).

Injection tests send VXLAN frames and sleeve-shaped datagrams from an underlay host that is not in the
mesh, and check that no container sees them, no ARP cache changes and the drops are counted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from lab import Container, Host, Lab, metric_value, wait_until

from weft.datapath.wire import OVERLAY_GSO_MAX

pytestmark = pytest.mark.netns

SECRET = "guard-test-secret"
MARKER = b"WEFT-MARKER-5e1d0b"
VXLAN_PORT = 6784
SLEEVE_PORT = 6783
VNI = 0x5746
PROBE_GROUP = bytes.fromhex("0180c200000f")
PROBE_ETHERTYPE = b"\x88\xb5"
STREAM_PORT = 5005
# Log lines carry milliseconds and the capture is timestamped on the underlay bridge: allow for both.
CLOCK_SLACK = 0.05
ATTACKER_MAC = bytes.fromhex("026666666666")

SENDER = f"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
seq = 0
while True:
    try:
        s.sendto({MARKER!r} + seq.to_bytes(8, "big") + bytes(200), (sys.argv[1], {STREAM_PORT}))
    except OSError:
        pass
    seq += 1
    time.sleep(0.01)
"""

RECEIVER = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {STREAM_PORT}))
print("listening", flush=True)
while True:
    data = s.recv(2048)
    print(f"{{time.time():.3f}} {{int.from_bytes(data[{len(MARKER)}:{len(MARKER) + 8}], 'big')}}", flush=True)
"""


# -- helpers ---------------------------------------------------------------------------------------


def write_config(host: Host, secret: str | None) -> Path:
    """The host's config file: only the secret lives there, so SIGHUP can turn encryption on."""
    files = []
    if secret is not None:
        path = host.tmp_dir / "reload-secret"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret)
        files.append(str(path))
    config = host.tmp_dir / "weft.yaml"
    config.write_text(json.dumps({"secret_files": files}))  # JSON is YAML
    return config


def datapaths(host: Host) -> dict[str, dict]:
    rows = host.status()["connections"]
    return {r["nickname"]: r["datapath"] for r in rows if r.get("datapath") and r.get("nickname")}


def wait_path(host: Host, peer: str, path: str, timeout: float = 30) -> None:
    wait_until(
        lambda: datapaths(host).get(peer, {}).get("path") == path,
        timeout=timeout,
        message=lambda: f"{host.name}: paths {datapaths(host)}, wanted {peer} {path}",
    )


def log_times(host: Host, text: str) -> list[float]:
    """Wall-clock times of the agent's log lines that contain ``text``."""
    times = []
    for line in host.agent_log().splitlines():
        if text in line and line[:4].isdigit():
            times.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


def acknowledged(host: Host, text: str, seen_before: int, timeout: float = 30) -> float:
    """Wait for one more log line with ``text`` than ``seen_before``; the time it was logged."""
    wait_until(
        lambda: len(log_times(host, text)) > seen_before,
        timeout=timeout,
        message=lambda: f"{host.name} never logged {text!r}",
    )
    return log_times(host, text)[-1]


def pcap_records(path: Path) -> list[tuple[float, bytes]]:
    """(timestamp, frame) for each record of a classic little-endian microsecond pcap file."""
    data = path.read_bytes()
    assert data[:4] == b"\xd4\xc3\xb2\xa1", "tcpdump wrote an unexpected pcap format"
    records, offset = [], 24
    while offset + 16 <= len(data):
        sec, usec, incl, _ = struct.unpack_from("<IIII", data, offset)
        if offset + 16 + incl > len(data):
            break
        records.append((sec + usec / 1e6, data[offset + 16 : offset + 16 + incl]))
        offset += 16 + incl
    return records


def in_clear(frame: bytes) -> tuple[str, str] | None:
    """(sender's underlay IP, what) if the frame carries a container frame in clear, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    src = socket.inet_ntoa(frame[26:30])
    udp = 14 + (frame[14] & 0x0F) * 4
    dport = int.from_bytes(frame[udp + 2 : udp + 4], "big")
    if MARKER in frame:
        return src, f"marker in a datagram to UDP {dport}"
    if dport == VXLAN_PORT:
        inner = frame[udp + 16 :]
        if inner[:6] == PROBE_GROUP and inner[12:14] == PROBE_ETHERTYPE:
            return None  # a fast-path probe
        return src, f"VXLAN container frame ({inner[12:14].hex()} from {inner[6:12].hex(':')})"
    return None


def leaks_after(records: list[tuple[float, bytes]], acks: dict[str, float]) -> list[str]:
    """Clear container frames a host sent after it acknowledged encryption (acks: underlay IP -> time)."""
    leaks = []
    for ts, frame in records:
        found = in_clear(frame)
        if found is not None and found[0] in acks and ts > acks[found[0]] + CLOCK_SLACK:
            leaks.append(f"{ts - acks[found[0]]:+.3f}s after {found[0]} acknowledged: {found[1]}")
    return leaks


def clear_before(records: list[tuple[float, bytes]], when: float) -> int:
    return sum(1 for ts, frame in records if ts < when and in_clear(frame) is not None)


class Stream:
    """Marker datagrams, 100 a second, from one container to another, for as long as the test runs."""

    def __init__(self, src: Container, dst: Container) -> None:
        self.receiver = dst.popen(sys.executable, "-c", RECEIVER)
        wait_until(lambda: "listening" in self.receiver.read_log(), timeout=10, message="receiver did not start")
        self.sender = src.popen(sys.executable, "-c", SENDER, dst.ip)

    def received_since(self, when: float) -> int:
        lines = self.receiver.read_log().splitlines()[1:]
        return sum(1 for line in lines if line.split() and float(line.split()[0]) > when)

    def wait_flowing(self, since: float, count: int = 50, timeout: float = 40) -> None:
        wait_until(
            lambda: self.received_since(since) >= count,
            timeout=timeout,
            message=lambda: f"the stream did not flow: {self.received_since(since)} datagrams since {since:.3f}",
        )


def mesh_of_two(lab: Lab) -> tuple[Host, Host, Container, Container]:
    """Two hosts without a secret, on the fast path to each other, one container each."""
    h1, h2 = lab(2)
    h1.start_agent("--config", str(write_config(h1, None)), peers=[h2])
    h2.start_agent("--config", str(write_config(h2, None)), peers=[h1])
    for h in (h1, h2):
        h.wait_ready()
    c1, c2 = h1.add_container("10.32.1.1/16"), h2.add_container("10.32.2.1/16")
    wait_path(h1, "h2", "fast")
    wait_path(h2, "h1", "fast")
    wait_until(lambda: c1.ping(c2), timeout=20, message="containers cannot ping each other")
    return h1, h2, c1, c2


def assert_no_leaks(records: list[tuple[float, bytes]], acks: dict[str, float]) -> None:
    first = min(acks.values())
    assert clear_before(records, first) > 20, "the capture saw no clear traffic before encryption: it proves nothing"
    leaks = leaks_after(records, acks)
    assert not leaks, f"{len(leaks)} frame(s) in clear after encryption was acknowledged:\n" + "\n".join(leaks[:20])


# -- capture tests -----------------------------------------------------------------------------------


def test_sighup_on_every_host_encrypts_everything_from_the_acknowledgement(lab: Lab) -> None:
    h1, h2, c1, c2 = mesh_of_two(lab)
    with lab.capture("underlay", "udp") as capture:
        stream = Stream(c1, c2)
        stream.wait_flowing(0, count=100)
        seen = {h: len(log_times(h, "reloaded configuration")) for h in (h1, h2)}
        for h in (h1, h2):
            write_config(h, SECRET)
            h.kill_agent(signal.SIGHUP, wait=False)
        acks = {h.ip: acknowledged(h, "reloaded configuration", seen[h]) for h in (h1, h2)}
        wait_path(h1, "h2", "sleeve")
        stream.wait_flowing(max(acks.values()) + 1)
        time.sleep(2)
    assert_no_leaks(capture_records(capture), acks)
    assert all("encryption is now ON" in h.agent_log() for h in (h1, h2))
    assert all(h.status()["encryption"] == "enabled" for h in (h1, h2))
    assert all(row["encrypted"] for h in (h1, h2) for row in h.status()["connections"])

    # The GSO size follows: the bridge at the reload, a container attached before at its next attach (a TCP
    # connection keeps the size it opened with, so nothing changes under running traffic)
    assert gso_sizes(h1, c1) == (OVERLAY_GSO_MAX, 65536)
    assert h1.cli("attach", "--netns", c1.netns, c1.cidr).stdout.startswith("attached "), "the size changed"
    assert gso_sizes(h1, c1) == (OVERLAY_GSO_MAX, OVERLAY_GSO_MAX)
    assert c1.ping(c2)


def gso_sizes(host: Host, container: Container) -> tuple[int, int]:
    """The GSO size of ``host``'s bridge and of ``container``'s interface."""

    def size(out: str) -> int:
        return json.loads(out)[0]["gso_max_size"]

    bridge = size(host.exec("ip", "-d", "-j", "link", "show", "weft").stdout)
    return bridge, size(container.exec("ip", "-d", "-j", "link", "show", "ethwe").stdout)


def test_sighup_on_one_host_drops_its_plaintext_connection_at_once(lab: Lab) -> None:
    h1, h2, c1, c2 = mesh_of_two(lab)
    with lab.capture("underlay", "udp") as capture:
        stream = Stream(c1, c2)
        stream.wait_flowing(0, count=100)
        seen1 = len(log_times(h1, "reloaded configuration"))
        write_config(h1, SECRET)
        h1.kill_agent(signal.SIGHUP, wait=False)
        ack1 = acknowledged(h1, "reloaded configuration", seen1)
        # h2, without a secret, held its fast path to h1 (an agent restarting looks the same) until the
        # first handshake told it h1 wants a secret: from then on it sends h1 nothing in clear either.
        refused2 = acknowledged(h2, "disagree on secrets", 0)
        # h1 holds a secret and h2 none: they must not talk at all.
        wait_until(
            lambda: not any(r["state"] == "established" for r in h1.status()["connections"]),
            timeout=10,
            message=lambda: f"h1 kept a connection to a host without the secret: {h1.status()['connections']}",
        )
        time.sleep(3)
        assert stream.received_since(ack1 + 1) == 0, "traffic crossed between a host with a secret and one without"
        seen2 = len(log_times(h2, "reloaded configuration"))
        write_config(h2, SECRET)
        h2.kill_agent(signal.SIGHUP, wait=False)
        ack2 = acknowledged(h2, "reloaded configuration", seen2)
        wait_path(h1, "h2", "sleeve")
        stream.wait_flowing(ack2 + 1)
        time.sleep(2)
    assert refused2 < ack2
    assert_no_leaks(capture_records(capture), {h1.ip: ack1, h2.ip: refused2})


def test_a_reload_that_turns_encryption_on_removes_fast_entries_the_agent_did_not_write(lab: Lab) -> None:
    """The agent programs the FDB against what it last wrote, not a fresh read; an entry put there behind its back
    (a tool, a leftover) towards a peer outside the trusted subnets must still be gone when a reload that turns
    encryption on is acknowledged: that reload reads the kernel, whatever was written since."""
    h1, h2, _, _ = mesh_of_two(lab)
    vxlan = "vxlan-6784"
    planted = "02:aa:bb:cc:dd:ee"
    h1.exec("bridge", "fdb", "append", "00:00:00:00:00:00", "dev", vxlan, "dst", h2.ip, "self", "permanent")
    h1.exec("bridge", "fdb", "add", planted, "dev", vxlan, "dst", h2.ip, "self", "permanent")
    assert planted in h1.exec("bridge", "fdb", "show", "dev", vxlan).stdout
    seen = len(log_times(h1, "reloaded configuration"))
    write_config(h1, SECRET)
    h1.kill_agent(signal.SIGHUP, wait=False)
    acknowledged(h1, "reloaded configuration", seen)
    left = [line for line in h1.exec("bridge", "fdb", "show", "dev", vxlan).stdout.splitlines() if h2.ip in line]
    assert not left, f"entries sending to {h2.ip} in clear outlived the reload: {left}"


def test_restart_with_a_new_secret_keeps_nothing_in_clear(lab: Lab) -> None:
    h1, h2, c1, c2 = mesh_of_two(lab)
    with lab.capture("underlay", "udp") as capture:
        stream = Stream(c1, c2)
        stream.wait_flowing(0, count=100)
        acks = {}
        for h, peer in ((h1, h2), (h2, h1)):
            seen = len(log_times(h, "running as"))
            h.kill_agent(signal.SIGTERM)
            h.start_agent("--config", str(write_config(h, SECRET)), peers=[peer])
            acks[h.ip] = acknowledged(h, "running as", seen)
            time.sleep(3)  # what the last run left in the kernel would leak now
        wait_path(h1, "h2", "sleeve")
        stream.wait_flowing(max(acks.values()) + 1)
        time.sleep(2)
    assert_no_leaks(capture_records(capture), acks)


def capture_records(capture) -> list[tuple[float, bytes]]:
    capture.stop()
    return pcap_records(capture.path)


# -- injection from an underlay host outside the mesh -------------------------------------------------


def arp(dst: bytes, op: int, sender_mac: bytes, sender_ip: str, target_mac: bytes, target_ip: str) -> bytes:
    body = struct.pack(
        ">HHBBH6s4s6s4s",
        1,
        0x0800,
        6,
        4,
        op,
        sender_mac,
        socket.inet_aton(sender_ip),
        target_mac,
        socket.inet_aton(target_ip),
    )
    return dst + sender_mac + b"\x08\x06" + body + bytes(18)


def vxlan(frame: bytes) -> bytes:
    return struct.pack(">B3xI", 0x08, VNI << 8) + frame


def sleeve(sender: bytes, frame: bytes, *, sealed: bool) -> bytes:
    """A datagram shaped like the sleeve's (header, counter, inner header, frame), with a bogus tag."""
    inner = struct.pack(">B6s6s", 2, sender, bytes(6)) + frame  # a broadcast from "sender"
    msg = struct.pack(">Q", 1 << 40) + inner + (os.urandom(16) if sealed else b"")
    return struct.pack(">B6sIBBH", 0x57, sender, 1234, 0, 1, len(msg)) + msg


def inject(outsider: Host, target: Host, datagrams: list[tuple[int, bytes]]) -> None:
    script = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for line in sys.stdin:
    port, data = line.split()
    s.sendto(bytes.fromhex(data), (sys.argv[1], int(port)))
"""
    lines = "".join(f"{port} {data.hex()}\n" for port, data in datagrams)
    outsider.exec(sys.executable, "-c", script, target.ip, input=lines)


FORGE = r"""
import socket, struct, sys
src, dst, dst_mac = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
port, count = int(sys.argv[4]), int(sys.argv[5])
payload = bytes.fromhex(sys.stdin.read().strip())
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
src_mac = s.getsockname()[4]
udp = struct.pack(">HHHH", 40000, port, 8 + len(payload), 0) + payload
ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
words = sum(struct.unpack(">10H", ip))
words = (words & 0xFFFF) + (words >> 16)
ip = ip[:10] + struct.pack(">H", ~((words & 0xFFFF) + (words >> 16)) & 0xFFFF) + ip[12:]
for _ in range(count):
    s.send(dst_mac + src_mac + b"\x08\x00" + ip + udp)
"""


def forge_from(host: Host, target: Host, payload: bytes, port: int, *, count: int) -> None:
    """UDP from ``host``'s address to ``target``, written on the wire below ``host``'s own firewall (a packet
    socket): what another machine that took ``host``'s address would send."""
    target_mac = target.exec("cat", "/sys/class/net/eth0/address").stdout.strip().replace(":", "")
    host.exec(sys.executable, "-c", FORGE, host.ip, target.ip, target_mac, str(port), str(count), input=payload.hex())


def neighbour(c: Container, ip: str) -> str | None:
    rows = json.loads(c.exec("ip", "-j", "neigh", "show", ip, "dev", "ethwe").stdout or "[]")
    return rows[0].get("lladdr") if rows else None


def drops(host: Host, reason: str) -> float:
    return metric_value(host.metrics(), "weft_datapath_packets_dropped_total", reason=reason)


@pytest.mark.parametrize("mode", ["encrypted", "trusted"])
def test_frames_from_outside_the_mesh_reach_no_container(lab: Lab, mode: str) -> None:
    h1, h2, outsider = lab(3)  # the outsider runs no agent; in "trusted" it is inside the trusted subnet
    extra = ["--trusted-subnet", "10.99.0.0/16"] if mode == "trusted" else []
    h1.start_agent(*extra, peers=[h2], secrets=[SECRET])
    h2.start_agent(*extra, peers=[h1], secrets=[SECRET])
    for h in (h1, h2):
        h.wait_ready()
    c1, c2 = h1.add_container("10.32.1.1/16"), h2.add_container("10.32.2.1/16")
    path = "fast" if mode == "trusted" else "sleeve"
    wait_path(h1, "h2", path)
    wait_path(h2, "h1", path)
    wait_until(lambda: c1.ping(c2), timeout=20, message="containers cannot ping each other")
    real = neighbour(c1, c2.ip)
    assert real == c2.mac()
    time.sleep(1.5)  # past the neighbour table's locktime: a forged reply would now be taken

    watch = c1.popen("tcpdump", "-n", "-l", "-i", "ethwe", "ether", "src", ATTACKER_MAC.hex(":"))
    wait_until(lambda: "listening on" in watch.read_log(), timeout=10, message="tcpdump did not start")
    before = {r: drops(h1, r) for r in ("fast_unknown_sender", "auth", "unknown_peer", "malformed")}
    c1_mac = bytes.fromhex(c1.mac().replace(":", ""))
    frames = [
        arp(c1_mac, 2, ATTACKER_MAC, c2.ip, c1_mac, c1.ip),  # "c2 is at the attacker's MAC", to c1
        arp(b"\xff" * 6, 2, ATTACKER_MAC, c2.ip, b"\xff" * 6, c2.ip),  # the same, gratuitous
        arp(b"\xff" * 6, 1, ATTACKER_MAC, c2.ip, bytes(6), c1.ip),  # a request that teaches c2's IP
    ]
    h2_name = bytes.fromhex(h2.agent_name.replace(":", ""))
    datagrams = []
    for _ in range(20):
        for frame in frames:
            datagrams.append((VXLAN_PORT, vxlan(frame)))
            datagrams.append((SLEEVE_PORT, sleeve(h2_name, frame, sealed=True)))  # posing as h2
            datagrams.append((SLEEVE_PORT, sleeve(ATTACKER_MAC, frame, sealed=False)))  # a stranger
            datagrams.append((SLEEVE_PORT, sleeve(h2_name, frame, sealed=False)[:20]))  # truncated
    inject(outsider, h1, datagrams)
    time.sleep(2)

    assert neighbour(c1, c2.ip) == real, "a frame from outside the mesh changed a container's ARP cache"
    watch.send_signal(signal.SIGINT)
    watch.wait(10)
    seen = [line for line in watch.read_log().splitlines() if ATTACKER_MAC.hex(":") in line]
    assert not seen, f"frames from outside the mesh reached a container: {seen[:5]}"
    grew = {r: drops(h1, r) - before[r] for r in before}
    assert grew["fast_unknown_sender"] >= 60, f"VXLAN drops not counted: {grew}"
    assert grew["auth"] + grew["unknown_peer"] + grew["malformed"] >= 180, f"sleeve drops not counted: {grew}"
    assert c1.ping(c2, count=3), "the mesh stopped working"
    assert datapaths(h1)["h2"]["path"] == path


def test_plaintext_in_the_name_of_a_peer_that_does_not_trust_us_reaches_no_container(lab: Lab) -> None:
    """h1 trusts h2's subnet, h2 does not trust h1's: the pair stays encrypted, and h2 never sends h1 plaintext. VXLAN
    from h2's address is then not h2's (here sent from h2's namespace, as a host that took its address would): h1's
    guard lets its probes cross, as they may before h2's first heartbeat says what it trusts, and drops the rest."""
    h1, h2 = lab(2)
    h1.start_agent("--trusted-subnet", "10.99.0.0/16", peers=[h2], secrets=[SECRET])
    h2.start_agent(peers=[h1], secrets=[SECRET])
    for h in (h1, h2):
        h.wait_ready()
    c1, c2 = h1.add_container("10.32.1.1/16"), h2.add_container("10.32.2.1/16")
    wait_path(h1, "h2", "sleeve")
    wait_until(lambda: c1.ping(c2), timeout=20, message="containers cannot ping each other")
    watch = c1.popen("tcpdump", "-n", "-l", "-i", "ethwe", "ether", "src", ATTACKER_MAC.hex(":"))
    wait_until(lambda: "listening on" in watch.read_log(), timeout=10, message="tcpdump did not start")
    before = drops(h1, "fast_unknown_sender")
    c1_mac = bytes.fromhex(c1.mac().replace(":", ""))
    frame = arp(c1_mac, 2, ATTACKER_MAC, c2.ip, c1_mac, c1.ip)  # "c2 is at the attacker's MAC", to c1
    forge_from(h2, h1, vxlan(frame), VXLAN_PORT, count=30)
    time.sleep(2)
    watch.send_signal(signal.SIGINT)
    watch.wait(10)
    seen = [line for line in watch.read_log().splitlines() if ATTACKER_MAC.hex(":") in line]
    assert not seen, f"plaintext in the name of a peer that requires encryption reached a container: {seen[:5]}"
    assert neighbour(c1, c2.ip) == c2.mac()
    assert drops(h1, "fast_unknown_sender") - before >= 30
    assert datapaths(h1)["h2"]["path"] == "sleeve" and c1.ping(c2, count=3)


# -- the guard's table across restarts ------------------------------------------------------------------


def guard_set(host: Host) -> set[str] | None:
    res = host.exec("nft", "-j", "list", "set", "inet", "weft_fast_6784", "fast4", check=False)
    if res.returncode != 0:
        return None
    items = json.loads(res.stdout)["nftables"]
    return {e for item in items for e in item.get("set", {}).get("elem", [])}


def test_the_guard_outlives_the_agent_and_weft_reset_removes_it(lab: Lab) -> None:
    h1, h2, c1, c2 = mesh_of_two(lab)
    wait_until(lambda: guard_set(h1) == {h2.ip}, timeout=10, message=lambda: f"guard set {guard_set(h1)}")
    assert "fast_unknown_sender" in h1.metrics()
    for sig in (signal.SIGKILL, signal.SIGTERM):
        h1.kill_agent(sig)
        assert guard_set(h1) == {h2.ip}, "the guard's set went with the agent"
        assert c1.ping(c2, count=3), "fast traffic stopped while the agent was down"
        h1.start_agent(peers=[h2])
        h1.wait_ready()
        assert guard_set(h1) == {h2.ip}
        assert c1.ping(c2, count=3)
    h1.kill_agent()
    reset = [sys.executable, "-m", "weft.cli", "--api-socket", str(h1.api_socket), "reset"]
    assert "nftables table inet weft_fast_6784" in h1.exec(*reset).stdout
    assert guard_set(h1) is None

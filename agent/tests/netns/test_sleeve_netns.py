"""The sleeve end to end over the kernel's own devices: hosts in namespaces (bridge + persistent TAP + one container
each) joined by an underlay of veth pairs, each host running tests/harness/sleeve_driver.py; what needs no kernel
device (control messages, garbage, replays, forgeries) is tested without root in unit/test_sleeve_inprocess.py. Also
a manual benchmark:

    python tests/netns/test_sleeve_netns.py bench [--plain] [--hosts 3] [--seconds 10] [--ulseg] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
DRIVER = HERE.parent / "harness" / "sleeve_driver.py"
SRC = HERE.parents[1] / "src"
PORT = 6783
MTU = 1376
pytestmark = pytest.mark.netns

# Sends N deterministic bytes to HOST:PORT and prints their sha256; retries the connect until the server is up.
SENDER = r"""
import hashlib, socket, sys, time
host, port, n, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
block = (marker * (65536 // len(marker) + 1))[:65536] if marker else bytes(range(256)) * 256
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection((host, port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
s.settimeout(60)
h = hashlib.sha256()
sent = 0
while sent < n:
    chunk = block[: min(len(block), n - sent)]
    chunk = bytes([sent // 65536 % 251]) + chunk[1:]
    s.sendall(chunk)
    h.update(chunk)
    sent += len(chunk)
s.close()
print(h.hexdigest())
"""

# python -c ETHTOOL DEV FEATURE=on|off ...: `ethtool -K` through pyroute2 (ethtool itself may not be installed)
ETHTOOL = r"""
import sys
from pyroute2 import Ethtool
features = Ethtool().get_features(sys.argv[1])
for arg in sys.argv[2:]:
    name, value = arg.split("=")
    features.features[name].enable = value == "on"
Ethtool().set_features(sys.argv[1], features)
"""

RECEIVER = r"""
import hashlib, socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
srv.settimeout(30)
c, _ = srv.accept()
c.settimeout(60)
h = hashlib.sha256()
n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
print(h.hexdigest(), n)
"""


def run(*args: str, check: bool = True, timeout: float = 30, input: str | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


def wait_until(predicate: Any, timeout: float = 10.0, message: str = "condition not met") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.1)


def link_key(a: int, b: int) -> str:
    """Fixed test key for traffic from a to b."""
    return hashlib.sha256(f"weft sleeve test {a}->{b}".encode()).hexdigest()


@dataclass
class Host:
    index: int
    netns: str
    container: str
    mac: str
    ip: str
    workdir: Path
    addrs: dict[int, str] = field(default_factory=dict)  # neighbour index -> our underlay address towards it
    driver: subprocess.Popen[bytes] | None = None

    @property
    def stats_file(self) -> Path:
        return self.workdir / f"h{self.index}.json"

    def stats(self) -> dict[str, Any]:
        """Ask the driver for fresh counters (SIGUSR1) and read them."""
        assert self.driver is not None
        old = json.loads(self.stats_file.read_text())["seq"]
        self.driver.send_signal(signal.SIGUSR1)
        return wait_until(lambda: _fresh(self.stats_file, old), 5, f"h{self.index} driver wrote no stats")

    def in_container(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        return run("ip", "netns", "exec", self.container, *args, check=check, timeout=timeout)

    def in_host(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        return run("ip", "netns", "exec", self.netns, *args, check=check, timeout=timeout)


def _fresh(path: Path, old: int) -> dict[str, Any] | None:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        data = json.loads(path.read_text())
        if data["seq"] > old:
            return data
    return None


class Net:
    """Namespaces and processes of one test, all named with a random token and removed by name/PID."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(2)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workdir = Path(tempfile.mkdtemp(prefix=f"wtsl{self.token}-"))
        self.hosts: list[Host] = []

    def netns(self, suffix: str) -> str:
        name = f"wtsl{self.token}-{suffix}"
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def popen(self, netns: str, *args: str, log: str) -> subprocess.Popen[bytes]:
        out = open(self.workdir / log, "wb")  # noqa: SIM115 - closed with the process
        env = dict(os.environ, PYTHONPATH=str(SRC))
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
        out.close()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for name in reversed(self.namespaces):
            run("ip", "netns", "del", name, check=False)
        for log in sorted(self.workdir.glob("*.log")):  # pytest shows captured output only for failures
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self, name: str) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.workdir / name).read_text(errors="replace")
        return ""

    # -- topology -------------------------------------------------------------------------------------------

    def add_hosts(self, n: int) -> list[Host]:
        for i in range(1, n + 1):
            h = self.netns(f"h{i}")
            c = self.netns(f"c{i}")
            host = Host(i, h, c, f"02:32:00:00:00:{i:02x}", f"10.32.0.{i}", self.workdir)
            for cmd in (
                ["link", "add", "name", "weft", "type", "bridge"],
                ["link", "set", "weft", "up"],
                ["tuntap", "add", "dev", "sleeve0", "mode", "tap", "multi_queue"],
                ["link", "set", "sleeve0", "mtu", str(MTU), "master", "weft", "up"],
                ["link", "set", "dev", "sleeve0", "type", "bridge_slave", "learning", "off"],
                ["link", "add", "name", "vc", "type", "veth", "peer", "name", "eth0", "netns", c],
                ["link", "set", "vc", "mtu", str(MTU), "master", "weft", "up"],
            ):
                run("ip", "-n", h, *cmd)
            run("ip", "-n", c, "link", "set", "eth0", "address", host.mac, "mtu", str(MTU), "up")
            run("ip", "-n", c, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            self.hosts.append(host)
        return self.hosts

    def wire(self, a: Host, b: Host, subnet: int) -> None:
        """An underlay veth between hosts a and b: 10.98.<subnet>.<index>/24 on each end."""
        peer = ["peer", "name", f"ul{a.index}", "netns", b.netns]
        run("ip", "-n", a.netns, "link", "add", "name", f"ul{b.index}", "type", "veth", *peer)
        for x, y in ((a, b), (b, a)):
            addr = f"10.98.{subnet}.{x.index}"
            run("ip", "-n", x.netns, "addr", "add", f"{addr}/24", "dev", f"ul{y.index}")
            run("ip", "-n", x.netns, "link", "set", f"ul{y.index}", "up")
            x.addrs[y.index] = addr

    def start(self, host: Host, *, keys: bool, datagram_size: int = 1472, e2e: bool = False, **extra: Any) -> None:
        """Run the driver on ``host`` with links to its underlay neighbours and routes along the chain/mesh; with
        ``e2e``, end-to-end keys with every host that is not a neighbour."""
        hosts = {h.index: h for h in self.hosts}
        me = host.index
        neighbours = sorted(host.addrs)
        next_hop = {}
        for other in hosts:
            if other != me:  # a chain or a full mesh: go direct if wired, else via the neighbour towards it
                next_hop[other] = other if other in host.addrs else min(neighbours, key=lambda n: abs(n - other))
        cfg = {
            "ourself": me,
            "tap": "sleeve0",
            "listen": ["0.0.0.0", PORT],
            "stats_file": str(host.stats_file),
            "links": [
                {
                    "peer": n,
                    "addr": [hosts[n].addrs[me], PORT],
                    "keys": {"send": link_key(me, n), "receive": link_key(n, me)} if keys else None,
                    "datagram_size": datagram_size,
                    "epoch": 1,
                    "e2e": e2e,
                }
                for n in neighbours
            ],
            "pairs": [
                {"peer": o, "kid": 7, "keys": {"send": link_key(me, o), "receive": link_key(o, me)}, "send": True}
                for o in hosts
                if e2e and keys and o != me and o not in host.addrs
            ],
            "next_hop": next_hop,
            "flood_origins": sorted(next_hop),
            "bcast_children": _bcast_children(me, hosts),
            "mac_owner": {h.mac: h.index for h in self.hosts if h is not host},
            "local_macs": [host.mac],
            "control_pad": 1200,
        } | extra
        path = self.workdir / f"h{me}-config.json"
        path.write_text(json.dumps(cfg))
        host.driver = self.popen(host.netns, sys.executable, str(DRIVER), str(path), log=f"h{me}.log")
        wait_until(lambda: host.stats_file.exists() or host.driver.poll() is not None, 10)
        assert host.driver.poll() is None, self.log(f"h{me}.log")


def _bcast_children(me: int, hosts: dict[int, Host]) -> dict[int, list[int]]:
    """Broadcast trees along a chain: our own broadcasts go to every neighbour, an origin's on away from it."""
    neighbours = sorted(hosts[me].addrs)
    return {o: neighbours if o == me else [n for n in neighbours if abs(n - o) > abs(me - o)] for o in hosts}


@pytest.fixture
def net() -> Iterator[Net]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    n = Net()
    try:
        yield n
    finally:
        n.close()


def pair(net: Net, *, keys: bool = True, **kwargs: Any) -> tuple[Host, Host]:
    h1, h2 = net.add_hosts(2)
    net.wire(h1, h2, 0)
    for h in (h1, h2):
        net.start(h, keys=keys, **kwargs)
    return h1, h2


def chain(net: Net, *, keys: bool = True, **kwargs: Any) -> tuple[Host, Host, Host]:
    h1, h2, h3 = net.add_hosts(3)
    net.wire(h1, h2, 0)
    net.wire(h2, h3, 1)
    for h in (h1, h2, h3):
        net.start(h, keys=keys, **kwargs)
    return h1, h2, h3


def ping(src: Host, dst: Host, count: int = 3) -> str:
    return src.in_container("ping", "-c", str(count), "-i", "0.2", "-W", "2", dst.ip, timeout=30)


def transfer(net: Net, src: Host, dst: Host, size: int, marker: str = "", port: int = 5001) -> None:
    """Send ``size`` bytes over TCP from src's container to dst's; assert they arrive intact."""
    recv = net.popen(dst.container, sys.executable, "-c", RECEIVER, dst.ip, str(port), log=f"recv{port}.log")
    sent = src.in_container(sys.executable, "-c", SENDER, dst.ip, str(port), str(size), marker, timeout=20).split()
    recv.wait(60)
    got = net.log(f"recv{port}.log").split()
    assert got[:2] == [sent[0], str(size)], f"sent {sent}, received {got}"


@contextlib.contextmanager
def capture(net: Net, host: Host, dev: str, name: str) -> Iterator[Path]:
    """tcpdump on ``dev`` in the host's namespace for the duration of the block; yields the pcap path."""
    path = net.workdir / f"{name}.pcap"
    tcpdump = ["tcpdump", "-Z", "root", "-i", dev, "-s", "0", "-U", "--immediate-mode", "-w", str(path), "udp"]
    proc = net.popen(host.netns, *tcpdump, log=f"{name}.log")
    wait_until(lambda: "listening on" in net.log(f"{name}.log") or proc.poll() is not None, 10)
    try:
        yield path
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


def udp_payloads(pcap: Path) -> list[bytes]:
    """UDP payloads of the IPv4-over-Ethernet packets in a classic pcap file."""
    data = pcap.read_bytes()
    out, off = [], 24
    while off + 16 <= len(data):
        (incl,) = struct.unpack_from("<I", data, off + 8)
        pkt = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(pkt) > 42 and pkt[12:14] == b"\x08\x00" and pkt[23] == 17:
            ihl = (pkt[14] & 15) * 4
            out.append(pkt[14 + ihl + 8 :])
    return out


def send_udp(host: Host, dst: str, datagrams: list[bytes]) -> None:
    script = "import socket,sys,json\ns=socket.socket(2,2)\nfor d in json.load(sys.stdin): s.sendto(bytes.fromhex(d), "
    script += f"({dst!r}, {PORT}))"
    run("ip", "netns", "exec", host.netns, sys.executable, "-c", script, input=json.dumps([d.hex() for d in datagrams]))


# -- tests ------------------------------------------------------------------------------------------------------


def test_encrypted_pair_carries_ping_and_tcp_and_hides_the_payload(net: Net) -> None:
    h1, h2 = pair(net)
    ping(h1, h2)
    assert h2.mac in h1.in_container("ip", "neigh", "show", h2.ip)  # ARP went over the sleeve as a broadcast
    marker = "WEFT-SECRET-MARKER-7f3a"
    with capture(net, h1, "ul2", "enc") as pcap:
        transfer(net, h1, h2, 2_000_000, marker=marker)
    payloads = udp_payloads(pcap)
    assert sum(len(p) for p in payloads) > 1_000_000
    assert marker.encode() not in pcap.read_bytes()
    transfer(net, h1, h2, 20_000_000, port=5002)
    transfer(net, h2, h1, 20_000_000, port=5003)
    s1, s2 = h1.stats(), h2.stats()
    assert s1["bytes"]["sleeve/tx"] > 20_000_000 and s2["bytes"]["sleeve/rx"] > 20_000_000
    assert not {"auth", "replay", "error", "send_error"} & (set(s1["dropped"]) | set(s2["dropped"]))


def test_unencrypted_pair_carries_traffic_in_the_clear(net: Net) -> None:
    h1, h2 = pair(net, keys=False)
    ping(h1, h2)
    marker = "WEFT-PLAIN-MARKER-91c2"
    with capture(net, h1, "ul2", "plain") as pcap:
        transfer(net, h1, h2, 1_000_000, marker=marker)
    assert marker.encode() in pcap.read_bytes()  # the capture does see payloads: the encrypted test means something
    transfer(net, h2, h1, 20_000_000, port=5002)


def test_chain_with_end_to_end_keys_passes_unicast_on_unopened(net: Net) -> None:
    """The middle host holds no keys for the pair: it passes their datagrams on by header (and their broadcasts,
    which every host delivers, hop by hop)."""
    h1, h2, h3 = chain(net, e2e=True)
    ping(h1, h3)
    transfer(net, h1, h3, 20_000_000)
    transfer(net, h3, h1, 5_000_000, port=5002)
    s2 = h2.stats()
    assert s2["bytes"]["transit/tx"] > 25_000_000 and s2["bytes"]["relay/tx"] < 1_000_000
    assert not {"auth", "replay", "error", "unknown_pair"} & (set(s2["dropped"]) | set(h3.stats()["dropped"]))


def test_chain_relays_unicast_and_broadcast(net: Net) -> None:
    h1, h2, h3 = chain(net)
    ping(h1, h3)
    assert h3.mac in h1.in_container("ip", "neigh", "show", h3.ip)
    ping(h1, h2)
    transfer(net, h1, h3, 20_000_000)
    transfer(net, h3, h1, 5_000_000, port=5002)
    s2 = h2.stats()
    assert s2["bytes"]["relay/tx"] > 20_000_000 and s2["bytes"]["relay/rx"] > 20_000_000
    assert not {"auth", "replay", "error"} & set(s2["dropped"])


def test_small_underlay_mtu_with_small_datagrams(net: Net) -> None:
    """Every datagram stays <= datagram_size: an underlay dropping UDP packets over 1000 bytes still works."""
    h1, h2 = net.add_hosts(2)
    net.wire(h1, h2, 0)
    # Segment on h1's egress (as a NIC without UDP segmentation offload would) so h2's firewall sees real datagrams.
    h1.in_host(sys.executable, "-c", ETHTOOL, "ul2", "tx-udp-segmentation=off")
    rules = (
        "table inet wtsl {\n chain in {\n  type filter hook input priority 0;\n"
        f"  udp dport {PORT} ip length > 1000 counter drop\n  udp dport {PORT} counter accept\n }}\n}}\n"
    )
    run("ip", "netns", "exec", h2.netns, "nft", "-f", "-", input=rules)
    for h in (h1, h2):
        net.start(h, keys=True, datagram_size=972)
    ping(h1, h2)
    transfer(net, h1, h2, 10_000_000)
    transfer(net, h2, h1, 2_000_000, port=5002)
    counters = [int(x.split()[0]) for x in h2.in_host("nft", "list", "table", "inet", "wtsl").split("packets")[1:]]
    assert counters[0] == 0 and counters[1] > 7000, counters
    send_udp(h1, "10.98.0.2", [bytes(1100)])  # the rule does bite
    counters = [int(x.split()[0]) for x in h2.in_host("nft", "list", "table", "inet", "wtsl").split("packets")[1:]]
    assert counters[0] == 1


def test_too_big_frames_get_icmp_frag_needed(net: Net) -> None:
    h1, h2 = pair(net, frame_mtu={"2": 1200, "1": 1200})
    out = h1.in_container("ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1300", h2.ip, check=False)
    assert "mtu = 1200" in out, out
    assert "mtu 1200" in h1.in_container("ip", "route", "get", h2.ip)
    transfer(net, h1, h2, 10_000_000)  # TCP shrinks its segments and carries on
    assert h1.stats()["dropped"]["too_big"] >= 1
    ping(h1, h2)


# -- manual benchmark -------------------------------------------------------------------------------------------


def bench(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--datagram-size", type=int, default=1472)
    ap.add_argument("--iperf-args", default="")
    ap.add_argument("--workers", type=int, default=1, help="forwarding workers per sleeve")
    ap.add_argument("--ulseg", action="store_true", help="segment UDP in software on the underlay, GRO on receive")
    ap.add_argument("--e2e", action="store_true", help="end-to-end keys between hosts that are not neighbours")
    args = ap.parse_args(argv)
    n = Net()
    try:
        hosts = n.add_hosts(args.hosts)
        for a, b in itertools.pairwise(hosts):
            n.wire(a, b, a.index - 1)
        if args.ulseg:  # like a NIC without UDP segmentation offload, with GRO at the receiver (veth: needs TSO off)
            tso = ("udp", "tcp", "tcp6", "tcp-ecn", "tcp-mangleid", "tcp-accecn")
            off = [f"tx-{f}-segmentation=off" for f in tso]
            for h in hosts:
                for dev in h.addrs:
                    h.in_host(sys.executable, "-c", ETHTOOL, f"ul{dev}", "rx-gro=on", *off)
        for h in hosts:
            n.start(h, keys=not args.plain, datagram_size=args.datagram_size, e2e=args.e2e, workers=args.workers)
        src, dst = hosts[0], hosts[-1]
        ping(src, dst, 3)  # ARP, warm caches
        print("idle", src.in_container("ping", "-c", "100", "-i", "0.01", "-q", dst.ip).strip().splitlines()[-1])
        n.popen(dst.container, "iperf3", "-s", "-1", log="iperf-server.log")
        time.sleep(0.5)
        extra = args.iperf_args.split()
        before = {h.index: (_cpu_seconds(h), h.stats()["bytes"]) for h in hosts}
        print(src.in_container("iperf3", "-c", dst.ip, "-t", str(args.seconds), *extra, timeout=args.seconds + 30))
        for h in hosts:
            s = h.stats()
            cpu = _cpu_seconds(h) - before[h.index][0]
            relayed = sum(s["bytes"][f"{p}/tx"] - before[h.index][1][f"{p}/tx"] for p in ("relay", "transit"))
            per_mb = f", {1e3 * cpu / (relayed / 1e6):.3f} ms CPU per MB relayed" if relayed > 1e6 else ""
            print(f"h{h.index}: {cpu:.2f} s CPU, {relayed / 1e6:.1f} MB relayed{per_mb}")
            print(f"h{h.index}", json.dumps({"bytes": s["bytes"], "dropped": s["dropped"], "workers": s["workers"]}))
    finally:
        n.close()


def _cpu_seconds(host: Host) -> float:
    """User + system CPU time of the host's driver process (``ip netns exec`` execs it: the PID is its own)."""
    assert host.driver is not None
    fields = Path(f"/proc/{host.driver.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        bench(sys.argv[2:])
    else:
        sys.exit(pytest.main([__file__, *sys.argv[1:]]))

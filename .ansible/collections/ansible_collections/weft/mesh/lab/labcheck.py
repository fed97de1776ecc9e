"""`weftlab.py check`: prove the lab is what it claims to be (reachability, firewall, NAT, isolation, kernel
features inside machines, EC2 registration). Traffic only goes to addresses inside the lab's namespaces."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from labec2 import ec2_client
from labmachines import connect, ssh_run
from labnet import run
from labplan import (
    MACHINES,
    MGMT_GATEWAY,
    NAT_PUBLIC_ADDRESS,
    SITES,
    WAN_NETNS,
    WEFT_TCP_PORT,
    WEFT_UDP_PORTS,
    Machine,
    machine,
)

LISTENER = """
import socket, sys
proto, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", port))
s.settimeout(wait)
if proto == "tcp":
    s.listen(4)
print("ready", flush=True)
try:
    if proto == "tcp":
        c, peer = s.accept()
        c.close()
    else:
        data, peer = s.recvfrom(100)
        s.sendto(b"pong", peer)
    print("peer", peer[0], flush=True)
except socket.timeout:
    print("none", flush=True)
"""

CLIENT = """
import socket, sys
proto, host, port, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
try:
    if proto == "tcp":
        socket.create_connection((host, port), timeout=wait).close()
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(wait)
        s.sendto(b"ping", (host, port))
        s.recvfrom(100)
    print("connected")
except OSError as exc:
    print("failed", type(exc).__name__, exc)
"""

# Inside a machine: what the agent will do (netns, veth, tap, vxlan, /dev/net/tun), then clean up.
KERNEL_FEATURES = """set -e
ip netns add weftlab-check
ip link add wlc-veth0 type veth peer name wlc-veth1
ip link set wlc-veth1 netns weftlab-check
ip netns exec weftlab-check ip link set wlc-veth1 up
ip tuntap add mode tap name wlc-tap0
ip link add wlc-vx0 type vxlan id 4242 dstport 4789 local {ip} dev eth0
ip link add wlc-br0 type bridge
ip link set wlc-vx0 master wlc-br0
python3 -c 'import fcntl, os, struct; fd = os.open("/dev/net/tun", os.O_RDWR); \
fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH", b"wlc-tun0", 0x1001)); print("tun-ok")'
ip -br link | grep -c wlc-
ip link del wlc-vx0; ip link del wlc-br0; ip link del wlc-tap0; ip link del wlc-veth0
ip netns del weftlab-check
echo features-ok
"""


@dataclass
class Result:
    name: str
    ok: bool
    detail: str


def probe(src: Machine, dst: Machine | None, host: str, proto: str, port: int, wait: float = 3.0) -> tuple[str, str]:
    """Try proto/port from src to host; with dst, a listener there reports the source address it saw.

    Returns (client outcome, listener outcome): ("connected"|"failed ...", "peer A.B.C.D"|"none"|"-").
    """
    listener = None
    if dst is not None:
        listener = connect(dst)
        cmd = f"python3 -c {shlex.quote(LISTENER)} {proto} {port} {wait + 2}"
        _, out, _ = listener.exec_command(cmd, timeout=wait + 10)
        ready = out.readline().strip()
        if ready != "ready":
            listener.close()
            raise RuntimeError(f"listener on {dst.name} did not start: {ready!r}")
    try:
        cmd = f"python3 -c {shlex.quote(CLIENT)} {proto} {host} {port} {wait}"
        _, client_out, _ = ssh_run(src, cmd, timeout=wait + 10)
        seen = "-"
        if listener is not None:
            seen = out.readline().strip()
        return client_out.strip(), seen
    finally:
        if listener is not None:
            listener.close()


def expect_open(src: str, dst: str, host: str, proto: str, port: int, seen_as: str) -> Result:
    """A connection that must work, and whose source must appear as seen_as at the listener."""
    client, seen = probe(machine(src), machine(dst), host, proto, port)
    ok = client == "connected" and seen == f"peer {seen_as}"
    return Result(f"{src} -> {dst} {host} {proto}/{port} open, source {seen_as}", ok, f"{client}; listener: {seen}")


def expect_blocked(src: str, dst: str | None, host: str, proto: str, port: int, dropped: bool = False) -> Result:
    """A connection that must fail (and, with a listener, must never arrive); dropped: silently (a timeout),
    which tells a firewall drop from a merely closed port."""
    client, seen = probe(machine(src), machine(dst) if dst else None, host, proto, port)
    ok = client.startswith("failed") and seen in ("none", "-") and (not dropped or "timeout" in client.lower())
    return Result(f"{src} -> {host} {proto}/{port} blocked", ok, f"{client}; listener: {seen}")


def expect_connect(src: str, host: str, port: int) -> Result:
    """A TCP connection to a port that already listens (e.g. sshd) must succeed."""
    client, _ = probe(machine(src), None, host, "tcp", port)
    return Result(f"{src} -> {host} tcp/{port} open", client == "connected", client)


def check_machine(m: Machine) -> Result:
    """sshd answers, systemd booted, addresses are the plan's."""
    _, state, _ = ssh_run(m, "systemctl is-system-running")
    _, addrs, _ = ssh_run(m, "ip -br -4 a")
    ok = state.strip() in ("running", "degraded") and m.underlay_ip in addrs and m.mgmt_ip in addrs
    brief = " | ".join(" ".join(line.split()) for line in addrs.splitlines())
    return Result(f"{m.name} booted", ok, f"{state.strip()}; {brief}")


def check_ping(src: str, host: str, expect: bool) -> Result:
    """ICMP echo: allowed inside a site, blocked between sites."""
    status, _, _ = ssh_run(machine(src), f"ping -c1 -W2 {host}")
    ok = (status == 0) == expect
    return Result(f"{src} ping {host} {'works' if expect else 'blocked'}", ok, f"exit {status}")


def check_features(m: Machine) -> Result:
    """netns, veth, tap, vxlan, bridge and /dev/net/tun inside the machine, as the agent needs them."""
    status, out, err = ssh_run(m, KERNEL_FEATURES.format(ip=m.underlay_ip))
    ok = status == 0 and "tun-ok" in out and "features-ok" in out
    return Result(f"{m.name} kernel features", ok, (out + err).strip().replace("\n", " "))


def check_no_way_out() -> Result:
    """The lab's routers know no route to the real world (asked of the routing table: no packet is sent)."""
    details = []
    ok = True
    for ns in [WAN_NETNS] + [s.netns for s in SITES.values()]:
        res = run(["ip", "-n", ns, "route", "get", "192.0.2.1"], check=False)
        # The wan knows no way out; site routers only know their default route towards the wan.
        good = res.returncode != 0 if ns == WAN_NETNS else "via" in res.stdout and "wan0" in res.stdout
        ok = ok and good
        details.append(f"{ns}: {(res.stdout or res.stderr).split(chr(10))[0].strip()}")
    return Result("no route out of the lab", ok, "; ".join(details))


def check_ec2() -> Result:
    """boto3 against moto lists the AWS machines, running, with the tags the inventory uses."""
    ec2 = ec2_client()
    filters = [{"Name": "tag:weft_mesh", "Values": ["true"]}, {"Name": "instance-state-name", "Values": ["running"]}]
    found = {}
    for res in ec2.describe_instances(Filters=filters)["Reservations"]:
        for inst in res["Instances"]:
            tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
            found[tags.get("Name")] = (inst["InstanceId"], inst.get("PrivateIpAddress"), tags)
    want = {m.name: m for m in MACHINES if m.site == "aws"}
    ok = set(found) == set(want) and all(
        found[n][1] == m.underlay_ip and found[n][2].get("lab_ssh_host") == m.mgmt_ip for n, m in want.items()
    )
    detail = ", ".join(f"{n}={v[0]} {v[1]} ssh={v[2].get('lab_ssh_host')}" for n, v in sorted(found.items()))
    return Result("ec2 instances in moto", ok, detail)


def checks() -> list[Callable[[], Result]]:
    """The list of checks, in an order that reads like the lab's story."""
    dc1a, dc1b, dc2a, awsa = (machine(n) for n in ("dc1-a", "dc1-b", "dc2-a", "aws-a"))
    udp = WEFT_UDP_PORTS[1]
    tcp = WEFT_TCP_PORT
    items: list[Callable[[], Result]] = [partial(check_machine, m) for m in MACHINES]
    items += [
        partial(expect_open, "dc1-a", "dc2-a", dc2a.underlay_ip, "tcp", tcp, dc1a.underlay_ip),
        partial(expect_open, "dc2-a", "dc1-b", dc1b.underlay_ip, "udp", udp, dc2a.underlay_ip),
        partial(expect_blocked, "dc1-a", None, dc2a.underlay_ip, "tcp", 22, dropped=True),
        partial(check_ping, "dc1-a", dc2a.underlay_ip, expect=False),
        partial(check_ping, "dc1-a", dc1b.underlay_ip, expect=True),
        partial(expect_connect, "dc1-a", dc1b.underlay_ip, 22),
        partial(expect_open, "aws-a", "dc1-a", dc1a.underlay_ip, "tcp", tcp, NAT_PUBLIC_ADDRESS),
        partial(expect_open, "aws-b", "dc2-a", dc2a.underlay_ip, "udp", udp, NAT_PUBLIC_ADDRESS),
        partial(expect_open, "aws-a", "aws-b", machine("aws-b").underlay_ip, "tcp", tcp, awsa.underlay_ip),
        partial(expect_blocked, "dc1-a", "aws-a", awsa.underlay_ip, "tcp", tcp),
        partial(expect_blocked, "dc1-a", "aws-a", NAT_PUBLIC_ADDRESS, "tcp", tcp),
        partial(expect_blocked, "dc1-a", "aws-a", NAT_PUBLIC_ADDRESS, "udp", udp),
        partial(expect_blocked, "dc1-a", None, dc1b.mgmt_ip, "tcp", 22),
        partial(expect_blocked, "dc1-a", None, MGMT_GATEWAY, "tcp", 22, dropped=True),
        check_no_way_out,
        partial(check_features, dc1a),
        partial(check_features, awsa),
        check_ec2,
    ]
    return items


def run_checks() -> bool:
    """Run every check, print one line each, and say whether all passed."""
    results = []
    started = time.monotonic()
    for item in checks():
        try:
            res = item()
        except Exception as exc:  # noqa: BLE001 - a crashed check is a failed check, keep going
            label = f"{item.func.__name__}{item.args}" if isinstance(item, partial) else item.__name__
            res = Result(label, False, f"{type(exc).__name__}: {exc}")
        results.append(res)
        print(f"{'PASS' if res.ok else 'FAIL'}  {res.name}: {res.detail}", flush=True)
    failed = sum(not r.ok for r in results)
    passed = len(results) - failed
    print(f"{passed} passed, {failed} failed in {time.monotonic() - started:.1f}s")
    return failed == 0

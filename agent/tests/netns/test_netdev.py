"""Kernel devices, FDBs, container attach and the MAC watcher, on real kernel objects in throwaway namespaces.

Nothing is created in the root namespace: the "host" is a namespace holding the bridge, and every container is
another namespace (or an `unshare -n` process). Names carry a random token; teardown is by name and PID.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest
from lab import wait_until

from weft.datapath import attach as attach_module
from weft.datapath.attach import (
    AttachError,
    attach,
    detach,
    expose,
    gso_size_for,
    hide,
    host_ifname,
    limit_gso,
    reset,
)
from weft.datapath.macwatch import MacWatcher
from weft.datapath.netdev import ZERO_MAC, NetDev, NetDevError, enter_netns
from weft.datapath.udp import SO_RCVBUFFORCE
from weft.datapath.wire import OVERLAY_GSO_MAX

BR, VX, TAP = "weft", "vxweft", "tapweft"
MTU = 1450


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "bridge", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` on PATH"
    return None


F = TypeVar("F", bound=Callable[..., None])


def netns_test(fn: F) -> F:
    """Runs on real kernel objects in namespaces: root only, selectable with -m netns."""
    reason = _skip_reason()
    return pytest.mark.skipif(reason is not None, reason=reason or "")(pytest.mark.netns(fn))


def sh(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def quiet_ipv6(*prefix: str) -> None:
    """No IPv6 in a test namespace: no MLD/RS chatter, so the only frames are the ones a test sends."""
    sh(*prefix, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")


@dataclass
class Env:
    token: str
    made: list[str]

    def ns(self, suffix: str) -> str:
        name = f"wtnd{self.token}-{suffix}"
        sh("ip", "netns", "add", name)
        self.made.append(name)
        quiet_ipv6("ip", "netns", "exec", name)
        return name


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env(secrets.token_hex(3), [])
    try:
        yield e
    finally:
        for name in reversed(e.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def host(env: Env) -> Iterator[tuple[str, NetDev]]:
    """A host namespace and a NetDev on it (closed before the namespace goes)."""
    name = env.ns("h")
    nd = NetDev(name)
    try:
        yield name, nd
    finally:
        nd.close()


@pytest.fixture
def overlay(host: tuple[str, NetDev]) -> tuple[str, NetDev]:
    """The host with its bridge, vxlan and tap, as the agent sets them up."""
    _, nd = host
    nd.ensure_bridge(BR, MTU)
    nd.ensure_vxlan(VX, bridge=BR, vni=1, port=6784, mtu=MTU)
    nd.ensure_tap(TAP, bridge=BR, mtu=MTU)
    return host


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A process in a fresh, anonymous network namespace: a container known only by PID."""
    proc = subprocess.Popen(["unshare", "-n", "sleep", "600"])
    try:
        wait_until(lambda: os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net"), 10)
        quiet_ipv6("nsenter", "-t", str(proc.pid), "-n")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=10)


def ping(*prefix: str, dst: str) -> None:
    sh(*prefix, "/usr/bin/ping", "-c", "1", "-W", "5", dst)


def socket_in(
    netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A socket (TCP unless asked) in another namespace, made by a short-lived thread that enters it (the test's
    netns stays)."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            enter_netns(netns)
            made.append(socket.socket(family, kind, proto))
        except BaseException as e:
            made.append(e)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def tcp_roundtrip(client_ns: str, server_ns: str, server_ip: str) -> bytes:
    """One TCP exchange between two namespaces, with sockets opened in each (no helper processes)."""
    srv, cli = socket_in(server_ns), socket_in(client_ns)
    with srv, cli:
        srv.settimeout(10)
        cli.settimeout(10)
        srv.bind((server_ip, 0))
        srv.listen(1)
        cli.connect((server_ip, srv.getsockname()[1]))
        conn, _ = srv.accept()
        with conn:
            cli.sendall(b"weft")
            conn.sendall(conn.recv(4)[::-1])
            return cli.recv(4)


# -- devices -----------------------------------------------------------------------------------------------------


@netns_test
def test_ensure_devices_idempotent_and_learning_off(host: tuple[str, NetDev]) -> None:
    name, nd = host
    br = nd.ensure_bridge(BR, MTU)
    vx = nd.ensure_vxlan(VX, bridge=BR, vni=1, port=6784, mtu=MTU)
    tap = nd.ensure_tap(TAP, bridge=BR, mtu=MTU)
    br_mac = nd.link(BR).mac
    nd.vxlan_fdb_add(VX, ZERO_MAC, "10.99.0.2")
    nd.vxlan_fdb_add(VX, "02:00:00:00:00:01", "10.99.0.2")
    nd.bridge_fdb_set(BR, "02:00:00:00:00:01", VX)
    before = (nd.vxlan_fdb(VX), nd.bridge_fdb(BR))

    assert (nd.ensure_bridge(BR, MTU), nd.ensure_vxlan(VX, bridge=BR, vni=1, port=6784, mtu=MTU)) == (br, vx)
    assert nd.ensure_tap(TAP, bridge=BR, mtu=MTU) == tap
    assert (nd.vxlan_fdb(VX), nd.bridge_fdb(BR)) == before
    assert nd.link(BR).mac == br_mac, "the bridge MAC is pinned, not taken from a port"
    assert sorted(nd.bridge_ports(BR)) == sorted([VX, TAP])

    vx_info = sh("ip", "-n", name, "-d", "link", "show", VX)
    assert "nolearning" in vx_info and "dstport 6784" in vx_info and "vxlan id 1 " in vx_info
    assert (
        f"mtu {MTU}" in vx_info and f"master {BR}" in vx_info and "learning off" in vx_info and "isolated on" in vx_info
    )
    tap_info = sh("ip", "-n", name, "-d", "link", "show", TAP)
    assert (
        "tun type tap" in tap_info
        and "learning off" in tap_info
        and "isolated on" in tap_info
        and f"master {BR}" in tap_info
    )
    assert "stp_state 0" in sh("ip", "-n", name, "-d", "link", "show", BR)

    # A different VNI is a different device: recreated, and the stale FDB goes with the old one.
    vx2 = nd.ensure_vxlan(VX, bridge=BR, vni=2, port=6784, mtu=MTU)
    assert vx2 != vx and "vxlan id 2 " in sh("ip", "-n", name, "-d", "link", "show", VX)
    assert nd.link(VX).master == br


@netns_test
def test_ensure_refuses_a_foreign_device(host: tuple[str, NetDev]) -> None:
    name, nd = host
    sh("ip", "-n", name, "link", "add", "notbr", "type", "veth", "peer", "name", "notbr-p")
    with pytest.raises(NetDevError, match="not a bridge"):
        nd.ensure_bridge("notbr", MTU)
    with pytest.raises(NetDevError, match="does not exist"):
        nd.ensure_vxlan(VX, bridge="nobridge", vni=1, port=6784, mtu=MTU)


def _open_queues(netns: str, n: int) -> str:
    """Attach ``n`` queues to TAP as the sleeve does, in the namespace; "ok" or the error of the one that failed."""
    code = (
        "import sys\n"
        "from weft.datapath.tap import open_tap\n"
        "fds = []\n"
        f"for _ in range({n}):\n"
        "    try:\n"
        f"        fds.append(open_tap({TAP!r}))\n"
        "    except OSError as e:\n"
        "        print(e.errno, e.strerror); sys.exit(0)\n"
        "print('ok')\n"
    )
    return sh("ip", "netns", "exec", netns, sys.executable, "-c", code).strip()


@netns_test
def test_a_single_queue_tap_from_an_older_release_is_replaced_by_a_multi_queue_one(host: tuple[str, NetDev]) -> None:
    name, nd = host
    nd.ensure_bridge(BR, MTU)
    sh("ip", "-n", name, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")  # what earlier releases made
    sh("ip", "-n", name, "link", "set", TAP, "master", BR, "up")
    old = nd.link_index(TAP)
    assert _open_queues(name, 2).startswith(f"{errno.EBUSY} ")  # one queue only: the workers could not attach

    new = nd.ensure_tap(TAP, bridge=BR, mtu=MTU, multi_queue=True)
    assert new != old
    info = sh("ip", "-n", name, "-d", "link", "show", TAP)
    assert "multi_queue" in info and "learning off" in info and "isolated on" in info and f"master {BR}" in info
    assert f"mtu {MTU}" in info
    assert _open_queues(name, 4) == "ok"
    assert nd.ensure_tap(TAP, bridge=BR, mtu=MTU, multi_queue=True) == new  # and left alone from then on


@netns_test
def test_tap_attaches_with_vnet_hdr_without_being_disturbed(overlay: tuple[str, NetDev]) -> None:
    name, nd = overlay
    index = nd.link_index(TAP)
    code = (
        "import fcntl, os, struct, sys\n"
        "fd = os.open('/dev/net/tun', os.O_RDWR)\n"
        f"ifr = fcntl.ioctl(fd, 0x400454CA, struct.pack('16sH', b'{TAP}', 0x0002 | 0x1000 | 0x4000))\n"
        "print(ifr[:16].rstrip(b'\\0').decode(), flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", name, sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == TAP
        wait_until(lambda: "LOWER_UP" in sh("ip", "-n", name, "link", "show", TAP), 10, message="tap has no carrier")
        assert nd.ensure_tap(TAP, bridge=BR, mtu=MTU) == index  # the sleeve keeps its device across agent restarts
        assert "vnet_hdr on" in sh("ip", "-n", name, "-d", "link", "show", TAP)
    finally:
        proc.kill()
        proc.wait(timeout=10)


@netns_test
def test_vxlan_fdb_flood_list_and_unicast(overlay: tuple[str, NetDev]) -> None:
    name, nd = overlay
    nd.vxlan_fdb_add(VX, ZERO_MAC, "10.99.0.2")
    nd.vxlan_fdb_add(VX, ZERO_MAC, "10.99.0.3")
    nd.vxlan_fdb_add(VX, ZERO_MAC, "10.99.0.3")  # append twice: still one entry
    nd.vxlan_fdb_add(VX, "02:AA:00:00:00:01", "10.99.0.2")
    nd.vxlan_fdb_add(VX, "02:aa:00:00:00:01", "10.99.0.3")  # unicast replaces
    assert nd.vxlan_fdb(VX) == {ZERO_MAC: {"10.99.0.2", "10.99.0.3"}, "02:aa:00:00:00:01": {"10.99.0.3"}}
    assert "00:00:00:00:00:00 dst 10.99.0.3 self permanent" in sh("bridge", "-n", name, "fdb", "show", "dev", VX)

    nd.vxlan_fdb_del(VX, ZERO_MAC, "10.99.0.2")
    nd.vxlan_fdb_del(VX, ZERO_MAC, "10.99.0.2")  # idempotent
    nd.vxlan_fdb_del(VX, "02:aa:00:00:00:01", "10.99.0.2")  # not its dst: nothing happens
    assert nd.vxlan_fdb(VX) == {ZERO_MAC: {"10.99.0.3"}, "02:aa:00:00:00:01": {"10.99.0.3"}}
    nd.vxlan_fdb_del(VX, "02:aa:00:00:00:01", "10.99.0.3")
    nd.vxlan_fdb_del(VX, ZERO_MAC, "10.99.0.3")
    assert nd.vxlan_fdb(VX) == {}
    assert nd.bridge_fdb(BR) == {}, "vxlan self entries never show up as bridge entries"


@netns_test
def test_bridge_fdb_static_entries(overlay: tuple[str, NetDev]) -> None:
    name, nd = overlay
    assert nd.bridge_fdb(BR) == {}, "port addresses are not user entries"
    nd.bridge_fdb_set(BR, "02:bb:00:00:00:01", VX)
    nd.bridge_fdb_set(BR, "02:bb:00:00:00:02", TAP)
    assert nd.bridge_fdb(BR) == {"02:bb:00:00:00:01": VX, "02:bb:00:00:00:02": TAP}
    assert "02:bb:00:00:00:01 dev vxweft master weft static" in sh("bridge", "-n", name, "fdb", "show", "br", BR)
    # One MAC looked up alone: the same answer as the whole table, port addresses and unknown MACs being None.
    assert nd.bridge_fdb_port(BR, "02:BB:00:00:00:01") == VX
    assert nd.bridge_fdb_port(BR, "02:bb:00:00:00:09") is None
    assert nd.bridge_fdb_port(BR, nd.link(VX).mac) is None and nd.bridge_fdb_port(BR, nd.link(BR).mac) is None
    nd.bridge_fdb_set(BR, "02:bb:00:00:00:01", TAP)  # moves
    assert nd.bridge_fdb(BR) == {"02:bb:00:00:00:01": TAP, "02:bb:00:00:00:02": TAP}
    assert nd.bridge_fdb_port(BR, "02:bb:00:00:00:01") == TAP
    nd.bridge_fdb_del(BR, "02:bb:00:00:00:01", VX)  # not there: nothing happens
    nd.bridge_fdb_del(BR, "02:bb:00:00:00:01", TAP)
    nd.bridge_fdb_del(BR, "02:bb:00:00:00:01", TAP)
    nd.bridge_fdb_del(BR, "02:bb:00:00:00:02", "noport")
    assert nd.bridge_fdb(BR) == {"02:bb:00:00:00:02": TAP}


@netns_test
def test_fdb_apply_keeps_what_it_applied_equal_to_the_kernel(overlay: tuple[str, NetDev]) -> None:
    """Programmings diff against what the last one applied rather than read the FDB: on a random walk of desired
    states (peers moving between fast, sleeve and gone, flood lists growing and shrinking, warm-up's add-only passes),
    what the agent believes the kernel holds is what a fresh read says, and an operator's entry on another port
    stays."""
    import random

    from weft.datapath import fdb

    _, nd = overlay
    sh("ip", "-n", overlay[0], "link", "add", "op0", "type", "veth", "peer", "name", "op1")
    sh("ip", "-n", overlay[0], "link", "set", "op0", "master", BR, "up")
    nd.bridge_fdb_set(BR, "02:ee:00:00:00:01", "op0")
    rng = random.Random(7)
    peers = list(range(1, 13))
    owner = {bytes([2, 0xAA, 0, 0, 0, p]): p for p in peers} | {bytes([2, 0xAB, 0, 0, 0, p]): p for p in peers}
    have = fdb.read(nd, bridge=BR, vxlan=VX)
    for step in range(25):
        fast = {p: f"10.99.0.{p + 1 + (step % 3 == 0 and p % 4 == 0)}" for p in rng.sample(peers, rng.randint(0, 8))}
        sleeve = frozenset(rng.sample([p for p in peers if p not in fast], rng.randint(0, 3)))
        want = fdb.desired_state(fast_ips=fast, sleeve_peers=sleeve, owner=owner, ourself=0, vxlan=VX, tap=TAP)
        delete = step % 5 != 1  # now and then a warm-up pass, which only adds
        if step % 2:  # as the agent programs it: every entry of the pass in one hand-over to netlink's thread
            nd.batch(
                lambda want=want, delete=delete: fdb.apply(
                    nd, bridge=BR, vxlan=VX, tap=TAP, want=want, delete=delete, have=have
                )
            )
        else:
            fdb.apply(nd, bridge=BR, vxlan=VX, tap=TAP, want=want, delete=delete, have=have)
        kernel = fdb.read(nd, bridge=BR, vxlan=VX)
        assert have == kernel, f"step {step}: applied state drifted from the kernel's"
        if delete:
            assert kernel.vxlan == want.vxlan and kernel.bridge == want.bridge | {"02:ee:00:00:00:01": "op0"}
    assert fdb.apply(nd, bridge=BR, vxlan=VX, tap=TAP, want=want, delete=True, have=have) == 0, (
        "a repeat changes nothing"
    )
    worker = nd.batch(threading.current_thread)
    assert worker is not threading.current_thread() and worker.name.startswith("weft-netlink")
    assert nd.batch(nd.batch, nd.link, BR).name == BR, "a batch within a batch runs in place"


@netns_test
def test_route_mtu_and_delete_link(host: tuple[str, NetDev]) -> None:
    name, nd = host
    sh("ip", "-n", name, "link", "add", "d0", "mtu", "1400", "type", "veth", "peer", "name", "d1", "mtu", "1400")
    sh("ip", "-n", name, "addr", "add", "10.50.0.1/24", "dev", "d0")
    sh("ip", "-n", name, "link", "set", "d0", "up")
    sh("ip", "-n", name, "link", "set", "d1", "up")
    assert nd.route_mtu("10.50.0.9") == 1400
    sh("ip", "-n", name, "route", "add", "10.60.0.0/24", "dev", "d0", "mtu", "1300")
    assert nd.route_mtu("10.60.0.9") == 1300
    with pytest.raises(NetDevError, match="no route"):
        nd.route_mtu("192.0.2.1")
    assert nd.delete_link("d0") and not nd.delete_link("d0")


# -- attach ------------------------------------------------------------------------------------------------------


@netns_test
def test_attach_two_containers_talk(env: Env, overlay: tuple[str, NetDev]) -> None:
    _, nd = overlay
    c1, c2 = env.ns("c1"), env.ns("c2")
    a1 = attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    a2 = attach(nd, bridge=BR, cidrs=["10.40.0.2/24"], mtu=MTU, netns=c2)
    assert a1.changed and a1.ifname == "ethwe" and a1.addresses == ["10.40.0.1/24"]
    assert a1.host_ifname == host_ifname(f"/var/run/netns/{c1}", "ethwe") and len(a1.host_ifname) <= 15
    assert a1.host_ifname != a2.host_ifname

    link = sh("ip", "-n", c1, "link", "show", "ethwe")
    assert f"mtu {MTU}" in link and a1.mac in link and "UP" in link
    assert "inet 10.40.0.1/24" in sh("ip", "-n", c1, "addr", "show", "ethwe")
    assert "224.0.0.0/4 dev ethwe" in sh("ip", "-n", c1, "route", "show")
    assert "DOWN" in sh("ip", "-n", c1, "link", "show", "lo"), "the container's lo is left alone"
    assert nd.link(a1.host_ifname).master == nd.link_index(BR) and nd.link(a1.host_ifname).mtu == MTU

    ping("ip", "netns", "exec", c1, dst="10.40.0.2")
    assert tcp_roundtrip(c1, c2, "10.40.0.2") == b"tfew"


@netns_test
def test_attach_is_idempotent_and_adds_only_new_cidrs(env: Env, overlay: tuple[str, NetDev]) -> None:
    _, nd = overlay
    c1 = env.ns("c1")
    first = attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    index = nd.link_index(first.host_ifname)
    again = attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    assert again == dataclasses.replace(first, changed=False)
    more = attach(nd, bridge=BR, cidrs=["10.40.0.1/24", "10.41.0.1/16"], mtu=MTU, netns=c1)
    assert more.changed and sorted(more.addresses) == ["10.40.0.1/24", "10.41.0.1/16"]
    assert nd.link_index(first.host_ifname) == index, "the veth was kept"
    assert not attach(nd, bridge=BR, cidrs=["10.41.0.1/16"], mtu=MTU, netns=c1).changed


def gso_max_size(netns: str, ifname: str) -> int:
    words = sh("ip", "-d", "-n", netns, "link", "show", ifname).split()
    return int(words[words.index("gso_max_size") + 1])


def bulk_tcp(client_ns: str, server_ns: str, server_ip: str, size: int) -> int:
    """Send ``size`` bytes over one TCP connection between two namespaces; the bytes the server got."""
    srv, cli = socket_in(server_ns), socket_in(client_ns)
    got = [0]
    with srv, cli:
        srv.settimeout(30)
        cli.settimeout(30)
        srv.bind((server_ip, 0))
        srv.listen(1)

        def serve() -> None:
            conn, _ = srv.accept()
            with conn:
                while data := conn.recv(1 << 20):
                    got[0] += len(data)

        reader = threading.Thread(target=serve)
        reader.start()
        cli.connect((server_ip, srv.getsockname()[1]))
        cli.sendall(bytes(size))
        cli.shutdown(socket.SHUT_WR)
        reader.join(30)
    return got[0]


@netns_test
def test_containers_and_the_host_send_packets_a_sealed_frame_carries_in_one_send(
    env: Env, overlay: tuple[str, NetDev], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a mesh secret, a container's TCP builds GSO packets below wire.OVERLAY_GSO_MAX, so the encrypted path
    seals each in one UDP send; an interface attached by an older release (the kernel's 64 KiB) is put right by the
    next attach, and without a secret the kernel's size comes back (the fast path's best)."""
    name, nd = overlay
    c1, c2 = env.ns("c1"), env.ns("c2")
    sealed = gso_size_for(encrypting=True)
    assert sealed == OVERLAY_GSO_MAX and gso_size_for(encrypting=False) == 65536
    a1 = attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1, gso_max_size=sealed)
    attach(nd, bridge=BR, cidrs=["10.40.0.2/24"], mtu=MTU, netns=c2, gso_max_size=sealed)
    assert gso_max_size(c1, "ethwe") == OVERLAY_GSO_MAX
    sh("ip", "-n", c1, "link", "set", "ethwe", "gso_max_size", "65536")
    assert attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1, gso_max_size=sealed).changed
    assert gso_max_size(c1, "ethwe") == OVERLAY_GSO_MAX
    assert not attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1, gso_max_size=sealed).changed
    assert attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1, gso_max_size=65536).changed
    assert gso_max_size(c1, "ethwe") == 65536
    assert attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1, gso_max_size=sealed).changed
    assert limit_gso(nd, BR, sealed) and not limit_gso(nd, BR, sealed) and gso_max_size(name, BR) == sealed

    # A size the kernel refuses (a kernel without the setting, or a limit of its own) costs speed only: the attach
    # goes on, and it is logged once
    monkeypatch.setattr(attach_module, "_gso_refused", threading.Event())  # as in a fresh agent
    with caplog.at_level(logging.WARNING, logger="weft.datapath.attach"):
        assert not limit_gso(nd, BR, 600_000) and not limit_gso(nd, BR, 600_000)
        assert attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1, gso_max_size=600_000) is not None
    refusals = [r.getMessage() for r in caplog.records if "gso_max_size" in r.getMessage()]
    assert len(refusals) == 1 and "two sends" in refusals[0], refusals
    assert gso_max_size(c1, "ethwe") == OVERLAY_GSO_MAX and gso_max_size(name, BR) == sealed

    # What the container really sends: every packet it puts on its veth, seen from the host's end
    cap = socket_in(name, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
    with cap:
        cap.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        cap.bind((a1.host_ifname, 0))
        assert bulk_tcp(c1, c2, "10.40.0.2", 32 << 20) == 32 << 20
        cap.setblocking(False)
        sizes = []
        with contextlib.suppress(BlockingIOError):
            while True:
                sizes.append(len(cap.recv(1 << 17)))
    assert max(sizes) > 16_384, "the container's TCP built GSO packets (else this shows nothing)"
    assert max(sizes) - 14 < OVERLAY_GSO_MAX, f"an IP packet of {max(sizes) - 14} bytes left the container"


@netns_test
def test_attach_by_pid(env: Env, overlay: tuple[str, NetDev], sleeper: int) -> None:
    _, nd = overlay
    c1 = env.ns("c1")
    attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    a = attach(nd, bridge=BR, cidrs=["10.40.0.3/24"], mtu=MTU, pid=sleeper)
    assert a.changed and a.addresses == ["10.40.0.3/24"]
    assert "inet 10.40.0.3/24" in sh("nsenter", "-t", str(sleeper), "-n", "ip", "addr", "show", "ethwe")
    ping("nsenter", "-t", str(sleeper), "-n", dst="10.40.0.1")
    assert not attach(nd, bridge=BR, cidrs=["10.40.0.3/24"], mtu=MTU, pid=sleeper).changed
    gone = detach(nd, bridge=BR, pid=sleeper)
    assert gone is not None and gone.changed and nd.link(a.host_ifname) is None


@netns_test
def test_detach(env: Env, overlay: tuple[str, NetDev]) -> None:
    _, nd = overlay
    c1 = env.ns("c1")
    a = attach(nd, bridge=BR, cidrs=["10.40.0.1/24", "10.41.0.1/16"], mtu=MTU, netns=c1)
    part = detach(nd, bridge=BR, cidrs=["10.41.0.1/16"], netns=c1)
    assert part is not None and part.changed and part.addresses == ["10.40.0.1/24"]
    assert nd.link(a.host_ifname) is not None
    unchanged = detach(nd, bridge=BR, cidrs=["10.41.0.1/16"], netns=c1)
    assert unchanged is not None and not unchanged.changed
    last = detach(nd, bridge=BR, cidrs=["10.40.0.1/24"], netns=c1)
    assert last is not None and last.changed and last.addresses == []
    assert nd.link(a.host_ifname) is None and "ethwe" not in sh("ip", "-n", c1, "link", "show")
    assert detach(nd, bridge=BR, netns=c1) is None
    attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    whole = detach(nd, bridge=BR, netns=c1)
    assert whole is not None and whole.changed and nd.link(a.host_ifname) is None
    assert detach(nd, bridge=BR, netns=f"wtnd{env.token}-gone") is None, "a vanished container is not attached"


@netns_test
def test_expose_and_hide(env: Env, overlay: tuple[str, NetDev]) -> None:
    name, nd = overlay
    c1 = env.ns("c1")
    attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    assert expose(nd, bridge=BR, cidrs=["10.40.0.254/24"]) == ["10.40.0.254/24"]
    assert expose(nd, bridge=BR, cidrs=["10.40.0.254/24"]) == []
    assert "inet 10.40.0.254/24" in sh("ip", "-n", name, "addr", "show", BR)
    ping("ip", "netns", "exec", c1, dst="10.40.0.254")
    assert hide(nd, bridge=BR, cidrs=["10.40.0.254/24"]) == ["10.40.0.254/24"]
    assert hide(nd, bridge=BR, cidrs=["10.40.0.254/24"]) == []
    assert "10.40.0.254" not in sh("ip", "-n", name, "addr", "show", BR)


@netns_test
def test_reset_removes_everything(env: Env, overlay: tuple[str, NetDev]) -> None:
    name, nd = overlay
    c1 = env.ns("c1")
    a = attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    assert sorted(reset(nd, bridge=BR, vxlan=VX, tap=TAP)) == sorted([a.host_ifname, VX, TAP, BR])
    assert [line.split(":")[1].strip() for line in sh("ip", "-n", name, "-o", "link", "show").splitlines()] == ["lo"]
    assert "ethwe" not in sh("ip", "-n", c1, "link", "show")
    assert reset(nd, bridge=BR, vxlan=VX, tap=TAP) == []


@netns_test
def test_attach_errors_say_what_to_do(env: Env, host: tuple[str, NetDev]) -> None:
    _, nd = host
    c1 = env.ns("c1")
    with pytest.raises(AttachError, match=r"bridge 'weft' does not exist: is the agent running\?"):
        attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    nd.ensure_bridge(BR, MTU)
    missing = f"wtnd{env.token}-missing"
    with pytest.raises(AttachError, match=rf"no network namespace named '{missing}' \(see: ip netns list\)"):
        attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=missing)
    assert not os.path.exists(f"/var/run/netns/{missing}"), "a missing namespace is never created"
    with pytest.raises(AttachError, match=r"invalid CIDR '10.0.0.1/33'"):
        attach(nd, bridge=BR, cidrs=["10.0.0.1/33"], mtu=MTU, netns=c1)
    with pytest.raises(AttachError, match=r"invalid CIDR '10\.0\.0\.1'"):
        expose(nd, bridge=BR, cidrs=["10.0.0.1"])
    with pytest.raises(AttachError, match="exactly one of netns or pid"):
        attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1, pid=1)
    with pytest.raises(AttachError, match="host's own"):
        attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=nd.netns)
    sh("ip", "-n", c1, "link", "add", "ethwe", "type", "veth", "peer", "name", "ethwe-p")
    with pytest.raises(AttachError, match="already has an interface 'ethwe'"):
        attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)


# -- local MACs ---------------------------------------------------------------------------------------------------


@netns_test
def test_local_macs_are_the_attached_ones_never_learned_ones(env: Env, overlay: tuple[str, NetDev]) -> None:
    name, nd = overlay
    c1, c2 = env.ns("c1"), env.ns("c2")
    a1 = attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    a2 = attach(nd, bridge=BR, cidrs=["10.40.0.2/24"], mtu=MTU, netns=c2)
    nd.bridge_fdb_set(BR, a1.mac, a1.host_ifname)  # what the agent does at attach; a2's MAC is only learned
    nd.bridge_fdb_set(BR, "02:cc:00:00:00:01", VX)  # remote MACs, programmed by the agent
    nd.bridge_fdb_set(BR, "02:cc:00:00:00:02", TAP)
    ping("ip", "netns", "exec", c1, dst="10.40.0.2")
    assert a2.mac in sh("bridge", "-n", name, "fdb", "show", "dev", a2.host_ifname), "learned"
    local = nd.local_macs(BR, [VX, TAP])
    assert {a1.mac, nd.link(BR).mac} <= local
    assert a2.mac not in local, "a learned MAC proves nothing: a container can send any source MAC"
    assert not local & {"02:cc:00:00:00:01", "02:cc:00:00:00:02"}
    assert not local & {nd.link(VX).mac, nd.link(TAP).mac, nd.link(a1.host_ifname).mac}, "no port addresses"
    assert nd.attached_macs(BR, [VX, TAP]) == {a1.host_ifname: {a1.mac}, a2.host_ifname: set()}
    assert {"02:cc:00:00:00:01", "02:cc:00:00:00:02"} <= nd.local_macs(BR, [])
    assert nd.container_port(BR, a2.host_ifname) >= 1
    assert nd.link(a2.host_ifname).port.get("IFLA_BRPORT_LEARNING") == 0
    assert a2.mac not in sh("bridge", "-n", name, "fdb", "show", "dev", a2.host_ifname)
    assert nd.container_port(BR, a2.host_ifname) == 0, "idempotent"


@netns_test
def test_a_container_port_made_in_one_request_forgets_only_what_it_learned(
    env: Env, overlay: tuple[str, NetDev]
) -> None:
    name, nd = overlay
    c1, c2 = env.ns("c1"), env.ns("c2")
    a1 = attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    a2 = attach(nd, bridge=BR, cidrs=["10.40.0.2/24"], mtu=MTU, netns=c2)
    nd.bridge_fdb_set(BR, a2.mac, a2.host_ifname)  # attached: static
    nd.bridge_fdb_set(BR, "02:cc:00:00:00:09", a2.host_ifname)
    ping("ip", "netns", "exec", c1, dst="10.40.0.2")
    assert a1.mac in sh("bridge", "-n", name, "fdb", "show", "dev", a1.host_ifname), "learned"
    assert nd.container_port(BR, a1.host_ifname, count=False) == 0
    assert nd.container_port(BR, a2.host_ifname, count=False) == 0
    assert nd.link(a1.host_ifname).port.get("IFLA_BRPORT_LEARNING") == 0
    assert a1.mac not in sh("bridge", "-n", name, "fdb", "show", "dev", a1.host_ifname), "forgotten"
    assert nd.attached_macs(BR, [VX, TAP])[a2.host_ifname] == {a2.mac, "02:cc:00:00:00:09"}, "static entries stay"


class Reports:
    """What the watcher reported, oldest first; fed from the watcher's thread."""

    def __init__(self) -> None:
        self.queue: queue.Queue[frozenset[str]] = queue.Queue()
        self.seen: list[frozenset[str]] = []

    def __call__(self, macs: frozenset[str]) -> None:
        self.queue.put(macs)

    def latest(self) -> frozenset[str] | None:
        while not self.queue.empty():
            self.seen.append(self.queue.get_nowait())
        return self.seen[-1] if self.seen else None


@netns_test
def test_mac_watcher_follows_the_fdb(env: Env, overlay: tuple[str, NetDev]) -> None:
    name, nd = overlay
    c1, c2 = env.ns("c1"), env.ns("c2")
    a1 = attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    attach(nd, bridge=BR, cidrs=["10.40.0.2/24"], mtu=MTU, netns=c2)
    reports = Reports()
    watcher = MacWatcher(BR, [VX, TAP], reports, settle=0.05, netns=name)
    watcher.start()
    try:
        initial = wait_until(reports.latest, 10, 0.05, "no initial report")
        assert nd.link(BR).mac in initial and initial == watcher.current()
        nd.bridge_fdb_set(BR, "02:dd:00:00:00:01", VX)  # a remote MAC: never reported as local
        ping("ip", "netns", "exec", c1, dst="10.40.0.2")  # learned MACs: never reported either
        nd.bridge_fdb_set(BR, a1.mac, a1.host_ifname)  # attached: reported
        wait_until(lambda: a1.mac in (reports.latest() or ()), 10, 0.05, "the container MAC was never reported")
        sh("bridge", "-n", name, "fdb", "del", a1.mac, "dev", a1.host_ifname, "master")
        wait_until(lambda: a1.mac not in (reports.latest() or ()), 10, 0.05, "the MAC was never reported gone")
        assert a1.mac not in watcher.current()
    finally:
        watcher.stop()
    watcher.stop()  # idempotent
    assert all("02:dd:00:00:00:01" not in r for r in reports.seen)
    assert all(a != b for a, b in itertools.pairwise(reports.seen)), "reports only on change"


@netns_test
def test_mac_watcher_does_not_reread_for_the_overlay_ports_entries(env: Env, overlay: tuple[str, NetDev]) -> None:
    """The agent's own programming (hundreds of entries on the VXLAN and TAP ports in a large mesh) wakes the watcher
    for nothing: only changes on other ports make it read the FDB again."""
    import time

    name, nd = overlay
    c1 = env.ns("c1")
    a1 = attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    reads: list[frozenset[str]] = []

    class Counting(MacWatcher):
        def _read(self, nd: NetDev, fallback: frozenset[str]) -> frozenset[str]:
            reads.append(macs := super()._read(nd, fallback))
            return macs

    watcher = Counting(BR, [VX, TAP], Reports(), settle=0.05, netns=name)
    watcher.start()
    try:
        assert len(reads) == 1
        for i in range(40):
            mac = f"02:dd:00:00:00:{i:02x}"
            nd.vxlan_fdb_add(VX, mac, "10.99.0.2")
            nd.bridge_fdb_set(BR, mac, VX if i % 2 else TAP)
        time.sleep(0.5)  # ten settle times: a wake-up would have read by now
        assert len(reads) == 1, "entries on the overlay ports made the watcher read the FDB"
        nd.bridge_fdb_set(BR, a1.mac, a1.host_ifname)
        wait_until(lambda: a1.mac in watcher.current(), 10, 0.05, "a container port's entry was not seen")
    finally:
        watcher.stop()


# -- all or nothing ----------------------------------------------------------------------------------------------


@netns_test
def test_a_failed_attach_leaves_nothing_behind(env: Env, overlay: tuple[str, NetDev]) -> None:
    name, nd = overlay
    c1 = env.ns("c1")

    def broken(mac: str, host: str) -> None:
        raise NetDevError("the kernel said no")

    def in_use(ifaces: list) -> None:
        raise AttachError(f"address {ifaces[0].ip} is already in use")

    def links(ns: str) -> str:
        return sh("ip", "-n", ns, "-o", "link", "show")

    with pytest.raises(AttachError, match="the kernel said no"):
        attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1, on_link=broken)
    assert "vwe" not in links(name) and "ethwe" not in links(c1), "the veth made for the attach is gone again"
    with pytest.raises(AttachError, match="already in use"):
        attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1, in_use=in_use)
    assert "vwe" not in links(name) and "ethwe" not in links(c1), "nothing is made before the probe"
    with pytest.raises(AttachError, match="'%'"):
        attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1, ifname="e%d")
    assert "vwe" not in links(name) and "e0" not in links(c1)

    a = attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1)
    attach(nd, bridge=BR, cidrs=["10.40.0.1/24"], mtu=MTU, netns=c1, in_use=in_use)  # held already: no probe
    with pytest.raises(AttachError, match="the kernel said no"):
        attach(nd, bridge=BR, cidrs=["10.40.0.1/24", "10.40.0.2/24"], mtu=MTU, netns=c1, on_link=broken)
    assert a.host_ifname in links(name), "an attach that existed before stays"
    assert "10.40.0.2/24" not in sh("ip", "-n", c1, "addr", "show", "ethwe")

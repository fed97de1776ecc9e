"""Kernel state of one host (one network namespace): bridge, VXLAN, TAP, veths and their FDBs.

Everything goes through pyroute2 netlink, never `ip`/`bridge` subprocesses, so the agent can converge state
quickly and read it back exactly. Every `ensure_*` is idempotent and leaves a correct device untouched: the
kernel forwards traffic through these devices while the agent restarts, so a needless delete, re-enslave or FDB
flush would drop packets.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from socket import AF_INET, AF_INET6
from typing import Any, TypeVar

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_MASTER, NTF_SELF, NUD_NOARP, NUD_PERMANENT

__all__ = ["ZERO_MAC", "Link", "NetDev", "NetDevError", "enter_netns", "netns_path"]

ZERO_MAC = "00:00:00:00:00:00"
IFF_UP = 0x1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_TABLE_MAIN = 254
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"


class NetDevError(Exception):
    """A kernel operation failed; the message says which and what to do."""


@dataclass(frozen=True)
class Link:
    """The parts of a link the data plane cares about."""

    index: int
    name: str
    kind: str | None  # linkinfo kind: "bridge", "vxlan", "veth", "tun", ... (None for e.g. loopback)
    mac: str
    mtu: int
    up: bool
    master: int | None
    peer_index: int | None  # IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace)
    gso_max_size: int | None  # the largest GSO packet the kernel builds for it (IFLA_GSO_MAX_SIZE)
    data: dict[str, Any]  # IFLA_INFO_DATA attributes by NLA name
    port: dict[str, Any]  # IFLA_INFO_SLAVE_DATA (bridge port) attributes by NLA name


def _attrs(nla: Any) -> dict[str, Any]:
    return dict(nla["attrs"]) if nla is not None else {}


def _to_link(msg: Any) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    data = _attrs(info.get_attr("IFLA_INFO_DATA")) if info is not None else {}
    port = _attrs(info.get_attr("IFLA_INFO_SLAVE_DATA")) if info is not None else {}
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        kind=info.get_attr("IFLA_INFO_KIND") if info is not None else None,
        mac=(msg.get_attr("IFLA_ADDRESS") or "").lower(),
        mtu=msg.get_attr("IFLA_MTU"),
        up=bool(msg["flags"] & IFF_UP),
        master=msg.get_attr("IFLA_MASTER"),
        peer_index=msg.get_attr("IFLA_LINK"),
        gso_max_size=msg.get_attr("IFLA_GSO_MAX_SIZE"),
        data=data,
        port=port,
    )


def _norm_mac(mac: str) -> str:
    parts = mac.lower().split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        raise NetDevError(f"invalid MAC address {mac!r}: expected aa:bb:cc:dd:ee:ff")
    return ":".join(parts)


def _ip(addr: str) -> str:
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        raise NetDevError(f"invalid IP address {addr!r}") from None


def _iface(cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError:
        raise NetDevError(f"invalid CIDR {cidr!r}: expected ADDRESS/PREFIXLEN") from None


def _call(what: str, fn: Callable[..., Any], *args: Any, ignore: Collection[int] = (), **kw: Any) -> Any:
    """Run one netlink request; errors become one-line NetDevErrors, errnos in `ignore` mean "already so"."""
    try:
        return fn(*args, **kw)
    except NetlinkError as e:
        if e.code in ignore:
            return None
        raise NetDevError(f"{what}: {os.strerror(e.code)}") from None
    except OSError as e:
        if e.errno in ignore:
            return None
        raise NetDevError(f"{what}: {e.strerror or e}") from None


def netns_path(netns: str) -> str:
    """A namespace name (under /var/run/netns) or a path such as /proc/PID/ns/net, as a path."""
    return netns if "/" in netns else f"{NETNS_RUN_DIR}/{netns}"


def enter_netns(netns: str) -> None:
    """Move the calling thread, and only it, into a network namespace. Only for threads you own and dedicate.

    Used instead of pyroute2's `netns=`, which forks a child per socket: a forked child inherits the agent's
    Python SIGTERM handling and, when pyroute2 then SIGTERMs it, can run on as a copy of the agent (seen as hangs).
    """
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns = getattr(os, "setns", None)  # Python >= 3.12
        if setns is not None:
            setns(fd, CLONE_NEWNET)
        elif ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), netns)
    finally:
        os.close(fd)


_T = TypeVar("_T")


class _NetlinkThread:
    """The IPRoute, reached only through its own thread.

    pyroute2 0.9's sync IPRoute drives a private asyncio loop, so it fails in a thread that already runs one (the
    agent's event loop) and warns when used from a thread other than its creator. All calls therefore run on one
    private thread that owns the socket, whoever the caller is. For another namespace, that thread moves into it
    first, so the netlink socket (and /dev/net/tun, when pyroute2 creates a tap) belong there.
    """

    def __init__(self, netns: str | None) -> None:
        self._closed = False
        self._thread_id: int | None = None  # the pool's only thread, where requests run directly
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weft-netlink")
        try:
            self._ipr = self._pool.submit(self._open, netns).result()
        except BaseException:
            self._pool.shutdown(wait=False)
            raise

    def _open(self, netns: str | None) -> IPRoute:
        self._thread_id = threading.get_ident()
        if netns is not None:
            enter_netns(netns)  # the pool's only thread, for good
        return IPRoute()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kw: Any) -> Any:
            if threading.get_ident() == self._thread_id:  # inside a batch: already on the thread
                return self._run(name, args, kw)
            return self._pool.submit(self._run, name, args, kw).result()

        return call

    def batch(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the thread; the requests it makes run there directly."""
        if threading.get_ident() == self._thread_id:
            return fn(*args)
        return self._pool.submit(fn, *args).result()

    def _run(self, name: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        try:
            result = getattr(self._ipr, name)(*args, **kw)
            return list(result) if isinstance(result, Iterator) else result  # dumps may be lazy generators
        finally:
            self._drop_strays()

    def _drop_strays(self) -> None:
        """Drop messages no request waits for: we subscribe to no groups, so they are only late replies.

        pyroute2 0.9 stops reading a "get" at its answer; the kernel's ACK that follows lands in the socket's
        catch-all queue, which nothing reads. On the agent's long-lived sockets that kept one message per
        request forever, and each pinned a piece of the heap: RSS grew ~100 KB per peer restart.
        """
        queue = self._ipr.asyncore.msg_queue.root
        while not queue.empty():
            queue.get_nowait()
            queue.task_done()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._pool.submit(self._ipr.close).result()
        finally:
            self._pool.shutdown(wait=True)


class NetDev:
    """One netlink socket on one network namespace; usable from any thread, including an asyncio loop's."""

    def __init__(self, netns: str | None = None) -> None:
        """Open netlink in the current namespace, or in `netns` (a name under /var/run/netns or a path such as
        /proc/PID/ns/net; it must exist). The agent uses the default; attach and tests use `netns`."""
        self.netns = netns
        self.ipr = _call(f"cannot open network namespace {netns!r}", _NetlinkThread, netns)

    @property
    def netns_path(self) -> str:
        """The namespace this NetDev works in, as a path (to compare namespace identities with os.stat)."""
        return netns_path(self.netns) if self.netns else "/proc/self/ns/net"

    def close(self) -> None:
        self.ipr.close()

    def batch(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)``, which may make many requests of this NetDev, as one hand-over to the netlink thread.

        Each request is otherwise one: the caller waits for the thread, and on a busy host (a hundred agents forming
        a mesh on two cores) every wait is a turn of the scheduler. An agent programming 150 FDB entries one by
        one held its event loop for seconds that way.
        """
        return self.ipr.batch(fn, *args)

    def __enter__(self) -> NetDev:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- links ---------------------------------------------------------------------------------------------

    def link(self, name: str | int) -> Link | None:
        """A link by name or ifindex, or None."""
        key = {"index": name} if isinstance(name, int) else {"ifname": name}
        try:
            return _to_link(self.ipr.link("get", **key)[0])
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise NetDevError(f"cannot read link {name!r}: {os.strerror(e.code)}") from None

    def link_index(self, name: str) -> int | None:
        link = self.link(name)
        return link.index if link else None

    def _require(self, name: str, kind: str) -> Link:
        link = self.link(name)
        if link is None:
            raise NetDevError(f"{kind} {name!r} does not exist: create it first")
        if link.kind != kind:
            raise NetDevError(f"link {name!r} is a {link.kind or 'plain device'}, not a {kind}")
        return link

    def _links(self) -> list[Link]:
        return [_to_link(m) for m in _call("cannot list links", self.ipr.link, "dump")]

    def links(self) -> list[Link]:
        """Every link of the namespace."""
        return self._links()

    def set_link(
        self,
        name: str,
        *,
        mtu: int | None = None,
        master: str | None = None,
        up: bool = False,
        gso_max_size: int | None = None,
    ) -> bool:
        """Converge mtu/master/up and the largest GSO packet the kernel builds for traffic leaving the link (what a
        TCP socket sends through it), touching only what differs (re-enslaving would flush the port's FDB). A kernel
        that does not report its GSO size is left alone: asked again on every call, it would never converge."""
        link = self.link(name)
        if link is None:
            raise NetDevError(f"link {name!r} does not exist")
        change: dict[str, Any] = {}
        if mtu is not None and link.mtu != mtu:
            change["mtu"] = mtu
        if master is not None:
            master_index = self._require(master, "bridge").index
            if link.master != master_index:
                change["master"] = master_index
        if up and not link.up:
            change["state"] = "up"
        if gso_max_size is not None and link.gso_max_size not in (None, gso_max_size):
            change["gso_max_size"] = gso_max_size
        if change:
            _call(f"cannot set {', '.join(change)} on {name!r}", self.ipr.link, "set", index=link.index, **change)
        return bool(change)

    def _port_learning_off(self, name: str) -> None:
        """An overlay port: no learning (the agent programs its MACs) and isolated from the other overlay
        port, so a frame that came in over one path is never sent out over the other (no loops, no
        duplicates); containers on non-isolated ports still reach both."""
        link = self.link(name)
        if link is not None and (
            link.port.get("IFLA_BRPORT_LEARNING", 1) != 0 or link.port.get("IFLA_BRPORT_ISOLATED", 0) != 1
        ):
            _call(
                f"cannot set learning off and isolation on for bridge port {name!r}",
                self.ipr.brport,
                "set",
                index=link.index,
                learning=0,
                isolated=1,
            )

    def delete_link(self, name: str) -> bool:
        """Idempotent; True if something was deleted (deleting one veth end deletes the pair)."""
        index = self.link_index(name)
        if index is None:
            return False
        try:
            self.ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise NetDevError(f"cannot delete link {name!r}: {os.strerror(e.code)}") from None
        return True

    def link_bytes(self, name: str) -> tuple[int, int]:
        """(rx, tx) byte counters of a link, e.g. the VXLAN device for fast-path traffic metrics."""
        msgs = _call(f"cannot read link {name!r}", self.ipr.link, "get", ifname=name)
        stats = msgs[0].get_attr("IFLA_STATS64") or {}
        return int(stats.get("rx_bytes", 0)), int(stats.get("tx_bytes", 0))

    def bridge_ports(self, bridge: str) -> list[str]:
        index = self.link_index(bridge)
        if index is None:
            return []
        return [link.name for link in self._links() if link.master == index]

    # -- devices -------------------------------------------------------------------------------------------

    def _own_link(self, name: str, kind: str, what: str) -> Link | None:
        """The link called ``name`` if it is of ``kind``; None if there is none; an error if it is something else
        (never delete a device we did not make)."""
        link = self.link(name)
        if link is not None and link.kind != kind:
            raise NetDevError(
                f"link {name!r} exists but is a {link.kind or 'plain device'}, not {what}: "
                f"delete it or configure another {what.removeprefix('a ')} name"
            )
        return link

    def ensure_bridge(self, name: str, mtu: int) -> int:
        link = self._own_link(name, "bridge", "a bridge")
        if link is None:
            _call(
                f"cannot create bridge {name!r}",
                self.ipr.link,
                "add",
                ifname=name,
                kind="bridge",
                br_stp_state=0,
                mtu=mtu,
                ignore=(errno.EEXIST,),
            )
            link = self._require(name, "bridge")
            # Pin the random MAC: otherwise the bridge takes the lowest port MAC, which changes as ports come and go.
            _call(f"cannot set the MAC of bridge {name!r}", self.ipr.link, "set", index=link.index, address=link.mac)
        self.set_link(name, mtu=mtu, up=True)
        return link.index

    def ensure_vxlan(self, name: str, *, bridge: str, vni: int, port: int, mtu: int) -> int:
        """Kernel VXLAN port on the bridge that learns nothing by itself: the agent programs both FDBs."""
        self._require(bridge, "bridge")
        link = self._own_link(name, "vxlan", "vxlan")
        if link is not None:
            d = link.data
            wanted = (vni, port, 0)
            if (d.get("IFLA_VXLAN_ID"), d.get("IFLA_VXLAN_PORT"), d.get("IFLA_VXLAN_LEARNING")) != wanted or (
                d.get("IFLA_VXLAN_GROUP") or d.get("IFLA_VXLAN_LOCAL")
            ):
                self.delete_link(name)
                link = None
        if link is None:
            _call(
                f"cannot create vxlan {name!r} (is vni {vni} with port {port} used by another device?)",
                self.ipr.link,
                "add",
                ifname=name,
                kind="vxlan",
                vxlan_id=vni,
                vxlan_port=port,
                vxlan_learning=0,
                mtu=mtu,
            )
        self.set_link(name, mtu=mtu, master=bridge, up=True)
        self._port_learning_off(name)
        return self._require(name, "vxlan").index

    def ensure_tap(self, name: str, *, bridge: str, mtu: int, multi_queue: bool = False) -> int:
        """Persistent TAP on the bridge; the sleeve attaches later with TUNSETIFF(IFF_TAP|IFF_NO_PI|IFF_VNET_HDR),
        plus IFF_MULTI_QUEUE exactly when `multi_queue` (the kernel refuses a mismatch)."""
        self._require(bridge, "bridge")
        link = self._own_link(name, "tun", "a tap")
        wrong_mode = link is not None and (
            link.data.get("IFLA_TUN_TYPE") != 2 or bool(link.data.get("IFLA_TUN_MULTI_QUEUE")) != multi_queue
        )
        if wrong_mode:
            self.delete_link(name)
            link = None
        if link is None:
            # Must be checked first: pyroute2 "adds" a tuntap via TUNSETIFF, which silently reuses an existing one.
            ifr = {"no_pi": 1, "vnet_hdr": 1, "multi_queue": int(multi_queue)}
            _call(
                f"cannot create tap {name!r} (is /dev/net/tun available?)",
                self.ipr.link,
                "add",
                ifname=name,
                kind="tuntap",
                mode="tap",
                ifr=ifr,
            )
        self.set_link(name, mtu=mtu, master=bridge, up=True)
        self._port_learning_off(name)
        return self._require(name, "tun").index

    def add_veth(self, name: str, *, peer: str, peer_netns_fd: int, mtu: int) -> int:
        """A veth pair whose peer is created directly inside another namespace (no rename or move needed)."""
        peer_spec = {"ifname": peer, "net_ns_fd": peer_netns_fd, "mtu": mtu}
        _call(f"cannot create veth {name!r}", self.ipr.link, "add", ifname=name, kind="veth", mtu=mtu, peer=peer_spec)
        index = self.link_index(name)
        if index is None:
            raise NetDevError(f"veth {name!r} vanished right after creation")
        return index

    # -- addresses and routes --------------------------------------------------------------------------------

    def addresses(self, name: str) -> list[str]:
        """Global-scope addresses of a link as CIDRs (link-local IPv6 is the kernel's, not ours)."""
        return self._addresses(name, RT_SCOPE_UNIVERSE)

    def _addresses(self, name: str, scope: int) -> list[str]:
        index = self.link_index(name)
        if index is None:
            return []
        msgs = _call(f"cannot list addresses of {name!r}", self.ipr.addr, "dump", index=index)
        return [f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}" for m in msgs if m["scope"] == scope]

    def address_add(self, name: str, cidr: str, scope: str = "universe") -> bool:
        """Idempotent; True if added. ``scope="link"``: an address for this link alone (not listed by addresses())."""
        iface = _iface(cidr)
        held = self._addresses(name, RT_SCOPE_UNIVERSE if scope == "universe" else RT_SCOPE_LINK)
        if any(_iface(a) == iface for a in held):
            return False
        index = self.link_index(name)
        if index is None:
            raise NetDevError(f"link {name!r} does not exist")
        kw: dict[str, Any] = {} if scope == "universe" else {"scope": RT_SCOPE_LINK}
        if iface.version == 4 and iface.network.prefixlen < 31:
            kw["broadcast"] = str(iface.network.broadcast_address)
        _call(
            f"cannot add {cidr} to {name!r}",
            self.ipr.addr,
            "add",
            index=index,
            address=str(iface.ip),
            prefixlen=iface.network.prefixlen,
            ignore=(errno.EEXIST,),
            **kw,
        )
        return True

    def address_del(self, name: str, cidr: str) -> bool:
        """Idempotent; True if removed."""
        iface = _iface(cidr)
        index = self.link_index(name)
        if index is None or not any(_iface(a) == iface for a in self.addresses(name)):
            return False
        _call(
            f"cannot remove {cidr} from {name!r}",
            self.ipr.addr,
            "del",
            index=index,
            address=str(iface.ip),
            prefixlen=iface.network.prefixlen,
            ignore=(errno.EADDRNOTAVAIL, errno.ENOENT),
        )
        return True

    def ensure_route(self, dst: str, dev: str) -> bool:
        """`ip route replace DST dev DEV` in the main table unless already so; True if changed."""
        net = ipaddress.ip_network(dst)
        index = self.link_index(dev)
        if index is None:
            raise NetDevError(f"link {dev!r} does not exist")
        family = AF_INET if net.version == 4 else AF_INET6
        want = (str(net.network_address), net.prefixlen, index)
        for r in _call(f"cannot list routes for {dst}", self.ipr.route, "dump", family=family, table=RT_TABLE_MAIN):
            if (r.get_attr("RTA_DST"), r["dst_len"], r.get_attr("RTA_OIF")) == want and not r.get_attr("RTA_GATEWAY"):
                return False
        _call(
            f"cannot add route {dst} dev {dev}",
            self.ipr.route,
            "replace",
            dst=str(net.network_address),
            dst_len=net.prefixlen,
            oif=index,
            family=family,
        )
        return True

    def route_mtu(self, dst: str) -> int:
        """MTU towards dst: the outgoing device's, lowered by a route or cached path-MTU metric if there is one."""
        msg = _call(f"no route to {dst}", self.ipr.route, "get", dst=dst)[0]
        link = self.link(msg.get_attr("RTA_OIF") or 0)
        if link is None:
            raise NetDevError(f"no route to {dst}: no outgoing device")
        metrics = msg.get_attr("RTA_METRICS")
        route_mtu = metrics.get_attr("RTAX_MTU") if metrics is not None else None
        return min(link.mtu, route_mtu) if route_mtu else link.mtu

    # -- FDBs ------------------------------------------------------------------------------------------------

    def _fdb_dump(self, **match: Any) -> list[Any]:
        return list(_call("cannot read the FDB", self.ipr.fdb, "dump", **match))

    def vxlan_fdb(self, vxlan: str) -> dict[str, set[str]]:
        """The VXLAN device's own entries: MAC -> underlay IPs (the all-zeros MAC is the flood list)."""
        index = self._require(vxlan, "vxlan").index
        out: dict[str, set[str]] = {}
        for m in self._fdb_dump(ifindex=index):
            dst = m.get_attr("NDA_DST")
            if m["ifindex"] == index and m["flags"] & NTF_SELF and dst:
                out.setdefault(m.get_attr("NDA_LLADDR").lower(), set()).add(dst)
        return out

    def vxlan_fdb_add(self, vxlan: str, mac: str, dst: str) -> None:
        """Flood entries accumulate (append); a unicast MAC has exactly one destination (replace)."""
        mac = _norm_mac(mac)
        index = self._require(vxlan, "vxlan").index
        op = "append" if mac == ZERO_MAC else "replace"
        # State and flags explicit: pyroute2 defaults them only for add/append/del, and a "replace" without NTF_SELF
        # silently lands in the bridge's FDB (dst ignored).
        _call(
            f"cannot add vxlan FDB entry {mac} dst {dst} on {vxlan!r}",
            self.ipr.fdb,
            op,
            ifindex=index,
            lladdr=mac,
            dst=_ip(dst),
            state=NUD_NOARP | NUD_PERMANENT,
            flags=NTF_SELF,
        )

    def vxlan_fdb_del(self, vxlan: str, mac: str, dst: str) -> None:
        """Idempotent; removes only the (mac, dst) pair, so the other flood destinations stay."""
        mac = _norm_mac(mac)
        index = self.link_index(vxlan)
        if index is None:
            return
        _call(
            f"cannot delete vxlan FDB entry {mac} dst {dst} on {vxlan!r}",
            self.ipr.fdb,
            "del",
            ifindex=index,
            lladdr=mac,
            dst=_ip(dst),
            state=NUD_NOARP | NUD_PERMANENT,
            flags=NTF_SELF,
            ignore=(errno.ENOENT, errno.ENODEV),
        )

    def _ports(self, bridge_index: int) -> tuple[dict[int, str], set[str]]:
        """The bridge's ports by ifindex, and the MACs that are the bridge's or a port's own address.

        Read from each link's name, master and address alone: decoding the rest of every link (its kind's data, its
        port's settings) was most of the time, and it is read for every change of the containers' MACs."""
        names: dict[int, str] = {}
        own: set[str] = set()
        for m in _call("cannot list links", self.ipr.link, "dump"):
            index, master = m["index"], m.get_attr("IFLA_MASTER")
            if master == bridge_index or index == bridge_index:
                own.add((m.get_attr("IFLA_ADDRESS") or "").lower())
                if master == bridge_index:
                    names[index] = m.get_attr("IFLA_IFNAME")
        return names, own

    def bridge_fdb(self, bridge: str) -> dict[str, str]:
        """Entries someone put on the bridge (static, or permanent but not a port address): MAC -> port."""
        index = self._require(bridge, "bridge").index
        ports, own = self._ports(index)
        out: dict[str, str] = {}
        for m in self._fdb_dump(master=index):
            mac = m.get_attr("NDA_LLADDR").lower()
            if m.get_attr("NDA_MASTER") != index or m["ifindex"] not in ports:
                continue
            if m["state"] & NUD_NOARP or (m["state"] & NUD_PERMANENT and mac not in own):
                out[mac] = ports[m["ifindex"]]
        return out

    def bridge_fdb_port(self, bridge: str, mac: str) -> str | None:
        """The port ``mac`` has an entry on that someone put on the bridge (what :meth:`bridge_fdb` lists for it),
        or None: one lookup in the kernel (`bridge fdb get`), where the whole FDB is a dump of every port's entries."""
        mac = _norm_mac(mac)
        br = self._require(bridge, "bridge")
        found = _call(
            f"cannot look {mac} up in the FDB of bridge {bridge!r}",
            self.ipr.fdb,
            "get",
            lladdr=mac,
            master=br.index,
            ignore=(errno.ENOENT,),
        )
        for m in found or ():
            port = self.link(m["ifindex"])
            if port is None or port.master != br.index:
                continue  # the bridge's own address, or a port that went away meanwhile
            if m["state"] & NUD_NOARP or (m["state"] & NUD_PERMANENT and mac not in (port.mac, br.mac)):
                return port.name
        return None

    def port_index(self, bridge: str, port: str) -> int | None:
        """The ifindex of ``port``, a port of ``bridge`` (None if it does not exist): two link reads, which a caller
        setting many entries on one port does once and passes on."""
        bridge_index = self._require(bridge, "bridge").index
        link = self.link(port)
        if link is None:
            return None
        if link.master != bridge_index:
            raise NetDevError(f"{port!r} is not a port of bridge {bridge!r}")
        return link.index

    def bridge_fdb_set(self, bridge: str, mac: str, port: str, *, index: int | None = None) -> None:
        """`bridge fdb replace MAC dev PORT master static`: moves the MAC if it sat on another port. ``index``: the
        port's, from port_index, when the caller has it."""
        mac = _norm_mac(mac)
        index = index if index is not None else self.port_index(bridge, port)
        if index is None:
            raise NetDevError(f"port {port!r} does not exist")
        _call(
            f"cannot set bridge FDB entry {mac} -> {port!r}",
            self.ipr.fdb,
            "replace",
            ifindex=index,
            lladdr=mac,
            state=NUD_NOARP,
            flags=NTF_MASTER,
        )

    def bridge_fdb_del(self, bridge: str, mac: str, port: str, *, index: int | None = None) -> None:
        """Idempotent; the kernel deletes the entry only if it is on that port."""
        mac = _norm_mac(mac)
        index = index if index is not None else self.port_index(bridge, port)
        if index is None:
            return
        _call(
            f"cannot delete bridge FDB entry {mac} on {port!r}",
            self.ipr.fdb,
            "del",
            ifindex=index,
            lladdr=mac,
            state=NUD_NOARP,
            flags=NTF_MASTER,
            ignore=(errno.ENOENT, errno.ENODEV),
        )

    def attached_macs(self, bridge: str, exclude_ports: Collection[str]) -> dict[str, set[str]]:
        """Port -> the MACs with a static entry on it, for every port but ``exclude_ports``.

        Attach puts a static entry for the container end's MAC on its port; learned entries are left out on
        purpose: a container can send any source MAC, so what the bridge learned proves nothing.
        """
        br = self._require(bridge, "bridge")
        ports, own = self._ports(br.index)
        excluded = set(exclude_ports)
        out: dict[str, set[str]] = {name: set() for name in ports.values() if name not in excluded}
        for m in self._fdb_dump(master=br.index):
            if m.get_attr("NDA_MASTER") != br.index or ports.get(m["ifindex"]) not in out:
                continue
            mac = m.get_attr("NDA_LLADDR").lower()
            if m["state"] & NUD_NOARP or (m["state"] & NUD_PERMANENT and mac not in own):
                out[ports[m["ifindex"]]].add(mac)
        return out

    def local_macs(self, bridge: str, exclude_ports: Collection[str]) -> set[str]:
        """MACs living on this host: the attached ones (static entries on local ports) and the bridge's own."""
        out = {self._require(bridge, "bridge").mac}
        for macs in self.attached_macs(bridge, exclude_ports).values():
            out |= macs
        return out

    def container_port(self, bridge: str, port: str, *, count: bool = True) -> int:
        """Make ``port`` a container port that learns nothing and forget what it learned; returns entries removed.

        Without learning, a frame with a forged source MAC cannot move another container's entry to this port.
        ``count=False``: one request, learning off and the port's learned entries flushed by the kernel (static and
        permanent ones stay), uncounted (returns 0); the bridge's whole FDB is not read.
        """
        link = self.link(port)
        if link is None:
            return 0
        if not count:
            _call(
                f"cannot set learning off on bridge port {port!r}",
                self.ipr.brport,
                "set",
                index=link.index,
                learning=0,
                flush=True,
            )
            return 0
        if link.port.get("IFLA_BRPORT_LEARNING", 1) != 0:
            _call(
                f"cannot set learning off on bridge port {port!r}", self.ipr.brport, "set", index=link.index, learning=0
            )
        removed = 0
        for m in self._fdb_dump(master=self._require(bridge, "bridge").index):
            if m["ifindex"] != link.index or m["state"] & (NUD_NOARP | NUD_PERMANENT):
                continue
            _call(
                f"cannot delete a learned entry on {port!r}",
                self.ipr.fdb,
                "del",
                ifindex=link.index,
                lladdr=m.get_attr("NDA_LLADDR"),
                state=m["state"],
                flags=NTF_MASTER,
                ignore=(errno.ENOENT, errno.ENODEV),
            )
            removed += 1
        return removed

"""Containers and the host on the overlay: a veth pair per container, addresses on the bridge for the host, and the
API requests that ask for them (attach/detach, expose/hide).

Every call is idempotent and reports whether it changed anything, so `weft attach` can be re-run (and Ansible can
show a diff). The container is named by a netns name or by a PID; the host-side veth name is derived from the
container's network namespace (its inode) and the interface name, so attaching by name or by any PID inside the
same namespace finds the same pair.

The agent does the work, not the CLI, because it knows the bridge and the MTU, and because it must learn a new
container's MAC at once: the container's MAC gets a static entry on its bridge port, so the mesh hears of it before
the container sends anything, and it never ages out while attached.

pyroute2 (weft.datapath.netdev) is imported only where the kernel is touched: the API imports this module for its
errors, and an agent without a data plane never loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from weft.addresses import AddressError, Interface, overlay_cidrs, parse_cidr
from weft.addresses import ifname as check_ifname

if TYPE_CHECKING:
    from weft.datapath.netdev import Link, NetDev

__all__ = [
    "MULTICAST_ROUTE",
    "AddressInUse",
    "AttachError",
    "Attachment",
    "InUseCheck",
    "LinkHook",
    "OverlayError",
    "attach",
    "carry_out",
    "detach",
    "expose",
    "gso_size_for",
    "hide",
    "host_ifname",
    "in_use_check",
    "limit_gso",
    "reset",
]

log = logging.getLogger(__name__)

NETNS_RUN_DIR = "/var/run/netns"
MULTICAST_ROUTE = "224.0.0.0/4"  # multicast leaves the container over the overlay, not a default route
HOST_PREFIX = "vwe"
HOST_HASH_CHARS = 8


class AttachError(Exception):
    """One line saying what is wrong and what to do."""


@dataclass
class Attachment:
    host_ifname: str  # veth end on the bridge
    ifname: str  # end inside the container
    mac: str  # MAC of the container end
    addresses: list[str]  # CIDRs now on it
    changed: bool  # False when the call changed nothing


# Called with the addresses about to be given (none of them held yet by the interface that gets them); raises
# AttachError when one is in use elsewhere. Runs before anything is changed.
InUseCheck = Callable[[list[Interface]], None]
# Called with (container MAC, host-side veth) once the pair is up on the bridge and before it gets addresses;
# raising undoes the attach.
LinkHook = Callable[[str, str], None]


def _overlay_cidrs(cidrs: Sequence[str]) -> list[str]:
    """Addresses to give: normalised ("10.0.0.1/24"), each one usable on the overlay (see weft.addresses)."""
    try:
        return overlay_cidrs(list(cidrs))
    except AddressError as e:
        raise AttachError(str(e)) from None


def _parse_cidrs(cidrs: Sequence[str]) -> list[str]:
    """Addresses to take away: only their form is checked, so that any address given earlier can be removed."""
    out: list[str] = []
    for cidr in cidrs:
        try:
            text = str(parse_cidr(cidr))
        except AddressError as e:
            raise AttachError(str(e)) from None
        if text not in out:
            out.append(text)
    return out


def _ifname(name: object) -> str:
    try:
        return check_ifname(name)
    except AddressError as e:
        raise AttachError(str(e)) from None


def _check_identity(netns: str | None, pid: int | None) -> None:
    if (netns is None) == (pid is None):
        raise AttachError("name the container by exactly one of netns or pid")


def _netns_path(netns: str | None, pid: int | None) -> str:
    _check_identity(netns, pid)
    if netns is not None:
        if not netns or "/" in netns or netns in (".", ".."):
            raise AttachError(f"invalid network namespace name {netns!r}")
        path = f"{NETNS_RUN_DIR}/{netns}"
        if not os.path.exists(path):
            raise AttachError(f"no network namespace named {netns!r} (see: ip netns list)")
        return path
    if not isinstance(pid, int) or pid <= 0:
        raise AttachError(f"invalid pid {pid!r}")
    path = f"/proc/{pid}/ns/net"
    if not os.path.exists(path):
        raise AttachError(f"no process with pid {pid} (has the container exited?)")
    return path


def _same_netns(path: str, nd: NetDev) -> bool:
    st, mine = os.stat(path), os.stat(nd.netns_path)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def host_ifname(netns_path: str, ifname: str) -> str:
    """Deterministic host-side name: "vwe" + 8 hex digits of the namespace identity and the container ifname."""
    st = os.stat(netns_path)
    digest = hashlib.sha256(f"{st.st_dev}:{st.st_ino}:{ifname}".encode()).hexdigest()
    return f"{HOST_PREFIX}{digest[:HOST_HASH_CHARS]}"


def _require_bridge(nd: NetDev, bridge: str) -> Link:
    link = nd.link(bridge)
    if link is None:
        raise AttachError(f"bridge {bridge!r} does not exist: is the agent running?")
    if link.kind != "bridge":
        raise AttachError(f"{bridge!r} is a {link.kind or 'plain device'}, not a bridge: check the bridge name")
    return link


@contextmanager
def _container(path: str) -> Iterator[NetDev]:
    from weft.datapath.netdev import NetDev, NetDevError

    try:
        cnd = NetDev(path)
    except NetDevError as e:
        raise AttachError(f"cannot enter the container's network namespace: {e}") from None
    try:
        yield cnd
    finally:
        cnd.close()


def _peer(nd: NetDev, cnd: NetDev, host: str, ifname: str) -> tuple[Link | None, Link | None]:
    """(host end, container end); the container end only if it really is the host end's peer."""
    h = nd.link(host)
    c = cnd.link(ifname)
    if h is None or c is None or h.kind != "veth" or c.kind != "veth":
        return h, None
    if h.peer_index != c.index or c.peer_index != h.index:
        return h, None
    return h, c


def attach(
    nd: NetDev,
    *,
    bridge: str,
    cidrs: list[str],
    mtu: int,
    netns: str | None = None,
    pid: int | None = None,
    ifname: str = "ethwe",
    in_use: InUseCheck | None = None,
    on_link: LinkHook | None = None,
    routes: Sequence[str] = (),
    gso_max_size: int | None = None,
) -> Attachment:
    """Put a container on the bridge: veth pair, CIDRs, MTU, GSO size (``gso_max_size``: see gso_size_for) and the
    multicast route (and ``routes``, on-link: the DNS address); adds only what is missing.

    All or nothing: every input is checked and every new address probed (``in_use``) before anything changes,
    and a failure after the pair was made deletes it again, so a refused attach leaves no veth behind.
    """
    from weft.datapath.netdev import NetDevError

    wanted = _overlay_cidrs(cidrs)
    ifname = _ifname(ifname)
    _require_bridge(nd, bridge)
    path = _netns_path(netns, pid)
    if _same_netns(path, nd):
        raise AttachError("that network namespace is the host's own: use expose to put the host on the overlay")
    host = host_ifname(path, ifname)
    created = False
    added: list[str] = []
    try:
        with _container(path) as cnd:
            h, c = _peer(nd, cnd, host, ifname)
            if c is None and cnd.link(ifname) is not None:
                raise AttachError(
                    f"the container already has an interface {ifname!r} that weft did not create: "
                    "remove it or attach with another ifname"
                )
            held = set(cnd.addresses(ifname)) if c is not None else set()
            new = [cidr for cidr in wanted if cidr not in held]
            if in_use is not None and new:
                in_use([parse_cidr(cidr) for cidr in new])
            changed = False
            if c is None:
                if h is not None:
                    nd.delete_link(host)  # a half-made or stale pair: start again
                fd = os.open(path, os.O_RDONLY)
                try:
                    nd.add_veth(host, peer=ifname, peer_netns_fd=fd, mtu=mtu)
                    created = True
                finally:
                    os.close(fd)
                changed = True
            changed |= nd.set_link(host, mtu=mtu, master=bridge, up=True)
            changed |= cnd.set_link(ifname, mtu=mtu, up=True)
            if gso_max_size is not None:
                changed |= limit_gso(cnd, ifname, gso_max_size)
            link = cnd.link(ifname)
            if link is None:
                raise AttachError(f"{ifname!r} vanished from the container while attaching; retry")
            if on_link is not None:
                on_link(link.mac, host)
            for cidr in new:
                if cnd.address_add(ifname, cidr):
                    added.append(cidr)
                    changed = True
            for route in (MULTICAST_ROUTE, *routes):
                changed |= cnd.ensure_route(route, ifname)
            return Attachment(host, ifname, link.mac, cnd.addresses(ifname), changed)
    except BaseException as e:
        with contextlib.suppress(NetDevError, AttachError):
            if created:
                nd.delete_link(host)  # deleting one end deletes the pair: nothing is left half-made
            elif added:
                with _container(path) as cnd:
                    for cidr in added:
                        cnd.address_del(ifname, cidr)
        if isinstance(e, NetDevError):
            raise AttachError(str(e)) from None
        raise


KERNEL_GSO_MAX = 65536  # the kernel's own GSO size for a new device (GSO_LEGACY_MAX_SIZE)


def gso_size_for(encrypting: bool) -> int:
    """The GSO size the overlay's devices ask for. With a mesh secret the encrypted path carries most traffic, and
    packets below wire.OVERLAY_GSO_MAX are sealed into one UDP send each: a tenth more throughput per core there,
    a fifth through a relay. Without one the kernel's fast path carries it, and measured, any size below the
    kernel's 64 KiB costs it more than that (docs/datapath.md, "One send per frame")."""
    from weft.datapath.wire import OVERLAY_GSO_MAX

    return OVERLAY_GSO_MAX if encrypting else KERNEL_GSO_MAX


def limit_gso(nd: NetDev, name: str, size: int) -> bool:
    """Converge the GSO size of a device whose traffic the overlay carries: a container's interface, the bridge
    for the host's own. True if it changed. Only a cost if it fails, so a kernel that refuses is logged once and
    the attach goes on."""
    from weft.datapath.netdev import NetDevError

    try:
        return nd.set_link(name, gso_max_size=size)
    except NetDevError as e:
        if not _gso_refused.is_set():
            _gso_refused.set()
            log.warning("%s; frames from the overlay's devices may take two sends on the encrypted path", e)
        return False


_gso_refused = threading.Event()


def find_attached(nd: NetDev, *, bridge: str, skip: set[str]) -> list[tuple[str, str, list[str]]]:
    """(namespace name, host-side veth, CIDRs) of every container in a named namespace that weft attached to
    ``bridge``, but for those whose host-side veth is in ``skip``. Enters a namespace only while some port of the
    bridge is unaccounted for, so a restart that knows its containers reads nothing."""
    from weft.datapath.netdev import NetDevError

    bridge_link = nd.link(bridge)
    if bridge_link is None:
        return []
    ports = {link.name for link in nd.links() if link.master == bridge_link.index and link.name.startswith(HOST_PREFIX)}
    ports -= skip
    found: list[tuple[str, str, list[str]]] = []
    try:
        names = sorted(os.listdir(NETNS_RUN_DIR))
    except OSError:
        return []
    for name in names:
        if not ports:
            break
        path = f"{NETNS_RUN_DIR}/{name}"
        try:
            with _container(path) as cnd:
                for link in cnd.links():
                    host = host_ifname(path, link.name) if link.kind == "veth" else None
                    if host in ports:
                        ports.discard(host)
                        found.append((name, host, cnd.addresses(link.name)))
        except (AttachError, NetDevError, OSError):
            continue  # a namespace that went away meanwhile, or is not ours to enter
    return found


def detach(
    nd: NetDev,
    *,
    bridge: str,
    cidrs: Sequence[str] = (),
    netns: str | None = None,
    pid: int | None = None,
    ifname: str = "ethwe",
) -> Attachment | None:
    """Remove CIDRs (the pair goes when none remain), or the whole pair; None when nothing was attached.

    A container (or namespace) that no longer exists counts as not attached: its veth died with it.
    """
    from weft.datapath.netdev import NetDevError

    drop = _parse_cidrs(cidrs)
    ifname = _ifname(ifname)
    _check_identity(netns, pid)
    try:
        path = _netns_path(netns, pid)
    except AttachError:
        return None
    if nd.link(bridge) is None:
        return None
    host = host_ifname(path, ifname)
    try:
        with _container(path) as cnd:
            h, c = _peer(nd, cnd, host, ifname)
            if h is None:
                return None
            if c is None:  # our host end without its container end: just clean it up
                nd.delete_link(host)
                return Attachment(host, ifname, "", [], True)
            changed = False
            for cidr in drop:
                changed |= cnd.address_del(ifname, cidr)
            remaining = cnd.addresses(ifname)
            if not drop or not remaining:
                changed |= nd.delete_link(host)
                remaining = []
            return Attachment(host, ifname, c.mac, remaining, changed)
    except NetDevError as e:
        raise AttachError(str(e)) from None


def expose(nd: NetDev, *, bridge: str, cidrs: list[str], in_use: InUseCheck | None = None) -> list[str]:
    """Give the bridge device addresses so the host itself joins the overlay; returns those added.

    Refused before anything changes: an address whose subnet the host already reaches another way (an address or
    route on an interface that is not weft's), which would take that traffic onto the overlay, and an address in
    use elsewhere (``in_use``).
    """
    from weft.datapath.netdev import NetDevError

    wanted = _overlay_cidrs(cidrs)
    _require_bridge(nd, bridge)
    try:
        held = set(nd.addresses(bridge))
        new = [cidr for cidr in wanted if cidr not in held]
        ifaces = [parse_cidr(cidr) for cidr in new]
        _refuse_underlay_overlap(nd, bridge, ifaces)
        if in_use is not None and ifaces:
            in_use(ifaces)
        return [cidr for cidr in new if nd.address_add(bridge, cidr)]
    except NetDevError as e:
        raise AttachError(str(e)) from None


def _refuse_underlay_overlap(nd: NetDev, bridge: str, ifaces: list[Interface]) -> None:
    from weft.datapath.underlay import host_networks

    weft_devices = {bridge, *nd.bridge_ports(bridge)}
    for iface in ifaces:
        for device, net in host_networks(nd, weft_devices):
            if iface.network.overlaps(net):
                raise AttachError(
                    f"{iface} overlaps {net} on {device}, which is not weft's: the overlay would take that "
                    "traffic off it; pick an overlay range the host does not use"
                )


def hide(nd: NetDev, *, bridge: str, cidrs: list[str]) -> list[str]:
    """Take addresses off the bridge device; returns those removed (none if the bridge is gone)."""
    from weft.datapath.netdev import NetDevError

    drop = _parse_cidrs(cidrs)
    if nd.link(bridge) is None:
        return []
    try:
        return [cidr for cidr in drop if nd.address_del(bridge, cidr)]
    except NetDevError as e:
        raise AttachError(str(e)) from None


def reset(nd: NetDev, *, bridge: str, vxlan: str, tap: str) -> list[str]:
    """Delete the containers' veths on the bridge, the vxlan, the tap and the bridge; returns what was deleted."""
    from weft.datapath.netdev import NetDevError

    deleted: list[str] = []
    try:
        for port in nd.bridge_ports(bridge):
            link = nd.link(port)
            if link is not None and link.kind == "veth" and nd.delete_link(port):
                deleted.append(port)
        for name in (vxlan, tap, bridge):
            if nd.delete_link(name):
                deleted.append(name)
    except NetDevError as e:
        raise AttachError(str(e)) from None
    return deleted


# -- API requests -----------------------------------------------------------------------------------------------------

_ONE_AT_A_TIME = threading.Lock()  # requests run in worker threads; two attaches must not probe past each other


class OverlayError(Exception):
    """A request that cannot be carried out; the message says what to do."""


class AddressInUse(OverlayError):
    """An address that another interface on the overlay already answers for."""


def _requested_container(body: dict[str, Any]) -> dict[str, Any]:
    """The JSON body's container fields, type-checked; attach() judges the names themselves."""
    netns, pid = body.get("netns"), body.get("pid")
    if (netns is None) == (pid is None):
        raise OverlayError("name the container by exactly one of --netns NAME or --pid PID")
    if netns is not None and not isinstance(netns, str):
        raise OverlayError(f"invalid network namespace name {netns!r}")
    if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0):
        raise OverlayError(f"invalid PID {pid!r}")
    return {"netns": netns, "pid": pid, "ifname": check_ifname(body.get("ifname") or "ethwe")}


def in_use_check(
    nd: NetDev, bridge: str, wait: float, describe: Callable[[str], str]
) -> Callable[[list[Interface]], None]:
    """Refuse an address this host holds on its bridge, or that anyone on the overlay answers an ARP probe for
    within ``wait`` seconds (IPv4; for IPv6 the kernel's duplicate address detection does this; 0: no probe)."""
    from weft.datapath.addrprobe import arp_probe

    def check(ifaces: list[Interface]) -> None:
        for held in nd.addresses(bridge):
            ip = ipaddress.ip_interface(held).ip
            if any(i.ip == ip for i in ifaces):
                raise AddressInUse(
                    f"address {ip} is already in use by this host (on its bridge {bridge}, given by weft expose)"
                )
        found = arp_probe(bridge, [i.ip for i in ifaces if isinstance(i.ip, ipaddress.IPv4Address)], wait=wait)
        if found:
            ip, mac = min(found.items())
            raise AddressInUse(
                f"address {ip} is already in use by MAC {mac} ({describe(mac)}): pick another address, "
                "or detach it there first"
            )

    return check


def carry_out(
    nd: NetDev,
    bridge: str,
    mtu: int,
    action: str,
    body: dict[str, Any],
    cidrs: list[str],
    *,
    probe_wait: float = 0.0,
    describe_mac: Callable[[str], str] = lambda mac: "unknown",
    routes: Sequence[str] = (),
    gso_max_size: int | None = None,
) -> dict:
    """Do one overlay action; returns what the CLI prints. Idempotent: ``changed`` says if it did anything.

    All or nothing: a refused request changes nothing. Blocks for up to ``probe_wait`` seconds while new IPv4
    addresses are probed for: call it from a worker thread.
    """
    from weft.datapath.netdev import NetDevError

    in_use = in_use_check(nd, bridge, probe_wait, describe_mac)

    def static_entry(mac: str, host_ifname: str) -> None:
        holder = nd.bridge_fdb_port(bridge, mac)
        if holder is not None and holder != host_ifname and holder.startswith(HOST_PREFIX):
            # A container that took another's MAC must not get it by being attached again. (A remote MAC's
            # entry on an overlay port is replaced: a container moved here; the mesh reports a conflict.)
            raise OverlayError(f"MAC {mac} is already attached on port {holder}: give this container its own MAC")
        nd.bridge_fdb_set(bridge, mac, host_ifname)

    try:
        with _ONE_AT_A_TIME:
            if action == "attach":
                if not cidrs:
                    raise OverlayError("give at least one address, like 10.32.0.5/12")
                who = _requested_container(body)
                result = attach(
                    nd,
                    bridge=bridge,
                    cidrs=cidrs,
                    mtu=mtu,
                    in_use=in_use,
                    on_link=static_entry,
                    routes=routes,
                    gso_max_size=gso_max_size,
                    **who,
                )
                return {
                    "changed": result.changed,
                    "interface": result.ifname,
                    "host_interface": result.host_ifname,
                    "mac": result.mac,
                    "addresses": result.addresses,
                    "routes": [MULTICAST_ROUTE, *routes],
                }
            if action == "detach":
                who = _requested_container(body)
                detached = detach(nd, bridge=bridge, cidrs=cidrs, **who)
                if detached is None:
                    return {"changed": False, "addresses": []}
                return {"changed": detached.changed, "addresses": detached.addresses}
            if not cidrs:
                raise OverlayError("give at least one address, like 10.32.0.1/12")
            if action == "expose":
                done = expose(nd, bridge=bridge, cidrs=cidrs, in_use=in_use)
            else:
                done = hide(nd, bridge=bridge, cidrs=cidrs)
            return {"changed": bool(done), "addresses": done}
    except (AttachError, NetDevError, AddressError) as exc:
        raise OverlayError(str(exc)) from None

"""API requests that put containers (attach/detach) and the host (expose/hide) on the overlay.

The agent does the work, not the CLI, because it knows the bridge and the MTU, and because it must
learn a new container's MAC at once: the container's MAC gets a static entry on its bridge port, so
the mesh hears of it before the container sends anything, and it never ages out while attached.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from weft.addresses import AddressError, Interface
from weft.addresses import ifname as check_ifname

if TYPE_CHECKING:
    from weft.datapath.netdev import NetDev

ACTIONS = ("attach", "detach", "expose", "hide")
_ONE_AT_A_TIME = threading.Lock()  # requests run in worker threads; two attaches must not probe past each other


class OverlayError(Exception):
    """A request that cannot be carried out; the message says what to do."""


class AddressInUse(OverlayError):
    """An address that another interface on the overlay already answers for."""


def _container(body: dict[str, Any]) -> dict[str, Any]:
    """The JSON body's container fields, type-checked; attach.py judges the names themselves."""
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
) -> dict:
    """Do one overlay action; returns what the CLI prints. Idempotent: ``changed`` says if it did anything.

    All or nothing: a refused request changes nothing. Blocks for up to ``probe_wait`` seconds while new IPv4
    addresses are probed for: call it from a worker thread.
    """
    from weft.datapath import attach as ops
    from weft.datapath.netdev import NetDevError

    in_use = in_use_check(nd, bridge, probe_wait, describe_mac)

    def static_entry(mac: str, host_ifname: str) -> None:
        holder = nd.bridge_fdb_port(bridge, mac)
        if holder is not None and holder != host_ifname and holder.startswith(ops.HOST_PREFIX):
            # A container that took another's MAC must not get it by being attached again. (A remote MAC's
            # entry on an overlay port is replaced: a container moved here; the mesh reports a conflict.)
            raise OverlayError(f"MAC {mac} is already attached on port {holder}: give this container its own MAC")
        nd.bridge_fdb_set(bridge, mac, host_ifname)

    try:
        with _ONE_AT_A_TIME:
            if action == "attach":
                if not cidrs:
                    raise OverlayError("give at least one address, like 10.32.0.5/12")
                who = _container(body)
                result = ops.attach(
                    nd, bridge=bridge, cidrs=cidrs, mtu=mtu, in_use=in_use, on_link=static_entry, routes=routes, **who
                )
                return {
                    "changed": result.changed,
                    "interface": result.ifname,
                    "host_interface": result.host_ifname,
                    "mac": result.mac,
                    "addresses": result.addresses,
                    "routes": [ops.MULTICAST_ROUTE, *routes],
                }
            if action == "detach":
                who = _container(body)
                detached = ops.detach(nd, bridge=bridge, cidrs=cidrs, **who)
                if detached is None:
                    return {"changed": False, "addresses": []}
                return {"changed": detached.changed, "addresses": detached.addresses}
            if not cidrs:
                raise OverlayError("give at least one address, like 10.32.0.1/12")
            if action == "expose":
                done = ops.expose(nd, bridge=bridge, cidrs=cidrs, in_use=in_use)
            else:
                done = ops.hide(nd, bridge=bridge, cidrs=cidrs)
            return {"changed": bool(done), "addresses": done}
    except (ops.AttachError, NetDevError, AddressError) as exc:
        raise OverlayError(str(exc)) from None

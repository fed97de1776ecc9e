"""API requests that put containers (attach/detach) and the host (expose/hide) on the overlay.

The agent does the work, not the CLI, because it knows the bridge and the MTU, and because it must
learn a new container's MAC at once: the container's MAC gets a static entry on its bridge port, so
the mesh hears of it before the container sends anything, and it never ages out while attached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weft.datapath.netdev import NetDev

ACTIONS = ("attach", "detach", "expose", "hide")


class OverlayError(Exception):
    """A request that cannot be carried out; the message says what to do."""


def _container(body: dict[str, Any]) -> dict[str, Any]:
    """The JSON body's container fields, type-checked; attach.py judges the names themselves."""
    netns, pid = body.get("netns"), body.get("pid")
    if (netns is None) == (pid is None):
        raise OverlayError("name the container by exactly one of --netns NAME or --pid PID")
    if netns is not None and not isinstance(netns, str):
        raise OverlayError(f"invalid network namespace name {netns!r}")
    if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0):
        raise OverlayError(f"invalid PID {pid!r}")
    ifname = body.get("ifname") or "ethwe"
    if not isinstance(ifname, str) or not 0 < len(ifname) <= 15 or "/" in ifname or " " in ifname:
        raise OverlayError(f"invalid interface name {ifname!r} (at most 15 characters, no '/' or spaces)")
    return {"netns": netns, "pid": pid, "ifname": ifname}


def carry_out(nd: NetDev, bridge: str, mtu: int, action: str, body: dict[str, Any], cidrs: list[str]) -> dict:
    """Do one overlay action; returns what the CLI prints. Idempotent: ``changed`` says if it did anything."""
    from weft.datapath import attach as ops
    from weft.datapath.netdev import NetDevError

    try:
        if action == "attach":
            if not cidrs:
                raise OverlayError("give at least one address, like 10.32.0.5/12")
            who = _container(body)
            result = ops.attach(nd, bridge=bridge, cidrs=cidrs, mtu=mtu, **who)
            nd.bridge_fdb_set(bridge, result.mac, result.host_ifname)
            return {
                "changed": result.changed,
                "interface": result.ifname,
                "host_interface": result.host_ifname,
                "mac": result.mac,
                "addresses": result.addresses,
            }
        if action == "detach":
            who = _container(body)
            detached = ops.detach(nd, bridge=bridge, cidrs=cidrs, **who)
            if detached is None:
                return {"changed": False, "addresses": []}
            return {"changed": detached.changed, "addresses": detached.addresses}
        if not cidrs:
            raise OverlayError("give at least one address, like 10.32.0.1/12")
        fn = ops.expose if action == "expose" else ops.hide
        done = fn(nd, bridge=bridge, cidrs=cidrs)
        return {"changed": bool(done), "addresses": done}
    except (ops.AttachError, NetDevError) as exc:
        raise OverlayError(str(exc)) from None

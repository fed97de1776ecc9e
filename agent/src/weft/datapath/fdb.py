"""Kernel forwarding state: which remote MAC goes out of which bridge port, and where VXLAN sends it.

The agent computes the whole desired state from the MAC table and the path choices, then changes
only the entries that differ, so re-applying is free and a restarted agent leaves working entries
alone. While an agent warms up after a restart it only adds: it does not yet know every peer's
MACs, and deleting what it has not heard of would cut traffic that the kernel still carries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weft.datapath.netdev import NetDev

ZERO_MAC = "00:00:00:00:00:00"


def mac_str(mac: bytes) -> str:
    return mac.hex(":")


@dataclass
class FdbState:
    vxlan: dict[str, set[str]] = field(default_factory=dict)  # MAC -> underlay IPs (VXLAN's own FDB)
    bridge: dict[str, str] = field(default_factory=dict)  # MAC -> bridge port (static entries)


def desired_state(
    *,
    fast_ips: Mapping[int, str],
    sleeve_peers: set[int] | frozenset[int],
    owner: Mapping[bytes, int],
    ourself: int,
    vxlan: str,
    tap: str,
) -> FdbState:
    """Remote MACs of fast peers go to the VXLAN port, those of sleeve/relayed peers to the TAP.

    Flooded frames (broadcast, multicast, unknown unicast) go to every fast peer through all-zero
    entries; the sleeve carries them to the rest along the broadcast tree.
    """
    state = FdbState()
    if fast_ips:
        state.vxlan[ZERO_MAC] = set(fast_ips.values())
    for mac, peer in owner.items():
        if peer == ourself:
            continue
        if peer in fast_ips:
            state.vxlan[mac_str(mac)] = {fast_ips[peer]}
            state.bridge[mac_str(mac)] = vxlan
        elif peer in sleeve_peers:
            state.bridge[mac_str(mac)] = tap
    return state


def apply(
    nd: NetDev, *, bridge: str, vxlan: str, tap: str, want: FdbState, delete: bool
) -> tuple[int, dict[str, set[str]]]:
    """Make the kernel match ``want``; returns the number of entries changed, and the VXLAN entries as they are
    now (read once, then kept up to date with each change, so callers need not read them again).

    Only entries on our own ports (VXLAN and TAP) are ever removed: an operator's static entries on
    other ports are not ours to touch.
    """
    changes = 0
    have_vx = nd.vxlan_fdb(vxlan)
    now_vx = {mac: set(dsts) for mac, dsts in have_vx.items()}
    for mac, dsts in want.vxlan.items():
        current = have_vx.get(mac, set())
        for dst in sorted(dsts - current):
            nd.vxlan_fdb_add(vxlan, mac, dst)
            if mac != ZERO_MAC:
                now_vx[mac] = set()  # a unicast MAC's entry is replaced
            now_vx.setdefault(mac, set()).add(dst)
            changes += 1
        if delete and mac == ZERO_MAC:
            for dst in sorted(current - dsts):
                nd.vxlan_fdb_del(vxlan, mac, dst)
                now_vx[mac].discard(dst)
                changes += 1
    if delete:
        for mac, dsts in have_vx.items():
            if mac not in want.vxlan:
                for dst in sorted(dsts):
                    nd.vxlan_fdb_del(vxlan, mac, dst)
                    changes += 1
                now_vx.pop(mac, None)
    have_br = nd.bridge_fdb(bridge)
    ports: dict[str, int | None] = {}  # each port's index, read once for all its entries

    def index(port: str) -> int | None:
        if port not in ports:
            ports[port] = nd.port_index(bridge, port)
        return ports[port]

    for mac, port in want.bridge.items():
        if have_br.get(mac) != port:
            nd.bridge_fdb_set(bridge, mac, port, index=index(port))
            changes += 1
    if delete:
        for mac, port in have_br.items():
            if mac not in want.bridge and port in (vxlan, tap):
                if index(port) is not None:
                    nd.bridge_fdb_del(bridge, mac, port, index=index(port))
                changes += 1
    return changes, {mac: dsts for mac, dsts in now_vx.items() if dsts}


def purge(
    nd: NetDev,
    *,
    bridge: str,
    vxlan: str,
    allowed: Callable[[str], bool],
    entries: dict[str, set[str]] | None = None,
) -> int:
    """Remove every VXLAN entry towards an underlay address that may not carry plaintext, at once.

    Unlike :func:`apply` this ignores warm-up: with a secret set, a peer outside the trusted subnets
    must not get a single frame in clear, whatever the last run left behind. A MAC left with no VXLAN
    destination also loses its bridge entry on the VXLAN port, so its frames are not flooded instead.
    Returns the number of entries removed. ``entries``: the VXLAN entries as :func:`apply` left them (else read
    here); they are updated in place.
    """
    changes = 0
    remaining: set[str] = set()
    have = nd.vxlan_fdb(vxlan) if entries is None else entries
    for mac, dsts in list(have.items()):
        for dst in sorted(dsts):
            if allowed(dst):
                remaining.add(mac)
            else:
                nd.vxlan_fdb_del(vxlan, mac, dst)
                dsts.discard(dst)
                changes += 1
        if not dsts:
            del have[mac]
    if changes:
        for mac, port in nd.bridge_fdb(bridge).items():
            if port == vxlan and mac not in remaining:
                nd.bridge_fdb_del(bridge, mac, port)
                changes += 1
    return changes


def destinations(nd: NetDev, vxlan: str, entries: dict[str, set[str]] | None = None) -> set[str]:
    """Every underlay address the VXLAN device sends to (what the fast-path guard must admit); from ``entries``
    when the caller has just read them."""
    have = nd.vxlan_fdb(vxlan) if entries is None else entries
    return {dst for dsts in have.values() for dst in dsts}

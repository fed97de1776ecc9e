"""Kernel forwarding state: which remote MAC goes out of which bridge port, and where VXLAN sends it.

The agent computes the whole desired state from the MAC table and the path choices, then changes
only the entries that differ from what the kernel holds, so re-applying is free and a restarted agent
leaves working entries alone. What the kernel holds is read when the agent starts and now and then
after; in between it is what the agent last applied, as reading the whole FDB on every change was
most of a dense mesh's CPU. While an agent warms up after a restart it only adds: it does not yet know every peer's
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


def read(nd: NetDev, *, bridge: str, vxlan: str) -> FdbState:
    """What the kernel holds: the VXLAN device's own entries and the static entries on every bridge port.

    Two dumps of the whole FDB, tens of milliseconds with a hundred peers: the agent reads them when it starts, after
    a failed change and now and then to catch what someone else changed, and otherwise diffs against what it applied.
    """
    return FdbState(vxlan=nd.vxlan_fdb(vxlan), bridge=nd.bridge_fdb(bridge))


def apply(nd: NetDev, *, vxlan: str, tap: str, bridge: str, want: FdbState, delete: bool, have: FdbState) -> int:
    """Make the kernel go from ``have`` (as last read or applied) to ``want``; returns the number of entries changed.

    ``have`` is updated in place as each change lands, so it stays what the kernel holds, even when a change fails
    half-way (the caller reads the kernel again then, to be sure). Only entries on our own ports (VXLAN and TAP) are
    ever removed: an operator's static entries on other ports are not ours to touch.
    """
    changes = 0
    for mac, dsts in want.vxlan.items():
        current = have.vxlan.get(mac, set())
        for dst in sorted(dsts - current):
            nd.vxlan_fdb_add(vxlan, mac, dst)
            if mac != ZERO_MAC:
                have.vxlan[mac] = set()  # a unicast MAC's entry is replaced
            have.vxlan.setdefault(mac, set()).add(dst)
            changes += 1
        if delete and mac == ZERO_MAC:
            for dst in sorted(current - dsts):
                nd.vxlan_fdb_del(vxlan, mac, dst)
                have.vxlan[mac].discard(dst)
                changes += 1
    if delete:
        for mac in [m for m in have.vxlan if m not in want.vxlan]:
            for dst in sorted(have.vxlan[mac]):
                nd.vxlan_fdb_del(vxlan, mac, dst)
                changes += 1
            del have.vxlan[mac]
    for mac in [m for m, dsts in have.vxlan.items() if not dsts]:
        del have.vxlan[mac]
    ports: dict[str, int | None] = {}  # each port's index, read once for all its entries

    def index(port: str) -> int | None:
        if port not in ports:
            ports[port] = nd.port_index(bridge, port)
        return ports[port]

    for mac, port in want.bridge.items():
        if have.bridge.get(mac) != port:
            nd.bridge_fdb_set(bridge, mac, port, index=index(port))
            have.bridge[mac] = port
            changes += 1
    if delete:
        for mac, port in [(m, p) for m, p in have.bridge.items() if m not in want.bridge and p in (vxlan, tap)]:
            if index(port) is not None:
                nd.bridge_fdb_del(bridge, mac, port, index=index(port))
            del have.bridge[mac]
            changes += 1
    return changes


def purge(nd: NetDev, *, bridge: str, vxlan: str, allowed: Callable[[str], bool], have: FdbState) -> int:
    """Remove every VXLAN entry towards an underlay address that may not carry plaintext, at once.

    Unlike :func:`apply` this ignores warm-up: with a secret set, a peer outside the trusted subnets
    must not get a single frame in clear, whatever the last run left behind. A MAC left with no VXLAN
    destination also loses its bridge entry on the VXLAN port, so its frames are not flooded instead.
    Returns the number of entries removed; ``have`` (what the kernel holds) is updated in place.
    """
    changes = 0
    remaining: set[str] = set()
    for mac, dsts in list(have.vxlan.items()):
        for dst in sorted(dsts):
            if allowed(dst):
                remaining.add(mac)
            else:
                nd.vxlan_fdb_del(vxlan, mac, dst)
                dsts.discard(dst)
                changes += 1
        if not dsts:
            del have.vxlan[mac]
    if changes:
        for mac, port in list(have.bridge.items()):
            if port == vxlan and mac not in remaining:
                nd.bridge_fdb_del(bridge, mac, port)
                del have.bridge[mac]
                changes += 1
    return changes


def destinations(have: FdbState) -> set[str]:
    """Every underlay address the VXLAN device sends to (what the fast-path guard must admit)."""
    return {dst for dsts in have.vxlan.values() for dst in dsts}

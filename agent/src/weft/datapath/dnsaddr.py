"""The DNS address: every host answers its own containers at one link-local address on its bridge, and nothing
addressed to or from it crosses the overlay.

All hosts hold the same address (169.254.53.53 by default), so a container's resolver setting is the same
everywhere and survives a move. On one layer-2 overlay that would be a conflict: a container's ARP request for the
address is flooded to every port of the bridge, the VXLAN and sleeve ports included, and every host would answer.
So an nftables bridge table the agent owns drops, on those two ports and in both directions, every ARP packet and
every IPv4 packet that names the address. A container's question reaches its own host only, and a host's answers
(and its ARP for the container) never leave it.

The address is added with link scope, so nothing takes it for an overlay address of the host (those are global),
and the server's sockets are bound to the bridge device: the kernel sends answers out of the bridge without a route
to the containers' range, which the host does not need for anything else. `weft reset` removes the table.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING

from weft.datapath.portguard import NftError, Runner, run_nft

if TYPE_CHECKING:
    from weft.datapath.netdev import NetDev

__all__ = ["TABLE", "install", "remove", "ruleset"]

TABLE = "weft_dns"
FAMILY = "bridge"


def ruleset(address: str, overlay_ports: Sequence[str]) -> str:
    """The whole table: four drops each way on the overlay ports.

    Every frame the bridge forwards, fast-path traffic included, passes both chains, so what such a frame costs
    is kept small. An IPv4 frame that names the address in neither field, and a frame that is neither IPv4 nor
    ARP, leave at the first or second rule, each written as the exact negation of what the drops depend on (the
    same fields, loaded the same way), so no frame a drop would match is let through. Each drop tests the
    address before the interface: only a frame that names it costs the interface's name and the set lookup.
    Tested first, those were the chains' main cost: a 16-byte copy and a hash per rule and frame, 0.7 us of the
    5.4 us a 1,300-byte packet cost between two hosts (docs/datapath.md).
    """
    ip = ipaddress.IPv4Address(address)  # never anything but an address into the script
    ports = ", ".join(f'"{p}"' for p in sorted(overlay_ports))
    neither = [f"ip saddr != {ip} ip daddr != {ip} accept", "meta protocol != ip ether type != arp accept"]
    matches = [f"ip daddr {ip}", f"ip saddr {ip}", f"arp daddr ip {ip}", f"arp saddr ip {ip}"]
    inbound = "\n".join(
        [*(f"        {r}" for r in neither), *(f"        {m} iifname @overlay counter drop" for m in matches)]
    )
    outbound = "\n".join(
        [*(f"        {r}" for r in neither), *(f"        {m} oifname @overlay counter drop" for m in matches)]
    )
    return f"""table {FAMILY} {TABLE} {{
    set overlay {{ type ifname; elements = {{ {ports} }}; }}
    chain from_overlay {{
        type filter hook prerouting priority -200; policy accept;
{inbound}
    }}
    chain to_overlay {{
        type filter hook postrouting priority -200; policy accept;
{outbound}
    }}
}}
"""


def install(nd: NetDev, *, bridge: str, overlay_ports: Sequence[str], address: str, run: Runner = run_nft) -> None:
    """The table first (replaced whole, atomically), then the address: it is never held unguarded."""
    script = f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n{ruleset(address, overlay_ports)}"
    try:
        run([], script)
    except NftError as exc:
        raise NftError(f"cannot load the DNS address guard: {exc}") from None
    nd.address_add(bridge, f"{address}/32", scope="link")


def remove(run: Runner = run_nft) -> bool:
    """Delete the table (for `weft reset`, which deletes the bridge and its address); True if there was one."""
    try:
        run(["list", "table", FAMILY, TABLE], None)
    except NftError:
        return False
    run(["delete", "table", FAMILY, TABLE], None)
    return True

"""What the host reaches without the overlay: the subnets of its addresses and routes on interfaces not weft's.

An overlay address given to the host (``weft expose``) brings a connected route for its subnet onto the bridge.
If that subnet overlaps one the host already reaches over another interface, the new route takes that traffic onto
the overlay: the host's own underlay (and with it the mesh) can break. So expose asks this module first.
"""

from __future__ import annotations

import ipaddress
import os
from socket import AF_INET, AF_INET6

from pyroute2.netlink.exceptions import NetlinkError

from weft.datapath.netdev import NetDev, NetDevError
from weft.mesh.address import Network

__all__ = ["host_networks"]

RT_TABLE_MAIN = 254


def host_networks(nd: NetDev, weft_devices: set[str]) -> list[tuple[str, Network]]:
    """(device, subnet) for every address and every main-table route (but the default route) whose device is not
    one of ``weft_devices``; a route through several devices or none is named by its type."""
    try:
        names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in nd.ipr.link("dump")}
        out: list[tuple[str, Network]] = []
        for msg in nd.ipr.addr("dump"):
            device = names.get(msg["index"], f"ifindex {msg['index']}")
            address = msg.get_attr("IFA_ADDRESS")
            if device not in weft_devices and address:
                out.append((device, ipaddress.ip_network(f"{address}/{msg['prefixlen']}", strict=False)))
        for family, zero in ((AF_INET, "0.0.0.0"), (AF_INET6, "::")):
            for msg in nd.ipr.route("dump", family=family, table=RT_TABLE_MAIN):
                if msg.get_attr("RTA_TABLE", msg["table"]) != RT_TABLE_MAIN or msg["dst_len"] == 0:
                    continue  # the local table holds our own addresses; the default route shadows nothing
                oif = msg.get_attr("RTA_OIF")
                device = names.get(oif, f"ifindex {oif}") if oif else "a route with no single device"
                if device not in weft_devices:
                    dst = msg.get_attr("RTA_DST") or zero
                    out.append((device, ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)))
        return out
    except NetlinkError as e:
        raise NetDevError(f"cannot read the host's addresses and routes: {os.strerror(e.code)}") from None

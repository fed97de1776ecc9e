"""Overlay addresses and interface names typed by an operator or sent to the API.

Overlay CIDRs for containers and for the host, and interface names, are checked here, once, before anything is
changed: bad input is refused with one line that quotes it and says what is expected, and never reaches the kernel
half-way. Every error is an ``AddressError`` (a ``ValueError``), which the API answers with 400 and the CLI prints as
one line. The underlay addresses of peers (``HOST[:PORT]``, listen addresses, trusted subnets) are read in
:mod:`weft.mesh.address`.
"""

from __future__ import annotations

import ipaddress

from weft.mesh.address import AddressError, short

__all__ = [
    "IFNAMSIZ",
    "AddressError",
    "Interface",
    "ifname",
    "overlay_cidr",
    "overlay_cidrs",
    "parse_cidr",
]

IFNAMSIZ = 15  # usable bytes in a Linux interface name (IFNAMSIZ 16 with the NUL)

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# Ranges that are never a container's (or an exposed host's) address on an L2 overlay, and why.
_V4_REFUSED: list[tuple[ipaddress.IPv4Network, str]] = [
    (ipaddress.IPv4Network("0.0.0.0/8"), "is in 0.0.0.0/8 ('this network', RFC 1122): it cannot be a source address"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "is a loopback address: traffic to it never leaves the container"),
    (
        ipaddress.IPv4Network("169.254.0.0/16"),
        "is link-local (169.254.0.0/16): self-assigned, never routed, and home to cloud metadata services",
    ),
    (ipaddress.IPv4Network("224.0.0.0/4"), "is a multicast address: it names a group, not one interface"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "is reserved (240.0.0.0/4) or the broadcast address 255.255.255.255"),
]
_V6_REFUSED: list[tuple[ipaddress.IPv6Network, str]] = [
    (ipaddress.IPv6Network("::/128"), "is the unspecified address"),
    (ipaddress.IPv6Network("::1/128"), "is the loopback address: traffic to it never leaves the container"),
    (ipaddress.IPv6Network("::ffff:0:0/96"), "is an IPv4-mapped address: give the IPv4 address itself"),
    (ipaddress.IPv6Network("fe80::/10"), "is link-local (fe80::/10): the kernel gives every interface its own"),
    (ipaddress.IPv6Network("ff00::/8"), "is a multicast address: it names a group, not one interface"),
]


# -- CIDRs -------------------------------------------------------------------------------------------------------------


def parse_cidr(text: str, what: str = "CIDR") -> Interface:
    """``ADDRESS/PREFIXLEN`` (an address without a prefix length is refused, not guessed)."""
    if not isinstance(text, str) or "/" not in text:
        raise AddressError(f"invalid {what} {short(str(text))}: expected ADDRESS/PREFIXLEN, e.g. 10.32.0.5/12")
    try:
        return ipaddress.ip_interface(text.strip())
    except ValueError:
        raise AddressError(f"invalid {what} {short(text)}: expected ADDRESS/PREFIXLEN, e.g. 10.32.0.5/12") from None


def overlay_cidr(text: str) -> Interface:
    """An address for one interface on the overlay (a container's, or the host's on the bridge).

    Refused, each with its reason: unspecified, loopback, link-local, multicast, reserved and broadcast addresses;
    the network and broadcast addresses of the given subnet (its all-zeros and all-ones host parts; a /31 or /127
    has neither, RFC 3021); and a single-address prefix (/32, /128), which leaves the interface no neighbour on the
    overlay it could reach.
    """
    iface = parse_cidr(text)
    refused = _V4_REFUSED if iface.version == 4 else _V6_REFUSED
    for net, why in refused:
        if iface.ip in net:
            raise AddressError(f"{iface} {why}; give an address like 10.32.0.5/12")
    net = iface.network
    if net.prefixlen == net.max_prefixlen:
        raise AddressError(
            f"{iface} has a /{net.prefixlen} prefix, so no other address of the overlay is on its link: "
            "give the overlay's prefix, like 10.32.0.5/12"
        )
    if net.prefixlen < net.max_prefixlen - 1:
        if iface.ip == net.network_address:
            raise AddressError(f"{iface} is the network address of {net}: pick an address inside it")
        if iface.version == 4 and iface.ip == net.broadcast_address:
            raise AddressError(f"{iface} is the broadcast address of {net}: pick an address inside it")
    return iface


def overlay_cidrs(texts: list[str] | tuple[str, ...]) -> list[str]:
    """Each checked by :func:`overlay_cidr`; normalised and without duplicates, in the order given."""
    out: list[str] = []
    for text in texts:
        cidr = str(overlay_cidr(text))
        if cidr not in out:
            out.append(cidr)
    return out


# -- interface names ---------------------------------------------------------------------------------------------------


def ifname(text: object, what: str = "interface name") -> str:
    """A Linux interface name: 1-15 printable ASCII characters, none of '/', ':', '%' or whitespace, and not
    '.' or '..' (the kernel's rules; '%' would make the kernel pick a name like eth0 for us)."""
    if not isinstance(text, str):
        raise AddressError(f"invalid {what} {text!r}: expected a string")
    bad = next((c for c in text if c in "/:%" or c.isspace() or not c.isprintable() or not c.isascii()), None)
    if not text or len(text) > IFNAMSIZ or text in (".", "..") or bad is not None:
        reason = f"it contains {bad!r}" if bad is not None else "1-15 characters, not '.' or '..'"
        raise AddressError(
            f"invalid {what} {short(text)}: {reason} "
            "(an interface name is 1-15 letters, digits or punctuation other than '/', ':' and '%')"
        )
    return text

"""The one place that reads addresses typed by an operator or sent to the API.

Peer targets (``HOST[:PORT]``), listen addresses, overlay CIDRs for containers and for the host, underlay subnets and
interface names are all checked here, once, before anything is changed: bad input is refused with one line that
quotes it and says what is expected, and never reaches the dialler or the kernel half-way. Every error is an
``AddressError`` (a ``ValueError``), which the API answers with 400 and the CLI prints as one line.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "DEFAULT_PORT",
    "IFNAMSIZ",
    "AddressError",
    "Interface",
    "Network",
    "bind_address",
    "host_name",
    "ifname",
    "join_host_port",
    "overlay_cidr",
    "overlay_cidrs",
    "parse_cidr",
    "peer_address",
    "split_peer_address",
    "subnet",
]

DEFAULT_PORT = 6783
IFNAMSIZ = 15  # usable bytes in a Linux interface name (IFNAMSIZ 16 with the NUL)
MAX_HOST_NAME = 253  # RFC 1035: a name of at most 255 octets on the wire is at most 253 characters of text
MAX_LABEL = 63
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

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


class AddressError(ValueError):
    """An address, CIDR or interface name that cannot be used; the message quotes it and says what is expected."""


# -- host names and HOST[:PORT] --------------------------------------------------------------------------------------


def host_name(text: str, what: str = "host") -> str:
    """An IPv4 literal, an IPv6 literal (no brackets) or a DNS name (RFC 1123), canonical and lower case.

    A dotted name that is all digits (``999.1.1.1``) is not a host name: it is a mistyped IPv4 address, and a
    resolver would not look it up either (no top-level domain is numeric).
    """
    host = text.strip()
    if not host:
        raise AddressError(f"{what}: empty host")
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise AddressError(f"{what} {_short(host)} is not an IPv6 address") from None
    labels = host.removesuffix(".").split(".")
    if all(label.isdecimal() for label in labels):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise AddressError(
                f"{what} {_short(host)} is not an IPv4 address (four numbers 0-255, no leading zeros)"
            ) from None
    if not host.isascii():
        raise AddressError(f"{what} {_short(host)} is not ASCII: write an international name in its xn-- form")
    name = host.lower().removesuffix(".")
    if len(name) > MAX_HOST_NAME:
        raise AddressError(f"{what} {_short(host)} is {len(name)} characters long, the limit is 253")
    for label in name.split("."):
        if len(label) > MAX_LABEL:
            raise AddressError(f"{what} {_short(host)} has a part of {len(label)} characters, the limit is 63")
        if not _LABEL.fullmatch(label):
            raise AddressError(
                f"{what} {_short(host)} is not a host name (letters, digits and '-' between dots, "
                "not starting or ending with '-')"
            )
    return name


def _short(text: str, limit: int = 80) -> str:
    """The operator's input, quoted, and cut so that a 300-character mistake still gives a one-line error."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _port(text: str, whole: str, what: str, lowest: int = 1) -> int:
    if not text.isascii() or not text.isdecimal() or not lowest <= int(text) < 65536:
        raise AddressError(f"{what} {_short(whole)}: port must be a number from {lowest} to 65535")
    return int(text)


def split_peer_address(
    text: str, default_port: int | None = DEFAULT_PORT, what: str = "peer address", *, lowest_port: int = 1
) -> tuple[str, int]:
    """``HOST[:PORT]``, ``[V6]:PORT`` or a bare IPv6 address to (host, port); the port is required without a
    default. The host is checked as by :func:`host_name`."""
    whole = text.strip()
    if not whole:
        raise AddressError(f"empty {what}")
    if whole.startswith("["):
        end = whole.find("]")
        if end < 0:
            raise AddressError(f"{what} {_short(whole)}: missing ']'")
        host, rest = whole[1:end], whole[end + 1 :]
        if not host or ":" not in host:
            raise AddressError(f"{what} {_short(whole)}: [{host}] is not an IPv6 address")
        if rest and not rest.startswith(":"):
            raise AddressError(f"{what} {_short(whole)}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
    elif whole.count(":") > 1:
        host, port_text = whole, None  # a bare IPv6 address, no port
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{what} {_short(whole)} is not HOST[:PORT] (write IPv6 as [ADDR]:PORT)") from None
    elif ":" in whole:
        host, port_text = whole.split(":")
        if not host:
            raise AddressError(f"{what} {_short(whole)}: missing host")
    else:
        host, port_text = whole, None
    if port_text is not None:
        port = _port(port_text, whole, what, lowest_port)
    elif default_port is None:
        raise AddressError(f"{what} {_short(whole)} is not HOST:PORT (the port is required)")
    else:
        port = default_port
    if any(c.isspace() for c in host):
        raise AddressError(f"{what} {_short(whole)}: the host contains spaces")
    return host_name(host, what if host == whole else f"{what} {_short(whole)}: host"), port


def join_host_port(host: str, port: int) -> str:
    """The canonical text form: ``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_address(text: str, default_port: int = DEFAULT_PORT) -> str:
    """A peer to dial, ``HOST[:PORT]``, in canonical form (what targets are keyed by and what gets dialled)."""
    return join_host_port(*split_peer_address(text, default_port))


def bind_address(text: str, what: str = "address") -> tuple[str, int]:
    """An address to listen on, ``HOST:PORT`` or ``[V6]:PORT``; an empty host (``:6783``) means every address and
    port 0 a free port chosen by the kernel."""
    whole = text.strip()
    if whole.startswith(":") and whole.count(":") == 1:
        return "", _port(whole[1:], whole, what, 0)
    return split_peer_address(whole, None, what, lowest_port=0)


# -- CIDRs -------------------------------------------------------------------------------------------------------------


def parse_cidr(text: str, what: str = "CIDR") -> Interface:
    """``ADDRESS/PREFIXLEN`` (an address without a prefix length is refused, not guessed)."""
    if not isinstance(text, str) or "/" not in text:
        raise AddressError(f"invalid {what} {_short(str(text))}: expected ADDRESS/PREFIXLEN, e.g. 10.32.0.5/12")
    try:
        return ipaddress.ip_interface(text.strip())
    except ValueError:
        raise AddressError(f"invalid {what} {_short(text)}: expected ADDRESS/PREFIXLEN, e.g. 10.32.0.5/12") from None


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


def subnet(text: str, what: str = "subnet") -> Network:
    """An underlay subnet in CIDR notation (host bits may be set: 10.0.0.7/8 is 10.0.0.0/8)."""
    try:
        if not isinstance(text, str) or "/" not in text:
            raise ValueError
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise AddressError(f"{what} {_short(str(text))} is not a subnet in CIDR notation (like 10.0.0.0/8)") from None


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
            f"invalid {what} {_short(text)}: {reason} "
            "(an interface name is 1-15 letters, digits or punctuation other than '/', ':' and '%')"
        )
    return text

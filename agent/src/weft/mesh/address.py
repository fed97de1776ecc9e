"""The one home for the underlay addresses of peers: what to dial, what to listen on, which subnets to trust.

``HOST[:PORT]`` (an IPv4 literal, ``[V6]:PORT`` or a bare IPv6 literal, or a DNS name), the default port, listen
addresses and trusted subnets are read here and nowhere else: from the config, the API and ``weft connect``, from
peers' gossip (the connection maker) and from the sockets of the transport. Bad input is refused with one line that
quotes it and says what is expected, as an ``AddressError`` (a ``ValueError``), which the API answers with 400 and
the CLI prints as one line. The Ansible collection's module_utils (``weft_api.normalize_address``) is a standard-library
twin of :func:`peer_address`; both run the cases in ``agent/tests/unit/data/peer_addresses.json``.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "DEFAULT_PORT",
    "AddressError",
    "Network",
    "bind_address",
    "host_name",
    "host_of",
    "ip_host_port",
    "join_host_port",
    "peer_address",
    "short",
    "split_host_port",
    "split_peer_address",
    "subnet",
]

DEFAULT_PORT = 6783
MAX_HOST_NAME = 253  # RFC 1035: a name of at most 255 octets on the wire is at most 253 characters of text
MAX_LABEL = 63
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    _refuse_zone(host, host, what)
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise AddressError(f"{what} {short(host)} is not an IPv6 address") from None
    labels = host.removesuffix(".").split(".")
    if all(label.isdecimal() for label in labels):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise AddressError(
                f"{what} {short(host)} is not an IPv4 address (four numbers 0-255, no leading zeros)"
            ) from None
    if not host.isascii():
        raise AddressError(f"{what} {short(host)} is not ASCII: write an international name in its xn-- form")
    name = host.lower().removesuffix(".")
    if len(name) > MAX_HOST_NAME:
        raise AddressError(f"{what} {short(host)} is {len(name)} characters long, the limit is 253")
    for label in name.split("."):
        if len(label) > MAX_LABEL:
            raise AddressError(f"{what} {short(host)} has a part of {len(label)} characters, the limit is 63")
        if not _LABEL.fullmatch(label):
            raise AddressError(
                f"{what} {short(host)} is not a host name (letters, digits and '-' between dots, "
                "not starting or ending with '-')"
            )
    return name


def _refuse_zone(host: str, whole: str, what: str) -> None:
    """A scoped IPv6 address (``fe80::1%eth0``) names an interface of one host: peers told of it could not dial it."""
    if "%" in host:
        raise AddressError(f"{what} {short(whole)}: a scoped IPv6 address (with '%') is not taken")


def short(text: str, limit: int = 80) -> str:
    """The operator's input, quoted, and cut so that a 300-character mistake still gives a one-line error."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _port(text: str, whole: str, what: str, lowest: int = 1) -> int:
    if not text.isascii() or not text.isdecimal() or not lowest <= int(text) < 65536:
        raise AddressError(f"{what} {short(whole)}: port must be a number from {lowest} to 65535")
    return int(text)


def split_peer_address(
    text: str, default_port: int | None = DEFAULT_PORT, what: str = "peer address", *, lowest_port: int = 1
) -> tuple[str, int]:
    """``HOST[:PORT]``, ``[V6]:PORT`` or a bare IPv6 address to (host, port); the port is required without a
    default. The host is checked as by :func:`host_name`."""
    whole = text.strip()
    if not whole:
        raise AddressError(f"empty {what}")
    _refuse_zone(whole, whole, what)
    if whole.startswith("["):
        end = whole.find("]")
        if end < 0:
            raise AddressError(f"{what} {short(whole)}: missing ']'")
        host, rest = whole[1:end], whole[end + 1 :]
        if not host or ":" not in host:
            raise AddressError(f"{what} {short(whole)}: [{host}] is not an IPv6 address")
        if rest and not rest.startswith(":"):
            raise AddressError(f"{what} {short(whole)}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
    elif whole.count(":") > 1:
        host, port_text = whole, None  # a bare IPv6 address, no port
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{what} {short(whole)} is not HOST[:PORT] (write IPv6 as [ADDR]:PORT)") from None
    elif ":" in whole:
        host, port_text = whole.split(":")
        if not host:
            raise AddressError(f"{what} {short(whole)}: missing host")
    else:
        host, port_text = whole, None
    if port_text is not None:
        port = _port(port_text, whole, what, lowest_port)
    elif default_port is None:
        raise AddressError(f"{what} {short(whole)} is not HOST:PORT (the port is required)")
    else:
        port = default_port
    if any(c.isspace() for c in host):
        raise AddressError(f"{what} {short(whole)}: the host contains spaces")
    return host_name(host, what if host == whole else f"{what} {short(whole)}: host"), port


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


def ip_host_port(text: str, default_port: int, what: str) -> tuple[str, int]:
    """``HOST[:PORT]`` whose host must be an IP literal (a DNS upstream: finding one by name would need DNS)."""
    host, port = split_peer_address(text, default_port, what)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise AddressError(f"{what} {short(text.strip())}: {host!r} is not an IP address") from None
    return host, port


def split_host_port(address: str) -> tuple[str, int]:
    """(host, port) of an address already in canonical form: a target, or one made from what a socket reported.

    Not a check: text from outside goes through :func:`peer_address` or :func:`bind_address` first."""
    host, _, port = address.rpartition(":")
    return (host[1:-1] if host.startswith("[") else host), int(port)


def host_of(address: str) -> str:
    """The host (an IPv6 literal without brackets) of an address in canonical form."""
    return split_host_port(address)[0]


# -- underlay subnets -------------------------------------------------------------------------------------------------


def subnet(text: str, what: str = "subnet") -> Network:
    """An underlay subnet in CIDR notation (host bits may be set: 10.0.0.7/8 is 10.0.0.0/8)."""
    try:
        if not isinstance(text, str) or "/" not in text:
            raise ValueError
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise AddressError(f"{what} {short(str(text))} is not a subnet in CIDR notation (like 10.0.0.0/8)") from None

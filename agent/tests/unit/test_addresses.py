"""weft.addresses: every address an operator types is checked once, with one line that says what is wrong."""

from __future__ import annotations

import pytest

from weft.addresses import (
    AddressError,
    bind_address,
    host_name,
    ifname,
    overlay_cidr,
    overlay_cidrs,
    peer_address,
    subnet,
)

# -- peer addresses: HOST[:PORT] -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", "10.0.0.1:6783"),
        ("10.0.0.1:7000", "10.0.0.1:7000"),
        ("  host.example.com  ", "host.example.com:6783"),
        ("Host.Example.COM.", "host.example.com:6783"),
        ("host.example.com:1", "host.example.com:1"),
        ("host:65535", "host:65535"),
        ("h-1.x-y.example", "h-1.x-y.example:6783"),
        ("1host.example", "1host.example:6783"),
        ("[fd00::1]:7000", "[fd00::1]:7000"),
        ("[fd00::1]", "[fd00::1]:6783"),
        ("[FD00:0::1]", "[fd00::1]:6783"),
        ("fd00::1", "[fd00::1]:6783"),
        ("::1", "[::1]:6783"),
        ("a" * 63 + ".example", "a" * 63 + ".example:6783"),
        (".".join(["a" * 63] * 3) + "." + "b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61 + ":6783"),
    ],
)
def test_peer_addresses_are_accepted_in_canonical_form(text: str, expected: str) -> None:
    assert peer_address(text) == expected
    assert peer_address(expected) == expected  # canonical forms are stable


def test_the_default_port_is_the_one_given() -> None:
    assert peer_address("h", default_port=7777) == "h:7777"
    assert peer_address("h:1", default_port=7777) == "h:1"


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("host:", "port"),
        ("host:0", "port"),
        ("host:65536", "port"),
        ("host:http", "port"),
        ("host:-1", "port"),
        ("host:١٢", "port"),  # non-ASCII digits
        (":6783", "host"),
        ("a b:6783", "host"),
        ("[fd00::1", "]"),
        ("[fd00::1]7000", ":PORT"),
        ("[fd00::1]:x", "port"),
        ("[fd00::1]:99999", "port"),
        ("[10.0.0.1]:7000", "IPv6"),
        ("1:2:3", "HOST[:PORT]"),
        ("fd00::1::2", "HOST[:PORT]"),
        ("host:1:2", "HOST[:PORT]"),
        ("[]", "IPv6"),
        ("[]:6783", "IPv6"),
        ("999.1.1.1", "IPv4"),
        ("999.1.1.1:6783", "IPv4"),
        ("10.0.0.01", "IPv4"),
        ("1.2.3", "IPv4"),
        ("10", "IPv4"),
        ("a..b", "host name"),
        ("-a.example", "host name"),
        ("a-.example", "host name"),
        ("under_score.example", "host name"),
        ("exa mple.com", "spaces"),
        ("bücher.example", "xn--"),
        ("a" * 64 + ".example", "63"),
        (".".join(["a" * 63] * 4), "253"),
    ],
)
def test_bad_peer_addresses_are_refused_with_the_reason(text: str, mentions: str) -> None:
    with pytest.raises(AddressError) as info:
        peer_address(text)
    message = str(info.value)
    assert mentions in message
    assert "\n" not in message
    if text.strip() and len(text) <= 80:
        assert repr(text.strip()) in message  # the operator sees what was wrong


def test_a_300_character_host_gives_a_short_one_line_error() -> None:
    """Once accepted and dialled, this killed the dial with a UnicodeError and left the target 'connecting'."""
    with pytest.raises(AddressError) as info:
        peer_address("x" * 300)
    message = str(info.value)
    assert "300 characters" in message and "253" in message
    assert len(message) < 300 and "\n" not in message


def test_host_names_are_case_folded_and_literals_canonical() -> None:
    assert host_name("EXAMPLE.com") == "example.com"
    assert host_name("0:0::1") == "::1"
    assert host_name("192.168.1.1") == "192.168.1.1"


# -- addresses to listen on -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:6783", ("0.0.0.0", 6783)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        (":6782", ("", 6782)),
        ("[::]:6783", ("::", 6783)),
        ("localhost:6782", ("localhost", 6782)),
    ],
)
def test_bind_addresses(text: str, expected: tuple[str, int]) -> None:
    assert bind_address(text) == expected


@pytest.mark.parametrize("text", ["nowhere", "localhost", "0.0.0.0:99999", "300.0.0.1:80", "[::1]", ":x"])
def test_bad_bind_addresses_are_refused(text: str) -> None:
    with pytest.raises(AddressError):
        bind_address(text)


# -- overlay CIDRs (containers and the host) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.32.0.5/12", "10.32.0.5/12"),
        ("10.32.1.1/16", "10.32.1.1/16"),
        ("192.168.7.1/24", "192.168.7.1/24"),
        ("10.0.0.0/31", "10.0.0.0/31"),  # RFC 3021: both addresses of a /31 are hosts
        ("10.0.0.1/31", "10.0.0.1/31"),
        ("fd00::5/64", "fd00::5/64"),
        ("FD00:0::5/64", "fd00::5/64"),
        ("fd00::/127", "fd00::/127"),
        ("100.64.0.1/10", "100.64.0.1/10"),
    ],
)
def test_overlay_cidrs_accepted(text: str, expected: str) -> None:
    assert str(overlay_cidr(text)) == expected


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("10.32.0.5", "ADDRESS/PREFIXLEN"),
        ("10.32.0.5/33", "ADDRESS/PREFIXLEN"),
        ("banana/12", "ADDRESS/PREFIXLEN"),
        ("", "ADDRESS/PREFIXLEN"),
        ("224.0.0.5/4", "multicast"),
        ("239.1.2.3/8", "multicast"),
        ("127.0.0.2/8", "loopback"),
        ("0.0.0.0/0", "0.0.0.0/8"),
        ("0.0.0.1/8", "0.0.0.0/8"),
        ("169.254.1.1/16", "link-local"),
        ("255.255.255.255/8", "broadcast"),
        ("240.0.0.1/4", "reserved"),
        ("10.32.0.0/12", "network address"),
        ("10.47.255.255/12", "broadcast address"),
        ("192.168.7.0/24", "network address"),
        ("10.32.0.5/32", "/32"),
        ("::/0", "unspecified"),
        ("::1/128", "loopback"),
        ("ff02::1/64", "multicast"),
        ("fe80::1/64", "link-local"),
        ("::ffff:10.0.0.1/96", "IPv4-mapped"),
        ("fd00::5/128", "/128"),
        ("fd00::/64", "network address"),
    ],
)
def test_overlay_cidrs_refused_with_the_reason(text: str, mentions: str) -> None:
    with pytest.raises(AddressError) as info:
        overlay_cidr(text)
    assert mentions in str(info.value)
    assert "\n" not in str(info.value)


def test_overlay_cidrs_are_normalised_and_deduplicated() -> None:
    assert overlay_cidrs(["10.32.0.5/12", "10.32.0.5/12", "FD00::5/64"]) == ["10.32.0.5/12", "fd00::5/64"]
    with pytest.raises(AddressError):
        overlay_cidrs(["10.32.0.5/12", "224.0.0.1/4"])


# -- underlay subnets ----------------------------------------------------------------------------------------------


def test_subnets_allow_host_bits_and_refuse_non_cidrs() -> None:
    assert str(subnet("10.0.0.7/8")) == "10.0.0.0/8"
    assert str(subnet("fd00::1/64")) == "fd00::/64"
    for bad in ("10.0.0.0", "10.0.0.0/33", "x/8"):
        with pytest.raises(AddressError, match="CIDR"):
            subnet(bad)


# -- interface names -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ethwe", "e", "eth0.100", "a" * 15, "we-1_x", "x@y"])
def test_interface_names_accepted(name: str) -> None:
    assert ifname(name) == name


@pytest.mark.parametrize(
    ("name", "mentions"),
    [
        ("e%d", "'%'"),
        ("", "1-15"),
        ("a" * 16, "1-15"),
        (".", "1-15"),
        ("..", "1-15"),
        ("a/b", "'/'"),
        ("a:1", "':'"),
        ("a b", "' '"),
        ("a\tb", "'\\t'"),
        ("a\nb", "'\\n'"),
        ("a\x01", "'\\x01'"),
        ("eth\u00e9", "'\u00e9'"),
        (None, "string"),
        (7, "string"),
    ],
)
def test_bad_interface_names_refused_with_the_reason(name: object, mentions: str) -> None:
    with pytest.raises(AddressError) as info:
        ifname(name)
    assert mentions in str(info.value)
    assert "\n" not in str(info.value)

"""weft.addresses: overlay CIDRs and interface names are checked once, with one line that says what is wrong."""

from __future__ import annotations

import pytest

from weft.addresses import AddressError, ifname, overlay_cidr, overlay_cidrs

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

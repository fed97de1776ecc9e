"""weft.mesh.address: the underlay addresses of peers (HOST[:PORT], listen addresses, trusted subnets).

The peer-address cases are a table shared with the Ansible collection's standard-library twin
(plugins/module_utils/weft_api.py, tests/unit/plugins/module_utils/test_weft_api.py): both must agree on every one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from weft.mesh.address import (
    DEFAULT_PORT,
    AddressError,
    bind_address,
    host_name,
    host_of,
    join_host_port,
    peer_address,
    split_host_port,
    subnet,
)

CASES = json.loads((Path(__file__).parent / "data" / "peer_addresses.json").read_text())


def _id(case: dict[str, Any]) -> str:
    return repr(case["input"])[:40]


# -- peer addresses: HOST[:PORT] -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES["accepted"], ids=_id)
def test_peer_addresses_are_accepted_in_canonical_form(case: dict[str, Any]) -> None:
    port = case.get("default_port", DEFAULT_PORT)
    assert peer_address(case["input"], port) == case["canonical"]
    assert peer_address(case["canonical"], port) == case["canonical"]  # canonical forms are stable
    assert join_host_port(*split_host_port(case["canonical"])) == case["canonical"]


@pytest.mark.parametrize("case", CASES["refused"], ids=_id)
def test_bad_peer_addresses_are_refused_with_the_reason(case: dict[str, Any]) -> None:
    text = case["input"]
    with pytest.raises(AddressError) as info:
        peer_address(text)
    message = str(info.value)
    assert case["mentions"] in message
    assert "\n" not in message and len(message) < 300
    if text.strip() and len(text) <= 80:
        assert repr(text.strip()) in message  # the operator sees what was wrong


def test_host_names_are_case_folded_and_literals_canonical() -> None:
    assert host_name("EXAMPLE.com") == "example.com"
    assert host_name("0:0::1") == "::1"
    assert host_name("192.168.1.1") == "192.168.1.1"
    assert host_of("[fd00::1]:6783") == "fd00::1" and host_of("10.0.0.1:6783") == "10.0.0.1"


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


# -- underlay subnets ----------------------------------------------------------------------------------------------


def test_subnets_allow_host_bits_and_refuse_non_cidrs() -> None:
    assert str(subnet("10.0.0.7/8")) == "10.0.0.0/8"
    assert str(subnet("fd00::1/64")) == "fd00::/64"
    for bad in ("10.0.0.0", "10.0.0.0/33", "x/8"):
        with pytest.raises(AddressError, match="CIDR"):
            subnet(bad)

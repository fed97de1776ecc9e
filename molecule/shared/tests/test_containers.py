"""The demo container on every mesh host (playbooks/checks/containers.yml) reaches the one on every other host
through the overlay: inside a site, between the DCs, and to and from the VPC behind its NAT."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest
from conftest import DEMO_NETNS, MESH_HOSTS, eventually, mesh_host

pytestmark = pytest.mark.skipif(
    os.environ.get("WEFT_CONTAINERS", "0") != "1", reason="this scenario attaches no containers"
)
testinfra_hosts = MESH_HOSTS


def container_address(host) -> str:
    out = host.check_output(f"ip -json -4 -netns {DEMO_NETNS} addr show dev ethwe")
    return json.loads(out)[0]["addr_info"][0]["local"]


@pytest.fixture(scope="module")
def addresses() -> dict[str, str]:
    return {name: container_address(mesh_host(name)) for name in MESH_HOSTS}


def test_container_is_on_the_overlay(host):
    address = container_address(host)
    # Allocated by the agent from its ring (ipalloc_range, 10.32.0.0/12 by default)
    assert ipaddress.ip_address(address) in ipaddress.ip_network("10.32.0.0/12"), address
    link = json.loads(host.check_output(f"ip -json -netns {DEMO_NETNS} link show dev ethwe"))[0]
    assert "UP" in link["flags"]


def test_container_reaches_every_other_container(host, addresses):
    me = host.backend.get_hostname()

    def check():
        unreachable = [
            f"{name} ({address})"
            for name, address in sorted(addresses.items())
            if name != me and not host.run(f"ip netns exec {DEMO_NETNS} ping -c 1 -W 2 -q {address}").succeeded
        ]
        assert not unreachable, f"the container on {me} cannot reach {unreachable}"

    eventually(check, timeout=60)

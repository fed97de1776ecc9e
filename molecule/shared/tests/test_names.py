"""The podman container named after its host (playbooks/checks/named_containers.yml: a real runtime, through the CNI
plugin weft-cni) resolves every other one's name, HOST.weft.local, to that container's address, through its own
host's agent, and reaches it by name: inside a site, between the DCs, and to and from the VPC behind its NAT."""

from __future__ import annotations

import json
import os

import pytest
from conftest import MESH_HOSTS, eventually, mesh_host

pytestmark = pytest.mark.skipif(os.environ.get("WEFT_NAMES", "0") != "1", reason="this scenario names no containers")
testinfra_hosts = MESH_HOSTS
DOMAIN = "weft.local"
NETWORK = "weft"


def container_address(host, name: str) -> str:
    inspect = json.loads(host.check_output(f"podman container inspect {name}"))[0]
    assert inspect["State"]["Running"], f"the container {name} is not running"
    return inspect["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]


@pytest.fixture(scope="module")
def addresses() -> dict[str, str]:
    return {name: container_address(mesh_host(name), name) for name in MESH_HOSTS}


def test_the_container_resolves_through_its_agent(host):
    me = host.backend.get_hostname()
    resolv = host.check_output(f"podman exec {me} cat /etc/resolv.conf")
    assert "nameserver 169.254.53.53" in resolv and f"search {DOMAIN}" in resolv, resolv


def test_every_container_is_found_and_reached_by_name(host, addresses):
    me = host.backend.get_hostname()

    def check():
        wrong = []
        for name, address in sorted(addresses.items()):
            if name == me:
                continue
            fqdn = f"{name}.{DOMAIN}"
            found = host.run(f"podman exec {me} getent ahostsv4 {fqdn}").stdout.split()[:1]
            if found != [address]:
                wrong.append(f"{fqdn} is {found or 'not found'}, not {address}")
            elif not host.run(f"podman exec {me} ping -c 1 -W 2 -q {fqdn}").succeeded:
                wrong.append(f"{fqdn} ({address}) does not answer a ping")
        assert not wrong, f"from the container {me}: {'; '.join(wrong)}"

    eventually(check, timeout=60)

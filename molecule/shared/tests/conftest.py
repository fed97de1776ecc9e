"""Shared by the scenarios' testinfra checks (molecule verify): which hosts, and how to ask their agents.

molecule.yml sets WEFT_INVENTORY (inventories/lab), WEFT_MESH_GROUP (the scenario's mesh: `dc` or
`weft_mesh`), WEFT_CONTAINERS (1 when the scenario attached demo containers) and WEFT_NAMES (1 when it started
the podman containers named after their hosts).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import testinfra.utils.ansible_runner


def _plain(value):
    """ansible-core 2.19's `ansible-inventory --list` wraps values from inventory plugins (the aws_ec2 hosts'
    ansible_host, for one) as {"__ansible_unsafe": value}; testinfra 10 expects plain strings."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return _plain(value["__ansible_unsafe"])
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_get_ansible_inventory = testinfra.utils.ansible_runner.get_ansible_inventory
testinfra.utils.ansible_runner.get_ansible_inventory = lambda *a, **kw: _plain(_get_ansible_inventory(*a, **kw))

INVENTORY = os.environ.get("WEFT_INVENTORY", "inventories/lab")
MESH_GROUP = os.environ.get("WEFT_MESH_GROUP", "weft_mesh")
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY)
MESH_HOSTS = sorted(RUNNER.get_hosts(MESH_GROUP))
WEFT = "/opt/weft/current/bin/weft"
DEMO_NETNS = "weftdemo"


def mesh_host(name: str):
    """A testinfra host for an inventory name (ssh, as the inventory says)."""
    return RUNNER.get_host(name)


def weft_status(host) -> dict:
    """`weft status --json` from the host's agent."""
    return json.loads(host.check_output(f"{WEFT} status --json"))


def eventually(check, timeout: float = 60.0, delay: float = 2.0):
    """Run check() until it stops raising AssertionError, or re-raise the last one after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)


@pytest.fixture(scope="session")
def mesh_hosts() -> list[str]:
    assert MESH_HOSTS, f"no hosts in group {MESH_GROUP} of {INVENTORY}"
    return MESH_HOSTS

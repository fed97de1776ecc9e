"""Every mesh host runs the agent, and holds an established connection to every other mesh host."""

from __future__ import annotations

import pytest
from conftest import MESH_HOSTS, eventually, weft_status

testinfra_hosts = MESH_HOSTS


def test_agent_service_is_active_and_enabled(host):
    service = host.service("weft.service")
    assert service.is_running
    assert service.is_enabled


def test_secrets_are_root_only(host):
    secret = host.file("/etc/weft/secret-1")
    assert secret.exists
    assert secret.user == "root"
    assert secret.mode == 0o600


def test_agent_is_ready(host):
    assert weft_status(host)["ready"] is True


def test_sees_every_other_host_with_an_established_connection(host):
    me = host.backend.get_hostname()
    others = sorted(h for h in MESH_HOSTS if h != me)

    def check():
        status = weft_status(host)
        peers = {p.get("nickname") for p in status.get("peers") or []}
        established = {c.get("nickname") for c in status.get("connections") or [] if c.get("state") == "established"}
        missing = [h for h in others if h not in peers]
        unconnected = [h for h in others if h not in established]
        assert not missing, f"{me} does not know {missing}"
        assert not unconnected, f"{me} has no established connection to {unconnected}"

    eventually(check)


@pytest.mark.parametrize("unit", ["weft.service"])
def test_agent_has_not_been_restarting(host, unit):
    restarts = host.check_output(f"systemctl show -p NRestarts --value {unit}")
    assert restarts.strip() == "0"

"""The real site.yml, run by ansible-playbook: without secrets (undefined or misspelt) it fails before any host
is contacted, let alone changed. The hosts are dummies on a closed local port, so a task that reached a host
would show up as unreachable in the recap; the secret check runs on the controller and must come first."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .runner import inventory_and_env

ROOT = Path(__file__).resolve().parents[3]
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
HINT = "set it from Vault, or set weft_allow_unencrypted: true to run a plaintext mesh"

pytestmark = pytest.mark.skipif(not PLAYBOOK.exists(), reason="ansible-playbook is not installed next to python")


def site(tmp_path, hostvars, extra=()):
    """Run site.yml against dc1-a, dc1-b, dc2-a (nothing listens on 127.0.0.1:1); (rc, output, recap)."""
    hosts = {
        "dc1-a": {"weft_site": "dc1", "weft_advertise_address": "10.10.1.11"},
        "dc1-b": {"weft_site": "dc1", "weft_advertise_address": "10.10.1.12"},
        "dc2-a": {"weft_site": "dc2", "weft_advertise_address": "10.10.2.11"},
    }
    for name, values in hostvars.items():
        hosts[name].update(values)
    inventory = {
        "all": {
            "vars": {"ansible_host": "127.0.0.1", "ansible_port": 1, "ansible_user": "nobody"},
            "children": {"weft_mesh": {"hosts": hosts}},
        }
    }
    env = inventory_and_env(tmp_path, inventory)
    run = subprocess.run(
        [str(PLAYBOOK), "-i", str(tmp_path / "hosts.yml"), "site.yml", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = run.stdout + run.stderr
    recap = {
        m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        for m in re.finditer(r"^(\S+)\s+: (ok=.*)$", run.stdout, re.M)
    }
    return run.returncode, output, recap


def tasks_run(output):
    return re.findall(r"^TASK \[(?:weft\.mesh\.agent : )?(.*?)\] \*", output, re.M)


def assert_stopped_before_any_host(rc, output, recap):
    assert rc == 2, output
    assert set(recap) == {"dc1-a", "dc1-b", "dc2-a"}, output
    for counts in recap.values():
        assert counts["changed"] == 0 and counts["unreachable"] == 0, output
    # The last task is the check: nothing after it ran, on any host, and the mesh check never started.
    assert tasks_run(output)[-1] == "Check every host has mesh secrets, or allows a plaintext mesh", output
    assert "Check the Weft mesh is whole" not in output


def test_undefined_secrets_fail_before_any_host(tmp_path):
    rc, output, recap = site(tmp_path, {})
    assert_stopped_before_any_host(rc, output, recap)
    assert "weft_secrets is not set for dc1-a, dc1-b, dc2-a: " + HINT in output


def test_misspelt_secrets_fail_before_any_host(tmp_path):
    secret = "correct-horse-battery-staple"
    rc, output, recap = site(tmp_path, {h: {"weft_secert": [secret]} for h in ("dc1-a", "dc1-b", "dc2-a")})
    assert_stopped_before_any_host(rc, output, recap)
    assert (
        "weft_secrets is not set for dc1-a, dc1-b, dc2-a (weft_secert on dc1-a, weft_secert on dc1-b, weft_secert "
        "on dc2-a: misspelt?): " + HINT in output
    )
    assert secret not in output


def test_null_secrets_fail_before_any_host(tmp_path):
    # `weft_secrets:` with nothing after it is null: the argument spec refuses it on every host, first thing.
    rc, output, recap = site(tmp_path, {h: {"weft_secrets": None} for h in ("dc1-a", "dc1-b", "dc2-a")})
    assert rc == 2, output
    assert all(c["failed"] == 1 and c["changed"] == 0 and c["unreachable"] == 0 for c in recap.values()), output
    assert len(tasks_run(output)) == 1 and "argument 'weft_secrets' is of type NoneType" in output


def test_secrets_on_some_hosts_only(tmp_path):
    rc, output, recap = site(tmp_path, {"dc1-a": {"weft_secrets": ["0123456789abcdef"]}}, ["-vvv"])
    assert_stopped_before_any_host(rc, output, recap)
    assert "weft_secrets is not set for dc1-b, dc2-a: " in output
    assert "0123456789abcdef" not in output


def test_allowed_plaintext_gets_past_the_check(tmp_path):
    # With the flag the play goes on to look at the hosts, which here cannot be reached: the check was the stop.
    rc, output, recap = site(tmp_path, {}, ["-e", "weft_allow_unencrypted=true"])
    assert rc == 4, output
    assert tasks_run(output)[-1] == "Look for systemd and weft_python on the host", output
    assert all(counts["unreachable"] == 1 and counts["changed"] == 0 for counts in recap.values()), output


def test_a_restart_batch_of_zero_fails_before_any_host(tmp_path):
    """Ansible reads serial 0 as every host at once: site.yml must refuse it before changing anything."""
    hostvars = {h: {"weft_allow_unencrypted": True} for h in ("dc1-a", "dc1-b", "dc2-a")}
    rc, output, recap = site(tmp_path, hostvars, ["-e", "weft_upgrade_serial=0"])
    assert rc == 2, output
    for counts in recap.values():
        assert counts["changed"] == 0 and counts["unreachable"] == 0, output
    assert tasks_run(output)[-1] == "Check the restart batches", output
    assert "weft_upgrade_serial 0: each restart batch must be a host count of at least 1" in output

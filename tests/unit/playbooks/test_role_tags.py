"""The role's phases by tag, as `ansible-playbook site.yml --list-tasks --tags ...` sees them: install (wheelhouse
and venv), config (configuration, secrets, firewall), service (unit, start), firewall alone. The pre-flight checks
run with any tags, the wait for readiness with every phase that can reload or restart, and the mesh check after
all of them. Task names are read from the role's task files, so a task added to a phase is checked too."""

import functools
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from .runner import inventory_and_env

ROOT = Path(__file__).resolve().parents[3]
TASKS = ROOT / "roles" / "agent" / "tasks"
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
# Task files the role includes (skipped whole on most runs), by the name of the task that includes them.
INCLUDED = {
    "absent.yml": "Remove the agent",
    "install.yml": "Install the agent into its versioned venv",
    "firewall.yml": "Open the agent's ports in the host's firewall",
    "check_config.yml": "Check the configuration with the agent's parser (check mode)",
}

pytestmark = pytest.mark.skipif(not PLAYBOOK.exists(), reason="ansible-playbook is not installed next to python")


def task_names(filename, skip_tag=None):
    """Names of the tasks in a task file, in blocks too (not their rescue and always sections, which
    --list-tasks does not show); without those tagged skip_tag (themselves or by their block). A file included
    dynamically (include_tasks) shows in --list-tasks as its include task: that name stands for it."""
    if filename in INCLUDED:
        return [INCLUDED[filename]]
    names = []

    def walk(tasks, inherited):
        for task in tasks or []:
            tags = inherited | set(task.get("tags") or [])
            if "block" in task:
                walk(task["block"], tags)
            elif skip_tag not in tags and "ansible.builtin.include_tasks" not in task:
                names.append(task["name"])

    walk(yaml.safe_load((TASKS / filename).read_text()), set())
    return names


@functools.lru_cache(maxsize=None)
def listed(*args):
    """{play name: [task names]} from --list-tasks, the role's prefix taken off."""
    tmp_path = Path(tempfile.mkdtemp(prefix="weft-tags-"))
    inventory = {
        "weft_mesh": {
            "vars": {"ansible_host": "127.0.0.1", "ansible_port": 1},
            "hosts": {
                "node-1": {"weft_site": "one", "weft_advertise_address": "192.0.2.1"},
                "node-2": {"weft_site": "two", "weft_advertise_address": "192.0.2.2"},
            },
        }
    }
    env = inventory_and_env(tmp_path, inventory)
    try:
        run = subprocess.run(
            [str(PLAYBOOK), "-i", str(tmp_path / "hosts.yml"), "site.yml", "--list-tasks", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert run.returncode == 0, run.stdout + run.stderr
    plays, tasks = {}, None
    for line in run.stdout.splitlines():
        if m := re.match(r"\s+play #\d+ \([^)]*\): (.*?)\tTAGS:", line):
            tasks = plays.setdefault(m.group(1), [])
        elif tasks is not None and (m := re.match(r"\s{6}(?:weft\.mesh\.agent : )?(.*?)\tTAGS: ", line)):
            tasks.append(m.group(1))
    return plays


def role_tasks(plays):
    return plays["Converge the Weft agents"]


def mesh_check(plays):
    return plays["Check the Weft mesh is whole"]


@pytest.mark.parametrize("tag", ["install", "config", "service", "firewall"])
def test_checks_run_with_any_tag(tag):
    plays = listed("--tags", tag)
    tasks = role_tasks(plays)
    for name in task_names("validate.yml"):
        assert name in tasks, f"{name!r} (validate.yml) does not run with --tags {tag}"
    assert mesh_check(plays), f"the mesh check does not run with --tags {tag}"


def test_tags_config_runs_configure_and_the_wait_but_installs_nothing():
    tasks = role_tasks(listed("--tags", "config"))
    for filename in ("configure.yml", "firewall.yml", "ready.yml"):
        for name in task_names(filename):
            assert name in tasks, f"{name!r} ({filename}) does not run with --tags config"
    assert "Apply configuration changes" in tasks
    # What install and service do is left alone; only their facts (tagged always) are gathered.
    for filename in ("wheelhouse.yml", "install.yml", "service.yml", "absent.yml"):
        for name in task_names(filename, skip_tag="always"):
            assert name not in tasks, f"{name!r} ({filename}) runs with --tags config"


def test_tags_install_and_service_keep_to_their_phase():
    install = role_tasks(listed("--tags", "install"))
    service = role_tasks(listed("--tags", "service"))
    for name in task_names("wheelhouse.yml") + task_names("install.yml"):
        assert name in install
    for name in task_names("service.yml") + task_names("ready.yml"):
        assert name in service
    for name in task_names("configure.yml", skip_tag="always"):
        assert name not in install and name not in service


def test_tags_firewall_runs_the_firewall_only():
    tasks = role_tasks(listed("--tags", "firewall"))
    assert set(task_names("firewall.yml")) <= set(tasks)
    for filename in ("configure.yml", "install.yml", "service.yml", "ready.yml"):
        for name in task_names(filename, skip_tag="always"):
            assert name not in tasks, f"{name!r} ({filename}) runs with --tags firewall"


def test_untagged_run_has_every_phase():
    tasks = role_tasks(listed())
    for filename in ("validate.yml", "absent.yml", "wheelhouse.yml", "install.yml", "configure.yml", "firewall.yml"):
        for name in task_names(filename):
            assert name in tasks, f"{name!r} ({filename}) is missing from an untagged run"

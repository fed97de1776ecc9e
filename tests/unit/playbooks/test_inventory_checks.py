"""The role's checks of the inventory and of the hosts, run by ansible-playbook for real:

- a duplicate address, sites whose hosts disagree, or an address that does not parse fail the real site.yml on
  the controller before any host is contacted (the hosts are dummies on a closed port, as in
  test_site_preflight.py), whatever --limit leaves out;
- a host without weft_python or systemd fails the play at the first step on the host, before any change (the
  hosts are this machine, through the local connection, with a weft_python that does not exist);
- a run limited to a host new to the mesh says which hosts outside the limit keep stale peer lists (the task
  is taken from validate.yml and run against facts set as validate.yml sets them);
- check mode validates the configuration with the agent's parser on the host (configure.yml's check-mode block
  against this machine, with this venv as the installed agent), as a real run's template `validate` does.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .runner import inventory_and_env

ROOT = Path(__file__).resolve().parents[3]
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
SECRET = "correct-horse-battery-staple"
CHECK = "Check the mesh's addresses and sites in the inventory"

pytestmark = pytest.mark.skipif(not PLAYBOOK.exists(), reason="ansible-playbook is not installed next to python")


def playbook(tmp_path, inventory, argv, playbook_file="site.yml", env=()):
    """Run ansible-playbook from the repository root; (rc, output with white space folded, recap, tasks run)."""
    environment = inventory_and_env(tmp_path, inventory, **dict(env))
    run = subprocess.run(
        [str(PLAYBOOK), "-i", str(tmp_path / "hosts.yml"), str(playbook_file), *argv],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    recap = {
        m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        for m in re.finditer(r"^(\S+)\s+: (ok=.*)$", run.stdout, re.M)
    }
    tasks = re.findall(r"^TASK \[(?:[\w.]+ : )?(.*?)\] \*", run.stdout, re.M)
    # Messages come back folded over lines (the YAML result format): one space for any run of white space.
    return run.returncode, " ".join((run.stdout + run.stderr).split()), recap, tasks


# --- On the controller, before any host ---------------------------------------------------------------------

MESH = {
    "dc1-a": {"weft_site": "dc1", "weft_advertise_address": "10.10.1.11", "weft_trusted_subnets": ["10.10.1.0/24"]},
    "dc1-b": {"weft_site": "dc1", "weft_advertise_address": "10.10.1.12", "weft_trusted_subnets": ["10.10.1.0/24"]},
    "dc2-a": {"weft_site": "dc2", "weft_advertise_address": "10.10.2.11", "weft_trusted_subnets": ["10.10.2.0/24"]},
}


def unreachable_mesh(**changes):
    """The three hosts on a closed local port, with secrets; changes: {host: {variable: value}}."""
    hosts = {name: dict(values, **changes.get(name.replace("-", "_"), {})) for name, values in MESH.items()}
    return {
        "all": {
            "vars": {
                "ansible_host": "127.0.0.1",
                "ansible_port": 1,
                "ansible_user": "nobody",
                "weft_secrets": [SECRET],
            },
            "children": {"weft_mesh": {"hosts": hosts}},
        }
    }


def assert_stopped_on_the_controller(rc, output, recap, tasks, hosts=("dc1-a", "dc1-b", "dc2-a")):
    assert rc == 2, output
    assert set(recap) == set(hosts), output
    for counts in recap.values():
        assert counts["changed"] == 0 and counts["unreachable"] == 0, output
    assert tasks[-1] == CHECK, output
    assert "Check the Weft mesh is whole" not in output
    assert SECRET not in output


def test_the_mesh_as_given_gets_past_the_checks(tmp_path):
    rc, output, recap, tasks = playbook(tmp_path, unreachable_mesh(), [])
    assert rc == 4, output
    assert CHECK in tasks and tasks[-1] == "Look for systemd and weft_python on the host", output
    assert all(counts["unreachable"] == 1 for counts in recap.values()), output


def test_a_duplicate_address_fails_before_any_host(tmp_path):
    rc, output, recap, tasks = playbook(tmp_path, unreachable_mesh(dc1_b={"weft_advertise_address": "10.10.1.11"}), [])
    assert_stopped_on_the_controller(rc, output, recap, tasks)
    assert "dc1-a and dc1-b both advertise 10.10.1.11:6783: give each host its own weft_advertise_address" in output


def test_a_clash_with_a_host_outside_the_limit_counts(tmp_path):
    # serial batches and --limit judge the whole mesh group: dc1-b is not in the run, its address still clashes.
    inventory = unreachable_mesh(dc2_a={"weft_public_address": "10.10.1.12"})
    rc, output, recap, tasks = playbook(tmp_path, inventory, ["--limit", "dc1-a"])
    assert_stopped_on_the_controller(rc, output, recap, tasks, hosts=["dc1-a"])
    assert "would dial dc1-b and dc2-a both at 10.10.1.12:6783" in output


def test_a_site_that_disagrees_fails_before_any_host(tmp_path):
    inventory = unreachable_mesh(dc1_b={"weft_trusted_subnets": ["10.10.0.0/16"]})
    rc, output, recap, tasks = playbook(tmp_path, inventory, [])
    assert_stopped_on_the_controller(rc, output, recap, tasks)
    assert (
        "the hosts of site dc1 disagree on weft_trusted_subnets (dc1-a has [10.10.1.0/24]; dc1-b has "
        "[10.10.0.0/16]): set it once for the site, in its group_vars" in output
    )


def test_hosts_that_disagree_on_the_address_range_fail_before_any_host(tmp_path):
    inventory = unreachable_mesh(dc2_a={"weft_ipalloc_range": "10.40.0.0/16"})
    rc, output, recap, tasks = playbook(tmp_path, inventory, ["--limit", "dc1-a"])
    assert_stopped_on_the_controller(rc, output, recap, tasks, hosts=["dc1-a"])
    assert (
        "hosts disagree on weft_ipalloc_range (dc1-a, dc1-b have 10.32.0.0/12; dc2-a has 10.40.0.0/16): set it "
        "once for the whole mesh, in group_vars/all (peers refuse a ring of another range)" in output
    )


def test_a_bad_address_given_as_an_extra_variable_fails_before_any_host(tmp_path):
    rc, output, recap, tasks = playbook(tmp_path, unreachable_mesh(), ["-e", '{"weft_extra_peers": ["10.0.0.9:x"]}'])
    assert_stopped_on_the_controller(rc, output, recap, tasks)
    for host in MESH:
        assert '%s: weft_extra_peers "10.0.0.9:x" is not HOST[:PORT]' % host in output


# --- On the host, first thing -------------------------------------------------------------------------------


def local_mesh(tmp_path, **values):
    """Two hosts that are this machine (local connection, no become), with the role's paths in tmp_path."""
    common = {
        "ansible_connection": "local",
        "ansible_become": False,
        "ansible_python_interpreter": sys.executable,
        "weft_secrets": [SECRET],
        "weft_config_dir": str(tmp_path / "etc"),
        "weft_install_dir": str(tmp_path / "opt"),
        "weft_state_dir": str(tmp_path / "state"),
        "weft_wheelhouse_cache": str(tmp_path / "cache"),
        **values,
    }
    hosts = {"dc1-a": dict(MESH["dc1-a"]), "dc2-a": dict(MESH["dc2-a"])}
    return {"all": {"vars": common, "children": {"weft_mesh": {"hosts": hosts}}}}


def test_a_host_without_python_stops_the_play_before_any_change(tmp_path):
    missing = tmp_path / "no" / "python3"
    rc, output, recap, tasks = playbook(tmp_path, local_mesh(tmp_path, weft_python=str(missing)), [])
    assert rc == 2, output
    assert tasks[-1] == "Check the host has systemd and weft_python", output
    assert all(c["failed"] == 1 and c["changed"] == 0 for c in recap.values()), output
    for host in ("dc1-a", "dc2-a"):
        assert "%s has no %s: install python3 (apt install python3) or set weft_python" % (host, missing) in output
        systemd = "%s does not run systemd (no /run/systemd/system)" % host
        assert (systemd in output) != os.path.isdir("/run/systemd/system"), output
    assert not (tmp_path / "etc").exists() and not (tmp_path / "opt").exists()
    assert "Check the Weft mesh is whole" not in output


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="this machine runs systemd")
def test_a_host_without_systemd_stops_the_play_before_any_change(tmp_path):
    rc, output, recap, tasks = playbook(tmp_path, local_mesh(tmp_path, weft_python=sys.executable), ["--check"])
    assert rc == 2, output
    assert tasks[-1] == "Check the host has systemd and weft_python", output
    assert "dc1-a does not run systemd (no /run/systemd/system): the agent runs as a systemd service" in output
    assert "has no " + sys.executable not in output
    assert all(c["changed"] == 0 for c in recap.values()), output


# --- --limit ------------------------------------------------------------------------------------------------

STALE_TASK = "Warn about peer lists left stale outside --limit"


def validate_task(name):
    tasks = yaml.safe_load((ROOT / "roles" / "agent" / "tasks" / "validate.yml").read_text())
    (task,) = [t for t in tasks if t.get("name") == name]
    return task


def stale_run(tmp_path, argv, serial=None):
    """validate.yml's warning, after the facts validate.yml records: dc1-c is new, the others run the agent."""
    play = {
        "name": "Pretend validate.yml read the hosts",
        "hosts": "weft_mesh",
        "gather_facts": False,
        "vars": {"weft_mesh_group": "weft_mesh"},
        "tasks": [
            {
                "name": "Record what validate.yml records",
                "ansible.builtin.set_fact": {
                    "_weft_preflight": {"present": "{{ test_state | default('present') == 'present' }}"},
                    "_weft_old_config": "{{ {'skipped': true} if test_state | default('present') == 'absent' "
                    "else ({'failed': false, 'msg': 'file not found'} if test_new | default(false) "
                    "else {'content': 'e30K', 'encoding': 'base64'}) }}",
                },
            },
            validate_task(STALE_TASK),
        ],
    }
    if serial is not None:
        play["serial"] = serial
    (tmp_path / "play.yml").write_text(yaml.safe_dump([play], sort_keys=False))
    hosts = {name: dict(values) for name, values in MESH.items()}
    hosts["dc1-c"] = {"weft_site": "dc1", "weft_advertise_address": "10.10.1.13", "test_new": True}
    inventory = {
        "all": {"vars": {"ansible_host": "127.0.0.1", "ansible_port": 1}, "children": {"weft_mesh": {"hosts": hosts}}}
    }
    return playbook(tmp_path, inventory, argv, playbook_file=tmp_path / "play.yml")


def test_a_limit_to_a_new_host_names_the_stale_ones(tmp_path):
    rc, output, recap, tasks = stale_run(tmp_path, ["--limit", "dc1-c,dc1-a"])
    assert rc == 0, output
    assert tasks[-1] == STALE_TASK, output
    assert (
        "dc1-b, dc2-a are outside --limit and will still list the old peers (dc1-c is new to the mesh): after this "
        "run, run site.yml --limit dc1-b,dc2-a (a reload, no restart)" in output
    )
    assert set(recap) == {"dc1-a", "dc1-c"}, output


def test_nothing_stale_says_nothing(tmp_path):
    for argv in (["--limit", "dc1-a,dc2-a"], []):
        rc, output, _recap, _tasks = stale_run(tmp_path, argv)
        assert rc == 0, output
        assert "will still list the old peers" not in output, output


def test_serial_batches_are_not_outside(tmp_path):
    rc, output, _recap, _tasks = stale_run(tmp_path, [], serial=1)
    assert rc == 0, output
    assert "will still list the old peers" not in output, output


def test_a_removed_host_is_named(tmp_path):
    rc, output, _recap, _tasks = stale_run(tmp_path, ["--limit", "dc2-a", "-e", "test_state=absent"])
    assert rc == 0, output
    assert (
        "dc1-a, dc1-b, dc1-c are outside --limit and will still list the old peers (dc2-a is removed): after this "
        "run, take dc2-a out of the inventory (or of the mesh group), then run site.yml --limit dc1-a,dc1-b,dc1-c"
        in output
    )


# --- Check mode ---------------------------------------------------------------------------------------------


def venv_has_the_agent():
    probe = subprocess.run([sys.executable, "-c", "import weft.config"], capture_output=True, check=False)
    return probe.returncode == 0


CHECK_MODE_BLOCK = "Check the configuration with the agent's parser (check mode)"


def check_configure(tmp_path, agent, **values):
    """The check-mode block (check_config.yml, included by configure.yml) in check mode against this machine;
    agent: None, or the venv to install as `current`. The block runs in a copy of the role (its defaults, vars
    and templates) that holds nothing else, so what the rest of configure.yml needs from the host does not
    matter here."""
    role = tmp_path / "roles" / "weft_check_mode"
    (role / "tasks").mkdir(parents=True)
    for part in ("defaults", "vars", "templates"):
        shutil.copytree(ROOT / "roles" / "agent" / part, role / part)
    check_config = yaml.safe_load((ROOT / "roles" / "agent" / "tasks" / "check_config.yml").read_text())
    (block,) = [task for task in check_config if task.get("name") == CHECK_MODE_BLOCK]
    (role / "tasks" / "main.yml").write_text(yaml.safe_dump([block], sort_keys=False))
    install = tmp_path / "opt"
    install.mkdir()
    if agent is not None:
        (install / "current").symlink_to(agent)
    host_tmp = tmp_path / "host-tmp"
    host_tmp.mkdir()
    play = [{"name": "Configure in check mode", "hosts": "target", "gather_facts": False, "roles": ["weft_check_mode"]}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play))
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "weft_config_dir": str(tmp_path / "etc"),
        "weft_install_dir": str(install),
        "weft_peers": ["10.10.1.12"],
        "weft_secrets": [],
        **values,
    }
    inventory = {"all": {"hosts": {"target": host}}}
    # The venv of the version to install: not there.
    argv = ["--check", "--diff", "-e", "_weft_venv=%s" % (install / "9.9.9")]
    env = {"TMPDIR": str(host_tmp), "ANSIBLE_ROLES_PATH": str(tmp_path / "roles")}
    result = playbook(tmp_path, inventory, argv, tmp_path / "play.yml", env=env)
    return (*result, host_tmp)


def test_check_mode_without_an_agent_says_validation_waits(tmp_path):
    rc, output, _recap, _tasks, host_tmp = check_configure(tmp_path, None, weft_mtu=90000)
    assert rc == 0, output
    assert "target has no agent installed yet: its weft.yaml is checked by the agent" in output
    assert "parser when a real run installs it" in output
    assert list(host_tmp.iterdir()) == []


@pytest.mark.skipif(not venv_has_the_agent(), reason="the agent is not installed in this venv")
def test_check_mode_refuses_what_the_agent_refuses(tmp_path):
    venv = Path(sys.executable).parent.parent
    rc, output, _recap, tasks, host_tmp = check_configure(tmp_path, venv, weft_mtu=90000)
    assert rc == 2, output
    assert tasks[-2:] == ["Check the agent would accept the configuration", "Remove the temporary file"], output
    assert "the weft.yaml a real run would write on target is refused by the agent's parser" in output
    assert "mtu: must be at most 9000" in output
    assert list(host_tmp.iterdir()) == [], "the temporary file was left behind"
    assert not (tmp_path / "etc").exists()


@pytest.mark.skipif(not venv_has_the_agent(), reason="the agent is not installed in this venv")
def test_datapath_workers_reach_the_agents_parser(tmp_path):
    venv = Path(sys.executable).parent.parent
    rc, output, _recap, _tasks, _host_tmp = check_configure(tmp_path / "many", venv, weft_datapath_workers=17)
    assert rc == 2, output
    assert "datapath_workers: must be at most 16" in output
    # A typo reaches the parser as typed, not as the 0 Jinja's int filter would make of it.
    rc, output, _recap, _tasks, _host_tmp = check_configure(tmp_path / "typo", venv, weft_datapath_workers="four")
    assert rc == 2, output
    assert "datapath_workers: must be an integer" in output
    rc, output, _recap, _tasks, _host_tmp = check_configure(tmp_path / "two", venv, weft_datapath_workers=2)
    assert rc == 0, output


@pytest.mark.skipif(not venv_has_the_agent(), reason="the agent is not installed in this venv")
def test_check_mode_passes_what_the_agent_accepts(tmp_path):
    venv = Path(sys.executable).parent.parent
    rc, output, _recap, tasks, host_tmp = check_configure(tmp_path, venv, weft_mtu=1400)
    assert rc == 0, output
    assert "Read it with the agent's parser" in tasks, output
    assert list(host_tmp.iterdir()) == []
    assert not (tmp_path / "etc").exists()
    # The check's own steps report no change.
    for name in (
        "Make a temporary file for the configuration",
        "Render the configuration into it",
        "Read it with the agent's parser",
        "Remove the temporary file",
    ):
        block = output.split("TASK [weft_check_mode : %s]" % name, 1)[1].split("TASK [", 1)[0]
        assert "changed:" not in block, output

"""validate.yml's decision on the mesh's first address ring, run by ansible-playbook for real: the tasks are taken
from validate.yml and run after facts set as validate.yml sets them, on hosts that are this machine (local
connection), each with its own configuration directory in tmp_path:

- a fresh mesh: every host gets seed= the group's pinned names;
- --limit to a host new to a running mesh: the hosts outside the limit are read (delegated), and the new host gets
  the seed they run with, not the group's;
- the same with the hosts outside unreachable: the play stops and says what to do;
- a run where every host is being removed (reset.yml and decommission.yml use the role with weft_state absent)
  decides nothing and reads nothing.
"""

import re
import sys
from pathlib import Path

import pytest
import yaml

from ansible_collections.weft.mesh.plugins.filter.ipam import weft_peer_name

from .test_inventory_checks import PLAYBOOK, playbook

ROOT = Path(__file__).resolve().parents[3]
TASKS = [
    "Decide how the mesh's first address ring comes about",
    "Read how the mesh's hosts outside this run started their address ring",
    "Decide again with what the hosts outside this run have",
    "Check the mesh's first address ring can be decided",
    "Warn about the address ring",
]
HOSTS = ["dc1-a", "dc1-b", "dc2-a"]

pytestmark = pytest.mark.skipif(not PLAYBOOK.exists(), reason="ansible-playbook is not installed next to python")


def run(tmp_path, argv, configs=None, unreachable=(), state="present"):
    """The IPAM tasks of validate.yml; configs: {host: weft.yaml settings} of the hosts that run the agent."""
    configs = configs or {}
    validate = yaml.safe_load((ROOT / "roles" / "agent" / "tasks" / "validate.yml").read_text())
    tasks = [t for t in validate if t.get("name") in TASKS]
    assert [t["name"] for t in tasks] == TASKS
    read = tasks[1]["ansible.builtin.include_tasks"]
    read["file"] = str(ROOT / "roles" / "agent" / "tasks" / read["file"])
    role_vars = yaml.safe_load((ROOT / "roles" / "agent" / "vars" / "main.yml").read_text())
    play = {
        "name": "The IPAM part of validate.yml",
        "hosts": "weft_mesh",
        "gather_facts": False,
        "vars": {
            "weft_mesh_group": "weft_mesh",
            "weft_ipalloc_init": "",
            "_weft_mesh_hosts": "{{ groups['weft_mesh'] }}",
            "_weft_ipalloc_init": role_vars["_weft_ipalloc_init"],
        },
        "tasks": [
            {
                "name": "Record what validate.yml records for every host",
                "ansible.builtin.set_fact": {
                    "_weft_preflight": {"present": "{{ weft_state | default('present') == 'present' }}"},
                },
            },
            {
                "name": "Record what validate.yml reads from a host the agent is to run on",
                "ansible.builtin.set_fact": {
                    "_weft_old_config": "{{ {'content': lookup('ansible.builtin.file', weft_config_dir ~ "
                    "'/weft.yaml') | b64encode} if (weft_config_dir ~ '/weft.yaml') is exists "
                    "else {'msg': 'no weft.yaml'} }}",
                },
                "when": "weft_state | default('present') == 'present'",
            },
            *tasks,
            {
                "name": "Say what this host is given",
                "ansible.builtin.debug": {"msg": "GIVEN {{ inventory_hostname }} {{ _weft_ipalloc_init }}"},
                "when": "weft_state | default('present') == 'present'",
            },
        ],
    }
    (tmp_path / "play.yml").write_text(yaml.safe_dump([play], sort_keys=False))
    hosts = {}
    for host in HOSTS:
        directory = tmp_path / host
        directory.mkdir(exist_ok=True)
        if host in configs:
            (directory / "weft.yaml").write_text(yaml.safe_dump(configs[host]))
        hosts[host] = {"weft_config_dir": str(directory), "weft_state": state}
        if host in unreachable:
            hosts[host].update(ansible_connection="ssh", ansible_host="127.0.0.1", ansible_port=1)
    inventory = {
        "all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
            "children": {"weft_mesh": {"hosts": hosts}},
        }
    }
    rc, output, recap, tasks_run = playbook(tmp_path, inventory, argv, playbook_file=tmp_path / "play.yml")
    given = dict(re.findall(r"GIVEN (\S+) (\S*)", output))
    return rc, output, recap, tasks_run, given


def seed(hosts):
    return "seed=" + ",".join(sorted(weft_peer_name(h) for h in hosts))


def test_a_fresh_mesh_is_seeded_by_the_group(tmp_path):
    rc, output, _recap, _tasks, given = run(tmp_path, [])
    assert rc == 0, output
    assert given == {h: seed(HOSTS) for h in HOSTS}, output
    assert "Read how the mesh's hosts outside this run" in output and "skipping" in output


def test_a_host_new_to_a_running_mesh_gets_its_seed_read_from_outside_the_limit(tmp_path):
    running = {"ipalloc_init": seed(["dc1-a", "dc1-b"]), "ipalloc_range": "10.32.0.0/12"}
    rc, output, _recap, _tasks, given = run(
        tmp_path, ["--limit", "dc2-a"], configs={"dc1-a": running, "dc1-b": running}
    )
    assert rc == 0, output
    assert given == {"dc2-a": seed(["dc1-a", "dc1-b"])}, output


def test_a_host_new_to_a_mesh_that_cannot_be_read_stops(tmp_path):
    running = {"ipalloc_init": seed(["dc1-a", "dc1-b"])}
    rc, output, recap, tasks, _given = run(
        tmp_path, ["--limit", "dc2-a"], configs={"dc1-a": running, "dc1-b": running}, unreachable=["dc1-a", "dc1-b"]
    )
    assert rc == 2, output
    assert tasks[-1] == "Check the mesh's first address ring can be decided", output
    assert "cannot tell whether the mesh has an address ring already: dc1-a, dc1-b could not be read" in output
    assert "set weft_ipalloc_init (for a new mesh: %s)" % seed(HOSTS) in output
    assert recap["dc2-a"]["changed"] == 0


def test_one_readable_host_outside_is_enough(tmp_path):
    running = {"ipalloc_init": seed(["dc1-a", "dc1-b"])}
    rc, output, _recap, _tasks, given = run(
        tmp_path, ["--limit", "dc2-a"], configs={"dc1-a": running, "dc1-b": running}, unreachable=["dc1-a"]
    )
    assert rc == 0, output
    assert given == {"dc2-a": seed(["dc1-a", "dc1-b"])}, output


def test_a_run_that_only_removes_hosts_decides_nothing(tmp_path):
    rc, output, recap, _tasks, given = run(tmp_path, ["--limit", "dc2-a"], state="absent")
    assert rc == 0, output
    assert given == {} and "'item' is undefined" not in output
    assert recap["dc2-a"]["failed"] == 0

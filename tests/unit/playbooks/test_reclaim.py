"""playbooks/reclaim.yml (the end of site.yml) run by ansible-playbook for real, against fake agents (one unix
socket per host, tests/unit/plugins/modules/fake_agent.py) on hosts that are this machine:

- a ring owner that is no inventory host and that every agent sees unreachable is reclaimed once, from the first
  host of the mesh, and the next run changes nothing;
- one that some agent still reaches is a warning, and nothing changes;
- check mode says what it would reclaim and changes nothing;
- weft_reclaim_ignore and weft_reclaim: false leave it alone.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ansible_collections.weft.mesh.plugins.filter.ipam import weft_peer_name

from ..plugins.modules.fake_agent import FakeAgent
from .runner import inventory_and_env

ROOT = Path(__file__).resolve().parents[3]
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
HOSTS = ["dc1-a", "dc1-b", "dc2-a"]
GONE = "02:5e:91:0c:7a:13"
TAKE_OVER = "Take over the ranges of hosts that left the inventory"

pytestmark = pytest.mark.skipif(not PLAYBOOK.exists(), reason="ansible-playbook is not installed next to python")


@pytest.fixture
def agents():
    """A fake agent per host, each with the same ring: the three hosts and aws-c (gone, unreachable)."""
    directory = tempfile.mkdtemp(prefix="weft-ut-")
    found = {}
    for host in HOSTS:
        agent = FakeAgent(os.path.join(directory, host + ".sock"))
        others = [(weft_peer_name(h), h, 100, True) for h in HOSTS if h != host]
        agent.ring((weft_peer_name(host), host, 100, True), *others, (GONE, "aws-c", 300, False))
        agent.start()
        found[host] = agent
    yield found
    for agent in found.values():
        agent.stop()
    os.rmdir(directory)


def run(tmp_path, agents, *argv):
    inventory = {
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_become": False,
                "ansible_python_interpreter": sys.executable,
            },
            "children": {"weft_mesh": {"hosts": {h: {"weft_api_socket": a.path} for h, a in agents.items()}}},
        }
    }
    env = inventory_and_env(tmp_path, inventory)
    done = subprocess.run(
        [str(PLAYBOOK), "-i", str(tmp_path / "hosts.yml"), "playbooks/reclaim.yml", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    recap = {
        m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        for m in re.finditer(r"^(\S+)\s+: (ok=.*)$", done.stdout, re.M)
    }
    return done.returncode, " ".join((done.stdout + done.stderr).split()), recap


def rmpeers(agents):
    return {h: [r[2] for r in a.changes() if r[1] == "/rmpeer"] for h, a in agents.items()}


def test_a_host_gone_everywhere_is_reclaimed_once_from_the_first_host(tmp_path, agents):
    rc, output, recap = run(tmp_path, agents)
    assert rc == 0, output
    assert rmpeers(agents) == {"dc1-a": [{"peers": [GONE], "force": False}], "dc1-b": [], "dc2-a": []}
    assert recap["dc1-a"]["changed"] == 1 and recap["dc1-b"]["changed"] == recap["dc2-a"]["changed"] == 0, output
    assert "dc1-a takes over the ranges of %s(aws-c) (300 addresses)" % GONE in output
    # dc1-b and dc2-a still list it (the fake agents do not gossip); dc1-a's ring says it owns nothing now.
    rc, output, recap = run(tmp_path, agents)
    assert rc == 0, output
    assert all(counts["changed"] == 0 for counts in recap.values()), output
    assert len(rmpeers(agents)["dc1-a"]) == 1  # the module saw nothing to reclaim and did not ask


def test_a_peer_still_reachable_somewhere_is_a_warning(tmp_path, agents):
    agents["dc2-a"].ipam["peers"][-1]["reachable"] = True
    rc, output, recap = run(tmp_path, agents)
    assert rc == 0, output
    assert all(counts["changed"] == 0 for counts in recap.values()), output
    assert "%s(aws-c) owns 300 addresses of the ring and is no inventory host, but dc2-a reaches it" % GONE in output
    assert rmpeers(agents) == {h: [] for h in HOSTS}


def test_check_mode_says_what_it_would_reclaim(tmp_path, agents):
    rc, output, recap = run(tmp_path, agents, "--check", "--diff")
    assert rc == 0, output
    assert recap["dc1-a"]["changed"] == 1, output
    assert "%s(aws-c) owns 300 addresses" % GONE in output  # the diff
    assert rmpeers(agents) == {h: [] for h in HOSTS}


@pytest.mark.parametrize("extra", ['{"weft_reclaim_ignore": ["aws-c"]}', '{"weft_reclaim": false}'])
def test_left_alone_when_told(tmp_path, agents, extra):
    rc, output, recap = run(tmp_path, agents, "-e", extra)
    assert rc == 0, output
    assert TAKE_OVER in output and all(counts["changed"] == 0 for counts in recap.values()), output
    assert rmpeers(agents) == {h: [] for h in HOSTS}


def test_an_agent_without_ipam_has_no_say(tmp_path, agents):
    agents["dc1-a"].ipam = None  # an older agent: 404 on /status/ipam
    rc, output, _recap = run(tmp_path, agents)
    assert rc == 0, output
    assert rmpeers(agents) == {"dc1-a": [], "dc1-b": [{"peers": [GONE], "force": False}], "dc2-a": []}

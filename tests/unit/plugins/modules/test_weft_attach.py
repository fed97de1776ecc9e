import os
import shutil
import subprocess
import uuid

import pytest

from ansible_collections.weft.mesh.plugins.modules import weft_attach

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="check mode inspects real namespaces: needs root and ip"
)


def run(run_module, agent, check_mode=False, diff=False, **args):
    return run_module(weft_attach.main, dict(args, api_socket=agent.path), check_mode=check_mode, diff=diff)


@pytest.fixture
def netns():
    """A real network namespace with a veth `ethwe` holding 10.32.0.5/12 (both ends inside: enough to inspect)."""
    name = "weftut-" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip = ["ip", "-n", name]
        subprocess.run([*ip, "link", "add", "ethwe", "type", "veth", "peer", "name", "vwe-peer"], check=True)
        subprocess.run([*ip, "addr", "add", "10.32.0.5/12", "dev", "ethwe"], check=True)
        subprocess.run([*ip, "link", "set", "ethwe", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


# -- real runs: the agent decides ---------------------------------------------------------------------------


def test_attach_then_again(agent, run_module):
    first = run(run_module, agent, netns="web1", cidrs=["10.32.1.5/12"])
    assert first["changed"] is True
    assert first["interface"] == "ethwe" and first["addresses"] == ["10.32.1.5/12"]
    assert agent.changes() == [("POST", "/attach", {"netns": "web1", "ifname": "ethwe", "cidrs": ["10.32.1.5/12"]})]
    second = run(run_module, agent, netns="web1", cidrs=["10.32.1.5/12"])
    assert second["changed"] is False


def test_attach_by_pid_normalizes_cidrs(agent, run_module):
    result = run(run_module, agent, pid=4242, ifname="eth1", cidrs=["10.32.1.7/12", "10.32.1.7/12", "fd00::07/64"])
    assert result["changed"] is True
    body = agent.changes()[0][2]
    assert body == {"pid": 4242, "ifname": "eth1", "cidrs": ["10.32.1.7/12", "fd00::7/64"]}


def test_detach_whole_and_twice(agent, run_module):
    run(run_module, agent, netns="web1", cidrs=["10.32.1.5/12", "10.32.1.6/12"])
    one = run(run_module, agent, netns="web1", cidrs=["10.32.1.6/12"], state="absent")
    assert one["changed"] is True and one["addresses"] == ["10.32.1.5/12"]
    whole = run(run_module, agent, netns="web1", state="absent")
    assert whole["changed"] is True and whole["addresses"] == []
    again = run(run_module, agent, netns="web1", state="absent")
    assert again["changed"] is False


def test_agent_refusal_is_reported(agent, run_module):
    agent.datapath = False
    result = run(run_module, agent, netns="web1", cidrs=["10.32.1.5/12"])
    assert result.failed
    assert "the data plane is off on this agent" in result["msg"]


def test_attach_without_addresses_allocates_once(agent, run_module):
    agent.ring(("02:00:00:00:00:01", "fake", 1 << 20, True))
    first = run(run_module, agent, netns="web1")
    assert first["changed"] is True and first["addresses"] == ["10.32.0.1/12"]
    assert agent.changes() == [("POST", "/attach", {"netns": "web1", "ifname": "ethwe", "cidrs": []})]
    again = run(run_module, agent, netns="web1")
    assert again["changed"] is False and again["addresses"] == ["10.32.0.1/12"]


def test_attach_allocates_in_a_subnet_beside_a_given_address(agent, run_module):
    agent.ring(("02:00:00:00:00:01", "fake", 1 << 20, True))
    result = run(run_module, agent, netns="web1", cidrs=["net:10.40.0.0/16", "10.32.9.9/12"])
    assert result["changed"] is True
    assert agent.changes()[0][2]["cidrs"] == ["net:10.40.0.0/16", "10.32.9.9/12"]
    assert sorted(result["addresses"]) == ["10.32.9.9/12", "10.40.0.1/16"]


def test_allocation_needs_an_agent_with_ipam(agent, run_module):
    result = run(run_module, agent, netns="web1")
    assert result.failed and "give at least one address" in result["msg"]  # the agent's own refusal


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"netns": "web1", "cidrs": ["10.32.1.5"]}, "invalid CIDR '10.32.1.5'"),
        ({"netns": "web1", "cidrs": ["net:10.40.0.1/16"]}, "did you mean net:10.40.0.0/16?"),
        ({"netns": "web1", "cidrs": ["net:10.40.0.0"]}, "expected net:NETWORK/PREFIXLEN"),
        ({"netns": "web1", "cidrs": ["net:10.40.0.0/16"], "state": "absent"}, "they are for state=present"),
        ({"cidrs": ["10.32.1.5/12"]}, "one of the following is required: netns, pid"),
        ({"netns": "a", "pid": 1, "cidrs": ["10.32.1.5/12"]}, "parameters are mutually exclusive: netns|pid"),
    ],
)
def test_bad_arguments(agent, run_module, args, message):
    result = run(run_module, agent, **args)
    assert result.failed and message in result["msg"]
    assert agent.changes() == []


# -- check mode: predicted from the namespace itself ----------------------------------------------------------


@needs_root
@pytest.mark.parametrize(
    ("args", "changed", "addresses"),
    [
        ({"cidrs": ["10.32.0.5/12"]}, False, ["10.32.0.5/12"]),
        ({"cidrs": ["10.32.0.5/12", "10.32.0.6/12"]}, True, ["10.32.0.5/12", "10.32.0.6/12"]),
        ({"cidrs": ["10.32.0.9/12"], "ifname": "eth7"}, True, ["10.32.0.9/12"]),
        ({"state": "absent"}, True, []),
        ({"state": "absent", "cidrs": ["10.32.0.5/12"]}, True, []),
        ({"state": "absent", "cidrs": ["10.32.0.7/12"]}, False, ["10.32.0.5/12"]),
        ({"state": "absent", "ifname": "eth7"}, False, []),
    ],
)
def test_check_mode_predicts(agent, run_module, netns, args, changed, addresses):
    result = run(run_module, agent, check_mode=True, netns=netns, **args)
    assert (result["changed"], result["addresses"]) == (changed, addresses)
    assert agent.changes() == []


@needs_root
def test_check_mode_foreign_interface(agent, run_module):
    # lo exists in every namespace and is not a veth: a real attach would refuse it too.
    result = run(run_module, agent, check_mode=True, pid=os.getpid(), ifname="lo", cidrs=["10.32.0.5/12"])
    assert result.failed and "weft did not create" in result["msg"]


@needs_root
def test_check_mode_missing_namespace(agent, run_module):
    present = run(run_module, agent, check_mode=True, netns="weftut-none", cidrs=["10.32.0.5/12"])
    assert present.failed and "no network namespace named 'weftut-none'" in present["msg"]
    absent = run(run_module, agent, check_mode=True, netns="weftut-none", state="absent")
    assert absent["changed"] is False


@needs_root
def test_check_mode_needs_the_agent(tmp_path, run_module, netns):
    result = run_module(
        weft_attach.main,
        {"api_socket": str(tmp_path / "x.sock"), "netns": netns, "cidrs": ["10.32.0.5/12"]},
        check_mode=True,
    )
    assert result.failed and "is weft running?" in result["msg"]


@needs_root
def test_diff_shows_addresses(agent, run_module, netns):
    result = run(run_module, agent, diff=True, netns=netns, cidrs=["10.32.0.6/12"])
    # before: read from the namespace; after: what the (fake) agent answered
    assert result["diff"]["before"] == "10.32.0.5/12\n"
    assert result["diff"]["after"] == "10.32.0.6/12\n"


@needs_root
@pytest.mark.parametrize(
    ("args", "changed", "addresses"),
    [
        ({}, False, ["10.32.0.5/12"]),  # it has an address in the default subnet already
        ({"cidrs": ["net:10.32.0.0/16"]}, False, ["10.32.0.5/12"]),
        ({"cidrs": ["net:10.40.0.0/16"]}, True, ["10.32.0.5/12"]),  # the address to come is not known yet
        ({"ifname": "eth7"}, True, []),
    ],
)
def test_check_mode_predicts_allocations(agent, run_module, netns, args, changed, addresses):
    agent.ring(("02:00:00:00:00:01", "fake", 1 << 20, True))
    result = run(run_module, agent, check_mode=True, netns=netns, **args)
    assert (result["changed"], result["addresses"]) == (changed, addresses)
    assert agent.changes() == []


@needs_root
def test_check_mode_allocation_needs_ipam(agent, run_module, netns):
    result = run(run_module, agent, check_mode=True, netns=netns)
    assert result.failed and "has no IPAM" in result["msg"]

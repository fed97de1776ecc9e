"""weft_rmpeer against the fake agent: it reads the ring, asks only for peers that still own addresses, refuses a
reachable peer without force, and check mode reports without changing anything."""

import pytest

from ansible_collections.weft.mesh.plugins.modules import weft_info, weft_rmpeer

ME = ("02:00:00:00:00:01", "dc1-a", 1000, True)
GONE = ("02:5e:91:0c:7a:13", "aws-c", 600, False)
ALIVE = ("02:77:00:00:00:02", "dc2-a", 400, True)


def run(run_module, agent, check_mode=False, diff=False, **args):
    return run_module(weft_rmpeer.main, dict(args, api_socket=agent.path), check_mode=check_mode, diff=diff)


def test_reclaims_a_gone_peer_then_changes_nothing(agent, run_module):
    agent.ring(ME, GONE, ALIVE)
    first = run(run_module, agent, peers=["aws-c"])
    assert first["changed"] is True
    assert first["reclaimed"] == {"02:5e:91:0c:7a:13": 600}
    assert first["msg"] == "reclaimed 600 addresses of 02:5e:91:0c:7a:13(aws-c)"
    assert agent.changes() == [("POST", "/rmpeer", {"peers": ["02:5e:91:0c:7a:13"], "force": False})]
    agent.requests.clear()
    again = run(run_module, agent, peers=["aws-c", "02:5E:91:0C:7A:13"])
    assert again["changed"] is False and again["reclaimed"] == {}
    assert again["msg"].startswith("nothing to reclaim")
    assert agent.changes() == []  # it owns nothing: the agent is not even asked


def test_names_are_compared_in_one_spelling(agent, run_module):
    agent.ring(ME, GONE)
    result = run(run_module, agent, peers=["2:5E:91:c:7a:13"])
    assert result["changed"] is True
    assert agent.changes()[0][2]["peers"] == ["02:5e:91:0c:7a:13"]


def test_check_mode_reports_without_changing(agent, run_module):
    agent.ring(ME, GONE, ALIVE)
    result = run(run_module, agent, check_mode=True, diff=True, peers=["aws-c", "02:99:00:00:00:09", "nobody"])
    assert result["changed"] is True
    assert result["reclaimed"] == {"02:5e:91:0c:7a:13": 600}
    assert result["msg"] == "would reclaim 600 addresses of 02:5e:91:0c:7a:13(aws-c)"
    unknown = "02:99:00:00:00:09 owns 0 addresses\n"
    assert result["diff"]["before"] == "02:5e:91:0c:7a:13(aws-c) owns 600 addresses\n" + unknown
    assert result["diff"]["after"] == "02:5e:91:0c:7a:13(aws-c) owns 0 addresses\n" + unknown
    assert [p["requested"] for p in result["peers"]] == ["aws-c", "02:99:00:00:00:09", "nobody"]
    assert agent.changes() == []


def test_a_reachable_peer_is_refused_unless_forced(agent, run_module):
    agent.ring(ME, GONE, ALIVE)
    refused = run(run_module, agent, peers=["dc2-a", "aws-c"])
    assert refused.failed and "02:77:00:00:00:02(dc2-a) is reachable" in refused["msg"]
    assert agent.changes() == []  # nothing of the request was sent
    checked = run(run_module, agent, check_mode=True, peers=["dc2-a"])
    assert checked.failed and "is reachable" in checked["msg"]  # check mode fails as the real run would
    forced = run(run_module, agent, peers=["dc2-a"], force=True)
    assert forced["changed"] is True and forced["reclaimed"] == {"02:77:00:00:00:02": 400}
    assert agent.changes() == [("POST", "/rmpeer", {"peers": ["02:77:00:00:00:02"], "force": True})]


def test_the_agent_refusing_is_reported(agent, run_module):
    agent.ring(ME, GONE)
    agent.ipam["peers"][1]["reachable"] = False
    # The ring said unreachable, the agent (asked a moment later) says reachable: its word counts.
    agent.rmpeer = lambda body: (409, {"error": "02:5e:91:0c:7a:13(aws-c) is reachable: rmpeer is for peers..."})
    result = run(run_module, agent, peers=["aws-c"])
    assert result.failed and "HTTP 409" in result["msg"] and "is reachable" in result["msg"]


@pytest.mark.parametrize(
    ("peers", "message"),
    [
        (["dc1-a"], "02:00:00:00:00:01(dc1-a) is this agent itself: run weft_rmpeer on another host"),
        (["02:00:00:00:00:01"], "is this agent itself"),
        (["twin"], "nickname 'twin' is ambiguous among the ring's owners (02:5e:00:00:00:01, 02:5e:00:00:00:02)"),
        (["", " "], "peers is empty"),
    ],
)
def test_requests_that_cannot_be_served(agent, run_module, peers, message):
    agent.ring(ME, ("02:5e:00:00:00:01", "twin", 10, False), ("02:5e:00:00:00:02", "twin", 10, False))
    result = run(run_module, agent, peers=peers)
    assert result.failed and message in result["msg"]
    assert agent.changes() == []


def test_state_has_one_choice(agent, run_module):
    agent.ring(ME)
    result = run(run_module, agent, peers=["aws-c"], state="present")
    assert result.failed and "value of state must be one of: absent" in result["msg"]


def test_peers_is_required(agent, run_module):
    result = run(run_module, agent)
    assert result.failed and "missing required arguments: peers" in result["msg"]


def test_an_agent_without_ipam_says_so(agent, run_module):
    result = run(run_module, agent, peers=["aws-c"])
    assert result.failed and "has no IPAM" in result["msg"]


def test_an_agent_without_a_ring_has_nothing_to_reclaim(agent, run_module):
    agent.ring(state="awaiting consensus: 1 of 3 peers")
    result = run(run_module, agent, peers=["aws-c"])
    assert result["changed"] is False
    assert result["msg"] == (
        "nothing to reclaim: aws-c owns no addresses (this agent has no ring yet: awaiting consensus: 1 of 3 peers)"
    )


def test_weft_info_reads_the_ring_on_request(agent, run_module):
    agent.ring(ME, GONE)
    plain = run_module(weft_info.main, {"api_socket": agent.path})
    assert "ipam" not in plain["weft"]
    result = run_module(weft_info.main, {"api_socket": agent.path, "ipam": True})
    assert result["weft"]["ipam"]["peers"][1]["nickname"] == "aws-c"
    assert result["ansible_facts"]["weft"]["ipam"]["state"] == "ready"
    agent.ipam = None
    assert "has no IPAM" in run_module(weft_info.main, {"api_socket": agent.path, "ipam": True})["msg"]

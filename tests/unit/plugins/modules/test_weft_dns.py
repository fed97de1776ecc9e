"""weft_dns against the fake agent: it reads this host's names first and asks only for what is missing or extra, so a
second run changes nothing; check mode and diff report without changing anything; bad names and addresses fail
before the agent is asked."""

import pytest

from ansible_collections.weft.mesh.plugins.modules import weft_dns

DB = "db.weft.local."


def run(run_module, agent, check_mode=False, diff=False, **args):
    return run_module(weft_dns.main, dict(args, api_socket=agent.path), check_mode=check_mode, diff=diff)


def test_adds_a_name_then_changes_nothing(agent, run_module):
    agent.serve_dns()
    first = run(run_module, agent, name="DB", addresses=["10.32.9.10", "10.32.9.9", "10.32.9.9"])
    assert first["changed"] is True
    assert first["name"] == DB
    assert first["added"] == ["10.32.9.9", "10.32.9.10"] and first["removed"] == []
    assert first["addresses"] == ["10.32.9.9", "10.32.9.10"]
    assert agent.changes() == [("POST", "/dns/add", {"name": DB, "addresses": ["10.32.9.9", "10.32.9.10"]})]
    agent.requests.clear()
    again = run(run_module, agent, name="db.weft.local", addresses=["10.32.9.9", "10.32.9.10"])
    assert again["changed"] is False and again["added"] == [] and again["addresses"] == ["10.32.9.9", "10.32.9.10"]
    assert agent.changes() == []


def test_present_adds_only_what_is_missing_and_keeps_the_rest(agent, run_module):
    agent.serve_dns(registered=[(DB, "10.32.9.9", "name:" + DB)])
    result = run(run_module, agent, name="db", addresses=["10.32.9.10"])
    assert result["changed"] is True and result["added"] == ["10.32.9.10"]
    assert result["addresses"] == ["10.32.9.9", "10.32.9.10"]
    assert [r[1] for r in agent.changes()] == ["/dns/add"]


def test_exclusive_takes_the_other_addresses_away(agent, run_module):
    agent.serve_dns(registered=[(DB, "10.32.9.9", "name:" + DB), (DB, "10.32.9.11", "name:" + DB)])
    result = run(run_module, agent, name="db", addresses=["10.32.9.9"], exclusive=True)
    assert result["changed"] is True and result["added"] == [] and result["removed"] == ["10.32.9.11"]
    assert result["addresses"] == ["10.32.9.9"]
    assert agent.changes() == [("POST", "/dns/remove", {"name": DB, "addresses": ["10.32.9.11"]})]
    agent.requests.clear()
    assert run(run_module, agent, name="db", addresses=["10.32.9.9"], exclusive=True)["changed"] is False
    assert agent.changes() == []


def test_a_containers_address_is_not_a_dns_add(agent, run_module):
    # The container web has 10.32.0.5 under its own key: present still registers it as a name of no container (it
    # stays when the container goes), and exclusive leaves the container's registration alone.
    web = "web.weft.local."
    agent.serve_dns(registered=[(web, "10.32.0.5", "netns:web1"), (web, "10.32.0.6", "netns:web2")])
    result = run(run_module, agent, name="web", addresses=["10.32.0.5"], exclusive=True)
    assert result["changed"] is True and result["added"] == ["10.32.0.5"] and result["removed"] == []
    assert result["addresses"] == ["10.32.0.5", "10.32.0.6"]


def test_absent_removes_the_given_addresses_or_the_whole_name(agent, run_module):
    agent.serve_dns(
        registered=[
            (DB, "10.32.9.9", "name:" + DB),
            (DB, "10.32.9.10", "name:" + DB),
            ("x.weft.local.", "10.32.1.1", "k"),
        ]
    )
    one = run(run_module, agent, name="db", addresses=["10.32.9.10", "10.32.7.7"], state="absent")
    assert one["changed"] is True and one["removed"] == ["10.32.9.10"] and one["addresses"] == ["10.32.9.9"]
    assert agent.changes() == [("POST", "/dns/remove", {"name": DB, "addresses": ["10.32.9.10"]})]
    agent.requests.clear()
    whole = run(run_module, agent, name="db", state="absent")
    assert whole["changed"] is True and whole["removed"] == ["10.32.9.9"] and whole["addresses"] == []
    assert agent.changes() == [("POST", "/dns/remove", {"name": DB})]
    agent.requests.clear()
    assert run(run_module, agent, name="db", state="absent")["changed"] is False
    assert agent.changes() == []
    assert [r["name"] for r in agent.dns["registered"]] == ["x.weft.local."]


def test_check_mode_and_diff_report_without_changing(agent, run_module):
    agent.serve_dns(registered=[(DB, "10.32.9.9", "name:" + DB), (DB, "10.32.9.11", "name:" + DB)])
    result = run(
        run_module, agent, check_mode=True, diff=True, name="db", addresses=["10.32.9.10", "10.32.9.9"], exclusive=True
    )
    assert result["changed"] is True
    assert result["added"] == ["10.32.9.10"] and result["removed"] == ["10.32.9.11"]
    assert result["addresses"] == ["10.32.9.9", "10.32.9.10"]
    assert result["diff"]["before"] == "10.32.9.9\n10.32.9.11\n"
    assert result["diff"]["after"] == "10.32.9.9\n10.32.9.10\n"
    assert result["diff"]["before_header"] == DB + " on this host"
    absent = run(run_module, agent, check_mode=True, diff=True, name="db", state="absent")
    assert absent["changed"] is True and absent["addresses"] == [] and absent["diff"]["after"] == ""
    assert agent.changes() == []
    assert len(agent.dns["registered"]) == 2


def test_the_real_diff_matches_what_the_agent_has(agent, run_module):
    agent.serve_dns()
    result = run(run_module, agent, diff=True, name="db", addresses=["10.32.9.9"])
    assert result["diff"]["before"] == "" and result["diff"]["after"] == "10.32.9.9\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"name": "db", "addresses": ["10.32.9"]}, "'10.32.9' is not an IPv4 address"),
        ({"name": "db", "addresses": ["fd00::1"]}, "is not an IPv4 address"),
        ({"name": "db", "addresses": ["127.0.0.1"]}, "127.0.0.1 is in 127.0.0.0/8, which no container may have"),
        ({"name": "db", "addresses": ["169.254.169.254"]}, "in 169.254.0.0/16"),
        ({"name": "db"}, "state=present needs at least one address"),
        ({"name": "db", "state": "absent", "exclusive": True}, "exclusive is for state=present"),
        ({"name": "db.example.com", "addresses": ["10.32.9.9"]}, "db.example.com. is not in the agent's domain"),
        ({"name": "d b", "addresses": ["10.32.9.9"]}, "invalid label 'd b'"),
        ({"name": "a..weft.local", "addresses": ["10.32.9.9"]}, "invalid label ''"),
        ({"name": "x" * 64, "addresses": ["10.32.9.9"]}, "invalid label"),
        ({"name": " ", "addresses": ["10.32.9.9"]}, "name is empty"),
    ],
)
@pytest.mark.parametrize("check_mode", [False, True])
def test_bad_requests_fail_before_any_change(agent, run_module, args, message, check_mode):
    agent.serve_dns()
    result = run(run_module, agent, check_mode=check_mode, **args)
    assert result.failed and message in result["msg"], result
    assert agent.changes() == []


def test_the_agents_domain_is_used(agent, run_module):
    agent.serve_dns(domain="mesh.example.")
    result = run(run_module, agent, name="db", addresses=["10.32.9.9"])
    assert result["name"] == "db.mesh.example."
    assert run(run_module, agent, name="db.weft.local", addresses=["10.32.9.9"]).failed


def test_an_agent_without_dns_or_with_dns_off_says_so(agent, run_module):
    result = run(run_module, agent, name="db", addresses=["10.32.9.9"])
    assert result.failed and "has no DNS" in result["msg"] and "upgrade it" in result["msg"]
    agent.dns = {"enabled": False}
    result = run(run_module, agent, check_mode=True, name="db", addresses=["10.32.9.9"])
    assert result.failed and "DNS is off on the agent" in result["msg"]
    assert agent.changes() == []


def test_an_agent_that_is_not_there(run_module, tmp_path):
    result = run_module(
        weft_dns.main, {"api_socket": str(tmp_path / "none.sock"), "name": "db", "addresses": ["10.1.1.1"]}
    )
    assert result.failed and "is weft running?" in result["msg"]

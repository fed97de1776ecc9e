from ansible_collections.weft.mesh.plugins.modules import weft_peers


def run(run_module, agent, check_mode=False, diff=False, **args):
    return run_module(weft_peers.main, dict(args, api_socket=agent.path), check_mode=check_mode, diff=diff)


def test_adds_only_missing_peers(agent, run_module):
    agent.targets = {"10.0.0.2:6783": "config", "10.0.0.9:6783": "discovered"}
    result = run(run_module, agent, peers=["10.0.0.2", "10.0.0.3:6783", "10.0.0.9"])
    assert result["changed"] is True
    assert result["added"] == ["10.0.0.3:6783", "10.0.0.9:6783"]  # a discovered target becomes a direct one
    assert result["removed"] == []
    body = {"addresses": ["10.0.0.3:6783", "10.0.0.9:6783"], "replace": False}
    assert agent.changes() == [("POST", "/connect", body)]
    assert result["targets"] == ["10.0.0.2:6783", "10.0.0.3:6783", "10.0.0.9:6783"]


def test_second_run_changes_nothing(agent, run_module):
    run(run_module, agent, peers=["10.0.0.2", "10.0.0.3"])
    agent.requests.clear()
    result = run(run_module, agent, peers=["10.0.0.3:6783", "10.0.0.2"])
    assert result["changed"] is False
    assert agent.changes() == []


def test_check_mode_predicts_without_changing(agent, run_module):
    agent.targets = {"10.0.0.2:6783": "api"}
    result = run(run_module, agent, check_mode=True, diff=True, peers=["10.0.0.3"])
    assert result["changed"] is True
    assert result["targets"] == ["10.0.0.2:6783", "10.0.0.3:6783"]
    assert result["diff"]["before"] == "10.0.0.2:6783\n"
    assert result["diff"]["after"] == "10.0.0.2:6783\n10.0.0.3:6783\n"
    assert agent.changes() == []
    assert agent.targets == {"10.0.0.2:6783": "api"}


def test_absent_forgets_only_listed_direct_targets(agent, run_module):
    agent.targets = {"10.0.0.2:6783": "config", "10.0.0.3:6783": "api", "10.0.0.9:6783": "discovered"}
    result = run(run_module, agent, state="absent", peers=["10.0.0.3", "10.0.0.9", "10.0.0.4"])
    assert result["changed"] is True
    assert result["removed"] == ["10.0.0.3:6783"]
    assert agent.changes() == [("POST", "/forget", {"addresses": ["10.0.0.3:6783"]})]
    assert sorted(agent.targets) == ["10.0.0.2:6783", "10.0.0.9:6783"]


def test_absent_when_already_gone(agent, run_module):
    result = run(run_module, agent, state="absent", peers=["10.0.0.3"])
    assert result["changed"] is False
    assert agent.changes() == []


def test_exclusive_replaces_in_one_call(agent, run_module):
    agent.targets = {"10.0.0.2:6783": "config", "10.0.0.3:6783": "api", "10.0.0.9:6783": "discovered"}
    result = run(run_module, agent, diff=True, exclusive=True, peers=["10.0.0.3", "10.0.0.4"])
    assert result["changed"] is True
    assert result["added"] == ["10.0.0.4:6783"] and result["removed"] == ["10.0.0.2:6783"]
    assert agent.changes() == [("POST", "/connect", {"addresses": ["10.0.0.3:6783", "10.0.0.4:6783"], "replace": True})]
    assert result["targets"] == ["10.0.0.3:6783", "10.0.0.4:6783"]
    assert result["diff"]["before"] == "10.0.0.2:6783\n10.0.0.3:6783\n"


def test_exclusive_already_exact(agent, run_module):
    agent.targets = {"10.0.0.3:6783": "config", "10.0.0.9:6783": "discovered"}
    result = run(run_module, agent, exclusive=True, peers=["10.0.0.3"])
    assert result["changed"] is False
    assert agent.changes() == []


def test_exclusive_with_absent_is_refused(agent, run_module):
    result = run(run_module, agent, exclusive=True, state="absent", peers=["10.0.0.3"])
    assert result.failed and "exclusive" in result["msg"]


def test_bad_address_is_refused_before_asking(agent, run_module):
    result = run(run_module, agent, peers=["10.0.0.3:99999"])
    assert result.failed
    assert result["msg"] == "peer address '10.0.0.3:99999': port must be a number from 1 to 65535"
    assert agent.requests == []


def test_no_agent(tmp_path, run_module):
    result = run_module(weft_peers.main, {"api_socket": str(tmp_path / "x.sock"), "peers": ["10.0.0.2"]})
    assert result.failed and "is weft running?" in result["msg"]

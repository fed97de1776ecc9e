from ansible_collections.weft.mesh.plugins.modules import weft_info


def test_returns_status_as_fact(agent, run_module):
    agent.targets = {"10.0.0.2:6783": "config"}
    result = run_module(weft_info.main, {"api_socket": agent.path})
    assert result["changed"] is False
    assert result["weft"]["ready"] is True
    assert result["ansible_facts"]["weft"] == result["weft"]
    assert result["weft"]["targets"][0]["address"] == "10.0.0.2:6783"
    assert agent.changes() == []


def test_check_mode_reads_too(agent, run_module):
    result = run_module(weft_info.main, {"api_socket": agent.path}, check_mode=True)
    assert result["weft"]["version"] == "0.1.0"


def test_no_agent_says_so(tmp_path, run_module):
    result = run_module(weft_info.main, {"api_socket": str(tmp_path / "missing.sock")})
    assert result.failed
    assert result["msg"] == "no agent API at %s: is weft running? (systemctl status weft)" % (tmp_path / "missing.sock")

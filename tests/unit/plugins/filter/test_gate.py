"""The restart gate: a restarted agent must be back with every peer, over the same path and encryption."""

from ansible_collections.weft.mesh.plugins.filter.gate import container_ports, restart_problems


def status(*connections, ready=True):
    return {"ready": ready, "connections": list(connections)}


def conn(nick, path, encrypted=True, state="established"):
    return {
        "nickname": nick,
        "state": state,
        "encrypted": encrypted,
        "datapath": {"path": path, "encrypted": encrypted},
    }


BEFORE = status(conn("dc1-b", "fast", False), conn("dc2-a", "sleeve"), conn("aws-a", "relay", state="relayed"))


def test_back_as_it_was():
    assert restart_problems(BEFORE, BEFORE) == []


def test_a_missing_peer_a_changed_path_and_lost_encryption_are_named():
    after = status(conn("dc1-b", "sleeve", True), conn("dc2-a", "sleeve", False))
    assert restart_problems(after, BEFORE) == [
        "aws-a is not back (it was relay, encrypted)",
        "dc1-b is sleeve, encrypted, it was fast, plaintext",
        "dc2-a is sleeve, plaintext, it was sleeve, encrypted",
    ]


def test_a_better_path_with_the_same_encryption_is_not_a_regression():
    # A peer relayed while its direct connection was not yet up (a mesh re-forming after a reset) is direct after
    # the restart: progress. The other way round, or a path without encryption, is not.
    better = status(conn("dc1-b", "fast", False), conn("dc2-a", "sleeve"), conn("aws-a", "sleeve"))
    assert restart_problems(better, BEFORE) == []
    worse = status(conn("dc1-b", "fast", False), conn("dc2-a", "relay", state="relayed"), conn("aws-a", "relay"))
    assert restart_problems(worse, BEFORE) == ["dc2-a is relay, encrypted, it was sleeve, encrypted"]
    plain = status(conn("dc1-b", "fast", False), conn("dc2-a", "fast", False), conn("aws-a", "relay"))
    assert restart_problems(plain, BEFORE) == ["dc2-a is fast, plaintext, it was sleeve, encrypted"]
    down = status(conn("dc1-b", "fast", False), conn("dc2-a", "down"), conn("aws-a", "relay"))
    assert restart_problems(down, BEFORE) == ["dc2-a is down, encrypted, it was sleeve, encrypted"]


def test_an_agent_not_ready_fails():
    assert restart_problems(status(ready=False), status()) == ["the agent is not ready"]


def test_of_two_connections_the_one_carrying_traffic_counts():
    after = status(
        conn("dc2-a", "down"), conn("dc2-a", "sleeve"), conn("dc1-b", "fast", False), BEFORE["connections"][2]
    )
    assert restart_problems(after, BEFORE) == []


def test_container_ports_ignore_the_bridge_and_self_entries():
    fdb = [
        {"mac": "02:00:00:00:00:01", "ifname": "vwe1a2b", "flags": [], "state": "static", "master": "weft"},
        {"mac": "aa:bb:cc:00:00:01", "ifname": "vwe1a2b", "flags": ["self"], "state": "permanent"},
        {"mac": "02:00:00:00:00:02", "ifname": "weft-tap", "state": ""},
    ]
    assert container_ports(fdb) == ["vwe1a2b 02:00:00:00:00:01"]


def test_a_peer_that_comes_back_under_a_new_name_is_back():
    # A host first deployed without a pinned peer name takes its pinned one at its next restart (docs/ansible.md,
    # "Peer names"): its peers see another name with the same nickname, which is what the gate compares.
    before = status(dict(conn("dc1-b", "fast", False), peer="02:11:11:11:11:11"))
    renamed = dict(conn("dc1-b", "fast", False), peer="6e:c3:00:92:0d:2c")
    stale = dict(conn("dc1-b", None, False, state="failed"), peer="02:11:11:11:11:11")  # the old name, on its way out
    assert restart_problems(status(stale, renamed), before) == []

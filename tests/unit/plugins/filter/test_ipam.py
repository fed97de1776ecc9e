"""The mesh's address space as the inventory sees it: pinned peer names, the first ring's seed (the mesh keeps the
one it started with), the inventory's IPAM settings, and which ring owners site.yml reclaims, from which host."""

import base64
import re

import pytest
import yaml
from ansible.errors import AnsibleFilterError

from ansible_collections.weft.mesh.plugins.filter.inventory import inventory_problems
from ansible_collections.weft.mesh.plugins.filter.ipam import (
    ipalloc_init,
    ipam_problems,
    normalize_init,
    peer_names,
    reclaim_plan,
    weft_peer_name,
)

HOSTS = ["aws-a", "dc1-a", "dc1-b", "dc2-a"]
NAME = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def config(**settings):
    """_weft_old_config as validate.yml sets it for a host with this weft.yaml."""
    return {"content": base64.b64encode(yaml.safe_dump(dict(nickname="x", **settings)).encode()).decode()}


NO_CONFIG = {"msg": "no /etc/weft/weft.yaml"}


def hostvars(**per_host):
    """Every host of HOSTS read by this run (no weft.yaml unless given), with variables per host."""
    found = {h: {"_weft_old_config": NO_CONFIG} for h in HOSTS}
    for host, values in per_host.items():
        found.setdefault(host.replace("_", "-"), {}).update(values)
    return found


def group_seed(hosts=HOSTS):
    return "seed=" + ",".join(sorted(weft_peer_name(h) for h in hosts))


# --- peer names -------------------------------------------------------------------------------------------------


def test_a_name_is_a_locally_administered_unicast_mac_fixed_by_the_inventory_name():
    names = [weft_peer_name(h) for h in HOSTS]
    assert all(NAME.match(n) for n in names)
    assert all(int(n[:2], 16) & 0x03 == 0x02 for n in names)  # locally administered, not multicast
    assert len(set(names)) == len(names)
    assert names == [weft_peer_name(h) for h in HOSTS]  # the same on every run, every controller
    assert weft_peer_name("dc1-a") == "6e:c3:00:92:0d:2c"  # pinned: a change here renames every host


def test_an_override_is_taken_in_one_spelling():
    assert weft_peer_name("dc1-a", "2:1F:aa:0:0:1") == "02:1f:aa:00:00:01"
    assert weft_peer_name("dc1-a", "") == weft_peer_name("dc1-a")
    with pytest.raises(AnsibleFilterError, match="weft_peer_name of dc1-a: 'dc1' is not a peer name"):
        weft_peer_name("dc1-a", "dc1")
    with pytest.raises(AnsibleFilterError, match="reserved"):
        weft_peer_name("dc1-a", "0:0:0:0:0:0")


def test_peer_names_read_overrides_from_hostvars():
    names = peer_names(HOSTS, hostvars(dc2_a={"weft_peer_name": "02:00:00:00:00:02"}))
    assert names["dc2-a"] == "02:00:00:00:00:02"
    assert names["dc1-a"] == weft_peer_name("dc1-a")


def test_seeds_compare_in_one_spelling():
    assert normalize_init("seed=02:00:00:00:00:02, 2:0:0:0:0:1") == "seed=02:00:00:00:00:01,02:00:00:00:00:02"
    assert normalize_init(" consensus=3 ") == "consensus=3"
    assert normalize_init("seed=nonsense") == "seed=nonsense"  # the agent's parser says what is wrong


# --- the first ring ---------------------------------------------------------------------------------------------


def test_a_new_mesh_is_seeded_by_the_group():
    found = ipalloc_init(HOSTS, hostvars())
    assert found["init"] == group_seed() and found["source"] == "group"
    assert found["errors"] == [] and found["warnings"] == [] and found["unread"] == []


def test_a_mesh_upgraded_from_a_release_without_ipam_is_seeded_by_the_group():
    old = config(peers=["10.10.1.12:6783"])  # a weft.yaml without ipalloc_init
    found = ipalloc_init(HOSTS, hostvars(dc1_a={"_weft_old_config": old}, dc1_b={"_weft_old_config": old}))
    assert found["init"] == group_seed() and found["source"] == "group"


def test_a_host_joining_a_running_mesh_gets_the_mesh_seed_not_the_group():
    running = config(ipalloc_init="seed=" + ",".join(sorted(weft_peer_name(h) for h in ["dc1-a", "dc1-b"])))
    vars_ = hostvars(dc1_a={"_weft_old_config": running}, dc1_b={"_weft_old_config": running})
    found = ipalloc_init(HOSTS, vars_)  # aws-a and dc2-a are new: no weft.yaml
    assert found["source"] == "running"
    assert found["init"] == group_seed(["dc1-a", "dc1-b"]) != group_seed()
    assert found["running"] == {found["init"]: ["dc1-a", "dc1-b"]}


def test_a_seed_host_back_with_nothing_is_an_observer_and_stays_one():
    # dc2-a was purged (reset.yml -e purge=true), or its instance replaced under the same name: its seed part may
    # have been reclaimed meanwhile, so it must take the mesh's ring rather than compute that part again.
    running = config(ipalloc_init=group_seed())
    vars_ = hostvars(**{h.replace("-", "_"): {"_weft_old_config": running} for h in HOSTS if h != "dc2-a"})
    found = ipalloc_init([*HOSTS, "aws-new"], dict(vars_, **{"aws-new": {"_weft_old_config": NO_CONFIG}}))
    assert found["init"] == group_seed() and found["source"] == "running"
    assert found["hosts"] == {"dc2-a": "observer"}  # aws-new is not in the seed: it gets the seed, as documented
    # Next run: dc2-a runs as an observer; the mesh's value is still the seed, and dc2-a keeps observer.
    vars_["dc2-a"]["_weft_old_config"] = config(ipalloc_init="observer")
    again = ipalloc_init(HOSTS, vars_)
    assert (again["init"], again["hosts"], again["errors"]) == (group_seed(), {"dc2-a": "observer"}, [])


def test_a_new_mesh_has_no_observers():
    assert ipalloc_init(HOSTS, hostvars())["hosts"] == {}


def test_a_seed_naming_hosts_that_left_stays():
    gone = "seed=02:aa:00:00:00:01," + weft_peer_name("dc1-a")
    found = ipalloc_init(HOSTS, hostvars(dc1_a={"_weft_old_config": config(ipalloc_init=gone)}))
    assert found["init"] == normalize_init(gone)


def test_any_running_mode_is_kept():
    found = ipalloc_init(HOSTS, hostvars(dc2_a={"_weft_old_config": config(ipalloc_init="consensus=3")}))
    assert (found["init"], found["source"]) == ("consensus=3", "running")


def test_hosts_running_different_seeds_are_an_error():
    vars_ = hostvars(
        dc1_a={"_weft_old_config": config(ipalloc_init="seed=02:00:00:00:00:01")},
        dc2_a={"_weft_old_config": config(ipalloc_init="seed=02:00:00:00:00:02")},
    )
    found = ipalloc_init(HOSTS, vars_)
    assert found["init"] == ""
    assert found["errors"] == [
        "the mesh's hosts run with different ipalloc_init (dc1-a: seed=02:00:00:00:00:01; dc2-a: "
        "seed=02:00:00:00:00:02): one mesh needs one ring; set weft_ipalloc_init (in group_vars/all) to the value "
        "whose ring you keep"
    ]


def test_hosts_being_removed_and_observers_are_not_in_the_seed():
    vars_ = hostvars(
        dc2_a={"_weft_preflight": {"present": False}},
        aws_a={"weft_ipalloc_init": "observer"},
        dc1_b={"weft_state": "absent"},
    )
    assert ipalloc_init(HOSTS, vars_)["init"] == "seed=" + weft_peer_name("dc1-a")


def test_an_override_of_a_name_is_in_the_seed():
    found = ipalloc_init(HOSTS, hostvars(dc2_a={"weft_peer_name": "02:00:00:00:00:02"}))
    assert "02:00:00:00:00:02" in found["init"] and weft_peer_name("dc2-a") not in found["init"]


def test_outside_the_run_hosts_are_read_before_a_seed_is_chosen():
    vars_ = {"aws-c": {"_weft_old_config": NO_CONFIG}, "dc1-a": {}, "dc1-b": {}}  # --limit aws-c
    first = ipalloc_init(["aws-c", "dc1-a", "dc1-b"], vars_)
    assert first["unread"] == ["dc1-a", "dc1-b"]
    assert first["errors"] and "cannot tell whether the mesh has an address ring already" in first["errors"][0]
    running = "seed=" + weft_peer_name("dc1-a")
    results = [  # what the slurp loop of validate.yml registers
        {"item": "dc1-a", "content": config(ipalloc_init=running)["content"], "failed": False},
        {"item": "dc1-b", "unreachable": True, "msg": "ssh: connect refused"},
    ]
    second = ipalloc_init(["aws-c", "dc1-a", "dc1-b"], vars_, {"results": results})
    assert (second["init"], second["source"], second["errors"]) == (running, "running", [])
    assert second["unread"] == ["dc1-b"]


def test_hosts_outside_the_run_without_a_weft_yaml_make_a_new_mesh():
    vars_ = {"aws-c": {"_weft_old_config": NO_CONFIG}, "dc1-a": {}}
    results = [{"item": "dc1-a", "failed": False, "msg": "file not found: /etc/weft/weft.yaml"}]
    found = ipalloc_init(["aws-c", "dc1-a"], vars_, results)
    assert found["init"] == group_seed(["aws-c", "dc1-a"]) and found["errors"] == []


def test_a_host_still_unread_next_to_a_pre_ipam_mesh_is_a_warning():
    vars_ = hostvars(dc1_a={"_weft_old_config": config()})
    del vars_["dc2-a"]["_weft_old_config"]
    found = ipalloc_init(HOSTS, vars_)
    assert found["init"] == group_seed() and found["errors"] == []
    assert found["warnings"] == [
        "the first address ring is seeded by the group (%s): dc2-a could not be read" % group_seed()
    ]


def test_a_changed_range_is_a_warning():
    old = config(ipalloc_range="10.32.0.0/12")
    vars_ = hostvars(dc1_a={"_weft_old_config": old, "weft_ipalloc_range": "10.40.0.0/16"})
    found = ipalloc_init(HOSTS, vars_)
    assert found["warnings"] == [
        "dc1-a changes ipalloc_range from 10.32.0.0/12 to 10.40.0.0/16: its agent forgets its ring and its "
        "allocations at the restart"
    ]
    same = hostvars(dc1_a={"_weft_old_config": config(ipalloc_range="10.32.0.0/12")})
    assert ipalloc_init(HOSTS, same)["warnings"] == []


def test_no_mesh_group_means_no_seed():
    found = ipalloc_init([], {})
    assert (found["init"], found["source"], found["errors"]) == ("", "", [])


# --- the inventory's settings -----------------------------------------------------------------------------------


def test_hosts_that_disagree_on_the_range_are_refused():
    vars_ = hostvars(dc2_a={"weft_ipalloc_range": "10.40.0.0/16"}, aws_a={"weft_ipalloc_range": "10.40.0.0/16"})
    assert ipam_problems(HOSTS, vars_) == [
        "the mesh's hosts disagree on weft_ipalloc_range (aws-a, dc2-a have 10.40.0.0/16; dc1-a, dc1-b have "
        "10.32.0.0/12): set it once for the whole mesh, in group_vars/all (peers refuse a ring of another range)"
    ]
    # The same range spelt another way, or the default written out, agree.
    same = hostvars(dc2_a={"weft_ipalloc_range": " 10.32.0.0/12"}, dc1_a={"weft_ipalloc_range": "10.32.0.0/12"})
    assert ipam_problems(HOSTS, same) == []


def test_the_range_problems_reach_the_inventory_check():
    vars_ = {h: {"weft_advertise_address": "10.0.0.%d" % i} for i, h in enumerate(HOSTS, 1)}
    vars_["dc2-a"]["weft_ipalloc_range"] = "10.40.0.0/16"
    assert any("disagree on weft_ipalloc_range" in p for p in inventory_problems(HOSTS, vars_))


def test_bad_settings_and_shared_names():
    vars_ = hostvars(
        dc1_a={"weft_ipalloc_range": "fd00::/64", "weft_peer_name": "02:00:00:00:00:07"},
        dc1_b={"weft_peer_name": "2:0:0:0:0:7"},
        dc2_a={"weft_peer_name": "dc2"},
    )
    assert ipam_problems(HOSTS, vars_) == [
        "dc1-a: weft_ipalloc_range fd00::/64 is not an IPv4 subnet like 10.32.0.0/12",
        "weft_peer_name of dc2-a: 'dc2' is not a peer name: six colon-separated hex bytes, like 02:1f:aa:00:00:01",
        "dc1-a and dc1-b share the peer name 02:00:00:00:00:07: give each host its own weft_peer_name, or none",
    ]


def test_an_explicit_init_must_be_the_whole_mesh_s_but_observers():
    seed = "seed=02:00:00:00:00:01"
    everyone = hostvars(**{h.replace("-", "_"): {"weft_ipalloc_init": seed} for h in HOSTS})
    everyone["aws-a"]["weft_ipalloc_init"] = "observer"
    assert ipam_problems(HOSTS, everyone) == []
    some = hostvars(dc1_a={"weft_ipalloc_init": seed})
    problems = ipam_problems(HOSTS, some)
    assert problems == [
        "the mesh's hosts disagree on weft_ipalloc_init (aws-a, dc1-b, dc2-a have none; dc1-a has %s): set it once "
        "for the whole mesh, in group_vars/all (peers refuse a ring seeded differently)" % seed
    ]


# --- reclaim ----------------------------------------------------------------------------------------------------

ME = {"dc1-a": weft_peer_name("dc1-a"), "dc1-b": weft_peer_name("dc1-b"), "dc2-a": weft_peer_name("dc2-a")}
GONE = "02:5e:91:0c:7a:13"


def owner(host, addresses, reachable=True, name=None, ourself=False, nickname=None):
    return {
        "name": name or ME[host],
        "nickname": nickname or host,
        "addresses": addresses,
        "reachable": reachable,
        "ourself": ourself,
    }


def view(me, *others, gone=True, gone_reachable=False):
    """weft status ipam from ``me``: itself, the other inventory hosts, and aws-c (gone) unless told otherwise."""
    peers = [owner(me, 100, ourself=True)] + [owner(h, 100) for h in others]
    if gone:
        peers.append(owner(None, 300, gone_reachable, name=GONE, nickname="aws-c"))
    return {"state": "ready", "peers": peers}


def test_a_host_gone_from_the_inventory_and_unreachable_everywhere_is_reclaimed_from_the_first_host():
    statuses = {h: view(h, *[o for o in ME if o != h]) for h in ["dc1-b", "dc1-a", "dc2-a"]}  # play order
    plan = reclaim_plan(statuses, ME)
    assert plan["host"] == "dc1-b"
    assert plan["peers"] == [GONE] and plan["labels"] == [GONE + "(aws-c)"] and plan["addresses"] == 300
    assert plan["warnings"] == []
    assert plan["msg"] == (
        "dc1-b takes over the ranges of %s(aws-c) (300 addresses): no inventory host, unreachable from dc1-b, "
        "dc1-a, dc2-a" % GONE
    )


def test_once_reclaimed_there_is_nothing_to_do():
    statuses = {h: view(h, gone=False) for h in ME}
    plan = reclaim_plan(statuses, list(ME.values()))
    assert (plan["host"], plan["peers"], plan["warnings"], plan["msg"]) == (None, [], [], "")


def test_a_peer_any_survivor_still_reaches_is_a_warning_not_a_reclaim():
    statuses = {"dc1-a": view("dc1-a"), "dc1-b": view("dc1-b", gone_reachable=True), "dc2-a": view("dc2-a")}
    plan = reclaim_plan(statuses, ME)
    assert plan["peers"] == [] and plan["host"] is None
    assert plan["warnings"] == [
        "%s(aws-c) owns 300 addresses of the ring and is no inventory host, but dc1-b reaches it: not reclaimed. If "
        "it left, stop its agent (or decommission it) and run site.yml again; if it belongs to the mesh, add it to "
        "the inventory or to weft_reclaim_ignore" % GONE
    ]


def test_inventory_hosts_are_never_reclaimed_even_when_down():
    down = {"dc1-a": {"state": "ready", "peers": [owner("dc1-a", 100, ourself=True), owner("dc2-a", 100, False)]}}
    assert reclaim_plan(down, ME)["peers"] == []


def test_peers_to_keep_are_left_alone_by_name_or_nickname():
    statuses = {"dc1-a": view("dc1-a")}
    assert reclaim_plan(statuses, ME, ["aws-c"])["peers"] == []
    assert reclaim_plan(statuses, ME, [GONE.upper()])["peers"] == []
    assert reclaim_plan(statuses, ME, ["someone-else"])["peers"] == [GONE]


def test_owners_of_nothing_and_agents_without_a_ring_or_status_do_not_count():
    statuses = {
        "dc2-a": None,  # its agent did not answer
        "dc1-b": {"state": "awaiting consensus: 1 of 3 peers", "peers": []},
        "dc1-a": {"state": "ready", "peers": [owner("dc1-a", 100, ourself=True), owner(None, 0, False, name=GONE)]},
    }
    plan = reclaim_plan(statuses, ME)
    assert plan["peers"] == [] and plan["unread"] == ["dc2-a"]
    statuses["dc1-a"]["peers"][1]["addresses"] = 5
    assert reclaim_plan(statuses, ME)["host"] == "dc1-a"  # the first host with a ring


def test_a_survivor_that_no_longer_lists_the_owner_does_not_block_it():
    statuses = {"dc1-a": view("dc1-a", gone=False), "dc1-b": view("dc1-b")}
    plan = reclaim_plan(statuses, ME)
    assert plan["peers"] == [GONE] and plan["host"] == "dc1-a"


def test_a_host_s_own_row_is_never_a_candidate():
    # dc1-a runs with a name the inventory does not derive (an old one): it is itself, not a stranger
    odd = {"dc1-a": {"state": "ready", "peers": [owner(None, 100, name="02:00:00:00:00:99", ourself=True)]}}
    assert reclaim_plan(odd, ME)["peers"] == []


def test_not_a_dict_of_statuses():
    with pytest.raises(AnsibleFilterError, match="reclaim_plan expects"):
        reclaim_plan([view("dc1-a")], ME)


def test_registered_weft_info_results_are_read_too():
    statuses = {
        "dc1-a": {"changed": False, "failed": False, "weft": {"ready": True, "ipam": view("dc1-a")}},
        "dc1-b": {"failed": True, "msg": "the agent at /run/weft/weft.sock has no IPAM"},
        "dc2-a": {"skipped": True, "changed": False},
    }
    plan = reclaim_plan(statuses, ME)
    assert (plan["host"], plan["peers"], plan["unread"]) == ("dc1-a", [GONE], ["dc1-b", "dc2-a"])

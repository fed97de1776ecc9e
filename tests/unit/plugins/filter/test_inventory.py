"""The role's checks of the inventory: addresses one site would dial for two hosts, sites whose hosts disagree,
addresses that do not parse, and the peer lists a run on part of the mesh leaves stale."""

import copy

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.weft.mesh.plugins.filter.inventory import address_problems, inventory_problems, stale_peers

# The lab: two routed data centres, and a VPC behind one NAT whose hosts share its public address.
LAB = {
    "dc1-a": {
        "weft_site": "dc1",
        "weft_advertise_address": "10.10.1.11",
        "weft_public_address": "10.10.1.11",
        "weft_trusted_subnets": ["10.10.1.0/24"],
    },
    "dc1-b": {
        "weft_site": "dc1",
        "weft_advertise_address": "10.10.1.12",
        "weft_public_address": "10.10.1.12",
        "weft_trusted_subnets": ["10.10.1.0/24"],
    },
    "dc2-a": {
        "weft_site": "dc2",
        "weft_advertise_address": "10.10.2.11",
        "weft_public_address": "10.10.2.11",
        "weft_trusted_subnets": ["10.10.2.0/24"],
    },
    "aws-a": {
        "weft_site": "aws",
        "weft_site_reachable": False,
        "weft_public_address": "198.51.100.10",
        "weft_advertise_address": "172.31.0.11",
        "weft_trusted_subnets": ["172.31.0.0/24"],
    },
    "aws-b": {
        "weft_site": "aws",
        "weft_site_reachable": "false",
        "weft_public_address": "198.51.100.10",
        "weft_advertise_address": "172.31.0.12",
        "weft_trusted_subnets": ["172.31.0.0/24"],
    },
}


def lab(**changes):
    """The lab's hostvars with some variables changed ({host: {name: value}}; a value None removes it)."""
    hostvars = copy.deepcopy(LAB)
    for host, values in changes.items():
        hostvars.setdefault(host, {})
        for name, value in values.items():
            if value is None:
                hostvars[host].pop(name, None)
            else:
                hostvars[host][name] = value
    return hostvars


def problems(hostvars):
    return inventory_problems(list(hostvars), hostvars)


def test_the_lab_passes():
    # aws-a and aws-b share the NAT's address, but nobody outside the VPC dials them: not a clash.
    assert problems(lab()) == []


def test_same_site_duplicate_advertise_address():
    assert problems(lab(**{"dc1-b": {"weft_advertise_address": "10.10.1.11"}})) == [
        "dc1-a and dc1-b both advertise 10.10.1.11:6783: give each host its own weft_advertise_address"
    ]


def test_the_port_counts_and_the_default_port_is_written_out():
    assert problems(lab(**{"dc1-b": {"weft_advertise_address": "10.10.1.11:7000"}})) == []
    assert problems(lab(**{"dc1-b": {"weft_advertise_address": "10.10.1.11:6783"}})) == [
        "dc1-a and dc1-b both advertise 10.10.1.11:6783: give each host its own weft_advertise_address"
    ]
    # weft_port moves the default port: 10.10.1.11 on port 7000 is 10.10.1.11:7000.
    hostvars = lab(**{"dc1-b": {"weft_advertise_address": "10.10.1.11:7000", "weft_public_address": None}})
    hostvars["dc1-a"]["weft_port"] = "7000"
    assert problems(hostvars) == [
        "dc1-a and dc1-b both advertise 10.10.1.11:7000: give each host its own weft_advertise_address"
    ]


def test_fallback_to_ansible_host_clashes_too():
    hostvars = {
        "a": {"ansible_host": "192.0.2.1", "weft_site": "x"},
        "b": {"ansible_host": "192.0.2.1", "weft_site": "x"},
        "c": {"weft_site": "x"},  # dialled at its inventory name
    }
    assert problems(hostvars) == [
        "a and b both advertise 192.0.2.1:6783: give each host its own weft_advertise_address"
    ]


def test_cross_site_public_duplicate():
    # dc2-a's public address is dc1-a's: dc1-b and the VPC would dial one for the other, dc1-a itself.
    assert problems(lab(**{"dc2-a": {"weft_public_address": "10.10.1.11"}})) == [
        "hosts at aws, dc1 would dial dc1-a and dc2-a both at 10.10.1.11:6783 (dc1-a's weft_advertise_address and "
        "weft_public_address, dc2-a's weft_public_address): give each host its own weft_public_address (the "
        "address other sites reach each one at)"
    ]


def test_reachable_site_behind_one_nat_needs_a_port_forward_each():
    hostvars = lab(**{h: {"weft_site_reachable": True} for h in ("aws-a", "aws-b")})
    assert problems(hostvars) == [
        "hosts at dc1, dc2 would dial aws-a and aws-b both at 198.51.100.10:6783 (aws-a's weft_public_address, "
        "aws-b's weft_public_address): give each host its own weft_public_address (behind one NAT, a port forward "
        "each; or weft_site_reachable: false for a site nobody can dial into)"
    ]
    hostvars["aws-b"]["weft_public_address"] = "198.51.100.10:6784"
    assert problems(hostvars) == []


def test_three_hosts_at_one_address_make_one_line():
    hostvars = dict((h, {"ansible_host": "127.0.0.1", "weft_site": s}) for h, s in (("a", "1"), ("b", "1"), ("c", "2")))
    assert problems(hostvars) == [
        "a, b and c all advertise 127.0.0.1:6783: give each host its own weft_advertise_address"
    ]


def test_names_compare_without_case():
    hostvars = {"a": {"ansible_host": "Node.example"}, "b": {"ansible_host": "node.EXAMPLE"}}
    assert problems(hostvars) == [
        "a and b both advertise node.example:6783: give each host its own weft_advertise_address"
    ]


def test_sites_that_disagree():
    hostvars = lab(
        **{
            "aws-b": {"weft_site_reachable": True, "weft_public_address": "198.51.100.11"},
            "dc1-b": {"weft_trusted_subnets": None},
        }
    )
    hostvars["dc1-c"] = {"weft_site": "dc1", "weft_advertise_address": "10.10.1.13", "weft_trusted_subnets": []}
    assert problems(hostvars) == [
        "the hosts of site aws disagree on weft_site_reachable (aws-a has false; aws-b has true): set it once for "
        "the site, in its group_vars",
        "the hosts of site dc1 disagree on weft_trusted_subnets (dc1-a has [10.10.1.0/24]; dc1-b, dc1-c have []): "
        "set it once for the site, in its group_vars",
    ]


def test_same_subnets_in_another_order_or_spelling_agree():
    hostvars = lab(
        **{
            "dc1-a": {"weft_trusted_subnets": ["10.10.9.0/24", "10.10.1.0/24"]},
            "dc1-b": {"weft_trusted_subnets": ["10.10.1.7/24", "10.10.9.0/24", "10.10.9.0/24"]},
        }
    )
    assert problems(hostvars) == []


def test_addresses_and_subnets_that_do_not_parse():
    hostvars = lab(
        **{
            "dc1-a": {"weft_public_address": "10.10.1.11:99999"},
            "dc1-b": {"weft_trusted_subnets": ["10.10.1.0/33"]},
            "dc2-a": {"weft_trusted_subnets": "10.10.2.0/24"},
        }
    )
    found = problems(hostvars)
    assert found[0].startswith('dc1-a: weft_public_address "10.10.1.11:99999" is not HOST[:PORT] (')
    assert found[1:] == [
        'dc1-b: weft_trusted_subnets has "10.10.1.0/33", which is not a subnet',
        'dc2-a: weft_trusted_subnets must be a list of subnets, not "10.10.2.0/24"',
    ]
    assert problems(lab(**{"dc2-a": {"weft_port": "http"}})) == ["dc2-a: weft_port 'http' is not a port number"]


def test_unknown_host():
    with pytest.raises(AnsibleFilterError, match="'nope' is not a host"):
        inventory_problems(["nope"], LAB)


def test_own_addresses():
    assert (
        address_problems(
            {
                "weft_listen_address": "0.0.0.0",
                "weft_advertise_address": "",
                "weft_peers": None,
                "weft_extra_peers": [],
            },
            "dc1-a",
            6783,
        )
        == []
    )
    found = address_problems(
        {"weft_listen_address": "[::1", "weft_peers": ["10.0.0.1", "fe80::zz"], "weft_extra_peers": "a b"},
        "dc1-a",
        6783,
    )
    assert [line.split(" (")[0] for line in found] == [
        'dc1-a: weft_listen_address "[::1" is not HOST[:PORT]',
        'dc1-a: weft_peers "fe80::zz" is not HOST[:PORT]',
        'dc1-a: weft_extra_peers "a b" is not HOST[:PORT]',
    ]


# --- stale_peers -------------------------------------------------------------------------------------------


def ran(hostvars, host, new=False, absent=False):
    """What validate.yml records about a host of the run: its pre-flight facts and its weft.yaml as read."""
    hostvars[host]["_weft_preflight"] = {"present": not absent}
    if absent:
        hostvars[host]["_weft_old_config"] = {"changed": False, "skipped": True}
    elif new:
        hostvars[host]["_weft_old_config"] = {"failed": False, "msg": "file not found: /etc/weft/weft.yaml"}
    else:
        hostvars[host]["_weft_old_config"] = {"content": "cGVlcnM6IFtdCg==", "encoding": "base64"}


def stale(hostvars, batch, play=None):
    return stale_peers(batch, hostvars, list(hostvars), play or batch)


def test_a_new_host_in_the_limit_leaves_the_others_stale():
    hostvars = lab(**{"dc1-c": {"weft_site": "dc1", "weft_advertise_address": "10.10.1.13"}})
    ran(hostvars, "dc1-c", new=True)
    result = stale(hostvars, ["dc1-c"])
    # The VPC's hosts dial dc1 too (they dial out); everyone is stale.
    assert result["stale"] == ["aws-a", "aws-b", "dc1-a", "dc1-b", "dc2-a"]
    assert result["joining"] == ["dc1-c"] and result["leaving"] == []
    assert result["msg"] == (
        "aws-a, aws-b, dc1-a, dc1-b, dc2-a are outside --limit and will still list the old peers (dc1-c is new to "
        "the mesh): after this run, run site.yml --limit aws-a,aws-b,dc1-a,dc1-b,dc2-a (a reload, no restart)"
    )


def test_a_new_host_behind_nat_changes_only_its_own_site():
    hostvars = lab(
        **{"aws-c": {"weft_site": "aws", "weft_site_reachable": False, "weft_advertise_address": "172.31.0.13"}}
    )
    ran(hostvars, "aws-c", new=True)
    ran(hostvars, "dc2-a")
    result = stale(hostvars, ["aws-c", "dc2-a"])
    assert result["stale"] == ["aws-a", "aws-b"]
    assert result["msg"] == (
        "aws-a, aws-b are outside --limit and will still list the old peers (aws-c is new to the mesh): after this "
        "run, run site.yml --limit aws-a,aws-b (a reload, no restart)"
    )


def test_nothing_stale():
    hostvars = lab()
    for host in hostvars:
        ran(hostvars, host)
    # A converged host in the limit changes nobody's peers.
    assert stale(hostvars, ["dc1-a"]) == {"stale": [], "joining": [], "leaving": [], "msg": ""}
    # No limit: nobody is outside, however new the hosts are.
    for host in hostvars:
        ran(hostvars, host, new=True)
    assert stale(hostvars, list(hostvars))["msg"] == ""


def test_later_batches_are_not_outside():
    # serial: the batch is dc1-c, the play covers everyone: the others get their new peers in their batch.
    hostvars = lab(**{"dc1-c": {"weft_site": "dc1", "weft_advertise_address": "10.10.1.13"}})
    ran(hostvars, "dc1-c", new=True)
    assert stale(hostvars, ["dc1-c"], play=list(hostvars))["msg"] == ""
    # serial with --limit: the batch is dc1-c, the play dc1-c and dc1-a: the rest are outside.
    assert stale(hostvars, ["dc1-c"], play=["dc1-c", "dc1-a"])["stale"] == ["aws-a", "aws-b", "dc1-b", "dc2-a"]


def test_explicit_peers_are_not_stale():
    hostvars = lab(**{"dc1-c": {"weft_site": "dc1", "weft_advertise_address": "10.10.1.13"}})
    hostvars["dc2-a"]["weft_peers"] = ["10.10.1.11"]
    ran(hostvars, "dc1-c", new=True)
    assert "dc2-a" not in stale(hostvars, ["dc1-c"])["stale"]


def test_a_removed_host_still_in_the_group():
    hostvars = lab()
    ran(hostvars, "dc1-b", absent=True)
    result = stale(hostvars, ["dc1-b"])
    assert result["leaving"] == ["dc1-b"]
    # peer_addresses still names dc1-b while it is in the group: it must leave the inventory first.
    assert result["msg"] == (
        "aws-a, aws-b, dc1-a, dc2-a are outside --limit and will still list the old peers (dc1-b is removed): after "
        "this run, take dc1-b out of the inventory (or of the mesh group), then run site.yml --limit "
        "aws-a,aws-b,dc1-a,dc2-a (a reload, no restart)"
    )


def test_joining_and_leaving_together():
    hostvars = lab(**{"dc2-b": {"weft_site": "dc2", "weft_advertise_address": "10.10.2.12"}})
    ran(hostvars, "dc2-b", new=True)
    ran(hostvars, "aws-b", absent=True)
    result = stale(hostvars, ["dc2-b", "aws-b"])
    # aws-b behind NAT is in nobody's list outside the VPC; dc2-b is in everyone's.
    assert result["stale"] == ["aws-a", "dc1-a", "dc1-b", "dc2-a"]
    assert "(dc2-b is new to the mesh; aws-b is removed)" in result["msg"]
    assert "take aws-b out of the inventory" in result["msg"]


def test_hosts_not_judged_yet_count_for_nothing():
    hostvars = lab()
    assert stale(hostvars, ["dc1-a"])["msg"] == ""


def test_a_present_host_whose_configuration_was_not_read_is_new():
    # The read skipped (no configuration directory): nothing to read, so the host is new to the mesh.
    hostvars = lab()
    hostvars["dc2-a"]["_weft_preflight"] = {"present": True}
    hostvars["dc2-a"]["_weft_old_config"] = {"changed": False, "skipped": True}
    assert stale(hostvars, ["dc2-a"])["joining"] == ["dc2-a"]

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.weft.mesh.plugins.filter.mesh import (
    mesh_problems,
    peer_addresses,
    plaintext_connections,
    weft_address,
)

# The lab's shape: two data centres that can reach each other, and a VPC behind NAT.
HOSTVARS = {
    "dc1-a": {
        "weft_site": "dc1",
        "weft_advertise_address": "10.10.1.11",
        "weft_public_address": "192.0.2.11",
        "weft_trusted_subnets": ["10.10.1.0/24"],
    },
    "dc1-b": {"weft_site": "dc1", "ansible_host": "10.10.1.12"},  # no addresses set: ansible_host everywhere
    "dc2-a": {"weft_site": "dc2", "weft_advertise_address": "10.10.2.11", "weft_public_address": "192.0.2.21:16783"},
    "aws-a": {"weft_site": "aws", "weft_site_reachable": False, "weft_advertise_address": "172.31.0.11"},
    "aws-b": {
        "weft_site": "aws",
        "weft_site_reachable": "false",
        "weft_advertise_address": "172.31.0.12",
        "weft_port": 7000,
    },
}
HOSTS = list(HOSTVARS)


def test_same_site_uses_advertise_other_sites_public():
    assert peer_addresses(HOSTS, HOSTVARS, "dc1-a") == ["10.10.1.12:6783", "192.0.2.21:16783"]


def test_fallbacks_and_unreachable_sites_left_out():
    # dc1-a has a public address for dc2; the VPC's hosts cannot be dialled from dc2.
    assert peer_addresses(HOSTS, HOSTVARS, "dc2-a") == ["10.10.1.12:6783", "192.0.2.11:6783"]


def test_nat_site_dials_everyone():
    assert peer_addresses(HOSTS, HOSTVARS, "aws-a") == [
        "10.10.1.12:6783",
        "172.31.0.12:7000",
        "192.0.2.11:6783",
        "192.0.2.21:16783",
    ]


def test_no_site_at_all_means_one_site():
    hostvars = {"a": {}, "b": {"ansible_host": "10.0.0.2"}, "c": {"weft_public_address": "198.51.100.3"}}
    assert peer_addresses(list(hostvars), hostvars, "a") == ["10.0.0.2:6783", "c:6783"]


def test_unknown_host_is_an_error():
    with pytest.raises(AnsibleFilterError, match="'ghost' is not a host"):
        peer_addresses(["ghost"], HOSTVARS, "dc1-a")


def test_weft_address():
    assert weft_address("0.0.0.0", 6783) == "0.0.0.0:6783"
    assert weft_address("::", "7000") == "[::]:7000"
    with pytest.raises(AnsibleFilterError, match="missing host"):
        weft_address(":1")


ADDRESSES = {"dc1-a": "10.10.1.11", "dc1-b": "10.10.1.12", "dc2-a": "10.10.2.11"}


def connection(nickname, state="established", encrypted=True, datapath=None, address=None):
    address = address or ADDRESSES.get(nickname, "192.0.2.99") + ":40001"
    return {
        "peer": "x",
        "nickname": nickname,
        "address": address,
        "state": state,
        "encrypted": encrypted,
        "datapath": datapath,
    }


def status(*connections, ready=True, peers=("dc1-a", "dc1-b", "dc2-a")):
    return {
        "ready": ready,
        "peers": [{"nickname": n} for n in peers],
        "connections": list(connections),
    }


MESH = ["dc1-a", "dc1-b", "dc2-a"]


def test_healthy_mesh():
    sealed = {"path": "sleeve", "encrypted": True}
    fast = {"path": "fast", "encrypted": False}
    st = status(connection("dc1-b", encrypted=False, datapath=fast), connection("dc2-a", datapath=sealed))
    assert mesh_problems(st, MESH, HOSTVARS, "dc1-a") == []


def test_missing_peer_and_pending_connection():
    st = status(connection("dc1-b", state="pending"), peers=("dc1-a", "dc1-b"), ready=False)
    assert mesh_problems(st, MESH, HOSTVARS, "dc1-a") == [
        "the agent is not ready",
        "dc1-b: no established connection (connections: pending)",
        "dc2-a: not among the peers",
    ]


def test_cross_site_traffic_in_clear():
    # The control channel is sealed but data takes the unencrypted fast path across sites: not acceptable.
    st = status(connection("dc1-b"), connection("dc2-a", datapath={"path": "fast", "encrypted": False}))
    assert mesh_problems(st, MESH, HOSTVARS, "dc1-a") == [
        "dc2-a: connection across sites (dc1 to dc2) is not encrypted (fast from 10.10.2.11)"
    ]
    assert mesh_problems(st, MESH, HOSTVARS, "dc1-a", False) == []


def test_datapath_down():
    down = {"path": "down", "encrypted": False, "reason": "no heartbeat"}
    st = status(connection("dc1-b"), connection("dc2-a", datapath=down))
    assert mesh_problems(st, MESH, HOSTVARS, "dc1-a") == ["dc2-a: data path down (no heartbeat)"]
    # Not required: judged by the control channel's encryption, which is on.
    assert mesh_problems(st, MESH, HOSTVARS, "dc1-a", True, False) == []


def test_no_datapath_at_all():
    # An agent with datapath: false reports no data path; the control channel is what counts.
    st = status(connection("dc1-b"), connection("dc2-a", encrypted=False))
    assert mesh_problems(st, MESH, HOSTVARS, "dc1-a") == [
        "dc2-a: connection across sites (dc1 to dc2) is not encrypted (control channel from 10.10.2.11)"
    ]


def test_nickname_override():
    hostvars = dict(HOSTVARS, **{"dc1-b": {"weft_site": "dc1", "weft_nickname": "bee"}})
    st = status(connection("bee"), connection("dc2-a"), peers=("dc1-a", "bee", "dc2-a"))
    assert mesh_problems(st, MESH, hostvars, "dc1-a") == []


def test_not_a_status():
    with pytest.raises(AnsibleFilterError, match="expects the weft_info status"):
        mesh_problems("nope", MESH, HOSTVARS, "dc1-a")


def test_routed_site_without_public_address_uses_advertise():
    # ansible_host may be a management network the hosts cannot use among themselves: it is the last resort.
    hostvars = {
        "a": {"weft_site": "s1", "ansible_host": "10.254.0.2"},
        "b": {"weft_site": "s2", "ansible_host": "10.254.0.3", "weft_advertise_address": "10.10.2.11"},
    }
    assert peer_addresses(["a", "b"], hostvars, "a") == ["10.10.2.11:6783"]


# --- plaintext connections: what verify.yml fails on, and what it lists ------------------------------------


def plaintext_mesh():
    """A mesh without secrets, as the agents report it: every connection unencrypted."""
    fast = {"path": "fast", "encrypted": False, "udp": "10.10.1.12:6784"}
    sleeve = {"path": "sleeve", "encrypted": False, "udp": "10.10.2.11:6783"}
    return status(
        connection("dc1-b", encrypted=False, datapath=fast), connection("dc2-a", encrypted=False, datapath=sleeve)
    )


def allowing(hostvars, *hosts):
    return dict(hostvars, **{h: dict(hostvars[h], weft_allow_unencrypted=True) for h in hosts})


def test_plaintext_across_sites_fails_unless_both_ends_allow_it():
    st = plaintext_mesh()
    refused = ["dc2-a: connection across sites (dc1 to dc2) is not encrypted (sleeve from 10.10.2.11)"]
    assert mesh_problems(st, MESH, HOSTVARS, "dc1-a") == refused
    # The setting a typo cannot produce: both ends must say so in inventory ("true" from -e counts too).
    assert mesh_problems(st, MESH, allowing(HOSTVARS, "dc1-a"), "dc1-a") == refused
    everyone = allowing(HOSTVARS, "dc1-a", "dc1-b", "dc2-a")
    everyone["dc2-a"]["weft_allow_unencrypted"] = "true"
    assert mesh_problems(st, MESH, everyone, "dc1-a") == []
    # ...and verify still lists them.
    assert plaintext_connections(st, MESH, everyone, "dc1-a") == [
        "dc1-b: fast from 10.10.1.12, at the same site, trusted subnet",
        "dc2-a: sleeve from 10.10.2.11, across sites (dc1 to dc2), allowed by weft_allow_unencrypted",
    ]


def test_plaintext_at_the_same_site_needs_a_trusted_subnet():
    # dc1-b's traffic comes from outside dc1-a's trusted subnets (its UDP address says so): not acceptable.
    elsewhere = {"path": "fast", "encrypted": False, "udp": "10.99.0.12:6784"}
    st = status(connection("dc1-b", encrypted=False, datapath=elsewhere), connection("dc2-a"))
    assert mesh_problems(st, MESH, HOSTVARS, "dc1-a") == [
        "dc1-b: connection at the same site from outside the trusted subnets is not encrypted"
        " (fast from 10.10.1.12, 10.99.0.12)"
    ]
    # No trusted subnets at all: nothing unencrypted is acceptable without the flag.
    untrusted = dict(HOSTVARS, **{"dc1-a": {"weft_site": "dc1"}})
    assert len(mesh_problems(plaintext_mesh(), MESH, untrusted, "dc1-a")) == 2


def test_plaintext_to_a_peer_outside_the_inventory():
    st = status(connection("dc1-b"), connection("dc2-a"), connection("stranger", encrypted=False))
    assert mesh_problems(st, MESH, HOSTVARS, "dc1-a") == [
        "stranger: connection to a peer outside the inventory is not encrypted (control channel from 192.0.2.99)"
    ]
    assert mesh_problems(st, MESH, allowing(HOSTVARS, "dc1-a"), "dc1-a") == []


def test_plaintext_to_a_removed_host_in_the_trusted_subnets_is_the_trusted_rule():
    # A host just taken out of the inventory (an EC2 instance terminated) whose agent still runs in a subnet
    # this host trusts: plaintext there is what the operator chose for the subnet, not a broken mesh.
    fast = {"path": "fast", "encrypted": False, "udp": "10.10.1.99:6784"}
    st = status(
        connection("dc1-b"),
        connection("dc2-a"),
        connection("gone", encrypted=False, datapath=fast, address="10.10.1.99:6783"),
    )
    assert mesh_problems(st, MESH, HOSTVARS, "dc1-a") == []
    assert plaintext_connections(st, MESH, HOSTVARS, "dc1-a") == [
        "gone: fast from 10.10.1.99, to a peer outside the inventory, trusted subnet"
    ]


def test_encrypted_mesh_lists_only_the_trusted_fast_path():
    assert plaintext_connections(status(connection("dc1-b"), connection("dc2-a")), MESH, HOSTVARS, "dc1-a") == []
    fast = {"path": "fast", "encrypted": False, "udp": "10.10.1.12:6784"}
    st = status(connection("dc1-b", datapath=fast), connection("dc2-a", datapath={"path": "sleeve", "encrypted": True}))
    assert mesh_problems(st, MESH, HOSTVARS, "dc1-a") == []
    assert plaintext_connections(st, MESH, HOSTVARS, "dc1-a") == [
        "dc1-b: fast from 10.10.1.12, at the same site, trusted subnet"
    ]


def test_ipv6_addresses_and_bad_subnets():
    hostvars = {
        "a": {"weft_site": "s", "weft_trusted_subnets": ["fd00::/64"]},
        "b": {"weft_site": "s"},
    }
    st = status(connection("b", encrypted=False, address="[fd00::2]:6783"), peers=("a", "b"))
    assert mesh_problems(st, ["a", "b"], hostvars, "a") == []
    hostvars["a"]["weft_trusted_subnets"] = ["not-a-subnet"]
    with pytest.raises(AnsibleFilterError, match="weft_trusted_subnets of a"):
        mesh_problems(st, ["a", "b"], hostvars, "a")

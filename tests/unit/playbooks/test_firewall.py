"""Firewalls: the role's weft_manage_firewall (firewalld or ufw on the hosts) and the EC2 security group example,
inventories/example-aws-security-group.yml, run for real against a local moto server when moto is installed."""

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
EXAMPLE = ROOT / "inventories" / "example-aws-security-group.yml"

pytestmark = pytest.mark.skipif(
    not (BIN / "ansible-playbook").exists(), reason="ansible-playbook is not installed next to python"
)


def ansible(argv, tmp_path, config=None, env=(), cwd=ROOT):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "AWS_"))}
    if config is None:
        config = tmp_path / "neutral.cfg"
        config.write_text("[defaults]\n")
    base.update(
        ANSIBLE_CONFIG=str(config),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_STDOUT_CALLBACK="default",
        **dict(env),
    )
    run = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], cwd=cwd, env=base, capture_output=True, text=True, timeout=300, check=False
    )
    recap = {
        m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        for m in re.finditer(r"^(\S+)\s+: (ok=.*)$", run.stdout, re.M)
    }
    return run.returncode, run.stdout + run.stderr, recap


def write_inventory(tmp_path, hosts, **group_vars):
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"weft_mesh": {"vars": group_vars, "hosts": hosts}}))
    return str(tmp_path / "hosts.yml")


DUMMIES = {
    "node-1": {"weft_site": "one", "weft_advertise_address": "192.0.2.1"},
    "node-2": {"weft_site": "two", "weft_advertise_address": "192.0.2.2"},
}
UNREACHABLE = {"ansible_host": "127.0.0.1", "ansible_port": 1, "ansible_user": "nobody"}


@pytest.mark.parametrize("module", ["ansible.posix.firewalld", "community.general.ufw"])
def test_firewall_modules_are_installed(tmp_path, module):
    rc, output, _ = ansible(["ansible-doc", module], tmp_path)
    assert rc == 0, output


def test_unknown_firewall_is_refused_before_any_host(tmp_path):
    inventory = write_inventory(tmp_path, DUMMIES, **UNREACHABLE)
    argv = ["ansible-playbook", "-i", inventory, "site.yml", "-e", "weft_manage_firewall=true"]
    rc, output, recap = ansible([*argv, "-e", "weft_firewall=iptables"], tmp_path, ROOT / "ansible.cfg")
    assert rc == 2, output
    assert "weft_firewall must be one of: firewalld, ufw" in output
    assert all(c["failed"] == 1 and c["unreachable"] == 0 and c["changed"] == 0 for c in recap.values()), output


def test_security_group_variables_are_known_to_the_role(tmp_path):
    # Kept in the mesh's group_vars next to the rest, they are no misspelling (validate.yml).
    sg = {"weft_sg_vpc_id": "vpc-1", "weft_sg_region": "eu-central-1", "weft_sg_name": "mesh"}
    sg["weft_sg_extra_cidrs"] = []
    inventory = write_inventory(tmp_path, DUMMIES, weft_allow_unencrypted=True, **UNREACHABLE, **sg)
    rc, output, _ = ansible(["ansible-playbook", "-i", inventory, "site.yml"], tmp_path, ROOT / "ansible.cfg")
    assert rc == 4, output  # past the checks, then the hosts are unreachable
    assert "weft_sg_" not in output


def test_security_group_example_syntax(tmp_path):
    inventory = write_inventory(tmp_path, DUMMIES)
    rc, output, _ = ansible(["ansible-playbook", "-i", inventory, str(EXAMPLE), "--syntax-check"], tmp_path)
    assert rc == 0, output


@pytest.fixture
def moto(tmp_path):
    """A moto server playing EC2 on a free local port; (AWS environment, boto3 EC2 client)."""
    boto3 = pytest.importorskip("boto3")
    server = BIN / "moto_server"
    if not server.exists():
        pytest.skip("moto_server is not installed next to python")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "moto.log").read_text()
            time.sleep(0.2)
        env = {
            "AWS_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "eu-central-1",
        }
        ec2 = boto3.client(
            "ec2",
            endpoint_url=env["AWS_URL"],
            region_name=env["AWS_REGION"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        yield env, ec2
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def ingress(ec2, name):
    """{(proto, port): (CIDRs, source group ids)} of the security group."""
    (group,) = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]}])["SecurityGroups"]
    rules = {}
    for perm in group["IpPermissions"]:
        for port in range(perm["FromPort"], perm["ToPort"] + 1):
            rules[(perm["IpProtocol"], port)] = (
                {r["CidrIp"] for r in perm["IpRanges"]},
                {p["GroupId"] for p in perm["UserIdGroupPairs"]},
            )
    return group["GroupId"], rules


def test_security_group_example_lets_the_mesh_in(tmp_path, moto):
    env, ec2 = moto
    vpc = ec2.create_vpc(CidrBlock="172.31.0.0/16")["Vpc"]["VpcId"]
    hosts = {
        "fra-1": {"ansible_host": "10.1.4.21"},
        "ams-1": {"ansible_host": "10.2.0.11", "weft_public_address": "203.0.113.10:6791"},
        "aws-1": {"ansible_host": "172.31.0.5", "weft_advertise_address": "172.31.0.5"},
        "named": {"ansible_host": "node.example.net"},  # no address to let in: skipped
    }

    def converge(hosts):
        inventory = write_inventory(tmp_path, hosts)
        argv = ["ansible-playbook", "-i", inventory, str(EXAMPLE), "-e", f"weft_sg_vpc_id={vpc}"]
        rc, output, recap = ansible(argv, tmp_path, env=env, cwd=tmp_path)
        assert rc == 0, output
        return recap["localhost"]["changed"], output

    changed, output = converge(hosts)
    assert changed == 1, output
    group_id, rules = ingress(ec2, "weft-mesh")
    mesh = {"10.1.4.21/32", "203.0.113.10/32", "172.31.0.5/32"}
    assert rules == {key: (mesh, {group_id}) for key in [("tcp", 6783), ("udp", 6783), ("udp", 6784)]}

    assert converge(hosts)[0] == 0  # nothing to change

    del hosts["fra-1"]  # a host leaves the inventory: its rule goes at the next run
    converge(hosts)
    left = {frozenset(cidrs) for cidrs, _ in ingress(ec2, "weft-mesh")[1].values()}
    assert left == {frozenset(mesh - {"10.1.4.21/32"})}

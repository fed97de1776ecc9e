"""A moto server playing the EC2 API, with the lab's AWS machines registered as tagged instances, so the lab
inventory can use the real amazon.aws.aws_ec2 plugin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from labplan import (
    AWS_FAKE_CREDENTIALS,
    AWS_REGION,
    AWS_VPC_NAME,
    LOG_DIR,
    MACHINES,
    MOTO_HOST,
    MOTO_PORT,
    MOTO_URL,
    RUN_DIR,
    SITES,
    Machine,
    public_address,
)
from labsys import changed, read_pid, stop_pid

MOTO_PIDFILE = RUN_DIR / "moto.pid"
MOTO_LOG = LOG_DIR / "moto.log"
ALIVE_STATES = ["pending", "running"]


def moto_server_bin() -> str:
    """moto_server from the same environment as this interpreter (the project venv)."""
    candidate = Path(sys.executable).parent / "moto_server"
    if not candidate.exists():
        raise SystemExit(f"weftlab: {candidate} not found; install lab/requirements.txt (make lab-up does)")
    return str(candidate)


def moto_pid() -> int | None:
    """The recorded moto server PID while it runs."""
    return read_pid(MOTO_PIDFILE, "moto_server")


def moto_answers() -> bool:
    """True when something answers HTTP on the moto port."""
    try:
        with urllib.request.urlopen(f"{MOTO_URL}/moto-api/", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except Exception:  # noqa: BLE001 - refused, reset, timeout: all "not yet"
        return False


def start_moto(timeout: float = 30.0) -> None:
    """Start moto_server on loopback unless ours runs; refuse to adopt a stranger on the port."""
    if moto_pid():
        return
    if moto_answers():
        raise SystemExit(f"weftlab: something not started by the lab already listens on {MOTO_URL}")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(MOTO_LOG, "ab") as out:
        proc = subprocess.Popen(
            [moto_server_bin(), "-H", MOTO_HOST, "-p", str(MOTO_PORT)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",
        )
    MOTO_PIDFILE.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while not moto_answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"weftlab: moto_server did not come up; see {MOTO_LOG}")
        time.sleep(0.2)
    changed(f"started moto_server (pid {proc.pid}) on {MOTO_URL}")


def stop_moto() -> None:
    """Stop the moto server by its recorded PID."""
    pid = moto_pid()
    if pid:
        stop_pid(pid, 10.0, signal.SIGTERM)
        changed(f"stopped moto_server (pid {pid})")
    MOTO_PIDFILE.unlink(missing_ok=True)


def ec2_client():  # -> botocore client
    """A boto3 EC2 client for the moto server with the fake credentials."""
    import boto3

    for key, value in AWS_FAKE_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    return boto3.client(
        "ec2",
        endpoint_url=MOTO_URL,
        region_name=AWS_REGION,
        aws_access_key_id=AWS_FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


def ensure_vpc(ec2) -> str:
    """The lab VPC and its one subnet (172.31.0.0/24), found by tag; returns the subnet id."""
    cidr = SITES["aws"].subnet
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "tag:Name", "Values": [AWS_VPC_NAME]}])["Vpcs"]
    if vpcs:
        vpc_id = vpcs[0]["VpcId"]
    else:
        vpc_id = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
        ec2.create_tags(Resources=[vpc_id], Tags=[{"Key": "Name", "Value": AWS_VPC_NAME}])
        changed(f"ec2: created VPC {vpc_id} {cidr}")
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]
    if subnets:
        return subnets[0]["SubnetId"]
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=f"{AWS_REGION}a")["Subnet"]["SubnetId"]
    ec2.create_tags(Resources=[subnet_id], Tags=[{"Key": "Name", "Value": f"{AWS_VPC_NAME}-subnet"}])
    changed(f"ec2: created subnet {subnet_id} {cidr}")
    return subnet_id


def instance_tags(m: Machine) -> dict[str, str]:
    """Tags the inventory keys on: name, site, mesh membership, and lab-only connection details."""
    return {
        "Name": m.name,
        "weft_site": m.site,
        "weft_mesh": "true",
        "weft_public_address": public_address(m),
        "lab_ssh_host": m.mgmt_ip,
    }


def find_instance(ec2, name: str) -> dict | None:
    """The live (pending or running) instance tagged Name=name, if any."""
    filters = [
        {"Name": "tag:Name", "Values": [name]},
        {"Name": "instance-state-name", "Values": ALIVE_STATES},
    ]
    for res in ec2.describe_instances(Filters=filters)["Reservations"]:
        for inst in res["Instances"]:
            return inst
    return None


def image_id(ec2) -> str:
    """Any AMI moto knows (it ships a fixed catalogue); sorted so the choice is stable."""
    arch = [{"Name": "architecture", "Values": ["x86_64"]}]
    images = ec2.describe_images(Owners=["amazon"], Filters=arch)["Images"] or ec2.describe_images()["Images"]
    return sorted(i["ImageId"] for i in images)[0]


def ensure_instance(ec2, m: Machine, subnet_id: str, ami: str) -> str:
    """Register the machine as an instance once (found by Name + state); keep its tags current."""
    tags = instance_tags(m)
    inst = find_instance(ec2, m.name)
    if inst is None:
        inst = ec2.run_instances(
            ImageId=ami,
            InstanceType="t3.micro",
            MinCount=1,
            MaxCount=1,
            # An explicit primary NIC that dies with the instance: moto then frees the private IP on terminate,
            # so the machine can be registered again at the same address.
            NetworkInterfaces=[
                {
                    "DeviceIndex": 0,
                    "SubnetId": subnet_id,
                    "PrivateIpAddress": m.underlay_ip,
                    "DeleteOnTermination": True,
                }
            ],
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
        )["Instances"][0]
        changed(f"ec2: registered {m.name} as {inst['InstanceId']}")
        return inst["InstanceId"]
    have = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
    if any(have.get(k) != v for k, v in tags.items()):
        ec2.create_tags(Resources=[inst["InstanceId"]], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        changed(f"ec2: retagged {inst['InstanceId']}")
    return inst["InstanceId"]


def register_instances() -> dict[str, str]:
    """Make sure every AWS machine is a live instance; returns name -> instance id."""
    ec2 = ec2_client()
    subnet_id = ensure_vpc(ec2)
    ami = image_id(ec2)
    return {m.name: ensure_instance(ec2, m, subnet_id, ami) for m in MACHINES if m.site == "aws"}

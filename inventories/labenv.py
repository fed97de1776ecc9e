"""Check that inventories/lab agrees with the lab that runs (/var/lib/weft-lab/lab.json), and print the
environment the lab's aws_ec2 inventory wants.

    labenv.py check     exit 1, naming each difference, if the static hosts, their addresses, the SSH key, the
                        NAT address or the EC2 endpoint differ from lab.json
    labenv.py exports   print `export AWS_URL=... AWS_ACCESS_KEY_ID=...` lines for a shell to eval

The inventory is written by hand (it is the example users copy), the lab is built by lab/weftlab.py from
lab/labplan.py; this keeps the two from drifting apart silently. Run with the project venv's Python.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
LAB_INVENTORY = HERE / "lab"
LAB_JSON = Path(os.environ.get("WEFT_LAB_JSON", "/var/lib/weft-lab/lab.json"))
DEFAULT_ENDPOINT = "http://127.0.0.1:5055"  # the fallback written in 20-lab.aws_ec2.yml


def load_lab() -> dict:
    try:
        return json.loads(LAB_JSON.read_text())
    except FileNotFoundError:
        raise SystemExit(f"labenv: {LAB_JSON} is missing: is the lab up? (make lab-up)") from None


def static_hosts() -> tuple[dict, dict]:
    """(host -> vars, all-group vars) from the static DC file."""
    data = yaml.safe_load((LAB_INVENTORY / "10-dc.yml").read_text())
    hosts: dict[str, dict] = {}

    def walk(group: dict) -> None:
        for name, hvars in (group.get("hosts") or {}).items():
            hosts[name] = hvars or {}
        for child in (group.get("children") or {}).values():
            walk(child or {})

    walk(data["all"])
    return hosts, data["all"].get("vars") or {}


def check(lab: dict) -> list[str]:
    problems = []
    hosts, common = static_hosts()
    machines = {m["name"]: m for m in lab["machines"]}
    for m in machines.values():
        if m.get("reachable_from_other_sites", True) and m["name"] not in hosts and m["site"] != "aws":
            problems.append(f"{m['name']} (site {m['site']}) is in lab.json but not in 10-dc.yml")
    for name, hvars in hosts.items():
        m = machines.get(name)
        if m is None:
            problems.append(f"{name} is in 10-dc.yml but not in lab.json")
            continue
        for var, want in (
            ("ansible_host", m["mgmt_ip"]),
            ("weft_advertise_address", m["underlay_ip"]),
            ("weft_public_address", m["public_address"]),
        ):
            if str(hvars.get(var)) != want:
                problems.append(f"{name}: {var} is {hvars.get(var)} in 10-dc.yml, lab.json says {want}")
    ssh = lab.get("ssh", {})
    for var, key in (("ansible_user", "user"), ("ansible_ssh_private_key_file", "private_key_file")):
        if key in ssh and str(common.get(var)) != ssh[key]:
            problems.append(f"10-dc.yml all.vars.{var} is {common.get(var)}, lab.json says {ssh[key]}")
    aws_vars = yaml.safe_load((LAB_INVENTORY / "group_vars" / "aws.yml").read_text())
    nat = lab["sites"]["aws"]["public_address"]
    if aws_vars.get("weft_public_address") != nat:
        problems.append(
            f"group_vars/aws.yml weft_public_address is {aws_vars.get('weft_public_address')}, NAT is {nat}"
        )
    endpoint = lab["ec2"]["endpoint_url"]
    if endpoint != DEFAULT_ENDPOINT and os.environ.get("AWS_URL") != endpoint:
        problems.append(f"the EC2 endpoint is {endpoint}: export AWS_URL={endpoint} (eval `labenv.py exports`)")
    return problems


def exports(lab: dict) -> str:
    ec2 = lab["ec2"]
    env = {
        "AWS_URL": ec2["endpoint_url"],
        "AWS_ACCESS_KEY_ID": ec2.get("aws_access_key_id", "testing"),
        "AWS_SECRET_ACCESS_KEY": ec2.get("aws_secret_access_key", "testing"),
        "AWS_DEFAULT_REGION": ec2.get("region", "us-east-1"),
        "ANSIBLE_VAULT_PASSWORD_FILE": str(HERE / "lab-vault-password.sh"),
    }
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labenv.py", description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("action", choices=["check", "exports"])
    args = parser.parse_args(argv)
    lab = load_lab()
    if args.action == "exports":
        sys.stdout.write(exports(lab))
        return 0
    problems = check(lab)
    for p in problems:
        print(f"labenv: inventories/lab differs from the lab: {p}", file=sys.stderr)
    if not problems:
        print(f"labenv: inventories/lab agrees with {LAB_JSON}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

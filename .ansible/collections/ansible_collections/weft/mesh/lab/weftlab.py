#!/usr/bin/env python3
"""weftlab: build the Weft virtual hybrid cloud on this machine (two DCs and an AWS VPC behind a NAT, five
systemd-nspawn machines, a moto EC2 API), idempotently up and down.

    weftlab.py up | down [--purge] | status | check | ssh NAME [CMD...]

See lab/README.md for the addressing plan and lab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import labnet
import labroot
from labplan import (
    AWS_FAKE_CREDENTIALS,
    AWS_REGION,
    CACHE_DIR,
    LAB_JSON,
    LOG_DIR,
    MACHINES,
    MGMT_BRIDGE,
    MGMT_GATEWAY,
    MGMT_SUBNET,
    MOTO_URL,
    RUN_DIR,
    SITES,
    SSH_KEY,
    STATE_DIR,
    TRANSIT_PREFIXLEN,
    VAULT_PASSWORD_FILE,
    WAN_NETNS,
    WEFT_TCP_PORT,
    WEFT_UDP_PORTS,
    Machine,
    machine,
    public_address,
)
from labsys import (
    CHANGES,
    cgroup_roots,
    changed,
    ensure_host_packages,
    ensure_tun,
    log,
    require_root,
    run,
    write_file,
)


def ensure_state() -> None:
    """State directory, the lab SSH key and the Ansible Vault password: created once, kept by `down`."""
    for d in (STATE_DIR, RUN_DIR, LOG_DIR, SSH_KEY.parent):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(SSH_KEY.parent, 0o700)
    if not SSH_KEY.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "weft-lab", "-f", str(SSH_KEY)])
        changed(f"generated {SSH_KEY}")
    if not VAULT_PASSWORD_FILE.exists():
        write_file(VAULT_PASSWORD_FILE, secrets.token_urlsafe(32) + "\n", 0o600)
        changed(f"generated {VAULT_PASSWORD_FILE}")


def lab_description(instance_ids: dict[str, str]) -> dict:
    """What inventories need to know about the lab (written to lab.json)."""
    return {
        "version": 1,
        "ssh": {"user": "root", "private_key_file": str(SSH_KEY), "python_interpreter": "/usr/bin/python3"},
        "vault_password_file": str(VAULT_PASSWORD_FILE),
        "ec2": {
            "endpoint_url": MOTO_URL,
            "region": AWS_REGION,
            **{k.lower(): v for k, v in AWS_FAKE_CREDENTIALS.items()},
        },
        "mgmt": {"bridge": MGMT_BRIDGE, "subnet": MGMT_SUBNET, "controller": MGMT_GATEWAY},
        "firewall": {"tcp": [WEFT_TCP_PORT], "udp": list(WEFT_UDP_PORTS)},
        "sites": {
            s.name: {
                "subnet": s.subnet,
                "gateway": s.gateway,
                "router_netns": s.netns,
                "nat": s.nat,
                "public_address": s.public_address,
                "transit": {"wan": s.wan_side, "router": s.router_side, "prefixlen": TRANSIT_PREFIXLEN},
            }
            for s in SITES.values()
        },
        "machines": [
            {
                "name": m.name,
                "site": m.site,
                "underlay_ip": m.underlay_ip,
                "mgmt_ip": m.mgmt_ip,
                "public_address": public_address(m),
                "reachable_from_other_sites": not SITES[m.site].nat,
                "netns": m.netns,
                "ec2_instance_id": instance_ids.get(m.name),
            }
            for m in MACHINES
        ],
    }


def ssh_port_open(m: Machine) -> bool:
    """A cheap liveness probe for `status`: does anything accept on the machine's port 22 over mgmt."""
    try:
        with socket.create_connection((m.mgmt_ip, 22), timeout=1):
            return True
    except OSError:
        return False


def print_table(rows: list[list[str]]) -> None:
    """Aligned columns, header first."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_up(_: argparse.Namespace) -> int:
    """Build what is missing, start what is stopped, wait for every sshd, describe the lab."""
    from labec2 import register_instances, start_moto
    from labmachines import start_machine, wait_all_ready

    started = time.monotonic()
    require_root()
    ensure_host_packages()
    ensure_tun()
    ensure_state()
    lower = labroot.ensure_base()
    labnet.build_network()
    for m in MACHINES:
        labroot.ensure_overlay(m, lower)
        labroot.personalize(m)
        start_machine(m)
    start_moto()
    instance_ids = register_instances()
    states = wait_all_ready(MACHINES)
    write_file(LAB_JSON, json.dumps(lab_description(instance_ids), indent=2) + "\n")
    rows = [["MACHINE", "SITE", "UNDERLAY", "MGMT (ssh)", "SEEN BY OTHER SITES AS", "NETNS", "SYSTEMD", "EC2"]]
    for m in MACHINES:
        rows.append(
            [
                m.name,
                m.site,
                m.underlay_ip,
                m.mgmt_ip,
                public_address(m),
                m.netns,
                states[m.name],
                instance_ids.get(m.name, "-"),
            ]
        )
    print_table(rows)
    print(f"ec2 api: {MOTO_URL}  ssh key: {SSH_KEY}  description: {LAB_JSON}")
    what = f"{len(CHANGES)} changes" if CHANGES else "nothing changed"
    print(f"weftlab up: ready in {time.monotonic() - started:.1f}s ({what})")
    return 0


def lab_mounts() -> list[str]:
    """Mount points under the state directory, deepest first (overlays, including ones of older layouts)."""
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    ours = [p for p in points if p.startswith(f"{STATE_DIR}/")]
    return sorted(set(ours), key=len, reverse=True)


def cmd_down(args: argparse.Namespace) -> int:
    """Stop everything the lab started and remove all it built, except the cached root (and key/vault file)."""
    from labec2 import stop_moto
    from labmachines import stop_machine

    started = time.monotonic()
    require_root()
    with ThreadPoolExecutor(max_workers=len(MACHINES)) as pool:
        list(pool.map(stop_machine, MACHINES))
    stop_moto()
    labnet.teardown_network()
    for m in MACHINES:
        labroot.umount_overlay(m)
    for point in lab_mounts():
        run(["umount", "-l", point])
        changed(f"unmounted {point}")
    if lab_mounts():
        raise SystemExit(f"weftlab: still mounted: {lab_mounts()}")
    for path in [*(m.state_dir for m in MACHINES), RUN_DIR, LAB_JSON]:
        if path.is_dir():
            shutil.rmtree(path)
            changed(f"removed {path}")
        elif path.exists():
            path.unlink()
            changed(f"removed {path}")
    for root in cgroup_roots():
        if (root / "weftlab").is_dir():
            try:
                (root / "weftlab").rmdir()
            except OSError as exc:
                log(f"cannot remove {root / 'weftlab'}: {exc}")
    if args.purge and STATE_DIR.exists():
        shutil.rmtree(STATE_DIR)
        changed(f"removed {STATE_DIR}")
    what = f"{len(CHANGES)} changes" if CHANGES else "nothing was up"
    print(f"weftlab down: done in {time.monotonic() - started:.1f}s ({what}); kept {CACHE_DIR}")
    return 0


def cmd_status(_: argparse.Namespace) -> int:
    """One line per machine plus the routers and moto; exit 0 only when everything runs."""
    from labec2 import moto_answers, moto_pid
    from labmachines import nspawn_pid

    present = set(labnet.netns_list())
    rows = [["MACHINE", "SITE", "UNDERLAY", "MGMT", "NETNS", "NSPAWN PID", "SSH"]]
    healthy = True
    for m in MACHINES:
        pid = nspawn_pid(m)
        ssh = ssh_port_open(m) if pid else False
        healthy = healthy and bool(pid) and ssh and m.netns in present
        rows.append(
            [
                m.name,
                m.site,
                m.underlay_ip,
                m.mgmt_ip,
                "yes" if m.netns in present else "no",
                str(pid or "-"),
                "open" if ssh else "-",
            ]
        )
    print_table(rows)
    routers = [WAN_NETNS] + [s.netns for s in SITES.values()]
    print("routers: " + ", ".join(f"{ns} {'up' if ns in present else 'missing'}" for ns in routers))
    mpid = moto_pid()
    print(f"moto: {'pid ' + str(mpid) if mpid else 'stopped'} {MOTO_URL} {'answers' if moto_answers() else ''}")
    print(f"cached root: {labroot.base_root() if labroot.base_root().is_dir() else 'not built'}")
    healthy = healthy and all(ns in present for ns in routers) and bool(mpid)
    return 0 if healthy else 3


def cmd_check(_: argparse.Namespace) -> int:
    """Run the lab's self-checks; non-zero exit on any failure."""
    from labcheck import run_checks

    require_root()
    return 0 if run_checks() else 1


def cmd_ssh(args: argparse.Namespace) -> int:
    """Replace this process with ssh to the machine over the management network, as root with the lab key."""
    m = machine(args.name)
    opts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    argv = ["ssh", "-i", str(SSH_KEY), *opts, *(["-t"] if not args.command and sys.stdin.isatty() else [])]
    os.execvp("ssh", [*argv, f"root@{m.mgmt_ip}", *args.command])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="weftlab.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="build and start the lab (idempotent)").set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop and remove the lab, keeping the cached root")
    down.add_argument("--purge", action="store_true", help=f"also remove {STATE_DIR} (SSH key, vault password)")
    down.set_defaults(func=cmd_down)
    sub.add_parser("status", help="show what runs").set_defaults(func=cmd_status)
    sub.add_parser("check", help="verify reachability, firewall, NAT, isolation, features, EC2").set_defaults(
        func=cmd_check
    )
    ssh = sub.add_parser("ssh", help="ssh into a machine")
    ssh.add_argument("name", help=", ".join(m.name for m in MACHINES))
    ssh.add_argument("command", nargs=argparse.REMAINDER, help="command to run instead of a shell")
    ssh.set_defaults(func=cmd_ssh)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RuntimeError as exc:
        log(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())

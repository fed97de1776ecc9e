"""Acceptance checks of the Ansible side against the running lab, after `make demo` (or a converged lab).

    .venv/bin/python playbooks/checks/acceptance.py [CHECK...]

Checks, in this order (all by default; each prints PASS or FAIL with the reason):
  idempotent   a second site.yml run reports changed=0 for every host
  check-diff   site.yml --check --diff reports no change and no error
  terminate    terminating aws-b in EC2 (moto) and re-running site.yml takes it out of every peer list by a
               reload (agent PIDs unchanged) so that it is no host's target; then aws-b is registered again
               (lab/weftlab.py up) and site.yml brings it back
  rotate       weft_secrets [new, old], site.yml, then [new], site.yml: the mesh stays whole throughout, the
               agents only reload; both runs at -vvv, whose output must not contain any of the secrets
  reclaim      aws-b's agent stopped and aws-b terminated in EC2: site.yml takes its share of the address ring
               over from exactly one host (every agent's ring then says it owns nothing), and a second site.yml
               changes nothing; then aws-b comes back purged (reset.yml -e purge=true, site.yml), as an observer,
               and its container gets an address again
  decommission decommission.yml -e hosts=dc2-a (still running): its share of the ring goes to exactly one remaining
               host, no agent sees anything unreachable, a second run changes nothing; then site.yml brings dc2-a
               back purged, as an observer, its container gets an address again and every container reaches
               every other one
  allocated    every demo container's address is one its own agent allocated from the ring (`make demo`)
  names        the podman containers named after their hosts (checks/named_containers.yml, through the CNI plugin)
               all resolve and ping each other by name (checks/name_matrix.yml), and a second run changes nothing; a
               name given with weft.mesh.weft_dns on one host resolves from every container, a second run changes
               nothing, and once removed it resolves from none
Exit status: the number of failed checks. Needs root and the lab up; changes the lab's mesh secret.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
LAB_JSON = Path("/var/lib/weft-lab/lab.json")
WEFT = "/opt/weft/current/bin/weft"
LOG_DIR = Path(os.environ.get("WEFT_CHECK_LOGS", "/tmp/weft-acceptance"))
sys.path.insert(0, str(ROOT / "inventories"))

import labvault  # noqa: E402


def lab() -> dict:
    return json.loads(LAB_JSON.read_text())


def env() -> dict[str, str]:
    ec2 = lab()["ec2"]
    return dict(
        os.environ,
        PATH=f"{VENV_BIN}:{os.environ['PATH']}",
        AWS_URL=ec2["endpoint_url"],
        AWS_ACCESS_KEY_ID=ec2["aws_access_key_id"],
        AWS_SECRET_ACCESS_KEY=ec2["aws_secret_access_key"],
        AWS_DEFAULT_REGION=ec2["region"],
        ANSIBLE_VAULT_PASSWORD_FILE=str(ROOT / "inventories" / "lab-vault-password.sh"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",  # molecule forces colours, which would hide the recap from the parsing here
        ANSIBLE_STDOUT_CALLBACK="default",
    )


def playbook(name: str, *args: str) -> tuple[int, str, dict[str, dict[str, int]]]:
    """Run ansible-playbook on the lab inventory; returns rc, the whole output (also kept in LOG_DIR), recap."""
    cmd = ["ansible-playbook", "-i", "inventories/lab", *args, name]
    start = time.monotonic()
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, check=False)
    out = res.stdout + res.stderr
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{time.strftime('%H%M%S')}-{Path(name).stem}{''.join(a.strip('-')[:6] for a in args)}.log"
    log.write_text(f"$ {' '.join(cmd)}\n{out}")
    recap = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", line)
        if m:
            recap[m[1]] = {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
    print(f"    ran {' '.join(cmd[3:])}: rc={res.returncode} in {time.monotonic() - start:.0f} s (log: {log})")
    return res.returncode, out, recap


def ssh(name: str, command: str) -> str:
    """Run a command on a lab machine over the management network."""
    m = next(m for m in lab()["machines"] if m["name"] == name)
    key = lab()["ssh"]["private_key_file"]
    opts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    res = subprocess.run(
        ["ssh", "-i", key, *opts, f"root@{m['mgmt_ip']}", command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{name}: {command}: {res.stderr.strip()}")
    return res.stdout


def machines() -> list[str]:
    return [m["name"] for m in lab()["machines"]]


def agent_pids(names: list[str]) -> dict[str, str]:
    return {n: ssh(n, "systemctl show -p MainPID --value weft.service").strip() for n in names}


def targets(name: str) -> list[dict]:
    return json.loads(ssh(name, f"{WEFT} status targets --json"))


def ec2():
    import boto3

    e = lab()["ec2"]
    return boto3.client(
        "ec2",
        endpoint_url=e["endpoint_url"],
        region_name=e["region"],
        aws_access_key_id=e["aws_access_key_id"],
        aws_secret_access_key=e["aws_secret_access_key"],
    )


class Check:
    failures = 0

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        print(f"--- {self.name}")
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            print(f"PASS {self.name}")
        else:
            Check.failures += 1
            print(f"FAIL {self.name}: {exc}")
        return kind is None or issubclass(kind, (AssertionError, RuntimeError, subprocess.SubprocessError))


def no_changes(rc: int, recap: dict) -> None:
    assert rc == 0, f"ansible-playbook exited {rc}"
    assert recap, "no PLAY RECAP in the output"
    changed = {h: r["changed"] for h, r in recap.items() if r["changed"] or r["failed"] or r["unreachable"]}
    assert not changed, f"hosts with changes, failures or unreachable: {changed}"


def check_idempotent() -> None:
    with Check("idempotent: a second site.yml run changes nothing"):
        rc, _out, recap = playbook("site.yml")
        no_changes(rc, recap)


def check_diff() -> None:
    with Check("check-diff: site.yml --check --diff reports no change and no error"):
        rc, out, recap = playbook("site.yml", "--check", "--diff")
        no_changes(rc, recap)
        assert "[ERROR]" not in out, "errors in the output"


def check_terminate(victim: str = "aws-b") -> None:
    with Check(f"terminate: {victim} terminated in EC2 leaves every peer list by a reload"):
        others = [n for n in machines() if n != victim]
        address = next(m["underlay_ip"] for m in lab()["machines"] if m["name"] == victim)
        before = agent_pids(others)
        client = ec2()
        ids = [
            i["InstanceId"]
            for r in client.describe_instances(
                Filters=[
                    {"Name": "tag:Name", "Values": [victim]},
                    {"Name": "instance-state-name", "Values": ["pending", "running"]},
                ]
            )["Reservations"]
            for i in r["Instances"]
        ]
        assert ids, f"no live instance named {victim} in EC2"
        client.terminate_instances(InstanceIds=ids)
        print(f"    terminated {victim} ({', '.join(ids)})")
        try:
            rc, out, recap = playbook("site.yml")
            assert rc == 0, f"site.yml exited {rc}"
            assert victim not in recap, f"{victim} is still in the inventory"
            # Its agent still runs and dials the others: its address space must not be reclaimed, only named.
            assert "takes over the ranges" not in out, "site.yml reclaimed the space of a peer that is still reachable"
            folded = " ".join(out.split())  # messages come folded over lines
            assert f"({victim}) owns" in folded and "is no inventory host, but" in folded, "no warning about the peer"
            after = agent_pids(others)
            assert after == before, f"agents restarted (MainPID before {before}, after {after})"
            for n in others:
                config = ssh(n, "cat /etc/weft/weft.yaml")
                assert f"{address}:" not in config, f"{n}: {address} is still in /etc/weft/weft.yaml"
                still = [t for t in targets(n) if t["address"].startswith(f"{address}:")]
                assert not still, f"{n}: {victim} ({address}) is still a target: {still}"
            print(f"    {victim} ({address}) is in no peer list and no target; agent PIDs unchanged: {after}")
        finally:
            print(f"    registering {victim} again (lab/weftlab.py up) and converging")
            subprocess.run(
                [str(VENV_BIN / "python"), "lab/weftlab.py", "up"], cwd=ROOT, check=True, capture_output=True
            )
            rc, _out, recap = playbook("site.yml")
            assert rc == 0 and victim in recap, f"could not bring {victim} back (site.yml rc={rc})"


MAX_LOST = 5  # "at most a few packets" while the secret rotates


def demo_address(name: str) -> str:
    """The overlay address of the demo container on ``name`` (playbooks/checks/containers.yml)."""
    out = ssh(name, "ip -4 -o -netns weftdemo addr show dev ethwe")
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    assert match, f"{name}: no demo container on the overlay (run make demo first): {out!r}"
    return match.group(1)


def start_ping(src: str, dst: str) -> str:
    """A ping every 0.2 s from src's demo container to dst's, in the background; returns its PID."""
    target = demo_address(dst)
    cmd = f"ip netns exec weftdemo ping -n -i 0.2 -c 100000 {target} > /tmp/weft-rotate-ping.log 2>&1 & echo $!"
    return ssh(src, cmd).strip()


def stop_ping(src: str, pid: str) -> tuple[int, int]:
    """Stop the ping (SIGINT, so it prints its summary) and return (sent, received)."""
    ssh(src, f"kill -INT {pid}; sleep 1; cat /tmp/weft-rotate-ping.log")
    out = ssh(src, "cat /tmp/weft-rotate-ping.log; rm -f /tmp/weft-rotate-ping.log")
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match, f"{src}: no ping summary: {out[-500:]!r}"
    return int(match.group(1)), int(match.group(2))


def check_rotate() -> None:
    with Check("rotate: [new, old] then [new] keeps the mesh whole; -vvv never shows a secret"):
        lib = labvault.vault()
        old = labvault.read_secrets(lib)
        assert old, "no lab secret to rotate (inventories/labvault.py ensure)"
        pids = agent_pids(machines())
        seen = list(old)
        outputs = []
        pinger = start_ping("dc1-a", "dc2-a")  # across sites, through both rotations
        for step in ("rotate", "finish"):
            labvault.main([step])
            seen += labvault.read_secrets(lib) or []
            # site.yml ends with the mesh check (playbooks/verify.yml): every host sees every other one.
            rc, out, _recap = playbook("site.yml", "-vvv")
            outputs.append(out)
            assert rc == 0, f"site.yml after `labvault.py {step}` exited {rc}: the mesh did not stay whole"
        now = labvault.read_secrets(lib) or []
        assert len(now) == 1 and now[0] not in old, "the rotation did not end with only the new secret"
        for n in machines():
            files = ssh(n, "ls /etc/weft").split()
            assert [f for f in files if f.startswith("secret-")] == ["secret-1"], f"{n}: secret files {files}"
        sent, received = stop_ping("dc1-a", pinger)
        assert sent - received <= MAX_LOST, f"a ping from dc1-a to dc2-a lost {sent - received} of {sent}"
        print(f"    ping dc1-a -> dc2-a during the rotation: {received} of {sent} answered")
        after = agent_pids(machines())
        assert after == pids, f"agents restarted during the rotation ({pids} -> {after})"
        leaked = sorted({labvault.fingerprint(s) for s in seen for out in outputs if s in out})
        assert not leaked, f"secrets (sha256 {leaked}) appear in the -vvv output"
        print(f"    {len(set(seen))} secrets seen by the runs, none in {sum(map(len, outputs))} bytes of -vvv output")


def ring(name: str) -> dict:
    return json.loads(ssh(name, f"{WEFT} status ipam --json"))


def owned(name: str, peer: str) -> int:
    """How many addresses ``peer`` (a nickname) owns in the ring as ``name``'s agent sees it."""
    return sum(p["addresses"] for p in ring(name)["peers"] if p["nickname"] == peer)


def owners(name: str) -> dict[str, int]:
    """{nickname: addresses} of every ring owner, as ``name``'s agent sees it."""
    return {p["nickname"]: p["addresses"] for p in ring(name)["peers"]}


def ring_whole(names: list[str], before: dict[str, int], gone: str = "", taker: str = "") -> None:
    """Every agent of ``names`` sees the ring ``before`` (with ``gone``'s share moved to ``taker``, and only to it)
    and nothing unreachable: unreachable_ratio 0, no owner row with reachable false."""
    want = {n: a for n, a in before.items() if a and n != gone}
    if gone:
        want[taker] = want.get(taker, 0) + before.get(gone, 0)
    for n in names:
        status = ring(n)
        seen = {p["nickname"]: p["addresses"] for p in status["peers"] if p["addresses"]}
        assert seen == want, f"{n}: ring owners {seen}, expected {want} ({gone}'s share to {taker} only)"
        away = [p["nickname"] or p["name"] for p in status["peers"] if not p["reachable"]]
        assert not away and status["unreachable_ratio"] == 0, (
            f"{n}: unreachable owners {away}, unreachable_ratio {status['unreachable_ratio']}"
        )


def eventually(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def task_hosts(out: str, task: str, status: str = "changed") -> list[str]:
    """The hosts a task of the output reports with ``status`` (changed, ok, skipping...)."""
    block = out.split(f"TASK [{task}]", 1)[1].split("\nTASK [", 1)[0] if f"TASK [{task}]" in out else ""
    return re.findall(rf"^{status}: \[([^\]]+)\]", block, re.M)


def check_reclaim(victim: str = "aws-b") -> None:
    with Check(f"reclaim: {victim} gone for good has its address space taken over by one host, once"):
        others = [n for n in machines() if n != victim]
        assert all(owned(n, victim) > 0 for n in others), f"{victim} owns nothing to begin with"
        before = owners(others[0])
        start = time.monotonic()
        ssh(victim, "systemctl stop weft")  # as if the instance died
        client = ec2()
        ids = [
            i["InstanceId"]
            for r in client.describe_instances(
                Filters=[
                    {"Name": "tag:Name", "Values": [victim]},
                    {"Name": "instance-state-name", "Values": ["pending", "running"]},
                ]
            )["Reservations"]
            for i in r["Instances"]
        ]
        assert ids, f"no live instance named {victim} in EC2"
        client.terminate_instances(InstanceIds=ids)
        print(f"    stopped the agent on {victim} and terminated it ({', '.join(ids)})")
        try:
            rc, out, recap = playbook("site.yml")
            assert rc == 0, f"site.yml exited {rc}"
            takers = task_hosts(out, "Take over the ranges of hosts that left the inventory")
            assert len(takers) == 1, f"expected one host to reclaim {victim}, got {takers}"
            said = re.search(
                rf"([\w.-]+) takes over the ranges of (\S+)\({victim}\) \((\d+) addresses\)", " ".join(out.split())
            )
            assert said and said.group(1) == takers[0], f"site.yml did not say it reclaimed {victim}"
            print(f"    {said.group(0)}")

            eventually(lambda: ring_whole(others, before, victim, takers[0]))
            took = time.monotonic() - start
            rc, _out, recap = playbook("site.yml")
            no_changes(rc, recap)
            print(
                f"    {takers[0]} reclaimed {victim}'s {before[victim]} addresses {took:.1f} s after its agent stopped;"
                f" every agent's ring: {victim} owns nothing, {takers[0]} {before[victim] + before.get(takers[0], 0)},"
                " nothing unreachable; a second site.yml changes nothing"
            )
        finally:
            print(f"    bringing {victim} back: registered again, purged (reset.yml), site.yml, its container")
            subprocess.run(
                [str(VENV_BIN / "python"), "lab/weftlab.py", "up"], cwd=ROOT, check=True, capture_output=True
            )
            playbook("playbooks/reset.yml", "--limit", victim, "-e", "purge=true")
            rc, _out, recap = playbook("site.yml")
            assert rc == 0 and victim in recap, f"could not bring {victim} back (site.yml rc={rc})"
            init = ssh(victim, "grep ipalloc_init /etc/weft/weft.yaml").strip()
            assert init == "ipalloc_init: observer", f"{victim} came back with {init!r}, not as an observer"
            rc, _out, _recap = playbook("playbooks/checks/containers.yml")
            assert rc == 0, f"{victim}'s container could not be attached again (rc={rc})"
            print(f"    {victim} is back as an observer; its container has {demo_address(victim)}")


def check_decommission(victim: str = "dc2-a") -> None:
    with Check(f"decommission: {victim}, still running, leaves; its address space goes to one host, once"):
        others = [n for n in machines() if n != victim]
        before = owners(others[0])
        assert before.get(victim, 0) > 0, f"{victim} owns nothing to begin with: {before}"
        start = time.monotonic()
        try:
            rc, out, _recap = playbook("playbooks/decommission.yml", "-e", f"hosts={victim}")
            assert rc == 0, f"decommission.yml exited {rc}"
            takers = task_hosts(out, "Take over the leaving hosts' ranges")
            assert len(takers) == 1, f"expected one host to reclaim {victim}, got {takers}"
            eventually(lambda: ring_whole(others, before, victim, takers[0]))
            took = time.monotonic() - start
            state = ssh(victim, "systemctl is-active weft; test -e /etc/weft/weft.yaml && echo configured; true")
            assert state.split() in (["inactive"], ["unknown"]), f"{victim}: agent or configuration left: {state!r}"
            rc, _out, recap = playbook("playbooks/decommission.yml", "-e", f"hosts={victim}")
            no_changes(rc, recap)
            print(
                f"    {takers[0]} reclaimed {victim}'s {before[victim]} addresses; every remaining agent's ring"
                f" is whole, nothing unreachable, {took:.1f} s after decommission.yml started;"
                " a second run changes nothing"
            )
        finally:
            print(f"    bringing {victim} back: site.yml, its container, the ping matrix")
            rc, _out, recap = playbook("site.yml")
            assert rc == 0 and victim in recap, f"could not bring {victim} back (site.yml rc={rc})"
        init = ssh(victim, "grep ipalloc_init /etc/weft/weft.yaml").strip()
        assert init == "ipalloc_init: observer", f"{victim} came back with {init!r}, not as an observer"
        rc, _out, _recap = playbook("playbooks/checks/containers.yml")
        assert rc == 0, f"{victim}'s container could not be attached again (rc={rc})"
        check_allocated_on(machines())
        rc, _out, _recap = playbook("playbooks/checks/ping_matrix.yml")
        assert rc == 0, f"not every container reaches every other one after {victim} came back (rc={rc})"
        eventually(lambda: ring_whole(machines(), owners(others[0])))
        print(f"    {victim} is back as an observer, its container has {demo_address(victim)}; all containers ping")


def check_allocated_on(names: list[str]) -> dict[str, str]:
    """Every demo container's address is an allocation of its own agent's ring; {host: address}."""
    found = {}
    for n in names:
        address = demo_address(n)
        held = {a["address"].split("/")[0]: a for a in ring(n)["allocations"]}
        assert address in held, f"{n}: the container's {address} is not one its agent allocated ({sorted(held)})"
        found[n] = address
    return found


def check_allocated() -> None:
    with Check("allocated: every demo container has an address its own agent allocated"):
        print(f"    {check_allocated_on(machines())}")


def weft_dns(host: str, args: str) -> dict:
    """weft.mesh.weft_dns on a lab host (ad hoc): its result, "changed" included."""
    cmd = ["ansible", "-i", "inventories/lab", host, "-o", "-m", "weft.mesh.weft_dns", "-a", args]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, check=False)
    line = next((li for li in res.stdout.splitlines() if li.startswith(f"{host} | ")), "")
    if " => " not in line or res.returncode != 0:
        raise RuntimeError(f"weft_dns {args} on {host}: rc={res.returncode}: {(res.stdout + res.stderr)[-400:]}")
    return json.loads(line.split(" => ", 1)[1])


def resolves(container: str, name: str) -> list[str]:
    """The IPv4 addresses the container named after its host gets for ``name`` (its resolver: its host's agent)."""
    out = ssh(container, f"podman exec {container} getent ahostsv4 {name} || true")
    return sorted({line.split()[0] for line in out.splitlines() if line.strip()})


def check_names() -> None:
    with Check("names: the podman containers reach each other by name; a weft_dns name is seen everywhere"):
        rc, _out, _recap = playbook("playbooks/checks/named_containers.yml")
        assert rc == 0, f"the named containers could not be started (rc={rc})"
        rc, _out, recap = playbook("playbooks/checks/name_matrix.yml", "playbooks/checks/named_containers.yml")
        assert rc == 0, f"not every container resolves and reaches every other one by name (rc={rc})"
        no_changes(rc, recap)
        names = machines()
        owner, name, address = names[0], "acceptance-db.weft.local", "10.32.255.250"
        first = weft_dns(owner, f"name={name} addresses={address}")
        assert first["changed"] and first["addresses"] == [address], f"weft_dns on {owner}: {first}"
        assert not weft_dns(owner, f"name={name} addresses={address}")["changed"], "a second weft_dns changed things"

        def everywhere(want: list[str]) -> None:
            seen = {n: resolves(n, name) for n in names}
            assert all(v == want for v in seen.values()), f"{name} from each container: {seen}, not {want}"

        eventually(lambda: everywhere([address]))
        gone = weft_dns(owner, f"name={name} state=absent")
        assert gone["changed"] and gone["removed"] == [address], f"weft_dns state=absent on {owner}: {gone}"
        eventually(lambda: everywhere([]))
        print(f"    {name} ({address}, from {owner}) resolved from {', '.join(names)}, then from none")


CHECKS = {
    "idempotent": check_idempotent,
    "check-diff": check_diff,
    "terminate": check_terminate,
    "rotate": check_rotate,
    "reclaim": check_reclaim,
    "decommission": check_decommission,
    "allocated": check_allocated,
    "names": check_names,
}


def main(argv: list[str]) -> int:
    names = argv or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise SystemExit(f"acceptance.py: unknown checks {unknown}; known: {', '.join(CHECKS)}")
    for n in names:
        CHECKS[n]()
    print(f"{len(names) - Check.failures} passed, {Check.failures} failed")
    return Check.failures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

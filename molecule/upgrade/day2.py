"""Day-2 operations on the lab, measured by the traffic they lose (molecule scenario `upgrade`).

Run from the repository root by converge.yml, with the lab up and the scenario's Ansible environment:

    1. the previous release of the agent (the commit before the current version was set) on all five machines,
       and a container on each;
    2. continuous pings, 100 a second, between containers across every pair of sites (dc1-a -> dc2-a,
       dc1-b -> aws-a, dc2-a -> aws-b: the encrypted path) and inside dc1 (dc1-a -> dc1-b: the fast path);
    3. an upgrade to the current version with a start-up fault on the first host: it stops there, that host is
       rolled back and healthy, the others are untouched;
    4. upgrade.yml: the fast pair loses nothing, an encrypted pair no more than 1 s per restarted host on it;
       upgrade.yml again changes nothing; site.yml again (the no-op) is timed with its task profile;
    5. a rollback to the previous release (no wheel build) and forward again;
    6. rotate_secret.yml under the same pings: no agent restarts, no secret in -vvv output;
    7. reset.yml on one host, site.yml: the host rejoins and the ping matrix is whole;
    8. decommission.yml on dc1-b: the other four reload without a restart, the mesh check passes;
    9. the collection built into a tarball, installed into an empty directory, and weft.mesh.site run from
       there with a user's own inventory: the lab converges (dc1-b comes back).
Figures go to bench/results/upgrade.json. Exits non-zero, saying why, at the first step that fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB = [sys.executable, str(REPO / "lab" / "weftlab.py")]
INVENTORY = REPO / "inventories" / "lab"
RATE = 100  # pings per second
CONTAINERS = {
    "aws-a": "10.32.100.1",
    "aws-b": "10.32.100.2",
    "dc1-a": "10.32.100.3",
    "dc1-b": "10.32.100.4",
    "dc2-a": "10.32.100.5",
}  # playbooks/checks/containers.yml with weft_demo_static: by place in the sorted group
PAIRS = {  # name: (from, to, path)
    "dc1-a>dc1-b": ("dc1-a", "dc1-b", "fast"),
    "dc1-a>dc2-a": ("dc1-a", "dc2-a", "sleeve"),
    "dc1-b>aws-a": ("dc1-b", "aws-a", "sleeve"),
    "dc2-a>aws-b": ("dc2-a", "aws-b", "sleeve"),
}
RESULTS = REPO / "bench" / "results" / "upgrade.json"


class Failed(Exception):
    """A step did not do what it must; the message says what."""


LOG = REPO / "bench" / "results" / "upgrade.log"  # follow a run with: tail -f bench/results/upgrade.log


def say(text: str) -> None:
    print(text, flush=True)
    with LOG.open("a") as log:
        log.write(text + "\n")


# -- running things -----------------------------------------------------------------------------------------


@dataclass
class Run:
    rc: int
    output: str
    seconds: float
    recap: dict[str, dict[str, int]] = field(default_factory=dict)


def playbook(
    *args: str, env: dict | None = None, cwd: Path = REPO, check: bool = True, label: str = "", clean: bool = False
) -> Run:
    cmd = ["ansible-playbook", *args]
    say(f"\n--- {label or ' '.join(args)}")
    start = time.monotonic()
    plain = {"ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"}  # molecule forces colour; the recap is parsed
    # clean: none of this checkout's or molecule's Ansible settings, as on a user's machine.
    base = {k: v for k, v in os.environ.items() if not (clean and k.startswith(("ANSIBLE_", "MOLECULE_")))}
    done = subprocess.run(
        cmd, cwd=cwd, env={**base, **plain, **(env or {})}, capture_output=True, text=True, check=False
    )
    run = Run(done.returncode, done.stdout + done.stderr, time.monotonic() - start)
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", done.stdout, re.M):
        run.recap[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    changed = sum(r.get("changed", 0) for r in run.recap.values())
    say(f"    rc={run.rc} in {run.seconds:.1f}s, changed={changed} ({', '.join(sorted(run.recap))})")
    if check and run.rc != 0:
        tail = "\n".join(run.output.splitlines()[-40:])
        raise Failed(f"{label or args[0]} failed (rc {run.rc}):\n{tail}")
    return run


def on(host: str, command: str, check: bool = True) -> str:
    done = subprocess.run([*LAB, "ssh", host, "--", command], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise Failed(f"on {host}: {command!r} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def status(host: str) -> dict:
    return json.loads(on(host, "/opt/weft/current/bin/weft status --json"))


def agent_pids(hosts: list[str]) -> dict[str, str]:
    return {h: on(h, "systemctl show -p MainPID --value weft").strip() for h in hosts}


def versions(hosts: list[str]) -> dict[str, str]:
    return {h: status(h)["version"] for h in hosts}


def play_order() -> list[str]:
    done = subprocess.run(
        ["ansible", "weft_mesh", "--list-hosts", "-i", str(INVENTORY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.strip() for line in done.stdout.splitlines()[1:] if line.strip()]


# -- the previous release ---------------------------------------------------------------------------------


def previous_release(work: Path) -> tuple[str, Path]:
    """(version, source dir) of the release before the current one, as released: the tree of the commit that set
    that version in agent/pyproject.toml (work done for the current version before its own bump stays out)."""
    pattern = r'^version *= *"([^"]+)"'
    current = re.search(pattern, (REPO / "agent" / "pyproject.toml").read_text(), re.M).group(1)
    commits = subprocess.run(
        ["git", "-C", str(REPO), "log", "--format=%H", "-G", pattern, "--", "agent/pyproject.toml"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()

    def version_at(rev: str) -> str | None:
        text = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{rev}:agent/pyproject.toml"], capture_output=True, text=True, check=False
        ).stdout
        found = re.search(pattern, text, re.M)
        return found.group(1) if found else None

    # Newest first: the first commit whose version differs from the current one set the previous version.
    for commit in commits:
        version = version_at(commit)
        if version is None or version == current or version_at(f"{commit}^") == version:
            continue
        dest = work / "previous"
        dest.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "agent"], capture_output=True, check=True)
        with tarfile.open(fileobj=__import__("io").BytesIO(archive.stdout)) as tar:
            tar.extractall(dest, filter="data")
        return version, dest / "agent"
    raise Failed("no earlier agent version in git history (agent/pyproject.toml): cannot test an upgrade")


def containers(label: str) -> None:
    """A container on every machine at its fixed address (weft_demo_static): the previous release has no IPAM, and
    the pings aim at CONTAINERS."""
    playbook("-i", str(INVENTORY), "playbooks/checks/containers.yml", "-e", "weft_demo_static=true", label=label)


# -- pings --------------------------------------------------------------------------------------------------


def start_pings() -> None:
    for name, (src, dst, _path) in PAIRS.items():
        unit = f"weft-ping-{name.replace('>', '-')}"
        on(
            src,
            f"systemctl stop {unit} 2>/dev/null; rm -f /root/{unit}.log; systemd-run --quiet --unit={unit} "
            f"--collect /bin/sh -c 'exec ip netns exec weftdemo ping -D -O -i {1 / RATE} -W 1 "
            f"{CONTAINERS[dst]} > /root/{unit}.log 2>&1'",
        )


def stop_pings() -> dict[str, str]:
    logs = {}
    for name, (src, _dst, _path) in PAIRS.items():
        unit = f"weft-ping-{name.replace('>', '-')}"
        on(src, f"systemctl stop {unit}", check=False)
        logs[name] = on(src, f"cat /root/{unit}.log; rm -f /root/{unit}.log", check=False)
    return logs


@dataclass
class PingLog:
    replies: dict[int, float]  # seq -> time of the first reply
    unanswered: dict[int, float]  # seq -> when ping gave up waiting for it

    @classmethod
    def parse(cls, text: str) -> PingLog:
        replies: dict[int, float] = {}
        unanswered: dict[int, float] = {}
        for ts, rest in re.findall(r"^\[(\d+\.\d+)\] (.*)$", text, re.M):
            seq = re.search(r"icmp_seq=(\d+)", rest)
            if not seq:
                continue
            n = int(seq.group(1))
            if "bytes from" in rest:
                replies.setdefault(n, float(ts))
            elif "no answer yet" in rest:
                unanswered.setdefault(n, float(ts))
        return cls(replies, unanswered)

    def window(self, start: float, end: float) -> tuple[int, int, float]:
        """(sent, lost, longest gap in seconds) for pings sent between start and end."""
        times = sorted(t for t in self.replies.values())
        lost = sum(1 for seq, t in self.unanswered.items() if seq not in self.replies and start <= t <= end)
        sent = sum(1 for t in times if start <= t <= end) + lost
        gap = 0.0
        for a, b in zip(times, times[1:], strict=False):
            if b >= start and a <= end:
                gap = max(gap, b - a)
        return sent, lost, gap

    def gap_near(self, moment: float, before: float = 10.0, after: float = 20.0) -> float:
        return self.window(moment - before, moment + after)[2]


# -- the steps ----------------------------------------------------------------------------------------------


def main() -> int:
    figures: dict = {"rate_per_second": RATE}
    phases: dict[str, tuple[float, float]] = {}
    work = Path(tempfile.mkdtemp(prefix="weft-day2-"))
    LOG.parent.mkdir(parents=True, exist_ok=True)
    LOG.write_text("")
    pinging = False
    try:
        hosts = play_order()
        if sorted(hosts) != sorted(CONTAINERS):
            raise Failed(f"the lab's mesh is {hosts}, not the five machines this scenario expects")
        prev_version, prev_source = previous_release(work)
        cur_version = re.search(r'^version *= *"([^"]+)"', (REPO / "agent/pyproject.toml").read_text(), re.M).group(1)
        say(f"upgrade {prev_version} -> {cur_version}; play order {', '.join(hosts)}")

        # 1. The previous release everywhere, a container on each machine.
        playbook(
            "-i",
            str(INVENTORY),
            "site.yml",
            "-e",
            f"weft_agent_source={prev_source}",
            label=f"site.yml with weft {prev_version}",
        )
        containers("a container on every machine")
        if set(versions(hosts).values()) != {prev_version}:
            raise Failed(f"expected every host on {prev_version}: {versions(hosts)}")

        # 2. Pings from here on.
        start_pings()
        pinging = True
        time.sleep(3)

        # 3. A fault on the first host of the play: it stops there, rolled back.
        broken = hosts[0]
        t0 = time.time()
        fault = json.dumps(
            {"weft_metrics_addr": "{{ '192.0.2.1:6782' if inventory_hostname == '%s' else '127.0.0.1:6782' }}" % broken}
        )
        run = playbook(
            "-i",
            str(INVENTORY),
            "playbooks/upgrade.yml",
            "-e",
            fault,
            check=False,
            label=f"upgrade.yml with a start-up fault on {broken}",
        )
        phases["failed upgrade"] = (t0, time.time())
        if run.rc == 0:
            raise Failed("the upgrade with a broken host passed")
        reasons = [line for line in run.output.splitlines() if "failed its restart gate" in line]
        if not reasons or "rolled back to weft" not in reasons[-1] or broken not in reasons[-1]:
            raise Failed("the failed upgrade does not say why:\n" + "\n".join(run.output.splitlines()[-30:]))
        say(f"    says: {reasons[-1].strip()[:300]}")
        now = versions(hosts)
        if set(now.values()) != {prev_version}:
            raise Failed(f"after the failed upgrade every host must run {prev_version}: {now}")
        touched = [h for h in hosts if h != broken and run.recap.get(h, {}).get("failed")]
        if touched:
            raise Failed(f"hosts other than {broken} failed: {touched}")
        playbook("-i", str(INVENTORY), "playbooks/verify.yml", label="the mesh is whole after the rollback")

        # 4. What would happen (check mode: nothing changes), the upgrade, then again with nothing to do, then the
        # no-op site.yml, timed.
        before = agent_pids(hosts)
        check = playbook(
            "-i", str(INVENTORY), "playbooks/upgrade.yml", "--check", "--diff", label="upgrade.yml --check"
        )
        for h in hosts:
            if (
                not re.search(
                    rf"{re.escape(h)}.*\n(?:.*\n){{0,6}}.*weft {re.escape(prev_version)} \(.*->"
                    rf"\s*{re.escape(cur_version)}",
                    check.output,
                )
                and f"would restart weft on {h}" not in check.output
            ):
                raise Failed(f"upgrade.yml --check does not say that {h} goes from {prev_version} to {cur_version}")
        if agent_pids(hosts) != before or set(versions(hosts).values()) != {prev_version}:
            raise Failed("upgrade.yml --check changed a host")
        t0 = time.time()
        run = playbook("-i", str(INVENTORY), "playbooks/upgrade.yml", label=f"upgrade.yml to {cur_version}")
        phases["upgrade"] = (t0, time.time())
        figures["upgrade_seconds"] = round(run.seconds, 1)
        if set(versions(hosts).values()) != {cur_version}:
            raise Failed(f"after the upgrade every host must run {cur_version}: {versions(hosts)}")
        started = {
            h: float(
                on(h, "systemctl show -p ExecMainStartTimestamp --timestamp=unix --value weft").strip().lstrip("@")
            )
            for h in hosts
        }
        restarted = [h for h in hosts if agent_pids([h])[h] != before[h]]
        again = playbook("-i", str(INVENTORY), "playbooks/upgrade.yml", label="upgrade.yml again")
        changed = {h: r.get("changed", 0) for h, r in again.recap.items() if r.get("changed", 0)}
        if changed:
            raise Failed(f"a second upgrade.yml changed something: {changed}")
        noop = playbook(
            "-i",
            str(INVENTORY),
            "site.yml",
            env={"ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks"},
            label="site.yml with nothing to do (timed)",
        )
        figures["noop_site_seconds"] = round(noop.seconds, 1)
        profile = noop.output[noop.output.find("TASKS RECAP") :].splitlines()[:20]
        say("    " + "\n    ".join(profile))

        # 5. Rollback to the previous release: no build; then forward again.
        t0 = time.time()
        back = playbook(
            "-i",
            str(INVENTORY),
            "playbooks/upgrade.yml",
            "-e",
            f"weft_version={prev_version}",
            label=f"upgrade.yml -e weft_version={prev_version} (rollback)",
        )
        phases["rollback"] = (t0, time.time())
        if re.search(
            r"TASK \[weft\.mesh\.agent : Build the wheelhouse on the controller\][^\n]*\n(changed|ok):", back.output
        ):
            raise Failed("the rollback built a wheelhouse")
        if set(versions(hosts).values()) != {prev_version}:
            raise Failed(f"after the rollback every host must run {prev_version}: {versions(hosts)}")
        t0 = time.time()
        playbook("-i", str(INVENTORY), "playbooks/upgrade.yml", label="upgrade.yml forward again")
        phases["forward again"] = (t0, time.time())

        # 6. Rotation under the pings: no restarts, no secret in the output.
        secret = os.urandom(24).hex()
        store = work / "store.yml"
        store.write_text("weft_secret_store:\n" + textwrap.indent(vault("day2", secret), "  "))
        pids = agent_pids(hosts)
        t0 = time.time()
        rotate = ["-i", str(INVENTORY), "playbooks/rotate_secret.yml", "-e", f"@{store}", "-e", "new_secret_id=day2"]
        rot = playbook(*rotate, "-vvv", label="rotate_secret.yml -vvv")
        phases["rotation"] = (t0, time.time())
        if secret in rot.output:
            raise Failed("the new secret appears in rotate_secret.yml's output")
        if agent_pids(hosts) != pids:
            raise Failed(f"rotation restarted agents: {pids} -> {agent_pids(hosts)}")
        again = playbook(*rotate, label="rotate_secret.yml again")
        if any(r.get("changed", 0) for r in again.recap.values()):
            raise Failed("a second rotate_secret.yml changed something")

        # Traffic verdicts.
        logs = {name: PingLog.parse(text) for name, text in stop_pings().items()}
        pinging = False
        figures["pairs"] = {}
        ok = True
        for name, (src, dst, path) in PAIRS.items():
            row = {}
            for phase, (a, b) in phases.items():
                sent, lost, gap = logs[name].window(a, b)
                row[phase] = {"sent": sent, "lost": lost, "longest_gap_s": round(gap, 3)}
            figures["pairs"][name] = {"path": path, **row}
            up = row["upgrade"]
            on_path = [h for h in (src, dst) if h in restarted]
            allowed = 0 if path == "fast" else RATE * len(on_path)
            verdict = "ok" if up["lost"] <= allowed else "TOO MANY"
            ok = ok and up["lost"] <= allowed
            say(
                f"    {name:12} {path:6} upgrade: {up['sent']} sent, {up['lost']} lost (allowed {allowed}), longest "
                f"gap {up['longest_gap_s']}s  {verdict}; rotation: {row['rotation']['lost']} lost, gap "
                f"{row['rotation']['longest_gap_s']}s; rollback: {row['rollback']['lost']} lost"
            )
        gaps = {}
        for h in restarted:
            pairs = [n for n, (s, d, p) in PAIRS.items() if p != "fast" and h in (s, d)]
            gaps[h] = max(logs[n].gap_near(started[h]) for n in pairs)
        if gaps:
            figures["restart_gap_s"] = {
                "median": round(statistics.median(gaps.values()), 3),
                "max": round(max(gaps.values()), 3),
                "per_host": {h: round(g, 3) for h, g in gaps.items()},
            }
            say(
                f"    restart gap on the encrypted path: median {figures['restart_gap_s']['median']}s, max "
                f"{figures['restart_gap_s']['max']}s ({figures['restart_gap_s']['per_host']})"
            )
        say(
            f"    upgrade of {len(hosts)} hosts at serial 1: {figures['upgrade_seconds']}s; no-op site.yml: "
            f"{figures['noop_site_seconds']}s"
        )
        # The verdict on traffic waits for the end: the steps below are worth running (and judging) either way.

        # 7. Reset one host; site.yml brings it back (the rotated secret now, as the inventory would say).
        secret_vars = ["-e", f"@{store}", "-e", json.dumps({"weft_secrets": ["{{ weft_secret_store.day2 }}"]})]
        playbook("-i", str(INVENTORY), "playbooks/reset.yml", "--limit", "dc2-a", label="reset.yml --limit dc2-a")
        playbook("-i", str(INVENTORY), "site.yml", *secret_vars, label="site.yml after the reset")
        containers("containers again")
        playbook("-i", str(INVENTORY), "playbooks/checks/ping_matrix.yml", label="ping matrix after the reset")

        # 8. Decommission dc1-b: no restart elsewhere, the check passes.
        rest = [h for h in hosts if h != "dc1-b"]
        pids = agent_pids(rest)
        playbook(
            "-i",
            str(INVENTORY),
            "playbooks/decommission.yml",
            "-e",
            "leaving=dc1-b",
            *secret_vars,
            label="decommission.yml -e leaving=dc1-b",
        )
        if agent_pids(rest) != pids:
            raise Failed(f"decommissioning restarted agents: {pids} -> {agent_pids(rest)}")
        if on("dc1-b", "systemctl is-active weft", check=False).strip() == "active":
            raise Failed("dc1-b still runs an agent after its decommission")

        # 9. The built collection, installed elsewhere, converges the lab from a user's inventory.
        installed = install_collection(work)
        user_inventory = work / "inventory"
        shutil.copytree(INVENTORY, user_inventory)
        # The user's vault now holds the rotated secret (group_vars/all/vault.yml is read last there).
        (user_inventory / "group_vars" / "all" / "vault.yml").write_text(
            store.read_text() + 'weft_secrets: ["{{ weft_secret_store.day2 }}"]\n'
        )
        env = {"ANSIBLE_COLLECTIONS_PATH": str(installed), "ANSIBLE_CONFIG": str(work / "ansible.cfg")}
        (work / "ansible.cfg").write_text(
            "[defaults]\nhost_key_checking = False\ninterpreter_python = /usr/bin/python3\nforks = 10\n"
            f"vault_password_file = {REPO / 'inventories' / 'lab-vault-password.sh'}\n"
            "[ssh_connection]\npipelining = True\n"
        )
        playbook(
            "-i",
            str(user_inventory),
            "weft.mesh.site",
            env=env,
            cwd=work,
            clean=True,
            label="weft.mesh.site from the installed tarball, the user's inventory",
        )
        if not ok:
            raise Failed("the upgrade lost more traffic than allowed (the table above)")
    except Failed as exc:
        say(f"\nFAILED: {exc}")
        return 1
    finally:
        if pinging:
            stop_pings()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)
    say(f"\nday-2 scenario passed; figures in {RESULTS.relative_to(REPO)}")
    return 0


def vault(name: str, secret: str) -> str:
    """`name: !vault |...`: the secret encrypted with the lab's vault password, as YAML."""
    done = subprocess.run(
        [
            "ansible-vault",
            "encrypt_string",
            "--encrypt-vault-id",
            "default",
            "--vault-password-file",
            str(REPO / "inventories" / "lab-vault-password.sh"),
            "--stdin-name",
            name,
        ],
        input=secret,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return done.stdout


def install_collection(work: Path) -> Path:
    """Build the collection from this checkout and install the tarball into an empty directory."""
    out = work / "dist"
    subprocess.run(
        ["ansible-galaxy", "collection", "build", "--output-path", str(out), str(REPO)],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    tarball = next(out.glob("weft-mesh-*.tar.gz"))
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
    bad = [n for n in names if n.endswith("vault.yml") or n.startswith(("lab/", "bench/", "molecule/"))]
    if bad:
        raise Failed(f"the tarball holds what it must not: {bad[:5]}")
    dest = work / "collections"
    # A clean environment and --force: with this checkout's collections path, ansible-galaxy would find weft.mesh
    # "already installed" (the checkout itself) and install nothing.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "MOLECULE_"))}
    subprocess.run(
        ["ansible-galaxy", "collection", "install", "--force", str(tarball), "-p", str(dest)],
        env=clean,
        check=True,
        capture_output=True,
        cwd=work,
    )
    if not (dest / "ansible_collections" / "weft" / "mesh" / "playbooks" / "site.yml").is_file():
        raise Failed(f"the tarball did not install weft.mesh into {dest}")
    return dest


if __name__ == "__main__":
    sys.exit(main())

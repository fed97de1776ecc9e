"""Booting and stopping the systemd-nspawn machines, and talking to them over SSH (paramiko, the lab key)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from labplan import RUN_DIR, SSH_KEY, Machine
from labroot import merged
from labsys import (
    cgroup_create,
    cgroup_kill,
    cgroup_pids,
    cgroup_remove,
    changed,
    log,
    read_pid,
    stop_pid,
)

# Capabilities beyond nspawn's defaults that the Weft agent needs: bridges, veths, vxlan, tap (NET_ADMIN),
# raw sockets (NET_RAW), `ip netns add` (SYS_ADMIN: unshare + bind mounts). Listed explicitly so it is obvious.
CAPABILITIES = "CAP_NET_ADMIN,CAP_NET_RAW,CAP_SYS_ADMIN"
STOP_GRACE = 20.0


def pidfile(m: Machine) -> Path:
    return RUN_DIR / f"{m.name}.pid"


def nspawn_pid(m: Machine) -> int | None:
    """The machine's recorded systemd-nspawn PID while it runs (checked against its root path)."""
    return read_pid(pidfile(m), str(merged(m)))


def nspawn_cmd(m: Machine) -> list[str]:
    """The proven recipe: no machined registration, keep our cgroup, join the prepared netns, boot systemd."""
    return [
        "systemd-nspawn",
        f"--directory={merged(m)}",
        f"--machine=weftlab-{m.name}",
        "--register=no",
        "--keep-unit",
        "--link-journal=no",
        f"--network-namespace-path=/run/netns/{m.netns}",
        "--bind=/dev/net/tun",
        f"--capability={CAPABILITIES}",
        "--resolv-conf=off",
        "--timezone=off",
        "--console=read-only",
        "--boot",
    ]


def start_machine(m: Machine) -> None:
    """Boot the machine unless it runs; the nspawn process joins the machine's own cgroup before exec."""
    if nspawn_pid(m):
        return
    stale = cgroup_kill(m.name)
    if stale:
        log(f"{m.name}: killed {stale} orphaned processes of an earlier boot")
    cgroup_remove(m.name)
    dirs = cgroup_create(m.name)

    def join_cgroup() -> None:
        for d in dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(m.state_dir / "console.log", "ab") as console:
        proc = subprocess.Popen(
            nspawn_cmd(m),
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=join_cgroup,
        )
    pidfile(m).write_text(f"{proc.pid}\n")
    changed(f"started {m.name} (systemd-nspawn pid {proc.pid})")


def stop_machine(m: Machine) -> None:
    """SIGTERM to nspawn makes it send SIGRTMIN+3 (halt) to the container's systemd; SIGKILL after a grace;
    then whatever is left in the machine's cgroup is killed and the cgroup removed."""
    pid = nspawn_pid(m)
    if pid:
        killed = stop_pid(pid, STOP_GRACE, signal.SIGTERM)
        changed(f"stopped {m.name} (pid {pid}{', killed' if killed else ''})")
    left = cgroup_kill(m.name)
    if left:
        changed(f"{m.name}: killed {left} processes left in its cgroup")
    if cgroup_pids(m.name):
        raise RuntimeError(f"{m.name}: processes survive in its cgroup: {cgroup_pids(m.name)}")
    cgroup_remove(m.name)
    pidfile(m).unlink(missing_ok=True)
    propagate = Path(f"/run/systemd/nspawn/propagate/weftlab-{m.name}")
    if propagate.is_dir() and not os.path.ismount(propagate):
        shutil.rmtree(propagate, ignore_errors=True)


# --- SSH ----------------------------------------------------------------------------------------------------


def connect(m: Machine, timeout: float = 5.0):  # -> paramiko.SSHClient
    """An SSH session as root with the lab key; host keys change with every rebuild, so none is pinned."""
    import paramiko

    # Connection errors while a machine boots are expected; paramiko would log each one as an error.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(
        m.mgmt_ip,
        username="root",
        key_filename=str(SSH_KEY),
        timeout=timeout,
        banner_timeout=timeout,
        auth_timeout=timeout,
        look_for_keys=False,
        allow_agent=False,
    )
    return client


def ssh_run(m: Machine, command: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run one command on a machine; returns (exit status, stdout, stderr)."""
    client = connect(m)
    try:
        _, out, err = client.exec_command(command, timeout=timeout)
        status = out.channel.recv_exit_status()
        return status, out.read().decode(), err.read().decode()
    finally:
        client.close()


def wait_ready(m: Machine, timeout: float) -> str:
    """Wait until sshd answers with the lab key and systemd finished booting; returns the system state."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not nspawn_pid(m):
            raise RuntimeError(f"{m.name}: systemd-nspawn exited; see {m.state_dir / 'console.log'}")
        try:
            _, out, _ = ssh_run(m, "systemctl is-system-running --wait", timeout=max(5.0, deadline - time.monotonic()))
            state = out.strip()
            if state in ("running", "degraded"):
                return state
            last = state
        except Exception as exc:  # noqa: BLE001 - any connection error just means "not yet"
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise RuntimeError(f"{m.name}: not ready after {timeout:.0f}s ({last})")


def wait_all_ready(machines: list[Machine], timeout: float = 180.0) -> dict[str, str]:
    """Wait for every machine in parallel; one failure fails the lot, after all have been waited for."""
    with ThreadPoolExecutor(max_workers=len(machines)) as pool:
        futures = {m.name: pool.submit(wait_ready, m, timeout) for m in machines}
    errors = []
    states = {}
    for name, fut in futures.items():
        try:
            states[name] = fut.result()
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))
    if errors:
        raise SystemExit("weftlab: " + "; ".join(errors))
    return states

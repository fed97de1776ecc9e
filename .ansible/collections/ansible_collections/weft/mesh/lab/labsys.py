"""Process, PID-file and cgroup helpers: the lab only ever stops processes it recorded or that live in its own
cgroups and namespaces, never by name pattern."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

VERBOSE = os.environ.get("WEFTLAB_VERBOSE", "") not in ("", "0")
CHANGES: list[str] = []

# Debian packages providing each host command the lab runs.
HOST_PACKAGES = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "nft": "nftables",
    "ip": "iproute2",
    "bridge": "iproute2",
}


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout stays clean for tables and command output."""
    print(f"weftlab: {msg}", file=sys.stderr, flush=True)


def changed(msg: str) -> None:
    """Record (and say) that up/down did something, so a second run can show it changed nothing."""
    CHANGES.append(msg)
    if VERBOSE:
        log(f"changed: {msg}")


def run(cmd: Sequence[str], check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command and capture its output; a failure names the command and its stderr."""
    if VERBOSE:
        log("+ " + " ".join(cmd))
    res = subprocess.run(list(cmd), capture_output=True, text=True, input=input)
    if check and res.returncode != 0:
        raise RuntimeError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr.strip()}")
    return res


def require_root() -> None:
    """Namespaces, mounts and nspawn all need root; fail early with a clear message instead of halfway."""
    if os.geteuid() != 0:
        raise SystemExit("weftlab: run as root (it builds network namespaces, mounts and containers)")


def ensure_host_packages() -> None:
    """Install missing host tools with apt-get, so a fresh machine (or CI) needs no manual step."""
    missing = sorted({pkg for cmd, pkg in HOST_PACKAGES.items() if shutil.which(cmd) is None})
    if not missing:
        return
    log(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(cmd, env=env, check=True, capture_output=True)
    changed(f"apt-get install {' '.join(missing)}")


def ensure_tun() -> None:
    """Machines get the host's /dev/net/tun bound in; create the node if this host lacks it."""
    tun = Path("/dev/net/tun")
    if tun.exists():
        return
    subprocess.run(["modprobe", "tun"], capture_output=True)
    if not tun.exists():
        tun.parent.mkdir(exist_ok=True)
        os.mknod(tun, 0o666 | stat.S_IFCHR, os.makedev(10, 200))
    changed("created /dev/net/tun")


def write_file(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write a file only when its content differs, so repeated runs leave mtimes (and the change log) alone."""
    if path.exists() and path.read_text() == text and (path.stat().st_mode & 0o777) == mode:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


# --- PIDs ---------------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    """The process's argv, or [] once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def read_pid(pidfile: Path, must_contain: str) -> int | None:
    """The recorded PID if that process still runs and is still ours (its argv contains must_contain).

    The argv check guards against PID reuse: a stale file must never make us signal a stranger.
    """
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid_alive(pid) and any(must_contain in a for a in cmdline(pid)):
        return pid
    return None


def signal_pid(pid: int, sig: int) -> None:
    """Send a signal, ignoring a process that has already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until the PIDs exit (reaping our own children); returns those still alive at the deadline."""
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while pending:
        for pid in pending:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        pending = [p for p in pending if pid_alive(p)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    return pending


def stop_pid(pid: int, grace: float, first: int = signal.SIGTERM) -> bool:
    """Ask politely, then SIGKILL after the grace period; True if the process had to be killed."""
    signal_pid(pid, first)
    if not wait_gone([pid], grace):
        return False
    signal_pid(pid, signal.SIGKILL)
    wait_gone([pid], 5)
    return True


# --- cgroups ------------------------------------------------------------------------------------------------


def cgroup_roots() -> list[Path]:
    """Writable cgroup hierarchies to put a machine in: the v2 one (unified or pure) and v1 name=systemd.

    nspawn with --keep-unit runs the container in the caller's cgroup; giving each machine its own keeps two
    containers' systemds from sharing one tree, and lets teardown kill every straggler through cgroup.kill.
    """
    base = Path("/sys/fs/cgroup")
    roots = []
    if (base / "unified" / "cgroup.procs").exists():
        roots.append(base / "unified")
    elif (base / "cgroup.controllers").exists():
        roots.append(base)
    if (base / "systemd" / "cgroup.procs").exists():
        roots.append(base / "systemd")
    return roots


def cgroup_dirs(name: str) -> list[Path]:
    """The machine's cgroup directory in each hierarchy (they may not exist)."""
    return [root / "weftlab" / name for root in cgroup_roots()]


def cgroup_pids(name: str) -> list[int]:
    """Every PID in the machine's cgroup subtrees."""
    pids: set[int] = set()
    for top in cgroup_dirs(name):
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except OSError:
                continue
    return sorted(pids)


def cgroup_create(name: str) -> list[Path]:
    """Create the machine's cgroups and return their directories, for the child to join before exec."""
    dirs = cgroup_dirs(name)
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


def cgroup_kill(name: str, timeout: float = 10) -> int:
    """SIGKILL everything left in the machine's cgroups (cgroup.kill where the kernel has it); returns a count."""
    pids = cgroup_pids(name)
    if not pids:
        return 0
    for d in cgroup_dirs(name):
        if (d / "cgroup.kill").exists():
            (d / "cgroup.kill").write_text("1")
    for pid in cgroup_pids(name):
        signal_pid(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while cgroup_pids(name) and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(pids)


def cgroup_remove(name: str) -> None:
    """Remove the machine's (empty) cgroup trees, deepest first, then the shared parent when empty."""
    for d in cgroup_dirs(name):
        if not d.is_dir():
            continue
        for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            _rmdir(sub)
        _rmdir(d)
        _rmdir(d.parent)


def _rmdir(d: Path) -> None:
    """rmdir that tolerates a cgroup that is gone or still busy (the caller re-checks what is left)."""
    with contextlib.suppress(OSError):
        d.rmdir()

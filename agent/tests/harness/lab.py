"""Network-namespace lab: run real weft agents on a private, fault-injectable underlay.

Topology: one "underlay" namespace holding a Linux bridge, and one namespace per host
attached to that bridge by a veth pair (``eth0`` on the host side, address 10.99.x.y/16).
Nothing is created in the root network namespace, so tests cannot disturb the machine's
own networking, and every name carries a random per-lab token so concurrent labs (or a
colleague's test run) never collide.  Teardown is by recorded name/PID only.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "AGENT_PORT",
    "HARNESS",
    "METRICS_PORT",
    "THIS_TREE",
    "Capture",
    "Host",
    "Lab",
    "LabCommandError",
    "LabProcess",
    "Release",
    "metric_value",
    "netns_unavailable_reason",
    "wait_until",
]

AGENT_PORT = 6783
METRICS_PORT = 6782
NFT_TABLE = "weft_lab"
# The shared test helpers (this directory: scripts run in namespaces live here too) and the tree under test.
HARNESS = Path(__file__).resolve().parent
AGENT_SRC = HARNESS.parents[1] / "src"

T = TypeVar("T")


@dataclass(frozen=True)
class Release:
    """An agent a host can run: its ``weft`` package and the python that has its dependencies."""

    src: Path
    python: str


THIS_TREE = Release(AGENT_SRC, sys.executable)


class LabCommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the output, so failures are self-explanatory."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n--- stdout ---\n{self.stdout or ''}\n--- stderr ---\n{self.stderr or ''}"


def _run(
    *cmd: str | os.PathLike[str],
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output, and raise a readable error if asked to check."""
    args = [str(c) for c in cmd]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input, env=env, check=False)
    if check and proc.returncode != 0:
        raise LabCommandError(proc.returncode, args, proc.stdout, proc.stderr)
    return proc


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.2,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Poll ``predicate`` until truthy; return its value, else fail with a useful message.

    Exceptions raised by the predicate count as "not yet" and the last one is reported.
    ``message`` may be a callable so expensive diagnostics (agent logs) are built only on failure.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_value: T | None = None
    while True:
        try:
            last_value = predicate()
            if last_value:
                return last_value
            last_exc = None
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    text = message() if callable(message) else message
    detail = f"; last exception: {last_exc!r}" if last_exc else f"; last value: {last_value!r}"
    raise AssertionError(f"{text} (timed out after {timeout}s{detail})") from last_exc


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum the samples called ``name`` whose labels include ``labels``; 0.0 if there are none.

    Counters may be named with or without their ``_total`` suffix.
    """
    total = 0.0
    found = False
    for wanted in (name, f"{name}_total"):
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == wanted and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
                    found = True
        if found:
            break
    return total


def _pcap_records(data: bytes) -> list[bytes]:
    """Split a classic libpcap file into packet records (a truncated last record is ignored)."""
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"not a pcap file (magic {magic.hex()})")
    records: list[bytes] = []
    offset = 24
    while offset + 16 <= len(data):
        (incl_len,) = struct.unpack_from(endian + "I", data, offset + 8)
        end = offset + 16 + incl_len
        if end > len(data):
            break
        records.append(data[offset + 16 : end])
        offset = end
    return records


def netns_unavailable_reason() -> str | None:
    """Why namespace tests cannot run here (None if they can); used to skip rather than fail."""
    if os.geteuid() != 0:
        return "netns lab needs root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"netns lab needs `{tool}` on PATH"
    probe = f"wtprobe{secrets.token_hex(3)}"
    res = _run("ip", "netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"cannot create network namespaces: {res.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


class LabProcess(subprocess.Popen[bytes]):
    """A Popen that remembers where its combined stdout/stderr log lives."""

    def __init__(self, args: Sequence[str], *, log_path: Path, **kwargs: Any) -> None:
        self.log_path = log_path
        super().__init__(args, **kwargs)

    def read_log(self) -> str:
        """The process's output so far (for assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Capture:
    """A running tcpdump writing a pcap file; stop it before trusting the file's contents."""

    def __init__(self, proc: LabProcess, pcap_path: Path) -> None:
        self.proc = proc
        self.path = pcap_path

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM tcpdump by PID so it flushes the pcap, then reap it (idempotent)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def payload_bytes(self) -> bytes:
        """Raw pcap bytes: enough to search for a marker string in cleartext."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def packets(self) -> list[bytes]:
        """Captured frames (link-layer included)."""
        return _pcap_records(self.payload_bytes())

    def packet_count(self) -> int:
        """Number of captured frames."""
        return len(self.packets())

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Host:
    """One lab machine: a namespace with ``eth0`` on the underlay, plus helpers to drive an agent."""

    def __init__(self, lab: Lab, index: int, netns: str, ip: str, tmp_dir: Path) -> None:
        self.lab = lab
        self.index = index
        self.name = f"h{index}"
        self.netns = netns
        self.ip = ip
        self.tmp_dir = tmp_dir
        self.state_dir = tmp_dir / "state"
        self.api_socket = tmp_dir / "weft.sock"
        self.agent_log_path = tmp_dir / "agent.log"
        self.agent: LabProcess | None = None
        self.containers: list[Container] = []
        # The agent and CLI this host runs: the tree under test unless a test points it at another release.
        self.agent_src = THIS_TREE.src
        self.python = THIS_TREE.python
        self._secret_count = 0

    def __repr__(self) -> str:
        return f"Host({self.name}, netns={self.netns}, ip={self.ip})"

    @property
    def agent_name(self) -> str:
        """Stable MAC-like 48-bit peer name, so logs and assertions are reproducible."""
        return f"02:00:00:00:{(self.index >> 8) & 0xFF:02x}:{self.index & 0xFF:02x}"

    @property
    def listen_addr(self) -> str:
        """``ip:port`` the agent listens on; what other hosts pass as ``--peer``."""
        return f"{self.ip}:{AGENT_PORT}"

    # -- generic process helpers -------------------------------------------------------------

    def exec(
        self,
        *cmd: str | os.PathLike[str],
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside this host's namespace and return its text output."""
        return _run("ip", "netns", "exec", self.netns, *cmd, check=check, timeout=timeout, input=input)

    def popen(
        self,
        *cmd: str | os.PathLike[str],
        log_name: str | None = None,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> LabProcess:
        """Start a long-running process in the namespace; the lab kills it at teardown."""
        return self.lab._spawn(self.netns, [str(c) for c in cmd], self.tmp_dir, log_name, env, **kwargs)

    def can_reach(self, target: Host | str, timeout: float = 1.0, port: int = 9) -> bool:
        """TCP-probe ``target`` from this namespace (no ping binary needed).

        A refused connection proves the path works both ways, so no listener is required.
        """
        ip = target.ip if isinstance(target, Host) else target
        script = (
            "import socket,sys\n"
            f"s=socket.socket(); s.settimeout({timeout!r})\n"
            f"try: s.connect(({ip!r},{port}))\n"
            "except ConnectionRefusedError: pass\n"
            "except OSError as e: sys.exit(f'unreachable: {e!r}')\n"
        )
        return self.exec(sys.executable, "-c", script, check=False, timeout=timeout + 10).returncode == 0

    # -- containers --------------------------------------------------------------------------

    def add_container(self, cidr: str, *, attach: bool = True) -> Container:
        """A container namespace on this host, attached to the overlay with ``cidr`` by ``weft attach``."""
        index = len(self.containers) + 1
        netns = f"{self.netns}c{index}"
        self.lab._add_netns(netns)
        container = Container(self, f"{self.name}c{index}", netns, cidr.split("/")[0], cidr)
        self.containers.append(container)
        if attach:
            self.cli("attach", "--netns", netns, cidr)
        return container

    def add_container_auto(self, *cidrs: str, api: bool = False) -> Container:
        """A container namespace on this host attached with no address (or ``net:SUBNET``), so IPAM picks one:
        the Container carries the address the agent gave it (its first, when there are several).

        ``api``: call the agent's API from this process instead of running the CLI, for tests that attach
        hundreds (the CLI's interpreter start-up is most of an attach's cost on a small machine). Not safe to
        call from two threads for one host (container names are numbered in order); one thread per host is.
        """
        index = len(self.containers) + 1
        netns = f"{self.netns}c{index}"
        self.lab._add_netns(netns)
        container = Container(self, f"{self.name}c{index}", netns, "", "")
        self.containers.append(container)
        if api:
            from weft.api.client import Client  # the tree under test, imported only by tests that ask for it

            body = {"netns": netns, "ifname": "ethwe", "cidrs": list(cidrs)}
            addresses = Client(str(self.api_socket), timeout=45.0).request("POST", "/attach", body)["addresses"]
        else:
            out = self.cli("attach", "--netns", netns, *cidrs, timeout=60.0).stdout.strip()
            addresses = out.rsplit(": ", 1)[-1].split()  # "attached ethwe (MAC): 10.32.0.1/12 ..."
        container.cidr = addresses[0]
        container.ip = container.cidr.split("/")[0]
        return container

    # -- agent helpers -----------------------------------------------------------------------

    def _write_secret(self, secret: str) -> Path:
        self._secret_count += 1
        path = self.tmp_dir / f"secret-{self._secret_count}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret)
        os.chmod(path, 0o600)
        return path

    def agent_command(
        self,
        *extra_args: str,
        peers: Iterable[Host | str] = (),
        secret_files: Iterable[Path] = (),
        resume: bool = False,
    ) -> list[str]:
        """The exact ``weft run`` command line used by :meth:`start_agent`."""
        cmd = [
            self.python,
            "-m",
            "weft.cli",
            "run",
            "--name",
            self.agent_name,
            "--nickname",
            self.name,
            "--listen",
            self.listen_addr,
            "--state-dir",
            str(self.state_dir),
            "--api-socket",
            str(self.api_socket),
            "--metrics-addr",
            f"127.0.0.1:{METRICS_PORT}",
            "--log-level",
            "debug",
        ]
        for peer in peers:
            cmd += ["--peer", peer.listen_addr if isinstance(peer, Host) else peer]
        for path in secret_files:
            cmd += ["--secret-file", str(path)]
        if resume:
            cmd.append("--resume")
        cmd += extra_args
        return cmd

    def use_release(self, release: Release) -> None:
        """Run ``release``'s agent and CLI from now on (the next start; a running agent is left as it is)."""
        self.agent_src, self.python = release.src, release.python

    def start_agent(
        self,
        *extra_args: str,
        peers: Iterable[Host | str] = (),
        secrets: Iterable[str] = (),
        env: dict[str, str] | None = None,
        resume: bool = False,
    ) -> LabProcess:
        """Launch ``weft run`` in this namespace; output is appended to ``agent.log``."""
        if self.agent_running():
            raise RuntimeError(f"{self.name}: agent already running (pid {self.agent and self.agent.pid})")
        secret_files = [self._write_secret(s) for s in secrets]
        cmd = self.agent_command(*extra_args, peers=peers, secret_files=secret_files, resume=resume)
        with self.agent_log_path.open("a") as log:
            log.write(f"=== lab: starting agent at {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n")
        self.agent = self.lab._spawn(self.netns, cmd, self.tmp_dir, "agent.log", env, agent_src=self.agent_src)
        return self.agent

    def agent_log(self) -> str:
        """Everything every agent run on this host has logged (for assertion messages)."""
        try:
            return self.agent_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def agent_running(self) -> bool:
        """True while the agent we started has not exited."""
        return self.agent is not None and self.agent.poll() is None

    def kill_agent(self, sig: int = signal.SIGTERM, wait: bool = True, timeout: float = 10.0) -> int | None:
        """Signal the agent by PID; with ``wait``, reap it and return its exit code."""
        if self.agent is None:
            return None
        if self.agent.poll() is None:
            self.agent.send_signal(sig)
        if not wait:
            return self.agent.returncode
        return self.agent.wait(timeout)

    def cli(self, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run the weft CLI against this host's API socket (a file path, so no namespace needed)."""
        cmd = [self.python, "-m", "weft.cli", "--api-socket", str(self.api_socket), *args]
        return _run(*cmd, check=check, timeout=timeout, env=self.lab.process_env(agent_src=self.agent_src))

    def status(self) -> Any:
        """Parsed ``status --json``."""
        return json.loads(self.cli("status", "--json").stdout)

    def wait_ready(self, timeout: float = 15.0) -> Any:
        """Wait until the API answers ``status --json``; fail fast (with the log) if the agent died."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self.agent is not None and self.agent.poll() is not None:
                raise AssertionError(f"{self.name}: agent exited with {self.agent.returncode}\n{self.agent_log()}")
            res = self.cli("status", "--json", check=False, timeout=max(1.0, min(10.0, timeout)))
            if res.returncode == 0:
                with contextlib.suppress(json.JSONDecodeError):
                    return json.loads(res.stdout)
            last = (res.stderr or res.stdout).strip()[-2000:]
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.name}: API socket {self.api_socket} not ready after {timeout}s;"
                    f" last CLI output: {last}\n--- agent log ---\n{self.agent_log()}"
                )
            time.sleep(0.2)

    def metrics(self, timeout: float = 5.0) -> str:
        """Fetch the agent's Prometheus text from 127.0.0.1 inside this namespace."""
        script = (
            "import sys,urllib.request\n"
            f"url='http://127.0.0.1:{METRICS_PORT}/metrics'\n"
            f"sys.stdout.write(urllib.request.urlopen(url,timeout={timeout!r}).read().decode())\n"
        )
        return self.exec(sys.executable, "-c", script, timeout=timeout + 10).stdout


class Container:
    """A network namespace attached to a host's overlay bridge: what users run workloads in."""

    def __init__(self, host: Host, name: str, netns: str, ip: str, cidr: str) -> None:
        self.host = host
        self.name = name
        self.netns = netns
        self.ip = ip
        self.cidr = cidr

    def __repr__(self) -> str:
        return f"Container({self.name}, {self.ip})"

    def exec(
        self, *cmd: str | os.PathLike[str], check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", self.netns, *cmd, check=check, timeout=timeout)

    def popen(self, *cmd: str | os.PathLike[str], log_name: str | None = None) -> LabProcess:
        """A long-running process in the container; the lab kills it at teardown."""
        return self.host.lab._spawn(self.netns, [str(c) for c in cmd], self.host.tmp_dir, log_name, None)

    def ping(self, target: Container | str, *, count: int = 1, size: int | None = None, timeout: float = 2.0) -> bool:
        ip = target.ip if isinstance(target, Container) else target
        cmd = ["ping", "-n", "-q", "-c", str(count), "-W", f"{timeout:g}"]
        if size is not None:
            cmd += ["-s", str(size)]
        return self.exec(*cmd, ip, check=False, timeout=timeout * count + 10).returncode == 0

    def mac(self, ifname: str = "ethwe") -> str:
        return self.exec("cat", f"/sys/class/net/{ifname}/address").stdout.strip()


def _lab_prefix() -> str:
    prefix = os.environ.get("WEFT_LAB_PREFIX", "wt")
    if not (prefix.isascii() and prefix.isalnum() and prefix.islower() and 1 <= len(prefix) <= 8):
        raise ValueError(f"WEFT_LAB_PREFIX must be 1-8 lowercase letters or digits, not {prefix!r}")
    return prefix


class Lab:
    """N hosts on a private bridged underlay, with nftables faults and packet capture.

    Use as a context manager (or the ``lab`` pytest fixture); ``lab(n)`` adds n hosts and
    returns them.  Everything is torn down on exit, on ``close()``, or at interpreter exit.
    """

    def __init__(
        self,
        n_hosts: int = 0,
        *,
        extra_pythonpath: Sequence[str | os.PathLike[str]] = (),
        keep_tmp: bool | None = None,
        stop_grace: float = 3.0,
    ) -> None:
        self.token = secrets.token_hex(3)
        # Namespaces are global: their names carry a prefix (WEFT_LAB_PREFIX, "wt" by default) and a random token.
        self.prefix = _lab_prefix()
        self.underlay_ns = f"{self.prefix}{self.token}-ul"
        self.bridge = f"br{self.token}"
        self.hosts: list[Host] = []
        self.namespaces: list[str] = []
        self.processes: list[LabProcess] = []
        self.extra_pythonpath = [Path(p) for p in extra_pythonpath]
        self.keep_tmp = keep_tmp if keep_tmp is not None else bool(os.environ.get("WEFT_LAB_KEEP"))
        self.tmp_dir: Path | None = None
        self._n_initial = n_hosts
        self._links: list[tuple[str, str]] = []  # (netns, ifname) we created
        self._blocks: set[frozenset[str]] = set()
        self._nft_ready: set[str] = set()
        self._log_seq = 0
        self.stop_grace = stop_grace
        self._closed = False

    def __repr__(self) -> str:
        return f"Lab({self.prefix}{self.token}, hosts={[h.name for h in self.hosts]})"

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self._ensure_underlay()
            if self._n_initial:
                self.add_hosts(self._n_initial)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, n: int) -> list[Host]:
        """Fixture-style shorthand for :meth:`add_hosts`."""
        return self.add_hosts(n)

    def _ensure_underlay(self) -> None:
        if self._closed:
            raise RuntimeError("lab already closed")
        if self.tmp_dir is not None:
            return
        _LIVE_LABS.add(self)
        base = "/tmp" if os.path.isdir("/tmp") else None  # short paths: unix sockets cap at 108 bytes
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f"weft-lab-{self.token}-", dir=base))
        self._add_netns(self.underlay_ns)
        self._ip("link", "add", self.bridge, "type", "bridge", netns=self.underlay_ns)
        self._links.append((self.underlay_ns, self.bridge))
        self._ip("link", "set", self.bridge, "up", netns=self.underlay_ns)

    def _add_netns(self, name: str) -> None:
        self.namespaces.append(name)  # record first so a half-created namespace is still removed
        _run("ip", "netns", "add", name)
        self._ip("link", "set", "lo", "up", netns=name)

    def _ip(self, *args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["ip", "-n", netns] if netns else ["ip"]
        return _run(*prefix, *args, check=check)

    def add_hosts(self, n: int) -> list[Host]:
        """Create ``n`` more hosts (h1, h2, ... numbered across calls) and return the new ones."""
        self._ensure_underlay()
        assert self.tmp_dir is not None
        new: list[Host] = []
        for _ in range(n):
            index = len(self.hosts) + 1
            k = 10 + index
            if k > 0xFFFE:
                raise ValueError("too many hosts for 10.99.0.0/16")
            ip = f"10.99.{k >> 8}.{k & 0xFF}"
            netns = f"{self.prefix}{self.token}-h{index}"
            veth = f"v{self.token}h{index}"
            if len(veth) > 15:
                raise ValueError(f"interface name {veth!r} too long")
            host_dir = self.tmp_dir / f"h{index}"
            host_dir.mkdir()
            self._add_netns(netns)
            # Create the pair inside the underlay ns with the peer born directly in the host ns,
            # so neither end ever appears in the root namespace.
            self._links.append((self.underlay_ns, veth))
            self._ip(
                "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns,
                netns=self.underlay_ns,
            )  # fmt: skip
            self._links.append((netns, "eth0"))
            self._ip("link", "set", veth, "master", self.bridge, "up", netns=self.underlay_ns)
            self._ip("addr", "add", f"{ip}/16", "dev", "eth0", netns=netns)
            self._ip("link", "set", "eth0", "up", netns=netns)
            host = Host(self, index, netns, ip, host_dir)
            self.hosts.append(host)
            new.append(host)
        for host in new:  # a test should start on a working underlay, not race the links coming up
            wait_until(
                lambda h=host: "LOWER_UP" in self._ip("link", "show", "eth0", netns=h.netns).stdout,
                timeout=10,
                interval=0.05,
                message=f"{host.name}: eth0 has no carrier",
            )
        return new

    def pin_neighbours(self) -> None:
        """Give every host a permanent ARP entry for every other host.

        The kernel's neighbour table is shared by all network namespaces and, by default, refuses new
        dynamic entries past 1,024 (net.ipv4.neigh.default.gc_thresh3) with "neighbor table overflow":
        a full mesh of 50 hosts needs 2,450, and packets to an unresolved neighbour are silently
        dropped. Permanent entries do not count against that limit and go away with the namespaces.
        """
        macs = {}
        for h in self.hosts:
            (link,) = json.loads(h.exec("ip", "-j", "link", "show", "dev", "eth0").stdout)
            macs[h.ip] = link["address"]
        for h in self.hosts:
            batch = "".join(
                f"neigh replace {ip} lladdr {mac} dev eth0 nud permanent\n" for ip, mac in macs.items() if ip != h.ip
            )
            h.exec("ip", "-batch", "-", input=batch)

    def host(self, name: str) -> Host:
        """Look a host up by name ("h1")."""
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def process_env(self, extra: dict[str, str] | None = None, *, agent_src: Path | None = None) -> dict[str, str]:
        """Environment for agents/CLI: the in-tree ``weft`` package (or ``agent_src``) importable, unbuffered output."""
        env = dict(os.environ)
        paths = [str(p) for p in [*self.extra_pythonpath, agent_src or AGENT_SRC]]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        # Names outside the DNS domain go to this namespace's own loopback, never to the machine's resolvers.
        env.setdefault("WEFT_DNS_UPSTREAM", "127.0.0.1:53")
        if extra:
            env.update(extra)
        return env

    def _spawn(
        self,
        netns: str,
        cmd: list[str],
        log_dir: Path,
        log_name: str | None,
        env: dict[str, str] | None,
        *,
        agent_src: Path | None = None,
        **kwargs: Any,
    ) -> LabProcess:
        """Start ``cmd`` in ``netns`` (``ip netns exec`` execs, so the PID is the command's own)."""
        if self._closed:
            raise RuntimeError("lab already closed")
        if log_name is None:
            self._log_seq += 1
            log_name = f"{Path(cmd[0]).name}-{self._log_seq}.log"
        log_path = log_dir / log_name
        with log_path.open("ab") as log:
            proc = LabProcess(
                ["ip", "netns", "exec", netns, *cmd],
                log_path=log_path,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.process_env(env, agent_src=agent_src),
                start_new_session=True,  # own process group: immune to the terminal's Ctrl-C
                **kwargs,
            )
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        """Tear everything down by recorded PID/name; safe to call repeatedly and never raises."""
        if self._closed:
            return
        self._closed = True
        _LIVE_LABS.discard(self)
        self._stop_processes(self.stop_grace)
        for netns, ifname in reversed(self._links):
            self._ip("link", "del", ifname, netns=netns, check=False)
        for netns in reversed(self.namespaces):
            with contextlib.suppress(Exception):
                _run("ip", "netns", "del", netns, check=False)
            # A named container's resolv.conf, written by weft attach (the name is this lab's own).
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        if self.tmp_dir is not None and not self.keep_tmp:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _stop_processes(self, grace: float) -> None:
        """SIGTERM every live process group we started, then SIGKILL whatever ignores it."""

        def signal_all(sig: int) -> None:
            for proc in self.processes:
                # Only while the leader is unreaped is its PID (= our PGID) guaranteed to be ours.
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, sig)

        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        signal_all(signal.SIGKILL)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)

    # -- underlay faults ---------------------------------------------------------------------

    def _resolve(self, h: Host | str) -> Host:
        return h if isinstance(h, Host) else self.host(h)

    def _nft_table(self, host: Host) -> None:
        """Our table in ``host``: a set of blocked peers, and chains that extra rules are added to."""
        if host.netns not in self._nft_ready:
            ruleset = f"""
table inet {NFT_TABLE} {{
    set blocked {{ type ipv4_addr; }}
    chain input {{ type filter hook input priority 0; policy accept; ip saddr @blocked drop; }}
    chain output {{ type filter hook output priority 0; policy accept; ip daddr @blocked drop; }}
}}
"""
            host.exec("nft", "-f", "-", input=ruleset)
            self._nft_ready.add(host.netns)

    def _nft_set(self, host: Host, verb: str, peer_ip: str) -> None:
        self._nft_table(host)
        host.exec("nft", verb, "element", "inet", NFT_TABLE, "blocked", f"{{ {peer_ip} }}")

    def _nft_rule(self, host: Host, chain: str, *rule: str) -> None:
        self._nft_table(host)
        host.exec("nft", "add", "rule", "inet", NFT_TABLE, chain, *rule)

    def block(self, a: Host | str, b: Host | str) -> None:
        """Drop all IPv4 between a and b, both directions, in both namespaces.

        Note: an output-hook drop makes the sender's ``sendto`` fail with EPERM (TCP just stalls).
        """
        ha, hb = self._resolve(a), self._resolve(b)
        if ha is hb:
            raise ValueError("cannot block a host from itself")
        key = frozenset((ha.name, hb.name))
        if key in self._blocks:
            return
        self._nft_set(ha, "add", hb.ip)
        self._nft_set(hb, "add", ha.ip)
        self._blocks.add(key)

    def unblock(self, a: Host | str, b: Host | str) -> None:
        """Undo :meth:`block` for this pair (no-op if not blocked)."""
        ha, hb = self._resolve(a), self._resolve(b)
        key = frozenset((ha.name, hb.name))
        if key not in self._blocks:
            return
        self._nft_set(ha, "delete", hb.ip)
        self._nft_set(hb, "delete", ha.ip)
        self._blocks.discard(key)

    def partition(self, group1: Iterable[Host | str], group2: Iterable[Host | str]) -> None:
        """Block every pair that crosses between the two groups."""
        g2 = [self._resolve(h) for h in group2]
        for a in group1:
            for b in g2:
                self.block(a, b)

    def limit_udp(self, a: Host | str, b: Host | str, max_ip_len: int) -> None:
        """Drop UDP packets longer than ``max_ip_len`` (IP length) between a and b, like a link with a
        small MTU that sends no "fragmentation needed" back. Undone by :meth:`heal`.

        The drop is on arrival, and both hosts segment UDP in software before their underlay link, as a
        NIC without UDP segmentation offload would: what is filtered is what crosses the wire, not the
        64 KiB GSO packets a sender hands its own stack.
        """
        ha, hb = self._resolve(a), self._resolve(b)
        for host, peer in ((ha, hb), (hb, ha)):
            host.exec("ethtool", "-K", "eth0", "tx-udp-segmentation", "off", "tx-udp_tnl-segmentation", "off")
            too_long = ("meta", "l4proto", "udp", "ip", "length", ">", str(max_ip_len), "drop")
            self._nft_rule(host, "input", "ip", "saddr", peer.ip, *too_long)

    def block_udp_port(self, a: Host | str, b: Host | str, port: int, *, both_ways: bool = True) -> None:
        """Drop UDP to ``port`` between a and b (from a to b only, unless ``both_ways``); undone by :meth:`heal`."""
        ha, hb = self._resolve(a), self._resolve(b)
        for src, dst in ((ha, hb), (hb, ha)) if both_ways else ((ha, hb),):
            self._nft_rule(src, "output", "ip", "daddr", dst.ip, "udp", "dport", str(port), "drop")
            self._nft_rule(dst, "input", "ip", "saddr", src.ip, "udp", "dport", str(port), "drop")

    def heal(self) -> None:
        """Remove every block (drops the nft table from each namespace)."""
        for netns in sorted(self._nft_ready):
            _run("ip", "netns", "exec", netns, "nft", "delete", "table", "inet", NFT_TABLE, check=False)
        self._nft_ready.clear()
        self._blocks.clear()

    @property
    def blocked_pairs(self) -> set[frozenset[str]]:
        """Currently blocked host-name pairs."""
        return set(self._blocks)

    # -- packet capture ----------------------------------------------------------------------

    def capture(self, where: Host | str, bpf_filter: str = "", timeout: float = 10.0) -> Capture:
        """Start tcpdump on the underlay bridge (``"underlay"``) or a host's eth0; returns once live."""
        if shutil.which("tcpdump") is None:
            raise RuntimeError("tcpdump is not installed")
        self._ensure_underlay()
        assert self.tmp_dir is not None
        if isinstance(where, str) and where == "underlay":
            netns, iface, label = self.underlay_ns, self.bridge, "underlay"
        else:
            host = self._resolve(where)
            netns, iface, label = host.netns, "eth0", host.name
        self._log_seq += 1
        pcap = self.tmp_dir / f"capture-{label}-{self._log_seq}.pcap"
        # -Z root: Debian's tcpdump otherwise drops to user "tcpdump" and cannot write our tmp dir.
        cmd = ["tcpdump", "-n", "-U", "--immediate-mode", "-Z", "root", "-i", iface, "-w", str(pcap)]
        if bpf_filter:
            cmd.append(bpf_filter)
        proc = self._spawn(netns, cmd, self.tmp_dir, f"capture-{label}-{self._log_seq}.log", None)
        wait_until(
            lambda: proc.poll() is not None or "listening on" in proc.read_log(),
            timeout=timeout,
            interval=0.05,
            message=lambda: f"tcpdump did not start: {proc.read_log()}",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"tcpdump exited with {proc.returncode}: {proc.read_log()}")
        return Capture(proc, pcap)


_LIVE_LABS: set[Lab] = set()


@atexit.register
def _close_live_labs() -> None:
    """Second line of defence: never leave namespaces or processes behind at interpreter exit."""
    for lab in list(_LIVE_LABS):
        lab.close()

"""weft-cni with real agents in network namespaces: the plugin binary run as a runtime runs it (CNI_* variables, the
configuration on stdin, in the root namespace), against named namespaces (/run/netns/NAME) and namespaces held only
by a process (/proc/PID/ns/net); and podman, a real runtime, running containers on two hosts that find each other by
name. Each test prints its figures (run with -s to see them)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cnispec import check_result
from lab import Host, Lab, LabProcess, wait_until

from weft import cni
from weft.api.client import Client

pytestmark = pytest.mark.netns

RANGE = ipaddress.ip_network("10.32.0.0/12")
DNS_ADDRESS = "169.254.53.53"
QUIET = ("--log-level", "info")
REPO = Path(__file__).resolve().parents[3]


# -- the plugin as a runtime runs it -----------------------------------------------------------------------------------


def plugin_binary(lab: Lab) -> str:
    """The installed ``weft-cni`` (the venv's console script), or a wrapper running the tree under test."""
    installed = Path(sys.executable).parent / "weft-cni"
    if installed.exists():
        return str(installed)
    assert lab.tmp_dir is not None
    wrapper = lab.tmp_dir / "weft-cni"
    if not wrapper.exists():
        src = Path(__file__).resolve().parents[2] / "src"
        wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={src} exec {sys.executable} -m weft.cni\n")
        wrapper.chmod(0o755)
    return str(wrapper)


class Plugin:
    """The plugin configured for one host's agent (a network named ``network``)."""

    def __init__(self, lab: Lab, host: Host, network: str = "weft", **conf: Any) -> None:
        self.binary = plugin_binary(lab)
        self.host = host
        self.conf = {"cniVersion": "1.0.0", "name": network, "type": "weft-cni", "api_socket": str(host.api_socket)}
        self.conf.update(conf)
        self.timings: dict[str, list[float]] = {"ADD": [], "DEL": [], "CHECK": []}

    def run(
        self,
        command: str,
        netns: str | None,
        container: str | None = "c0ffee",
        *,
        ifname: str | None = "eth0",
        name: str | None = None,
        conf: dict[str, Any] | None = None,
        stdin: str | None = None,
    ) -> tuple[int, Any, subprocess.CompletedProcess[str]]:
        """(exit status, the JSON it printed or None, the process)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update({"CNI_COMMAND": command, "CNI_PATH": f"{Path(self.binary).parent}:/usr/lib/cni"})
        for key, value in (("CNI_CONTAINERID", container), ("CNI_NETNS", netns), ("CNI_IFNAME", ifname)):
            if value is not None:
                env[key] = value
        if name is not None:
            env["CNI_ARGS"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"
        began = time.perf_counter()
        proc = subprocess.run(
            [self.binary],
            input=stdin if stdin is not None else json.dumps({**self.conf, **(conf or {})}),
            capture_output=True,
            text=True,
            env=env,
            timeout=90,
            check=False,
        )
        if command in self.timings:
            self.timings[command].append(time.perf_counter() - began)
        assert "Traceback" not in proc.stdout + proc.stderr, proc
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, out, proc

    def add(self, netns: str, container: str = "c0ffee", **kwargs: Any) -> dict[str, Any]:
        status, out, proc = self.run("ADD", netns, container, **kwargs)
        assert status == 0, f"ADD failed: {proc.stdout} {proc.stderr}\n{self.host.agent_log()[-3000:]}"
        check_result(out)
        return out

    def delete(self, netns: str | None, container: str = "c0ffee", **kwargs: Any) -> None:
        status, out, proc = self.run("DEL", netns, container, **kwargs)
        assert status == 0 and out is None and proc.stdout == "", f"DEL failed: {proc.stdout} {proc.stderr}"

    def check(self, netns: str, prev: dict[str, Any], container: str = "c0ffee") -> tuple[int, Any]:
        status, out, _ = self.run("CHECK", netns, container, conf={"prevResult": prev})
        return status, out


def error_code(result: tuple[int, Any, subprocess.CompletedProcess[str]]) -> int:
    """The code of an error object, checked against the spec's shape."""
    status, out, proc = result
    assert status != 0, f"expected an error, got {proc.stdout}"
    assert isinstance(out, dict) and set(out) <= {"cniVersion", "code", "msg", "details"}, proc.stdout
    assert isinstance(out["cniVersion"], str) and isinstance(out["code"], int) and isinstance(out["msg"], str)
    return out["code"]


# -- what the agent and the namespaces hold ----------------------------------------------------------------------------


def api(h: Host) -> Client:
    return Client(str(h.api_socket), timeout=45.0)


def allocations(h: Host) -> list[dict[str, Any]]:
    return api(h).request("GET", "/status/ipam")["allocations"]


def registered(h: Host) -> list[dict[str, Any]]:
    return api(h).request("GET", "/status/dns")["registered"]


def bridge_ports(h: Host) -> list[str]:
    links = json.loads(h.exec("ip", "-j", "link", "show", "master", "weft").stdout or "[]")
    return sorted(link["ifname"] for link in links if link["ifname"].startswith("vwe"))


def state(h: Host) -> tuple[list[Any], list[Any], list[str]]:
    """Everything an attach leaves on a host: allocations, names, veths on the bridge."""
    return allocations(h), registered(h), bridge_ports(h)


def links_in(netns_path: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        ["nsenter", f"--net={netns_path}", "ip", "-j", "address", "show"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def addresses_of(link: dict[str, Any]) -> set[str]:
    return {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["family"] == "inet"}


def routes_in(netns_path: str) -> set[str]:
    out = subprocess.run(
        ["nsenter", f"--net={netns_path}", "ip", "-j", "route", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {r["dst"] if "/" in r["dst"] else f"{r['dst']}/32" for r in json.loads(out) if r["dst"] != "default"}


def dig(netns_path: str, name: str) -> list[str] | None:
    """The addresses the DNS address answers for ``name``, asked from inside the namespace; None with no answer."""
    proc = subprocess.run(
        ["nsenter", f"--net={netns_path}", "dig", "+short", "+time=2", "+tries=1", f"@{DNS_ADDRESS}", name],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if proc.returncode != 0:
        return None
    return sorted(line.strip() for line in proc.stdout.splitlines() if line.strip())


def solo(lab: Lab) -> Host:
    """One agent that owns the whole ring."""
    (h,) = lab(1)
    h.start_agent(*QUIET, "--ipalloc-init", f"seed={h.agent_name}")
    h.wait_ready(timeout=30)
    return h


def pair(lab: Lab) -> tuple[Host, Host]:
    """Two agents that see each other, sharing the ring."""
    h1, h2 = lab(2)
    seed = f"seed={h1.agent_name},{h2.agent_name}"
    h1.start_agent(*QUIET, "--ipalloc-init", seed, peers=[h2])
    h2.start_agent(*QUIET, "--ipalloc-init", seed, peers=[h1])
    for h in (h1, h2):
        h.wait_ready(timeout=30)
    wait_until(
        lambda: (
            all(p["reachable"] for h in (h1, h2) for p in api(h).status()["ipam"]["peers"])
            and all(len(api(h).status()["peers"]) == 2 for h in (h1, h2))
        ),
        timeout=30,
        message="no mesh",
    )
    # Both ends on the fast path before containers talk: while one end has turned fast and the other not yet, the
    # floods of the sleeve end (its containers' ARP requests) do not cross (docs/datapath.md, "Paths").
    wait_until(
        lambda: all(fast_towards(h, other) for h, other in ((h1, h2), (h2, h1))), timeout=30, message="no fast path"
    )
    return h1, h2


def fast_towards(h: Host, other: Host) -> bool:
    rows = api(h).status()["connections"]
    return any(r.get("nickname") == other.name and (r.get("datapath") or {}).get("path") == "fast" for r in rows)


def namespace(lab: Lab, host: Host, suffix: str) -> str:
    """A named namespace (removed with the lab); its path, as a runtime passes it."""
    name = f"{host.netns}{suffix}"
    lab._add_netns(name)
    return f"/run/netns/{name}"


@contextlib.contextmanager
def process_namespace(lab: Lab, host: Host) -> Iterator[tuple[LabProcess, str]]:
    """A network namespace that only a process holds (no name): (the process, /proc/PID/ns/net)."""
    proc = lab._spawn(host.netns, ["unshare", "--net", "sleep", "600"], host.tmp_dir, None, None)
    path = f"/proc/{proc.pid}/ns/net"
    wait_until(
        lambda: (
            os.stat(path).st_ino != os.stat(f"/proc/{os.getpid()}/ns/net").st_ino
            and os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep")
        ),
        timeout=10,
        interval=0.05,
        message="unshare did not start",
    )
    try:
        yield proc, path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def latency(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"median {statistics.median(ms):.0f} ms, p99 {p99:.0f} ms, max {ms[-1]:.0f} ms over {len(ms)}"


# -- ADD, CHECK, DEL ---------------------------------------------------------------------------------------------------


def test_add_check_del_on_a_named_namespace(lab: Lab) -> None:
    h = solo(lab)
    cni_ = Plugin(lab, h)
    path = namespace(lab, h, "a")
    netns = Path(path).name
    before = state(h)

    result = cni_.add(path, name="web1")
    assert result["cniVersion"] == "1.0.0"
    (iface,) = result["interfaces"]
    assert iface["name"] == "eth0" and iface["sandbox"] == path
    (ip,) = result["ips"]
    assert ip["interface"] == 0 and ipaddress.ip_interface(ip["address"]).network == RANGE
    assert {r["dst"] for r in result["routes"]} == {"224.0.0.0/4", f"{DNS_ADDRESS}/32"}
    assert result["dns"] == {"nameservers": [DNS_ADDRESS], "domain": "weft.local", "search": ["weft.local"]}

    # the container has what the result says, with the agent's MTU
    link = links_in(path)["eth0"]
    assert link["address"] == iface["mac"] and "UP" in link["flags"]
    assert addresses_of(link) == {ip["address"]}
    assert {r["dst"] for r in result["routes"]} <= routes_in(path)
    (allocation,) = allocations(h)
    assert allocation["address"] == ip["address"] and allocation["key"] == "cni:weft:c0ffee:eth0"
    host_link = json.loads(h.exec("ip", "-j", "link", "show", allocation["interface"]).stdout)[0]
    bridge = json.loads(h.exec("ip", "-j", "link", "show", "weft").stdout)[0]
    assert link["mtu"] == host_link["mtu"] == bridge["mtu"], (link["mtu"], host_link["mtu"], bridge["mtu"])
    address = ip["address"].split("/")[0]
    assert [(r["name"], r["address"]) for r in registered(h)] == [("web1.weft.local.", address)]
    assert dig(path, "web1.weft.local") == [address]
    assert result["dns"] == {"nameservers": ["169.254.53.53"], "domain": "weft.local", "search": ["weft.local"]}
    assert not (Path("/etc/netns") / netns).exists()  # the runtime writes the container's resolv.conf from "dns"

    # CHECK: nothing on stdout while all is well; an error once an address is gone
    assert cni_.check(path, result) == (0, None)
    subprocess.run(["ip", "-n", netns, "address", "del", ip["address"], "dev", "eth0"], check=True)
    status, out = cni_.check(path, result)
    assert status != 0 and ip["address"] in out["msg"], out
    subprocess.run(["ip", "-n", netns, "address", "add", ip["address"], "dev", "eth0"], check=True)
    assert cni_.check(path, result) == (0, None)

    # a second ADD is refused, by the same container or another, and changes nothing
    attached = state(h)
    assert error_code(cni_.run("ADD", path, name="web1")) == cni.ALREADY_ATTACHED
    assert error_code(cni_.run("ADD", path, "other", name="web9")) == cni.ALREADY_ATTACHED
    assert state(h) == attached and addresses_of(links_in(path)["eth0"]) == addresses_of(link)
    print(f"\nADD {cni_.timings['ADD'][0] * 1000:.0f} ms, CHECK {cni_.timings['CHECK'][0] * 1000:.0f} ms")

    # DEL, twice: nothing left, in the container or on the host
    cni_.delete(path, name="web1")
    assert "eth0" not in links_in(path)
    assert state(h) == before == ([], [], [])
    assert not (Path("/etc/netns") / netns).exists()
    cni_.delete(path, name="web1")
    assert state(h) == before


def test_a_namespace_held_by_a_process_and_dels_after_namespaces_are_gone(lab: Lab) -> None:
    h = solo(lab)
    cni_ = Plugin(lab, h)
    other = h.add_container_auto()

    # /proc/PID/ns/net: attached, reaches a container of the host, and its DEL after the process died frees all
    with process_namespace(lab, h) as (proc, path):
        result = cni_.add(path, "proc1", name="job1")
        assert result["interfaces"][0]["sandbox"] == path
        address = result["ips"][0]["address"].split("/")[0]
        assert "eth0" in links_in(path)
        ping = subprocess.run(
            ["nsenter", f"--net={path}", "ping", "-c1", "-W2", other.ip], capture_output=True, text=True, check=False
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert any(r["name"] == "job1.weft.local." for r in registered(h))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    wait_until(lambda: len(bridge_ports(h)) == 1, timeout=10, message="the veth outlived its namespace")
    cni_.delete(path, "proc1", name="job1")
    assert [a["holder"] for a in allocations(h)] == [other.netns]
    assert registered(h) == []
    assert dig(f"/run/netns/{other.netns}", "job1.weft.local") == []
    cni_.delete(path, "proc1", name="job1")

    # /run/netns/NAME deleted before the DEL: the DEL frees the address and the name (and the resolv.conf the agent
    # wrote for the namespace)
    path = namespace(lab, h, "gone")
    netns = Path(path).name
    result = cni_.add(path, "named1", name="web1")
    subprocess.run(["ip", "netns", "del", netns], check=True)
    cni_.delete(path, "named1", name="web1")
    assert [a["holder"] for a in allocations(h)] == [other.netns] and registered(h) == []
    assert bridge_ports(h) == [a["interface"] for a in allocations(h)]
    assert not (Path("/etc/netns") / netns).exists()
    # the address is free again: the next container gets it
    again = cni_.add(namespace(lab, h, "again"), "named2")
    assert again["ips"][0]["address"] == result["ips"][0]["address"]
    assert address == result["ips"][0]["address"].split("/")[0]  # the first DEL had freed it for the second ADD


def test_del_with_the_agent_stopped_and_the_address_free_after_its_restart(lab: Lab) -> None:
    h = solo(lab)
    cni_ = Plugin(lab, h)
    path = namespace(lab, h, "a")
    first = cni_.add(path, name="web1")
    assert allocations(h) and registered(h)

    assert h.kill_agent(signal.SIGTERM) is not None
    cni_.delete(path, name="web1")  # the interface goes, so does the veth on the bridge
    assert "eth0" not in links_in(path)
    assert bridge_ports(h) == []
    cni_.delete(path, name="web1")
    cni_.delete("", name="web1")  # no namespace at all
    assert error_code(cni_.run("ADD", path, "c2")) == cni.TRY_AGAIN_LATER
    status, out, _ = cni_.run("STATUS", None, None, ifname=None)
    assert status != 0 and out["code"] == cni.NOT_AVAILABLE

    h.start_agent(*QUIET, "--ipalloc-init", f"seed={h.agent_name}")
    h.wait_ready(timeout=30)
    assert allocations(h) == [] and registered(h) == []  # the veth was gone at start: freed
    assert cni_.run("STATUS", None, None, ifname=None)[0] == 0
    again = cni_.add(path, "c3", name="web1")
    assert again["ips"][0]["address"] == first["ips"][0]["address"]
    cni_.delete(path, "c3")
    assert state(h) == ([], [], [])


def test_bad_input_is_an_error_object_and_changes_nothing(lab: Lab) -> None:
    h = solo(lab)
    cni_ = Plugin(lab, h)
    path = namespace(lab, h, "a")
    good = json.dumps(cni_.conf)
    cases = [
        (cni_.run("ADD", path, stdin="{not json"), cni.DECODE_FAILURE),
        (cni_.run("ADD", path, stdin=json.dumps({"name": "weft", "type": "weft-cni"})), cni.INVALID_CONFIG),
        (cni_.run("ADD", path, stdin=good.replace('"1.0.0"', '"7.0.0"')), cni.INCOMPATIBLE_VERSION),
        (cni_.run("ADD", path, stdin=json.dumps({"cniVersion": "1.0.0", "type": "weft-cni"})), cni.INVALID_CONFIG),
        (cni_.run("DEL", path, stdin="{not json"), cni.DECODE_FAILURE),
        (cni_.run("CHECK", path, stdin=json.dumps({"name": "weft"})), cni.INVALID_CONFIG),
        (cni_.run("ADD", path, None), cni.INVALID_ENVIRONMENT),
        (cni_.run("DEL", path, None), cni.INVALID_ENVIRONMENT),
        (cni_.run("ADD", path, ifname=None), cni.INVALID_ENVIRONMENT),
        (cni_.run("ADD", None), cni.INVALID_ENVIRONMENT),
        (cni_.run("CHECK", None), cni.INVALID_ENVIRONMENT),
        (cni_.run("ADD", path, ifname="eth 0"), cni.INVALID_ENVIRONMENT),
        (cni_.run("ADD", path + "-nothere"), cni.UNKNOWN_CONTAINER),
        (cni_.run("ADD", "/tmp"), cni.INVALID_ENVIRONMENT),
        (cni_.run("NOPE", path), cni.INVALID_ENVIRONMENT),
    ]
    for result, code in cases:
        assert error_code(result) == code, result[2]
    assert state(h) == ([], [], []) and "eth0" not in links_in(path)


def test_a_hundred_add_del_cycles_leave_nothing_behind(lab: Lab) -> None:
    h = solo(lab)
    cni_ = Plugin(lab, h)
    path = namespace(lab, h, "a")
    netns = Path(path).name
    addresses = set()
    for i in range(100):
        result = cni_.add(path, f"cycle{i}", name="web")
        addresses.add(result["ips"][0]["address"])
        cni_.delete(path, f"cycle{i}", name="web")
    assert state(h) == ([], [], [])
    assert json.loads(h.cli("status", "ipam", "--json").stdout)["allocations"] == []
    assert json.loads(h.cli("status", "dns", "--json").stdout)["registered"] == []
    assert "eth0" not in links_in(path) and not (Path("/etc/netns") / netns).exists()
    assert len(addresses) == 1  # each DEL freed the address the next ADD was given
    print(f"\n100 cycles: ADD {latency(cni_.timings['ADD'])}; DEL {latency(cni_.timings['DEL'])}")


def test_a_name_resolves_from_a_container_on_another_host(lab: Lab) -> None:
    h1, h2 = pair(lab)
    web1, web2 = namespace(lab, h1, "a"), namespace(lab, h2, "b")
    a1 = Plugin(lab, h1).add(web1, "w1", name="web1")["ips"][0]["address"].split("/")[0]
    added = Plugin(lab, h2).add(web2, "w2", name="web2")
    a2 = added["ips"][0]["address"].split("/")[0]
    # As a runtime does: the container's resolv.conf from the result's dns (ip netns exec shows this one)
    resolv = Path("/etc/netns") / Path(web2).name / "resolv.conf"
    resolv.parent.mkdir(parents=True, exist_ok=True)
    dns = added["dns"]
    resolv.write_text(f"nameserver {dns['nameservers'][0]}\nsearch {' '.join(dns['search'])}\n")
    wait_until(lambda: dig(web2, "web1.weft.local") == [a1], timeout=15, message="web1 not found from h2")
    wait_until(lambda: dig(web1, "web2.weft.local") == [a2], timeout=15, message="web2 not found from h1")
    # by the short name, through that resolv.conf
    ping = subprocess.run(
        ["ip", "netns", "exec", Path(web2).name, "ping", "-c1", "-W2", "web1"], capture_output=True, text=True
    )
    assert ping.returncode == 0 and a1 in ping.stdout, ping.stdout + ping.stderr
    Plugin(lab, h1).delete(web1, "w1")
    wait_until(lambda: dig(web2, "web1.weft.local") == [], timeout=15, message="web1 still answered after its DEL")
    Plugin(lab, h2).delete(web2, "w2")


# -- podman ------------------------------------------------------------------------------------------------------------


def lab_rootfs() -> Path:
    """A Debian 12 root for the containers: the lab machines' (lab/labroot.py) for the current recipe if it is
    cached, else any complete one cached before (any has ping and getent); built the way `weftlab up` builds it only
    when none is (a fresh machine: about a minute, then cached for the lab too)."""
    sys.path.insert(0, str(REPO / "lab"))
    try:
        import labroot
    finally:
        sys.path.remove(str(REPO / "lab"))
    cached = [labroot.base_dir(), *sorted(labroot.CACHE_DIR.glob(f"{labroot.SUITE}-*"))]
    for base in cached:
        if (base / "recipe.json").exists() and (base / "rootfs" / "usr/bin/ping").exists():
            return base / "rootfs"
    if shutil.which("debootstrap") is None:
        pytest.skip(f"no lab root cached in {labroot.CACHE_DIR} and no debootstrap to build one (apt-get install it)")
    try:
        return labroot.ensure_base()
    except SystemExit as exc:
        pytest.fail(f"building the lab root failed: {exc}")


class Podman:
    """podman with private storage and network configuration, its CNI backend finding weft-cni in the venv."""

    def __init__(self, tmp: Path, plugin_dir: str) -> None:
        self.tmp = tmp
        (tmp / "net.d").mkdir()
        conf = tmp / "containers.conf"
        # Its state, locks and events in our directory too (the defaults are /run/libpod and /dev/shm/libpod_lock,
        # shared with every other podman of the machine).
        conf.write_text(
            f'[engine]\ntmp_dir = "{tmp}/libpod"\nlock_type = "file"\nevents_logger = "none"\n'
            f'[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = ["{plugin_dir}", "/usr/lib/cni"]\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.names: list[str] = []

    def network(self, name: str, host: Host) -> None:
        conflist = {
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [{"type": "weft-cni", "api_socket": str(host.api_socket)}],
        }
        (self.tmp / "net.d" / f"{name}.conflist").write_text(json.dumps(conflist))

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [
            "podman", "--root", str(self.tmp / "root"), "--runroot", str(self.tmp / "runroot"),
            "--network-config-dir", str(self.tmp / "net.d"), "--runtime", "runc", "--cgroup-manager", "cgroupfs",
            *args,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def run(self, name: str, network: str, rootfs: Path) -> float:
        self.names.append(name)
        began = time.monotonic()
        self(
            "run", "-d", "--name", name, "--network", network, "--ulimit", "nofile=1024:1024",
            "--ulimit", "nproc=1024:1024", "--rootfs", f"{rootfs}:O", "sleep", "600",
        )  # fmt: skip
        return time.monotonic() - began

    def netns_of(self, name: str) -> str:
        return self("inspect", "--format", "{{.NetworkSettings.SandboxKey}}", name).stdout.strip()

    def cleanup(self) -> None:
        for name in self.names:
            self("rm", "-f", "-t", "0", name, check=False)
        for line in Path("/proc/self/mounts").read_text().splitlines():  # whatever podman left mounted
            target = line.split()[1]
            if target.startswith(str(self.tmp)):
                subprocess.run(["umount", "-l", target], check=False)


def test_podman_containers_on_two_hosts_reach_each_other_by_name(lab: Lab) -> None:
    for tool in ("podman", "runc", "conmon"):
        if shutil.which(tool) is None and not Path(f"/usr/libexec/podman/{tool}").exists():
            pytest.skip(f"{tool} is not installed (apt-get install podman runc containernetworking-plugins)")
    rootfs = lab_rootfs()
    h1, h2 = pair(lab)
    networks = {h1: f"weft-{lab.token}-h1", h2: f"weft-{lab.token}-h2"}
    tmp = Path(tempfile.mkdtemp(prefix=f"weft-podman-{lab.token}-", dir="/tmp"))
    podman = Podman(tmp, str(Path(plugin_binary(lab)).parent))
    cni_cache = Path("/var/lib/cni")  # libcni keeps the results of ADDs there (podman 4.3 cannot move it)
    cache_was_there = cni_cache.exists()
    netns_paths: list[str] = []
    try:
        for h, network in networks.items():
            podman.network(network, h)
        took = [podman.run("web1", networks[h1], rootfs), podman.run("web2", networks[h2], rootfs)]
        netns_paths = [podman.netns_of(n) for n in ("web1", "web2")]
        print(f"\npodman run -d: {took[0]:.2f} s and {took[1]:.2f} s")
        for h, name in ((h1, "web1"), (h2, "web2")):
            assert [r["name"] for r in registered(h)] == [f"{name}.weft.local."], registered(h)
        # podman writes the result's DNS into the container's resolv.conf: no --dns needed
        resolv = podman("exec", "web1", "cat", "/etc/resolv.conf").stdout
        assert f"nameserver {DNS_ADDRESS}" in resolv and "search weft.local" in resolv, resolv
        for me, peer in (("web1", "web2"), ("web2", "web1")):
            address = registered(h2 if peer == "web2" else h1)[0]["address"]
            got = wait_until(
                lambda me=me, peer=peer: podman("exec", me, "getent", "hosts", peer, check=False).stdout.split(),
                timeout=20,
                message=f"{me} cannot resolve {peer}",
            )
            assert got[0] == address and got[1] == f"{peer}.weft.local", got
            ping = podman("exec", me, "ping", "-c1", "-W2", peer, check=False)
            assert ping.returncode == 0, ping.stdout + ping.stderr
        for name in ("web1", "web2"):
            podman("rm", "-f", "-t", "0", name)
        for h in (h1, h2):
            assert state(h) == ([], [], []), state(h)
    finally:
        podman.cleanup()
        for path in netns_paths:  # podman removes its namespaces; one left behind by a failure goes here
            if path.startswith("/run/netns/") and os.path.exists(path):
                subprocess.run(["ip", "netns", "del", Path(path).name], check=False)
        for network in networks.values():  # libcni's cache of the results of our networks' ADDs
            for cached in (cni_cache / "results").glob(f"{network}-*"):
                cached.unlink(missing_ok=True)
        if not cache_was_there:
            for empty in (cni_cache / "results", cni_cache):
                with contextlib.suppress(OSError):
                    empty.rmdir()
        shutil.rmtree(tmp, ignore_errors=True)

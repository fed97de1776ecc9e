"""weft-cni without root: its input checks and error codes, VERSION, the result it builds, what it asks the agent
(a fake agent on a unix socket), DEL with no agent, and that it imports nothing heavy. The plugin with real agents
in network namespaces is netns/test_cni_netns.py."""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cnispec import check_result

from weft import cni

SRC = str(Path(__file__).resolve().parents[2] / "src")
CONF = {"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni"}


def plugin(
    stdin: str | bytes, command: str | None = "ADD", **env: str
) -> tuple[int, dict[str, Any] | None, subprocess.CompletedProcess[bytes]]:
    """Run the plugin as a runtime does: (exit status, the JSON on stdout or None, the process)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    full["PYTHONPATH"] = SRC
    if command is not None:
        full["CNI_COMMAND"] = command
    full.update(env)
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [sys.executable, "-m", "weft.cni"], input=data, capture_output=True, env=full, timeout=60, check=False
    )
    out = proc.stdout.decode()
    return proc.returncode, (json.loads(out) if out.strip() else None), proc


def spec_env(**extra: str) -> dict[str, str]:
    return {"CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0", "CNI_NETNS": f"/proc/{os.getpid()}/ns/net", **extra}


def assert_error(status: int, out: dict[str, Any] | None, proc: Any, code: int, *words: str) -> dict[str, Any]:
    assert status != 0, out
    assert out is not None and set(out) <= {"cniVersion", "code", "msg", "details"}, out
    assert isinstance(out["cniVersion"], str) and out["code"] == code and isinstance(out["msg"], str), out
    for word in words:
        assert word in out["msg"], out
    assert b"Traceback" not in proc.stderr and b"Traceback" not in proc.stdout
    return out


# -- VERSION and the configuration on stdin --------------------------------------------------------------------------


def test_version_names_every_supported_version_and_echoes_the_one_asked() -> None:
    status, out, _ = plugin('{"cniVersion": "0.4.0"}', "VERSION")
    assert status == 0 and out == {"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}
    for stdin in ("", "not json", '{"cniVersion": "9.9.9"}'):
        status, out, _ = plugin(stdin, "VERSION")
        assert status == 0 and out is not None and out["cniVersion"] == "1.0.0" and "1.0.0" in out["supportedVersions"]


@pytest.mark.parametrize(
    ("stdin", "code", "word"),
    [
        ("this is not json", cni.DECODE_FAILURE, "not JSON"),
        (b"\xff\xfe{", cni.DECODE_FAILURE, "UTF-8"),
        ("[1, 2]", cni.DECODE_FAILURE, "object"),
        ("[" * 100000, cni.DECODE_FAILURE, ""),
        ('{"name": "weft", "type": "weft-cni"}', cni.INVALID_CONFIG, "cniVersion"),
        ('{"cniVersion": "2.0.0", "name": "weft"}', cni.INCOMPATIBLE_VERSION, "2.0.0"),
        ('{"cniVersion": 1, "name": "weft"}', cni.INCOMPATIBLE_VERSION, "not supported"),
        ('{"cniVersion": "1.0.0", "type": "weft-cni"}', cni.INVALID_CONFIG, "network name"),
        ('{"cniVersion": "1.0.0", "name": "-bad"}', cni.INVALID_CONFIG, "network name"),
        ('{"cniVersion": "1.0.0", "name": "weft", "api_socket": "relative.sock"}', cni.INVALID_CONFIG, "api_socket"),
        ('{"cniVersion": "1.0.0", "name": "weft", "ipam": "host-local"}', cni.INVALID_CONFIG, "ipam"),
        ('{"cniVersion": "1.0.0", "name": "weft", "ipam": {"type": "../x"}}', cni.INVALID_CONFIG, "ipam.type"),
        ('{"cniVersion": "1.0.0", "name": "weft", "prevResult": []}', cni.INVALID_CONFIG, "prevResult"),
    ],
)
def test_bad_stdin_is_an_error_object_with_the_spec_code(stdin: str, code: int, word: str) -> None:
    for command in ("ADD", "DEL", "CHECK"):
        assert_error(*plugin(stdin, command, **spec_env()), code, word)


def test_an_error_carries_the_configuration_version() -> None:
    conf = {**CONF, "cniVersion": "0.4.0"}
    out = assert_error(*plugin(json.dumps(conf), "BOGUS", **spec_env()), cni.INVALID_ENVIRONMENT, "CNI_COMMAND")
    assert out["cniVersion"] == "0.4.0"


# -- the environment -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "drop", "change", "word"),
    [
        (None, "", {}, "CNI_COMMAND"),
        ("ADD", "CNI_CONTAINERID", {}, "CNI_CONTAINERID"),
        ("DEL", "CNI_CONTAINERID", {}, "CNI_CONTAINERID"),
        ("CHECK", "CNI_CONTAINERID", {}, "CNI_CONTAINERID"),
        ("ADD", "", {"CNI_CONTAINERID": "-starts-badly"}, "CNI_CONTAINERID"),
        ("ADD", "", {"CNI_CONTAINERID": "has space"}, "CNI_CONTAINERID"),
        ("ADD", "CNI_IFNAME", {}, "CNI_IFNAME"),
        ("DEL", "CNI_IFNAME", {}, "CNI_IFNAME"),
        ("ADD", "", {"CNI_IFNAME": "eth:0"}, "CNI_IFNAME"),
        ("ADD", "", {"CNI_IFNAME": "a" * 16}, "CNI_IFNAME"),
        ("ADD", "", {"CNI_IFNAME": ".."}, "CNI_IFNAME"),
        ("ADD", "CNI_NETNS", {}, "CNI_NETNS"),
        ("CHECK", "CNI_NETNS", {}, "CNI_NETNS"),
        ("ADD", "", {"CNI_NETNS": "relative/ns"}, "CNI_NETNS"),
        ("ADD", "", {"CNI_ARGS": "K8S_POD_NAME=web;SOMETHING=1"}, "SOMETHING"),
        ("ADD", "", {"CNI_ARGS": "K8S_POD_NAME"}, "KEY=VALUE"),
        ("ADD", "", {"CNI_ARGS": "IgnoreUnknown=maybe"}, "IgnoreUnknown"),
        ("ADD", "", {"CNI_ARGS": "IgnoreUnknown=1;MAC=02:00:00:00:00:01"}, "MAC"),
    ],
)
def test_a_bad_environment_is_code_4_naming_the_variable(
    command: str | None, drop: str, change: dict[str, str], word: str
) -> None:
    env = {k: v for k, v in spec_env(**change).items() if k != drop}
    assert_error(*plugin(json.dumps(CONF), command, **env), cni.INVALID_ENVIRONMENT, word)


def test_add_to_a_namespace_that_is_not_there_is_code_3() -> None:
    env = spec_env(CNI_NETNS="/run/netns/weft-test-no-such-namespace")
    assert_error(*plugin(json.dumps(CONF), "ADD", **env), cni.UNKNOWN_CONTAINER, "does not exist")


def test_cni_args() -> None:
    assert cni.parse_args("") == {}
    assert cni.parse_args("IgnoreUnknown=1;K8S_POD_NAME=web1;FOO=bar") == {
        "IgnoreUnknown": "1",
        "K8S_POD_NAME": "web1",
        "FOO": "bar",
    }
    assert cni.parse_args("K8S_POD_NAMESPACE=default;K8S_POD_NAME=api-0;K8S_POD_INFRA_CONTAINER_ID=abc")
    assert cni.parse_args("IgnoreUnknown=true;X=") == {"IgnoreUnknown": "true", "X": ""}
    for bad in ("FOO=1", "IgnoreUnknown=0;FOO=1", ";", "A=B=C"):
        with pytest.raises(cni.CniError) as info:
            cni.parse_args(bad)
        assert info.value.code == cni.INVALID_ENVIRONMENT


def test_the_dns_name_is_the_runtime_container_name_when_dns_can_carry_it() -> None:
    assert cni.dns_label("web1") == "web1"
    assert cni.dns_label("Web_1") == "web_1"  # podman's generated names have an underscore: the agent takes it
    for bad in ("", "my.app", "a" * 64, "café", "has space"):
        assert cni.dns_label(bad) == ""
    env = cni.parse_environment({**spec_env(), "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=web1"}, "DEL")
    assert env["name"] == "web1"
    env = cni.parse_environment({**spec_env(), "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=my.app"}, "DEL")
    assert env["name"] == ""


def test_the_key_is_network_container_and_interface_and_always_a_valid_one() -> None:
    env = cni.parse_environment(spec_env(), "DEL")
    assert cni._key(CONF, env) == "cni:weft:c0ffee:eth0"
    long_env = {**env, "container": "a" * 250}
    key = cni._key(CONF, long_env)
    assert key.startswith("cni:sha256:") and len(key) <= cni.MAX_KEY
    assert cni._key(CONF, {**env, "ifname": "eth#0"}).startswith("cni:sha256:")


def test_how_the_agent_is_told_the_namespace() -> None:
    env = cni.parse_environment(spec_env(CNI_NETNS="/run/netns/blue"), "DEL")
    assert cni._who(CONF, env) == {"key": "cni:weft:c0ffee:eth0", "netns": "blue"}
    assert cni._who(CONF, {**env, "netns": "/var/run/netns/blue"})["netns"] == "blue"
    me = f"/proc/{os.getpid()}/ns/net"
    assert cni._who(CONF, {**env, "netns": me}) == {"key": "cni:weft:c0ffee:eth0", "pid": os.getpid()}
    gone = "/proc/999999999/ns/net"
    assert cni._who(CONF, {**env, "netns": gone}, existing_only=True) == {"key": "cni:weft:c0ffee:eth0"}
    with pytest.raises(cni.CniError) as info:
        cni._who(CONF, {**env, "netns": "/var/run/docker/netns/abc"})
    assert info.value.code == cni.INVALID_ENVIRONMENT
    assert cni._who(CONF, {**env, "netns": "/var/run/docker/netns/abc"}, existing_only=True) == {
        "key": "cni:weft:c0ffee:eth0"
    }
    assert cni._who(CONF, {**env, "netns": ""}) == {"key": "cni:weft:c0ffee:eth0"}


# -- results ---------------------------------------------------------------------------------------------------------

ANSWER = {
    "changed": True,
    "interface": "eth0",
    "host_interface": "vwe0123abcd",
    "mac": "02:11:22:33:44:55",
    "addresses": ["10.32.0.7/12"],
    "routes": ["224.0.0.0/4", "169.254.53.53/32"],
    "key": "cni:weft:c0ffee:eth0",
    "name": "web1.weft.local.",
    "dns": {"nameservers": ["169.254.53.53"], "domain": "weft.local", "search": ["weft.local"]},
}


def test_the_result_is_the_spec_result() -> None:
    env = cni.parse_environment(spec_env(CNI_NETNS="/run/netns/blue"), "DEL")
    result = cni.result_object(CONF, env, ANSWER)
    check_result(result)
    assert result == {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "02:11:22:33:44:55", "sandbox": "/run/netns/blue"}],
        "ips": [{"address": "10.32.0.7/12", "interface": 0}],
        "routes": [{"dst": "224.0.0.0/4"}, {"dst": "169.254.53.53/32"}],
        "dns": {"nameservers": ["169.254.53.53"], "search": ["weft.local"], "domain": "weft.local"},
    }
    old = cni.result_object({**CONF, "cniVersion": "0.4.0"}, env, ANSWER)
    check_result(old, "0.4.0")
    assert old["ips"] == [{"address": "10.32.0.7/12", "interface": 0, "version": "4"}]


def test_a_result_after_another_plugin_keeps_its_result() -> None:
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:09", "sandbox": "/run/netns/blue"}],
        "ips": [{"address": "192.168.1.5/24", "gateway": "192.168.1.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["192.168.1.1"]},
    }
    env = cni.parse_environment(spec_env(CNI_NETNS="/run/netns/blue", CNI_IFNAME="ethwe"), "DEL")
    result = cni.result_object({**CONF, "prevResult": prev}, env, {**ANSWER, "interface": "ethwe"})
    check_result(result)
    assert [i["name"] for i in result["interfaces"]] == ["eth0", "ethwe"]
    assert result["ips"][0] == prev["ips"][0] and result["ips"][1] == {"address": "10.32.0.7/12", "interface": 1}
    assert result["routes"][0] == {"dst": "0.0.0.0/0"} and len(result["routes"]) == 3
    assert result["dns"]["nameservers"] == ["192.168.1.1", "169.254.53.53"]


def test_check_reads_the_addresses_prev_result_gave_our_interface() -> None:
    prev = cni.result_object(CONF, cni.parse_environment(spec_env(), "DEL"), ANSWER)
    assert cni._prev_addresses(prev, "eth0") == ["10.32.0.7/12"]
    with pytest.raises(cni.CniError) as info:
        cni._prev_addresses(prev, "eth1")
    assert info.value.code == cni.INVALID_CONFIG


# -- with a fake agent -----------------------------------------------------------------------------------------------


class FakeAgent(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.answers: dict[str, tuple[int, Any]] = {}
        super().__init__(path, _Handler)


class _Handler(socketserver.StreamRequestHandler):
    server: FakeAgent

    def handle(self) -> None:
        method, target, _ = self.rfile.readline().decode().split(" ", 2)
        length = 0
        while (line := self.rfile.readline().decode().strip()) != "":
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.requests.append((method, target, body))
        status, answer = self.server.answers.get(target, (200, {"changed": False, "addresses": []}))
        data = json.dumps(answer).encode()
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        self.wfile.write(head.encode() + data)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    server = FakeAgent(str(tmp_path / "agent.sock"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_add_asks_the_agent_for_an_exclusive_named_attach(agent: FakeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cni, "_has_interface", lambda netns, ifname: False)
    agent.answers["/attach"] = (200, ANSWER)
    conf = {**CONF, "api_socket": agent.server_address}
    me = f"/proc/{os.getpid()}/ns/net"
    environ = spec_env(CNI_NETNS=me, CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=Web1")
    result = cni.run("ADD", cni.parse_config(json.dumps(conf)), environ)
    assert result is not None
    check_result(result)
    assert agent.requests == [
        (
            "POST",
            "/attach",
            {
                "key": "cni:weft:c0ffee:eth0",
                "pid": os.getpid(),
                "ifname": "eth0",
                "cidrs": [],
                "exclusive": True,
                "name": "web1",
            },
        )
    ]


def test_add_with_a_bare_static_ip_takes_the_range_prefix(agent: FakeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cni, "_has_interface", lambda netns, ifname: False)
    agent.answers["/attach"] = (200, ANSWER)
    agent.answers["/status/ipam"] = (200, {"range": "10.32.0.0/12", "state": "ready", "allocations": []})
    conf = {**CONF, "api_socket": agent.server_address}
    environ = spec_env(CNI_NETNS=f"/proc/{os.getpid()}/ns/net", CNI_ARGS="IgnoreUnknown=1;IP=10.32.0.7")
    cni.run("ADD", cni.parse_config(json.dumps(conf)), environ)
    assert agent.requests[-1][2]["cidrs"] == ["10.32.0.7/12"]


def test_add_refused_by_the_agent_is_its_reason(agent: FakeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cni, "_has_interface", lambda netns, ifname: False)
    conf = {**CONF, "api_socket": agent.server_address}
    environ = spec_env(CNI_NETNS=f"/proc/{os.getpid()}/ns/net")
    agent.answers["/attach"] = (409, {"error": "the container already has an interface attached by weft (x)"})
    with pytest.raises(cni.CniError) as info:
        cni.run("ADD", cni.parse_config(json.dumps(conf)), environ)
    assert info.value.code == cni.ALREADY_ATTACHED
    agent.answers["/attach"] = (409, {"error": "no free address in 10.32.0.0/26: all 62 are in use"})
    with pytest.raises(cni.CniError) as info:
        cni.run("ADD", cni.parse_config(json.dumps(conf)), environ)
    assert info.value.code == cni.AGENT_REFUSED and "no free address" in info.value.msg


def test_add_to_an_agent_without_dns_goes_on_unnamed(agent: FakeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cni, "_has_interface", lambda netns, ifname: False)
    conf = {**CONF, "api_socket": agent.server_address}
    environ = spec_env(CNI_NETNS=f"/proc/{os.getpid()}/ns/net", CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=web1")
    agent.answers["/attach"] = (409, {"error": "DNS is off on this agent (dns: false): attach without --name"})
    with pytest.raises(cni.CniError):
        cni.run("ADD", cni.parse_config(json.dumps(conf)), environ)
    assert [r[2].get("name") for r in agent.requests] == ["web1", None]


def test_del_of_a_gone_container_frees_by_key(agent: FakeAgent) -> None:
    conf = {**CONF, "api_socket": agent.server_address}
    for netns in ("", "/proc/999999999/ns/net"):
        agent.requests.clear()
        assert cni.run("DEL", cni.parse_config(json.dumps(conf)), spec_env(CNI_NETNS=netns)) is None
        assert agent.requests == [("POST", "/detach", {"key": "cni:weft:c0ffee:eth0", "ifname": "eth0"})]


def test_del_without_an_agent_succeeds_and_add_says_try_again(tmp_path: Path) -> None:
    conf = json.dumps({**CONF, "api_socket": str(tmp_path / "none.sock")})
    for _ in range(2):
        status, out, proc = plugin(conf, "DEL", **spec_env(CNI_NETNS=""))
        assert status == 0 and out is None and proc.stdout == b"", proc
    # a socket nobody listens on (the agent was killed)
    dead = tmp_path / "dead.sock"
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))
    conf = json.dumps({**CONF, "api_socket": str(dead)})
    status, out, proc = plugin(conf, "DEL", **spec_env(CNI_NETNS="/proc/999999999/ns/net"))
    assert status == 0 and out is None, proc
    assert_error(*plugin(conf, "STATUS"), cni.NOT_AVAILABLE, "not available")


def test_status_and_gc(agent: FakeAgent) -> None:
    conf = cni.parse_config(json.dumps({**CONF, "api_socket": agent.server_address}))
    agent.answers["/status/ipam"] = (200, {"state": "ready"})
    assert cni.run("STATUS", conf, {}) is None
    agent.answers["/status/ipam"] = (200, {"state": "awaiting consensus: 1 of 2 peers"})
    with pytest.raises(cni.CniError) as info:
        cni.run("STATUS", conf, {})
    assert info.value.code == cni.NOT_AVAILABLE and "consensus" in info.value.msg
    assert cni.run("GC", conf, {}) is None


def test_check_needs_0_4_0_and_a_prev_result(agent: FakeAgent) -> None:
    conf = {**CONF, "api_socket": agent.server_address}
    me = f"/proc/{os.getpid()}/ns/net"
    with pytest.raises(cni.CniError) as info:
        cni.run("CHECK", cni.parse_config(json.dumps({**conf, "cniVersion": "0.3.1"})), spec_env(CNI_NETNS=me))
    assert info.value.code == cni.INCOMPATIBLE_VERSION
    with pytest.raises(cni.CniError) as info:
        cni.run("CHECK", cni.parse_config(json.dumps(conf)), spec_env(CNI_NETNS=me))
    assert info.value.code == cni.INVALID_CONFIG and "prevResult" in info.value.msg


# -- start-up --------------------------------------------------------------------------------------------------------


def test_the_plugin_imports_nothing_heavy() -> None:
    heavy = ["pydantic", "asyncio", "aiohttp", "yaml", "click", "cryptography", "pyroute2", "subprocess", "ctypes"]
    probe = f"import sys, weft.cni; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=60,
        check=True,
    ).stdout
    assert out.strip() == "[]", out

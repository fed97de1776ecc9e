"""``weft-cni``: the CNI plugin (spec 1.0.0) that puts a runtime's containers on the overlay through the local agent.

The runtime runs it once per operation, with the operation in ``CNI_*`` variables and the plugin's configuration on
stdin; it answers on stdout with a result or an error object (code and message), never a traceback. The agent does
the work (veth, address from the ring, port guard, DNS name), so this process only translates: it imports nothing
heavy (no pydantic, asyncio or aiohttp), because a runtime waits for it at every container start.

Configuration (a plugin of the network's list)::

    {"type": "weft-cni",
     "api_socket": "/run/weft/weft.sock",     optional: the agent's API socket
     "ipam": {"type": "host-local", ...}}     optional: addresses from an IPAM plugin instead of the ring

docs/cni.md has conflists for podman and Kubernetes-style runtimes, the result, the error codes and the limits.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

from weft.api.client import DEFAULT_SOCKET, ApiError, Client

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

SPEC = "1.0.0"
SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
CHECK_SINCE = "0.4.0"  # CHECK came with spec 0.4.0
API_TIMEOUT = 60.0  # an address may first have to come from another peer (a space request), or a ring form
STATUS_TIMEOUT = 5.0
MAX_STDIN = 4 << 20  # a configuration with its prevResult is a few kB

# The spec's error codes (SPEC.md, "Error"); 50 is STATUS's (spec 1.1); 100 and above are this plugin's own.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
AGENT_REFUSED = 100  # the agent said no (an address in use, none free, a bad name...): msg is its reason
ALREADY_ATTACHED = 101  # ADD for a container that already has the interface (ADD twice without a DEL)

# CNI_ARGS keys this plugin reads, or knows that it may ignore; any other needs IgnoreUnknown (as the reference
# plugins do). K8S_POD_NAME is the container's DNS name; podman passes its container name there too.
KNOWN_ARGS = frozenset(
    {"IgnoreUnknown", "K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID", "IP", "MAC"}
)
NETNS_DIR = "/run/netns"  # where `ip netns`, podman, containerd and CRI-O keep named namespaces
CLONE_NEWNET = 0x40000000
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ID_CHARS = _ALNUM | frozenset("_.-")  # the spec's for container IDs and network names
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")  # the agent's for a DNS label
_KEY_CHARS = _ALNUM | frozenset("_.:/@=+-")  # the agent's for a holder key (weft.ipam.holders)
MAX_KEY = 200


class CniError(Exception):
    """An operation that fails: the runtime gets ``{"code", "msg", "details"}``."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def main() -> int:
    """Entry point (``weft-cni``): one CNI operation, its answer on stdout; 0 on success, 1 on an error."""
    version = SPEC
    try:
        command = os.environ.get("CNI_COMMAND", "")
        raw = _stdin()
        if command == "VERSION":
            _emit(version_info(raw))
            return 0
        config = parse_config(raw)
        version = config["cniVersion"]
        result = run(command, config, os.environ, raw)
        if result is not None:
            _emit(result)
        return 0
    except CniError as exc:
        _emit(error_object(version, exc))
    except Exception as exc:  # the runtime shows our message: never a traceback
        _emit(error_object(version, CniError(IO_FAILURE, f"weft-cni failed: {type(exc).__name__}: {exc}")))
    return 1


def run(command: str, config: dict[str, Any], environ: Mapping[str, str], raw: str = "") -> dict[str, Any] | None:
    """Carry out ``command``: the result object for ADD, None for the others (which print nothing on success)."""
    if command == "ADD":
        return add(config, parse_environment(environ, "ADD"), raw)
    if command == "DEL":
        delete(config, parse_environment(environ, "DEL"), raw)
        return None
    if command == "CHECK":
        check(config, parse_environment(environ, "CHECK"), raw)
        return None
    if command == "STATUS":
        status(config)
        return None
    if command == "GC":
        return None  # nothing is kept outside the agent, which frees at start what a gone container held
    if not command:
        raise CniError(INVALID_ENVIRONMENT, "CNI_COMMAND is missing")
    raise CniError(INVALID_ENVIRONMENT, f"CNI_COMMAND {command[:20]!r} is not one of ADD, DEL, CHECK, VERSION")


# -- the operations -------------------------------------------------------------------------------------------------


def add(config: dict[str, Any], env: dict[str, Any], raw: str = "") -> dict[str, Any]:
    """Attach the container through the agent and say what it got."""
    netns, ifname = env["netns"], env["ifname"]
    if _has_interface(netns, ifname):
        raise CniError(
            ALREADY_ATTACHED,
            f"the container already has an interface {ifname}: a second ADD without a DEL, or another plugin's",
        )
    who = _who(config, env)
    ipam = bool(config.get("ipam"))
    ipam_result: dict[str, Any] = {}
    if ipam:
        ipam_result = _ipam_plugin(config, env, "ADD", raw)
        cidrs = _addresses(ipam_result, config)
    else:
        cidrs = _static_cidrs(config, env)
    body: dict[str, Any] = {**who, "ifname": ifname, "cidrs": cidrs, "exclusive": True}
    if env["name"]:
        body["name"] = env["name"]
    client = _client(config)
    try:
        try:
            answer = client.request("POST", "/attach", body)
        except ApiError as exc:
            if "name" not in body or "DNS is off" not in str(exc):
                raise
            del body["name"]  # an agent without DNS: the container still joins, unnamed
            answer = client.request("POST", "/attach", body)
    except ApiError as exc:
        error = _api_error(exc, "ADD")
        if ipam:
            _ipam_release(config, env, raw)  # this ADD failed as a whole: give its addresses back
        raise error from None
    return result_object(config, env, answer, ipam_result)


def delete(config: dict[str, Any], env: dict[str, Any], raw: str = "") -> None:
    """Idempotent, and done even when the agent or the container is already gone (the spec asks both)."""
    body = {**_who(config, env, existing_only=True), "ifname": env["ifname"]}
    try:
        _client(config).request("POST", "/detach", body)
    except ApiError as exc:
        if not _agent_down(exc):
            raise _api_error(exc, "DEL") from None
        # The agent is down: take the interface out of the container, so its veth is gone, and the agent frees the
        # addresses and names of a veth that is gone when it starts again.
        _delete_interface(env)
    if config.get("ipam"):
        _ipam_plugin(config, env, "DEL", raw)


def check(config: dict[str, Any], env: dict[str, Any], raw: str = "") -> None:
    """The interface is in the container, up, with every address ``prevResult`` gave it, each still reserved for
    this container by the agent; the agent answers. Routes are not checked: a later plugin may change them."""
    if _version_tuple(config["cniVersion"]) < _version_tuple(CHECK_SINCE):
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK needs cniVersion {CHECK_SINCE} or later")
    prev = config.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult in the configuration")
    ifname, netns = env["ifname"], env["netns"]
    wanted = _prev_addresses(prev, ifname)
    try:
        ipam_status = _client(config, STATUS_TIMEOUT).request("GET", "/status/ipam")
    except ApiError as exc:
        raise _api_error(exc, "CHECK") from None
    link = _link_info(netns, ifname)
    if link is None:
        raise CniError(UNKNOWN_CONTAINER, f"the container has no interface {ifname}")
    if "UP" not in link.get("flags", []):
        raise CniError(AGENT_REFUSED, f"the container's {ifname} is down")
    held = {f"{a.get('local')}/{a.get('prefixlen')}" for a in link.get("addr_info", []) if isinstance(a, dict)}
    missing = sorted(a for a in wanted if a not in held)
    if missing:
        raise CniError(AGENT_REFUSED, f"the container's {ifname} lacks {', '.join(missing)}")
    if not config.get("ipam"):
        key = _key(config, env)
        reserved = {a.get("address") for a in ipam_status.get("allocations", []) if a.get("key") == key}
        in_range = [a for a in wanted if _in_range(a, ipam_status.get("range", ""))]
        lost = sorted(a for a in in_range if a not in reserved)
        if lost:
            raise CniError(AGENT_REFUSED, f"the agent no longer reserves {', '.join(lost)} for this container")
    else:
        _ipam_plugin(config, env, "CHECK", raw)


def status(config: dict[str, Any]) -> None:
    """Whether an ADD can be served now: the agent answers and its address ring is there."""
    try:
        answer = _client(config, STATUS_TIMEOUT).request("GET", "/status/ipam")
    except ApiError as exc:
        raise CniError(NOT_AVAILABLE, f"the weft agent is not available: {exc}") from None
    state = answer.get("state", "") if isinstance(answer, dict) else ""
    if state != "ready" and not state.startswith("waiting for space"):
        raise CniError(NOT_AVAILABLE, f"the weft agent cannot give addresses yet: {state or 'no IPAM state'}")


# -- input ----------------------------------------------------------------------------------------------------------


def _stdin() -> str:
    data = sys.stdin.buffer.read(MAX_STDIN + 1) if sys.stdin is not None else b""
    if len(data) > MAX_STDIN:
        raise CniError(IO_FAILURE, f"the configuration on stdin is over {MAX_STDIN} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise CniError(DECODE_FAILURE, f"the configuration on stdin is not UTF-8: {exc}") from None


def version_info(raw: str) -> dict[str, Any]:
    """VERSION's answer: the version asked in (when we support it) and every version we support."""
    asked = SPEC
    try:
        given = json.loads(raw).get("cniVersion") if raw.strip() else None
    except (ValueError, AttributeError, RecursionError):
        given = None
    if given in SUPPORTED:
        asked = given
    return {"cniVersion": asked, "supportedVersions": list(SUPPORTED)}


def parse_config(raw: str) -> dict[str, Any]:
    """The plugin configuration from stdin, checked; CniError with the spec's code for what is wrong."""
    try:
        config = json.loads(raw)
    except RecursionError:
        raise CniError(DECODE_FAILURE, "the configuration on stdin is nested too deeply") from None
    except ValueError as exc:
        raise CniError(DECODE_FAILURE, f"the configuration on stdin is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CniError(DECODE_FAILURE, "the configuration on stdin must be a JSON object")
    version = config.get("cniVersion")
    if version is None:
        raise CniError(INVALID_CONFIG, "the configuration has no cniVersion")
    if not isinstance(version, str) or version not in SUPPORTED:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {str(version)[:20]!r} is not supported",
            f"weft-cni supports {', '.join(SUPPORTED)}",
        )
    name = config.get("name")
    if not isinstance(name, str) or not _spec_id(name):
        raise CniError(
            INVALID_CONFIG, "the configuration has no network name (a letter or digit, then letters, digits, _ . -)"
        )
    socket = config.get("api_socket", DEFAULT_SOCKET)
    if not isinstance(socket, str) or not socket.startswith("/"):
        raise CniError(INVALID_CONFIG, "api_socket must be the absolute path of the agent's API socket")
    ipam = config.get("ipam")
    if ipam is not None and not isinstance(ipam, dict):
        raise CniError(INVALID_CONFIG, "ipam must be an object with a type (or left out: addresses from the ring)")
    if ipam:
        kind = ipam.get("type")
        if not isinstance(kind, str) or not kind or "/" in kind or "\\" in kind:
            raise CniError(INVALID_CONFIG, "ipam.type must be the name of an IPAM plugin (no path)")
    for key in ("runtimeConfig", "prevResult", "args"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CniError(INVALID_CONFIG, f"{key} must be an object")
    return config


def parse_environment(environ: Mapping[str, str], command: str) -> dict[str, Any]:
    """The ``CNI_*`` variables ``command`` needs, checked: code 4 naming the variable, or 3 for a namespace that is
    not there (ADD, CHECK)."""
    container = environ.get("CNI_CONTAINERID", "")
    if not container:
        raise CniError(INVALID_ENVIRONMENT, "CNI_CONTAINERID is missing")
    if not _spec_id(container):
        raise CniError(INVALID_ENVIRONMENT, "CNI_CONTAINERID must be a letter or digit, then letters, digits, _ . -")
    ifname = environ.get("CNI_IFNAME", "")
    if not ifname:
        raise CniError(INVALID_ENVIRONMENT, "CNI_IFNAME is missing")
    if not _ifname_ok(ifname):
        raise CniError(
            INVALID_ENVIRONMENT,
            f"CNI_IFNAME {ifname[:20]!r} is not an interface name (1-15 printable characters, "
            "none of / : % or whitespace, not . or ..)",
        )
    netns = environ.get("CNI_NETNS", "")
    if command != "DEL" and not netns:
        raise CniError(INVALID_ENVIRONMENT, "CNI_NETNS is missing")
    if netns and not netns.startswith("/"):
        raise CniError(INVALID_ENVIRONMENT, f"CNI_NETNS {netns[:80]!r} is not the path of a network namespace")
    if command != "DEL" and not os.path.exists(netns):
        raise CniError(UNKNOWN_CONTAINER, f"CNI_NETNS {netns[:80]} does not exist")
    args = parse_args(environ.get("CNI_ARGS", ""))
    return {
        "container": container,
        "ifname": ifname,
        "netns": netns,
        "name": dns_label(args.get("K8S_POD_NAME", "")),
        "args": args,
        "path": environ.get("CNI_PATH", ""),
    }


def parse_args(text: str) -> dict[str, str]:
    """``CNI_ARGS`` (``K=V;K=V``): pairs that are not ``K=V`` are refused, and keys this plugin does not know unless
    ``IgnoreUnknown`` is 1 or true (as the reference plugins do)."""
    out: dict[str, str] = {}
    if not text:
        return out
    for pair in text.split(";"):
        key, sep, value = pair.partition("=")
        if not sep or not key or "=" in value:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: {pair[:60]!r} is not KEY=VALUE")
        out[key] = value
    ignore = out.get("IgnoreUnknown", "0")
    if ignore not in ("0", "1", "true", "false", "True", "False"):
        raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: IgnoreUnknown={ignore[:20]!r} is not a boolean")
    unknown = sorted(k for k in out if k not in KNOWN_ARGS)
    if unknown and ignore not in ("1", "true", "True"):
        raise CniError(
            INVALID_ENVIRONMENT, f"CNI_ARGS: unknown argument(s) {', '.join(unknown)[:99]} (IgnoreUnknown=1: ignored)"
        )
    if out.get("MAC"):
        raise CniError(INVALID_ENVIRONMENT, "CNI_ARGS: MAC is not supported: weft gives the container's MAC")
    return out


def dns_label(name: str) -> str:
    """The DNS label a container name gives (lower case), or "" when DNS cannot carry it (the container still gets
    its address, unnamed): one label of 1-63 letters, digits, - and _."""
    label = name.strip().lower()
    if not 0 < len(label) <= 63 or not set(label) <= _LABEL_CHARS:
        return ""
    return label


def _spec_id(text: str) -> bool:
    return bool(text) and text[0] in _ALNUM and set(text) <= _ID_CHARS


def _ifname_ok(name: str) -> bool:
    if not 0 < len(name) <= 15 or name in (".", ".."):
        return False
    return all(c.isascii() and c.isprintable() and not c.isspace() and c not in "/:%" for c in name)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


# -- what the agent is told -----------------------------------------------------------------------------------------


def _key(config: dict[str, Any], env: dict[str, Any]) -> str:
    """What the agent keeps the container's addresses and name under: the spec's (network, container ID, interface),
    so a DEL after the namespace is gone still frees them. A digest when it would be too long or hold characters a
    key cannot."""
    key = f"cni:{config['name']}:{env['container']}:{env['ifname']}"
    if len(key) <= MAX_KEY and set(key) <= _KEY_CHARS:
        return key
    import hashlib

    return "cni:sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _who(config: dict[str, Any], env: dict[str, Any], *, existing_only: bool = False) -> dict[str, Any]:
    """The key, and how the agent finds the namespace: by its name under /run/netns, or by a process in it. A DEL
    names a /proc/PID namespace only while it exists (the PID may be another process's by then); with no
    namespace, the agent frees by key."""
    who: dict[str, Any] = {"key": _key(config, env)}
    netns = env["netns"]
    if not netns:
        return who
    parts = netns.split("/")
    if len(parts) == 5 and parts[1] == "proc" and parts[2].isdigit() and parts[3:] == ["ns", "net"]:
        if not existing_only or os.path.exists(netns):
            who["pid"] = int(parts[2])
        return who
    real = os.path.realpath(netns)
    if os.path.dirname(real) == NETNS_DIR:
        who["netns"] = os.path.basename(real)
        return who
    if existing_only:
        return who  # a DEL still frees by key
    raise CniError(
        INVALID_ENVIRONMENT, f"CNI_NETNS {netns[:80]}: weft-cni takes {NETNS_DIR}/NAME or /proc/PID/ns/net namespaces"
    )


def _static_cidrs(config: dict[str, Any], env: dict[str, Any]) -> list[str]:
    """Addresses the runtime asks for (CNI_ARGS IP=, or the ``ips`` capability); an address without a prefix gets
    the agent's range's (podman's --ip gives a bare address). None: an address from the ring."""
    wanted: list[str] = []
    runtime = config.get("runtimeConfig") or {}
    ips = runtime.get("ips")
    if ips is not None:
        if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
            raise CniError(INVALID_CONFIG, "runtimeConfig.ips must be a list of addresses")
        wanted += ips
    if env["args"].get("IP"):
        wanted += [a for a in env["args"]["IP"].split(",") if a]
    if not wanted or all("/" in a for a in wanted):
        return wanted
    try:
        universe = _client(config, STATUS_TIMEOUT).request("GET", "/status/ipam")["range"]
    except ApiError as exc:
        raise _api_error(exc, "ADD") from None
    except (KeyError, TypeError):
        raise CniError(IO_FAILURE, "the agent did not say its address range") from None
    prefix = str(universe).rpartition("/")[2]
    return [a if "/" in a else f"{a}/{prefix}" for a in wanted]


def _client(config: dict[str, Any], timeout: float = API_TIMEOUT) -> Client:
    return Client(config.get("api_socket", DEFAULT_SOCKET), timeout=timeout)


def _agent_down(exc: ApiError) -> bool:
    text = str(exc)
    return text.startswith(("no agent API at", "cannot talk to the agent"))


def _api_error(exc: ApiError, command: str) -> CniError:
    text = str(exc)
    if _agent_down(exc):
        return CniError(TRY_AGAIN_LATER, f"the weft agent is not running: {text}")
    if "already has an interface" in text:
        return CniError(ALREADY_ATTACHED, text)
    return CniError(AGENT_REFUSED, text, f"weft agent refused the {command}")


# -- results --------------------------------------------------------------------------------------------------------


def result_object(
    config: dict[str, Any], env: dict[str, Any], answer: dict[str, Any], ipam: dict[str, Any] | None = None
) -> dict[str, Any]:
    """ADD's result: the container's interface, its addresses and routes, and the DNS settings, after those of
    ``prevResult`` when a plugin ran before this one."""
    version = config["cniVersion"]
    prev = config.get("prevResult") or {}
    interfaces = [i for i in prev.get("interfaces", []) if isinstance(i, dict)]
    index = len(interfaces)
    interfaces.append({"name": env["ifname"], "mac": answer.get("mac", ""), "sandbox": env["netns"]})
    ips = [i for i in prev.get("ips", []) if isinstance(i, dict)]
    for cidr in answer.get("addresses", []):
        ip: dict[str, Any] = {"address": cidr, "interface": index}
        if version != SPEC:  # 0.3.x and 0.4.0 name the IP version
            ip["version"] = "6" if ":" in cidr else "4"
        ips.append(ip)
    routes = [r for r in prev.get("routes", []) if isinstance(r, dict)]
    routes += [{"dst": r} for r in answer.get("routes", []) if {"dst": r} not in routes]
    result: dict[str, Any] = {"cniVersion": version, "interfaces": interfaces, "ips": ips, "routes": routes}
    dns = _dns(prev.get("dns"), answer.get("dns") or (ipam or {}).get("dns"))
    if dns:
        result["dns"] = dns
    return result


def _dns(first: Any, second: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in (first, second):
        if not isinstance(part, dict):
            continue
        for key in ("nameservers", "search", "options"):
            values = [v for v in part.get(key) or [] if isinstance(v, str)]
            if values:
                out[key] = out.get(key, []) + [v for v in values if v not in out.get(key, [])]
        if isinstance(part.get("domain"), str) and part["domain"] and "domain" not in out:
            out["domain"] = part["domain"]
    return out


def error_object(version: str, exc: CniError) -> dict[str, Any]:
    error: dict[str, Any] = {"cniVersion": version if version in SUPPORTED else SPEC, "code": exc.code, "msg": exc.msg}
    if exc.details:
        error["details"] = exc.details
    return error


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _prev_addresses(prev: dict[str, Any], ifname: str) -> list[str]:
    """The addresses ``prevResult`` gave our interface (the one named ``ifname`` inside the container)."""
    interfaces = prev.get("interfaces") or []
    ours = [n for n, i in enumerate(interfaces) if isinstance(i, dict) and i.get("name") == ifname and i.get("sandbox")]
    if not ours:
        raise CniError(INVALID_CONFIG, f"prevResult has no interface {ifname} inside the container")
    return [
        str(ip.get("address"))
        for ip in prev.get("ips") or []
        if isinstance(ip, dict) and ip.get("interface") in ours and ip.get("address")
    ]


def _in_range(cidr: str, universe: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_interface(cidr).ip in ipaddress.ip_network(universe)
    except ValueError:
        return False


# -- the container's namespace --------------------------------------------------------------------------------------


def _has_interface(netns: str, ifname: str) -> bool:
    """Whether the namespace at ``netns`` has an interface ``ifname``: this thread enters it (setns) and comes back."""
    import ctypes
    import socket

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CniError(IO_FAILURE, f"cannot open this process's network namespace: {exc}") from None
    try:
        try:
            target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CniError(UNKNOWN_CONTAINER, f"cannot open CNI_NETNS {netns[:80]}: {exc.strerror}") from None
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                why = os.strerror(ctypes.get_errno())
                raise CniError(INVALID_ENVIRONMENT, f"CNI_NETNS {netns[:80]} is not a network namespace: {why}")
            try:
                socket.if_nametoindex(ifname)
                return True
            except OSError:
                return False
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:  # cannot happen to root; never go on in the wrong namespace
                    os._exit(1)
        finally:
            os.close(target)
    finally:
        os.close(own)


def _in_netns(netns: str, *cmd: str) -> Any:
    import subprocess

    try:
        return subprocess.run(
            ["nsenter", f"--net={netns}", *cmd], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CniError(IO_FAILURE, f"cannot look into the container's network namespace: {exc}") from None


def _link_info(netns: str, ifname: str) -> dict[str, Any] | None:
    out = _in_netns(netns, "ip", "-j", "address", "show", "dev", ifname)
    if out.returncode != 0:
        return None
    try:
        (link,) = json.loads(out.stdout)
        return link if isinstance(link, dict) else None
    except (ValueError, TypeError):
        raise CniError(IO_FAILURE, f"cannot read the container's {ifname}: {out.stdout[:80]!r}") from None


def _delete_interface(env: dict[str, Any]) -> None:
    """DEL with the agent down: the container's interface goes (and with it the veth on the agent's bridge)."""
    netns = env["netns"]
    if not netns or not os.path.exists(netns):
        return
    out = _in_netns(netns, "ip", "link", "del", "dev", env["ifname"])
    if out.returncode != 0 and "Cannot find device" not in out.stderr:
        raise CniError(IO_FAILURE, f"cannot delete the container's {env['ifname']}: {out.stderr.strip()[:200]}")


# -- delegated IPAM -------------------------------------------------------------------------------------------------


def _ipam_plugin(config: dict[str, Any], env: dict[str, Any], command: str, raw: str) -> dict[str, Any]:
    """Run the configured IPAM plugin as the spec says: the same environment (but CNI_COMMAND) and configuration,
    its stderr ours. Its result (ADD), or {}."""
    import subprocess

    kind = config["ipam"]["type"]
    paths = [d for d in env.get("path", "").split(":") if d]
    binary = next((os.path.join(d, kind) for d in paths if os.access(os.path.join(d, kind), os.X_OK)), None)
    if binary is None:
        raise CniError(INVALID_CONFIG, f"IPAM plugin {kind!r} not found in CNI_PATH ({env.get('path') or 'unset'})")
    try:
        proc = subprocess.run(
            [binary],
            input=raw or json.dumps(config),
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "CNI_COMMAND": command},
            timeout=API_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CniError(IO_FAILURE, f"IPAM plugin {kind}: {exc}") from None
    try:
        answer = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if proc.returncode != 0:
        code = answer.get("code")
        raise CniError(
            code if isinstance(code, int) and not isinstance(code, bool) else IO_FAILURE,
            f"IPAM plugin {kind}: {answer.get('msg') or f'exit status {proc.returncode}'}",
            str(answer.get("details", "")),
        )
    return answer


def _ipam_release(config: dict[str, Any], env: dict[str, Any], raw: str) -> None:
    try:
        _ipam_plugin(config, env, "DEL", raw)
    except CniError as exc:
        sys.stderr.write(f"weft-cni: IPAM plugin DEL after a failed ADD: {exc.msg}\n")


def _addresses(result: dict[str, Any], config: dict[str, Any]) -> list[str]:
    addresses = [ip["address"] for ip in result.get("ips", []) if isinstance(ip, dict) and "address" in ip]
    if not addresses:
        raise CniError(INVALID_CONFIG, f"IPAM plugin {config['ipam']['type']} gave no address")
    return addresses


if __name__ == "__main__":
    sys.exit(main())

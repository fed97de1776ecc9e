"""Agent configuration: defaults, then /etc/weft/weft.yaml, then WEFT_* variables, then flags.

Every problem is reported as one ConfigError naming the setting, what was wrong and where it came
from, so an operator can fix it without reading code. Secrets are never part of the config itself:
it names files, and the files must be private (mode 0600).
"""

from __future__ import annotations

import ipaddress
import math
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from weft.dns.names import domain_of
from weft.ipam.bootstrap import DEFAULT_RANGE, BootstrapError, Init, parse_init, parse_range, parse_subnets
from weft.ipam.space import Subnet
from weft.mesh.address import Network, bind_address, join_host_port, peer_address, subnet
from weft.mesh.peer import parse_name
from weft.safetext import refuse_control

DEFAULT_CONFIG = Path("/etc/weft/weft.yaml")
ENV_PREFIX = "WEFT_"
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MAX_WORKERS = 4  # the default number of sleeve workers is the cores this process may run on, up to this
MAX_DATAPATH_WORKERS = 16


class ConfigError(Exception):
    """A configuration problem, worded for the operator."""


class SettingError(ValueError):
    """Settings that are wrong: (setting, what is wrong) pairs, each message free of the value given."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{name}: {message}" for name, message in problems))
        self.problems = problems


# -- the kinds of value a setting takes, from YAML, a WEFT_* variable (text) or a flag --------------------------
# Each turns what it is given into its type or raises ValueError with a message that does not repeat the value:
# a secret pasted in the wrong place must not end up in a log.

_TRUE = frozenset({"true", "yes", "on", "1", "t", "y"})
_FALSE = frozenset({"false", "no", "off", "0", "f", "n"})
Kind = Callable[[Any], Any]


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be text, not {_what(value)}")
    return value


def _optional(kind: Kind) -> Kind:
    return lambda value: None if value is None else kind(value)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError("must be true or false")


def _number(value: Any, integer: bool) -> float:
    what = "an integer" if integer else "a number"
    if isinstance(value, bool):
        raise ValueError(f"must be {what}, not true or false")
    if isinstance(value, str):
        try:
            value = int(value.strip()) if integer else float(value.strip())
        except ValueError:
            raise ValueError(f"must be {what}") from None
    if not isinstance(value, int | float) or not math.isfinite(value) or (integer and value != int(value)):
        raise ValueError(f"must be {what}")
    return int(value) if integer else float(value)


def _integer(ge: int | None = None, le: int | None = None) -> Kind:
    return lambda value: _bounded(int(_number(value, True)), ge=ge, le=le)


def _real(gt: float | None = None, ge: float | None = None, le: float | None = None) -> Kind:
    return lambda value: _bounded(_number(value, False), gt=gt, ge=ge, le=le)


def _bounded(value: Any, gt: Any = None, ge: Any = None, le: Any = None) -> Any:
    if gt is not None and not value > gt:
        raise ValueError(f"must be greater than {gt}")
    if ge is not None and not value >= ge:
        raise ValueError(f"must be at least {ge}")
    if le is not None and not value <= le:
        raise ValueError(f"must be at most {le}")
    return value


def _path(value: Any) -> Path:
    if isinstance(value, Path):
        return value
    return Path(_text(value))


def _list(kind: Kind) -> Kind:
    def convert(value: Any) -> list[Any]:
        if not isinstance(value, list | tuple):
            raise ValueError(f"must be a list, not {_what(value)}")
        return [kind(item) for item in value]

    return convert


def _what(value: Any) -> str:
    return {dict: "a mapping", list: "a list", tuple: "a list", bool: "true or false"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _kind(kind: Kind, check: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """A setting's metadata: its kind, and an optional check that may also put the value in normal form."""
    return {"kind": kind, "check": check}


# -- checks that go beyond the kind ------------------------------------------------------------------------------


def _ipam(parse: Any, *args: Any) -> Any:
    """Run an IPAM parser; its error, worded for the operator, becomes the setting's message."""
    try:
        return parse(*args)
    except BootstrapError as exc:
        raise ValueError(str(exc)) from None


def _check_name(value: str | None) -> str | None:
    if value is not None:
        parse_name(value)
    return value


def _check_nickname(value: str | None) -> str | None:
    """Peers refuse a nickname with control characters (it could forge their log lines): refuse it here."""
    if value is not None:
        if len(value) > 255:
            raise ValueError("must be at most 255 characters")
        refuse_control(value, "nickname")
    return value


def _check_bind(value: str) -> str:
    bind_address(value)
    return value


def _check_bridge(value: str) -> str:
    if not value or len(value) > 10 or not all(c.isalnum() or c in "-_" for c in value):
        raise ValueError("must be 1-10 letters, digits, '-' or '_' (device names derive from it)")
    return value


def _check_subnets(value: list[str]) -> list[str]:
    for cidr in value:
        subnet(cidr, "trusted subnet")
    return value


def _check_log_level(value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def _check_dns_address(value: str) -> str:
    try:
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address (the default is 169.254.53.53)") from None
    if not address.is_link_local:
        raise ValueError(
            f"{value} is not link-local (169.254.0.0/16): every host answers at this address on its own bridge,"
            " so it must be one no network routes"
        )
    return str(address)


def _check_dns_upstream(value: list[str]) -> list[str]:
    from weft.dns.upstream import parse_server  # dnspython, only when upstreams are set

    return [join_host_port(*parse_server(text)) for text in value]  # its ValueError names the entry


@dataclass(kw_only=True)
class AgentConfig:
    """Every setting, checked and in normal form. ``AgentConfig(**values)`` checks the values it is given (of the
    right types); :func:`load_config` also turns text and YAML into those types. A wrong setting is a
    :class:`SettingError` (a ValueError) naming it."""

    name: str | None = field(default=None, metadata=_kind(_optional(_text), _check_name))
    nickname: str | None = field(default=None, metadata=_kind(_optional(_text), _check_nickname))
    listen: str = field(default="0.0.0.0:6783", metadata=_kind(_text, _check_bind))
    advertise: str | None = field(
        default=None, metadata=_kind(_optional(_text), lambda v: peer_address(v) if v else None)
    )
    peers: list[str] = field(default_factory=list, metadata=_kind(_list(_text), lambda v: [peer_address(p) for p in v]))
    secret_files: list[Path] = field(default_factory=list, metadata=_kind(_list(_path)))
    state_dir: Path = field(default=Path("/var/lib/weft"), metadata=_kind(_path))
    api_socket: Path = field(default=Path("/run/weft/weft.sock"), metadata=_kind(_path))
    metrics_addr: str = field(default="127.0.0.1:6782", metadata=_kind(_text, _check_bind))
    discovery: bool = field(default=True, metadata=_kind(_boolean))
    resume: bool = field(default=False, metadata=_kind(_boolean))
    log_level: str = field(default="info", metadata=_kind(_text, _check_log_level))
    # The data plane.
    datapath: bool = field(default=True, metadata=_kind(_boolean))
    bridge: str = field(default="weft", metadata=_kind(_text, _check_bridge))
    vxlan_port: int = field(default=6784, metadata=_kind(_integer(ge=1, le=65535)))
    mtu: int = field(default=1376, metadata=_kind(_integer(ge=576, le=9000)))
    trusted_subnets: list[str] = field(default_factory=list, metadata=_kind(_list(_text), _check_subnets))
    # None: the cores, at most 4
    datapath_workers: int | None = field(
        default=None, metadata=_kind(_optional(_integer(ge=1, le=MAX_DATAPATH_WORKERS)))
    )
    # Tuning; the defaults suit data centres and clouds alike.
    heartbeat_interval: float = field(default=10.0, metadata=_kind(_real(gt=0)))
    read_timeout: float = field(default=30.0, metadata=_kind(_real(gt=0)))
    handshake_timeout: float = field(default=5.0, metadata=_kind(_real(gt=0)))
    dial_timeout: float = field(default=3.0, metadata=_kind(_real(gt=0)))
    gossip_interval: float = field(default=30.0, metadata=_kind(_real(gt=0)))
    max_backoff: float = field(default=30.0, metadata=_kind(_real(gt=0)))
    conn_limit: int = field(default=100, metadata=_kind(_integer(ge=1)))
    accept_rate: float = field(default=20.0, metadata=_kind(_real(gt=0)))
    # A whole mesh of conn_limit peers (re)starting together is let in at once; floods are held to accept_rate.
    accept_burst: int = field(default=100, metadata=_kind(_integer(ge=1)))
    # Per API listener (the socket and the metrics address)
    api_conn_limit: int = field(default=64, metadata=_kind(_integer(ge=1)))
    # An API connection idle (or a metrics request unanswered) this long
    api_timeout: float = field(default=5.0, metadata=_kind(_real(gt=0)))
    # Data-path heartbeats and probes; a path is down after 3 missed
    path_interval: float = field(default=1.0, metadata=_kind(_real(gt=0)))
    # ARP-probe a new overlay address this long; 0: never
    address_probe_time: float = field(default=0.5, metadata=_kind(_real(ge=0, le=10)))
    # Keep a gone fast peer's kernel entries this long
    fast_path_grace: float = field(default=60.0, metadata=_kind(_real(ge=0)))
    # IPAM: the range containers get addresses from, and how its first ring comes about (docs/ipam.md).
    ipalloc_range: str = field(default=DEFAULT_RANGE, metadata=_kind(_text, lambda v: str(_ipam(parse_range, v))))
    ipalloc_default_subnet: str | None = field(
        default=None,
        metadata=_kind(
            _optional(_text), lambda v: None if v is None else str(_ipam(parse_range, v, "ipalloc_default_subnet"))
        ),
    )
    # seed=NAME,... | consensus[=N] | observer; default: consensus among the targets
    ipalloc_init: str | None = field(
        default=None, metadata=_kind(_optional(_text), lambda v: None if v is None else str(_ipam(parse_init, v)))
    )
    # DNS: names for containers, answered on every host at one address on its bridge (docs/dns.md).
    dns: bool = field(default=True, metadata=_kind(_boolean))
    # Its ValueError says what is wrong
    dns_domain: str = field(default="weft.local.", metadata=_kind(_text, domain_of))
    dns_address: str = field(default="169.254.53.53", metadata=_kind(_text, _check_dns_address))
    dns_ttl: int = field(default=30, metadata=_kind(_integer(ge=0, le=86400)))
    # Default: the host's /etc/resolv.conf
    dns_upstream: list[str] = field(default_factory=list, metadata=_kind(_list(_text), _check_dns_upstream))

    def __post_init__(self) -> None:
        """Check every setting (and put it in normal form); all that is wrong is reported at once."""
        problems = []
        for f in fields(self):
            check = f.metadata.get("check")
            if check is None:
                continue
            try:
                setattr(self, f.name, check(getattr(self, f.name)))
            except ValueError as exc:
                problems.append((f.name, str(exc)))
        if not problems:
            try:
                _ipam(parse_subnets, self.ipalloc_range, self.ipalloc_default_subnet)
            except ValueError as exc:
                problems.append(("ipalloc_default_subnet", str(exc)))
        if problems:
            raise SettingError(problems)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> AgentConfig:
        """Settings as YAML, WEFT_* variables and flags give them: converted to their kinds, then checked."""
        kinds = {f.name: f.metadata["kind"] for f in fields(cls)}
        problems = [(name, "not a setting") for name in values if name not in kinds]
        converted = {}
        for name, value in values.items():
            if name in kinds:
                try:
                    converted[name] = kinds[name](value)
                except ValueError as exc:
                    problems.append((name, str(exc)))
        if problems:
            raise SettingError(problems)
        return cls(**converted)

    def copy(self, **changes: Any) -> AgentConfig:
        """These settings with ``changes`` (checked like the rest)."""
        return replace(self, **changes)

    def ipam_subnets(self) -> tuple[Subnet, Subnet]:
        """(the allocation range, the default subnet)."""
        return parse_subnets(self.ipalloc_range, self.ipalloc_default_subnet)

    def ipam_init(self) -> Init:
        return parse_init(self.ipalloc_init)

    def workers(self) -> int:
        """The sleeve's forwarding workers: as configured, else one per core this process may use, at most 4."""
        if self.datapath_workers is not None:
            return self.datapath_workers
        return max(1, min(DEFAULT_MAX_WORKERS, len(os.sched_getaffinity(0))))

    def trusted_networks(self) -> list[Network]:
        return [subnet(c) for c in self.trusted_subnets]

    def listen_host_port(self) -> tuple[str, int]:
        return bind_address(self.listen)

    def metrics_host_port(self) -> tuple[str, int]:
        return bind_address(self.metrics_addr)


SETTINGS = tuple(f.name for f in fields(AgentConfig))


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """WEFT_* variables; list settings take comma- or space-separated values."""
    values: dict[str, Any] = {}
    aliases = {"peer": "peers", "secret_file": "secret_files", "trusted_subnet": "trusted_subnets"}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == "WEFT_CONFIG":
            continue
        name = key[len(ENV_PREFIX) :].lower()
        name = aliases.get(name, name)
        if name not in SETTINGS:
            continue
        if name in ("peers", "secret_files", "trusted_subnets", "dns_upstream"):
            values[name] = [v for v in raw.replace(",", " ").split() if v]
        elif name in ("discovery", "datapath", "dns") and raw.lower() in ("0", "false", "no", "off"):
            values[name] = False
        else:
            values[name] = raw
    return values


def load_config(path: Path | None, env: Mapping[str, str], flags: Mapping[str, Any]) -> AgentConfig:
    """Layer the sources (file < environment < flags) and validate the result."""
    data: dict[str, Any] = {}
    source = "defaults"
    file = path or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if file is not None:
        import yaml  # only to read a file

        source = str(file)
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {file}: {exc}") from None
        if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
            raise ConfigError(f"config file {file} must be a YAML mapping of setting names to values")
        data.update({k.replace("-", "_"): v for k, v in loaded.items()})
    data.update(_from_env(env))
    data.update({k: v for k, v in flags.items() if v is not None and v != () and v != []})
    try:
        return AgentConfig.from_values(data)
    except SettingError as exc:
        raise ConfigError(f"invalid configuration (from {source}, WEFT_* variables and flags): {exc}") from None


def read_secrets(files: list[Path]) -> list[bytes]:
    """Read mesh secrets from files that only their owner can read; the first is the one offered."""
    secrets = []
    for file in files:
        try:
            info = file.stat()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {file}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"secret file {file} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"secret file {file} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run: chmod 600 {file}"
            )
        try:
            secret = file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {file}: {exc.strerror}") from None
        if len(secret) < 8:
            raise ConfigError(f"secret file {file} holds fewer than 8 bytes; use a long random secret")
        secrets.append(secret)
    return secrets

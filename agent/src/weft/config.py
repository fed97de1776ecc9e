"""Agent configuration: defaults, then /etc/weft/weft.yaml, then WEFT_* variables, then flags.

Every problem is reported as one ConfigError naming the setting, what was wrong and where it came
from, so an operator can fix it without reading code. Secrets are never part of the config itself:
it names files, and the files must be private (mode 0600).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from weft.dns.names import domain_of
from weft.ipam.bootstrap import DEFAULT_RANGE, BootstrapError, Init, parse_init, parse_range, parse_subnets
from weft.ipam.space import Subnet
from weft.mesh.address import AddressError, Network, bind_address, join_host_port, peer_address, subnet
from weft.mesh.peer import PeerNameError, parse_name
from weft.safetext import refuse_control

DEFAULT_CONFIG = Path("/etc/weft/weft.yaml")
ENV_PREFIX = "WEFT_"
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MAX_WORKERS = 4  # the default number of sleeve workers is the cores this process may run on, up to this
MAX_DATAPATH_WORKERS = 16


class ConfigError(Exception):
    """A configuration problem, worded for the operator."""


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    nickname: str | None = None
    listen: str = "0.0.0.0:6783"
    advertise: str | None = None
    peers: list[str] = Field(default_factory=list)
    secret_files: list[Path] = Field(default_factory=list)
    state_dir: Path = Path("/var/lib/weft")
    api_socket: Path = Path("/run/weft/weft.sock")
    metrics_addr: str = "127.0.0.1:6782"
    discovery: bool = True
    resume: bool = False
    log_level: str = "info"
    # The data plane.
    datapath: bool = True
    bridge: str = "weft"
    vxlan_port: int = Field(6784, ge=1, le=65535)
    mtu: int = Field(1376, ge=576, le=9000)
    trusted_subnets: list[str] = Field(default_factory=list)
    datapath_workers: int | None = Field(None, ge=1, le=MAX_DATAPATH_WORKERS)  # None: the cores, at most 4
    # Tuning; the defaults suit data centres and clouds alike.
    heartbeat_interval: float = Field(5.0, gt=0)
    read_timeout: float = Field(20.0, gt=0)
    handshake_timeout: float = Field(5.0, gt=0)
    dial_timeout: float = Field(3.0, gt=0)
    gossip_interval: float = Field(30.0, gt=0)
    max_backoff: float = Field(30.0, gt=0)
    conn_limit: int = Field(100, ge=1)
    accept_rate: float = Field(20.0, gt=0)
    accept_burst: int = Field(20, ge=1)
    api_conn_limit: int = Field(64, ge=1)  # per API listener (the socket and the metrics address)
    api_timeout: float = Field(5.0, gt=0)  # an API connection idle (or a metrics request unanswered) this long
    path_interval: float = Field(1.0, gt=0)  # data-path heartbeats and probes; a path is down after 3 missed
    address_probe_time: float = Field(0.5, ge=0, le=10)  # ARP-probe a new overlay address this long; 0: never
    fast_path_grace: float = Field(60.0, ge=0)  # keep a gone fast peer's kernel entries this long
    # IPAM: the range containers get addresses from, and how its first ring comes about (docs/ipam.md).
    ipalloc_range: str = DEFAULT_RANGE
    ipalloc_default_subnet: str | None = None
    ipalloc_init: str | None = None  # seed=NAME,... | consensus[=N] | observer; default: consensus among the targets
    # DNS: names for containers, answered on every host at one address on its bridge (docs/dns.md).
    dns: bool = True
    dns_domain: str = "weft.local."
    dns_address: str = "169.254.53.53"
    dns_ttl: int = Field(30, ge=0, le=86400)
    dns_upstream: list[str] = Field(default_factory=list)  # default: the host's /etc/resolv.conf

    @field_validator("ipalloc_range")
    @classmethod
    def _ipalloc_range(cls, value: str) -> str:
        return str(_bootstrap(parse_range, value))

    @field_validator("ipalloc_default_subnet")
    @classmethod
    def _ipalloc_default(cls, value: str | None) -> str | None:
        return None if value is None else str(_bootstrap(parse_range, value, "ipalloc_default_subnet"))

    @field_validator("ipalloc_init")
    @classmethod
    def _ipalloc_init(cls, value: str | None) -> str | None:
        return None if value is None else str(_bootstrap(parse_init, value))

    @model_validator(mode="after")
    def _default_subnet_inside(self) -> AgentConfig:
        _bootstrap(parse_subnets, self.ipalloc_range, self.ipalloc_default_subnet)
        return self

    def ipam_subnets(self) -> tuple[Subnet, Subnet]:
        """(the allocation range, the default subnet)."""
        return parse_subnets(self.ipalloc_range, self.ipalloc_default_subnet)

    def ipam_init(self) -> Init:
        return parse_init(self.ipalloc_init)

    @field_validator("dns_domain")
    @classmethod
    def _dns_domain(cls, value: str) -> str:
        return domain_of(value)  # its ValueError says what is wrong

    @field_validator("dns_address")
    @classmethod
    def _dns_address(cls, value: str) -> str:
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

    @field_validator("dns_upstream")
    @classmethod
    def _dns_upstream(cls, value: list[str]) -> list[str]:
        from weft.dns.upstream import parse_server  # dnspython, only when upstreams are set

        return [join_host_port(*parse_server(text)) for text in value]  # its ValueError names the entry

    @field_validator("bridge")
    @classmethod
    def _bridge(cls, value: str) -> str:
        if not value or len(value) > 10 or not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError("must be 1-10 letters, digits, '-' or '_' (device names derive from it)")
        return value

    @field_validator("trusted_subnets")
    @classmethod
    def _subnets(cls, value: list[str]) -> list[str]:
        for cidr in value:
            subnet(cidr, "trusted subnet")
        return value

    def trusted_networks(self) -> list[Network]:
        return [subnet(c) for c in self.trusted_subnets]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None:
            parse_name(value)
        return value

    @field_validator("nickname")
    @classmethod
    def _nickname(cls, value: str | None) -> str | None:
        """Peers refuse a nickname with control characters (it could forge their log lines): refuse it here."""
        if value is not None:
            if len(value) > 255:
                raise ValueError("must be at most 255 characters")
            refuse_control(value, "nickname")
        return value

    @field_validator("listen", "metrics_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        bind_address(value)
        return value

    @field_validator("advertise")
    @classmethod
    def _advertise(cls, value: str | None) -> str | None:
        return peer_address(value) if value else None

    @field_validator("peers")
    @classmethod
    def _peers(cls, value: list[str]) -> list[str]:
        return [peer_address(p) for p in value]

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.lower()

    def workers(self) -> int:
        """The sleeve's forwarding workers: as configured, else one per core this process may use, at most 4."""
        if self.datapath_workers is not None:
            return self.datapath_workers
        return max(1, min(DEFAULT_MAX_WORKERS, len(os.sched_getaffinity(0))))

    def listen_host_port(self) -> tuple[str, int]:
        return bind_address(self.listen)

    def metrics_host_port(self) -> tuple[str, int]:
        return bind_address(self.metrics_addr)


def _bootstrap(parse: Any, *args: Any) -> Any:
    """Run an IPAM parser; its error, worded for the operator, becomes the validation message."""
    try:
        return parse(*args)
    except BootstrapError as exc:
        raise ValueError(str(exc)) from None


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """WEFT_* variables; list settings take comma- or space-separated values."""
    values: dict[str, Any] = {}
    aliases = {"peer": "peers", "secret_file": "secret_files", "trusted_subnet": "trusted_subnets"}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == "WEFT_CONFIG":
            continue
        name = key[len(ENV_PREFIX) :].lower()
        name = aliases.get(name, name)
        if name not in AgentConfig.model_fields:
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
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {_clean(err['msg'])}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration (from {source}, WEFT_* variables and flags): {problems}") from None
    except (AddressError, PeerNameError) as exc:
        raise ConfigError(str(exc)) from None


def _clean(message: str) -> str:
    return message.removeprefix("Value error, ")


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

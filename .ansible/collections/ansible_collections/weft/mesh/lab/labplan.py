"""The lab's addressing plan: the one place that says which machine lives where and how sites are wired."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PREFIX = "weftlab"
STATE_DIR = Path("/var/lib/weft-lab")
CACHE_DIR = Path("/var/cache/weft-lab")
RUN_DIR = STATE_DIR / "run"
LOG_DIR = STATE_DIR / "logs"
SSH_KEY = STATE_DIR / "ssh" / "id_ed25519"
VAULT_PASSWORD_FILE = STATE_DIR / "vault-password"
LAB_JSON = STATE_DIR / "lab.json"

# Out-of-band management: a bridge in the root namespace, one isolated port per machine.
MGMT_BRIDGE = f"{PREFIX}-mgmt"
MGMT_SUBNET = "10.254.0.0/24"
MGMT_GATEWAY = "10.254.0.1"

# The wan router's transit links: one /30 per site, wan side first.
WAN_NETNS = f"{PREFIX}-wan"
NAT_PUBLIC_ADDRESS = "198.51.100.10"

# What the wan firewall lets through between sites.
WEFT_TCP_PORT = 6783
WEFT_UDP_PORTS = (6783, 6784)

MOTO_HOST = "127.0.0.1"
MOTO_PORT = 5055
MOTO_URL = f"http://{MOTO_HOST}:{MOTO_PORT}"
AWS_REGION = "us-east-1"
AWS_FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
AWS_VPC_NAME = f"{PREFIX}-vpc"


@dataclass(frozen=True)
class Site:
    """A site: a LAN (bridge br0 in the site's router namespace) with a /30 transit link to the wan router."""

    name: str
    subnet: str
    gateway: str
    router: str
    wan_side: str
    router_side: str
    nat: bool

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.router}"

    @property
    def wan_link(self) -> str:
        """The transit link's name in the wan namespace."""
        return f"to-{self.name}"

    @property
    def prefixlen(self) -> int:
        return int(self.subnet.split("/")[1])

    @property
    def public_address(self) -> str | None:
        """Where other sites see this site's hosts come from: the NAT's address, or None (hosts are routed)."""
        return self.router_side if self.nat else None


@dataclass(frozen=True)
class Machine:
    """A booted systemd-nspawn machine in its own network namespace."""

    name: str
    site: str
    underlay_ip: str
    mgmt_ip: str

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.name}"

    @property
    def mgmt_port(self) -> str:
        """The root-namespace end of the machine's management veth (a port of the mgmt bridge)."""
        return f"wlm-{self.name}"

    @property
    def lan_port(self) -> str:
        """The router-namespace end of the machine's underlay veth (a port of the site's br0)."""
        return f"p-{self.name}"

    @property
    def state_dir(self) -> Path:
        return STATE_DIR / self.name


SITES: dict[str, Site] = {
    "dc1": Site("dc1", "10.10.1.0/24", "10.10.1.1", "dc1-gw", "198.51.100.1", "198.51.100.2", nat=False),
    "dc2": Site("dc2", "10.10.2.0/24", "10.10.2.1", "dc2-gw", "198.51.100.5", "198.51.100.6", nat=False),
    "aws": Site("aws", "172.31.0.0/24", "172.31.0.1", "aws-nat", "198.51.100.9", NAT_PUBLIC_ADDRESS, nat=True),
}
TRANSIT_PREFIXLEN = 30

MACHINES: list[Machine] = [
    Machine("dc1-a", "dc1", "10.10.1.11", "10.254.0.11"),
    Machine("dc1-b", "dc1", "10.10.1.12", "10.254.0.12"),
    Machine("dc2-a", "dc2", "10.10.2.11", "10.254.0.13"),
    Machine("aws-a", "aws", "172.31.0.11", "10.254.0.14"),
    Machine("aws-b", "aws", "172.31.0.12", "10.254.0.15"),
]


def machine(name: str) -> Machine:
    """Look a machine up by name, with a helpful error for typos on the command line."""
    for m in MACHINES:
        if m.name == name:
            return m
    raise SystemExit(f"weftlab: no machine {name!r}; machines: {', '.join(m.name for m in MACHINES)}")


def all_netns() -> list[str]:
    """Every namespace the lab owns, machines first so that teardown stops them before their routers."""
    return [m.netns for m in MACHINES] + [s.netns for s in SITES.values()] + [WAN_NETNS]


def public_address(m: Machine) -> str:
    """The address other sites see the machine at: its own for routed DCs, the NAT's for the VPC."""
    return SITES[m.site].public_address or m.underlay_ip

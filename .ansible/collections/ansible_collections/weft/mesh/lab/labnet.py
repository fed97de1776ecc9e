"""The lab's underlay and management network: namespaces, veths, bridges, routes and nftables rulesets.

Every `ensure_*` looks before it acts, so a second `up` changes nothing; every teardown step tolerates absence.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time

from labplan import (
    MACHINES,
    MGMT_BRIDGE,
    MGMT_GATEWAY,
    MGMT_SUBNET,
    SITES,
    TRANSIT_PREFIXLEN,
    WAN_NETNS,
    WEFT_TCP_PORT,
    WEFT_UDP_PORTS,
    Machine,
    Site,
    all_netns,
)
from labsys import changed, run, signal_pid, wait_gone

NFT_TABLE = "weftlab"


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    """Run `ip` in a namespace (None: the root one) and return stdout."""
    return run(["ip", *(["-n", ns] if ns else []), *args], check=check).stdout


def ip_json(*args: str, ns: str | None = None) -> list[dict]:
    """`ip -j` output as Python objects; [] when the object does not exist."""
    res = run(["ip", "-j", *(["-n", ns] if ns else []), *args], check=False)
    if res.returncode != 0 or not res.stdout.strip():
        return []
    return json.loads(res.stdout)


def netns_list() -> list[str]:
    """Names of all network namespaces under /run/netns."""
    return [line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()]


def link(dev: str, ns: str | None = None) -> dict | None:
    """The link's `ip -j -d link show` record, or None when it does not exist."""
    found = ip_json("-d", "link", "show", "dev", dev, ns=ns)
    return found[0] if found else None


def in_ns(ns: str, *cmd: str, check: bool = True, input: str | None = None) -> str:
    """Run a host command inside a lab namespace (sysctl, nft): the namespace has no files of its own."""
    return run(["ip", "netns", "exec", ns, *cmd], check=check, input=input).stdout


# --- ensure -------------------------------------------------------------------------------------------------


def ensure_netns(ns: str) -> None:
    """Create the namespace with loopback up."""
    if ns in netns_list():
        return
    run(["ip", "netns", "add", ns])
    ip("link", "set", "lo", "up", ns=ns)
    changed(f"netns {ns}")


def ensure_sysctl(ns: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl when it differs (e.g. forwarding in routers)."""
    current = in_ns(ns, "sysctl", "-n", key, check=False).strip()
    if current and current != value:
        in_ns(ns, "sysctl", "-qw", f"{key}={value}")
        changed(f"{ns}: {key}={value}")


def ensure_veth(a: str, a_ns: str | None, b: str, b_ns: str | None) -> None:
    """A veth pair with its ends created directly in their namespaces; a half-pair left over is replaced."""
    if link(a, a_ns) and link(b, b_ns):
        return
    for dev, ns in ((a, a_ns), (b, b_ns)):
        if link(dev, ns):
            ip("link", "del", dev, ns=ns)
    a_where = ["netns", a_ns] if a_ns else []
    b_where = ["netns", b_ns] if b_ns else []
    run(["ip", "link", "add", a, *a_where, "type", "veth", "peer", "name", b, *b_where])
    changed(f"veth {a_ns or 'root'}/{a} <-> {b_ns or 'root'}/{b}")


def ensure_bridge(dev: str, ns: str | None) -> None:
    """A plain bridge (no STP, no forwarding delay: ports forward at once)."""
    if link(dev, ns):
        return
    ip("link", "add", dev, "type", "bridge", "stp_state", "0", "forward_delay", "0", ns=ns)
    changed(f"bridge {ns or 'root'}/{dev}")


def ensure_master(dev: str, bridge: str, ns: str | None) -> None:
    """Enslave a port to its bridge."""
    info = link(dev, ns)
    if info and info.get("master") == bridge:
        return
    ip("link", "set", dev, "master", bridge, ns=ns)
    changed(f"{ns or 'root'}/{dev} master {bridge}")


def ensure_isolated(dev: str) -> None:
    """Bridge port isolation: isolated ports reach the bridge (the controller) but never each other."""
    info = link(dev)
    if info and info.get("linkinfo", {}).get("info_slave_data", {}).get("isolated"):
        return
    run(["bridge", "link", "set", "dev", dev, "isolated", "on"])
    changed(f"{dev} isolated")


def ensure_up(dev: str, ns: str | None) -> None:
    """Bring a link up."""
    info = link(dev, ns)
    if info and "UP" in info.get("flags", []):
        return
    ip("link", "set", dev, "up", ns=ns)
    changed(f"{ns or 'root'}/{dev} up")


def ensure_addr(dev: str, cidr: str, ns: str | None) -> None:
    """Give a link exactly one IPv4 address (the lab's), replacing any other."""
    addr, plen = cidr.split("/")
    have = [
        (a["local"], a["prefixlen"])
        for i in ip_json("addr", "show", "dev", dev, ns=ns)
        for a in i.get("addr_info", [])
        if a.get("family") == "inet"
    ]
    if have == [(addr, int(plen))]:
        return
    for other, olen in have:
        ip("addr", "del", f"{other}/{olen}", "dev", dev, ns=ns)
    ip("addr", "add", cidr, "dev", dev, ns=ns)
    changed(f"{ns or 'root'}/{dev} {cidr}")


def ensure_route(dest: str, via: str, ns: str) -> None:
    """A static route (dest may be 'default')."""
    have = ip_json("route", "show", dest, ns=ns)
    if any(r.get("gateway") == via for r in have):
        return
    ip("route", "replace", dest, "via", via, ns=ns)
    changed(f"{ns}: route {dest} via {via}")


def ensure_nft(ns: str | None, ruleset: str) -> None:
    """Load the lab's nftables table atomically; its comment carries a hash, so an unchanged one is kept."""
    digest = hashlib.sha256(ruleset.encode()).hexdigest()[:16]
    prefix = ["ip", "netns", "exec", ns, "nft"] if ns else ["nft"]
    current = run([*prefix, "list", "table", "inet", NFT_TABLE], check=False).stdout
    if f'comment "weftlab {digest}"' in current:
        return
    script = (
        f"table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n"
        f'table inet {NFT_TABLE} {{\n  comment "weftlab {digest}"\n{ruleset}}}\n'
    )
    run([*prefix, "-f", "-"], input=script)
    changed(f"{ns or 'root'}: nftables table inet {NFT_TABLE}")


# --- rulesets -----------------------------------------------------------------------------------------------


def wan_ruleset() -> str:
    """The wan firewall: only Weft's ports cross between sites (plus replies and their ICMP errors)."""
    udp_lo, udp_hi = WEFT_UDP_PORTS
    return f"""  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop
    tcp dport {WEFT_TCP_PORT} accept
    udp dport {udp_lo}-{udp_hi} accept
    counter comment "dropped between sites"
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    iif lo accept
    ct state established,related accept
  }}
"""


def nat_ruleset(site: Site) -> str:
    """A NAT gateway: the VPC gets out (masqueraded behind the public address); nothing gets in."""
    return f"""  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "br0" oifname "wan0" accept
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    iif lo accept
    ct state established,related accept
    iifname "br0" icmp type echo-request accept
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" ip saddr {site.subnet} masquerade
  }}
"""


def root_ruleset() -> str:
    """In the root namespace: machines may answer the controller over mgmt, never start anything or route."""
    return f"""  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{MGMT_BRIDGE}" ct state established,related accept
    iifname "{MGMT_BRIDGE}" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{MGMT_BRIDGE}" drop
    oifname "{MGMT_BRIDGE}" drop
    iifname "wlm-*" drop
    oifname "wlm-*" drop
  }}
"""


# --- build --------------------------------------------------------------------------------------------------


def build_router(ns: str) -> None:
    """A namespace that forwards IPv4 and does not push bridged frames through its IP firewall."""
    ensure_netns(ns)
    ensure_sysctl(ns, "net.ipv4.ip_forward", "1")
    for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"):
        ensure_sysctl(ns, f"net.bridge.{key}", "0")


def build_site(site: Site) -> None:
    """The site router: br0 holds the LAN gateway, wan0 the transit /30; DCs route, the VPC NATs."""
    build_router(site.netns)
    ensure_bridge("br0", site.netns)
    ensure_addr("br0", f"{site.gateway}/{site.prefixlen}", site.netns)
    ensure_up("br0", site.netns)
    ensure_veth(site.wan_link, WAN_NETNS, "wan0", site.netns)
    ensure_addr(site.wan_link, f"{site.wan_side}/{TRANSIT_PREFIXLEN}", WAN_NETNS)
    ensure_addr("wan0", f"{site.router_side}/{TRANSIT_PREFIXLEN}", site.netns)
    ensure_up(site.wan_link, WAN_NETNS)
    ensure_up("wan0", site.netns)
    ensure_route("default", site.wan_side, site.netns)
    if site.nat:
        ensure_nft(site.netns, nat_ruleset(site))
    else:
        # Routed DC: the wan knows the way back to the hosts' own addresses.
        ensure_route(site.subnet, site.router_side, WAN_NETNS)


def build_mgmt() -> None:
    """The out-of-band management bridge in the root namespace, guarded by a small nftables table."""
    ensure_bridge(MGMT_BRIDGE, None)
    ensure_addr(MGMT_BRIDGE, f"{MGMT_GATEWAY}/{MGMT_SUBNET.split('/')[1]}", None)
    ensure_up(MGMT_BRIDGE, None)
    ensure_nft(None, root_ruleset())


def build_machine_net(m: Machine) -> None:
    """The machine's namespace: eth0 on its site's LAN (default route there), mgmt0 on the isolated mgmt bridge."""
    site = SITES[m.site]
    ensure_netns(m.netns)
    ensure_veth("eth0", m.netns, m.lan_port, site.netns)
    ensure_master(m.lan_port, "br0", site.netns)
    ensure_up(m.lan_port, site.netns)
    ensure_addr("eth0", f"{m.underlay_ip}/{site.prefixlen}", m.netns)
    ensure_up("eth0", m.netns)
    ensure_route("default", site.gateway, m.netns)
    ensure_veth("mgmt0", m.netns, m.mgmt_port, None)
    ensure_master(m.mgmt_port, MGMT_BRIDGE, None)
    ensure_isolated(m.mgmt_port)
    ensure_up(m.mgmt_port, None)
    ensure_addr("mgmt0", f"{m.mgmt_ip}/{MGMT_SUBNET.split('/')[1]}", m.netns)
    ensure_up("mgmt0", m.netns)


def build_network() -> None:
    """The whole underlay and management network, idempotently."""
    build_router(WAN_NETNS)
    ensure_nft(WAN_NETNS, wan_ruleset())
    for site in SITES.values():
        build_site(site)
    build_mgmt()
    for m in MACHINES:
        build_machine_net(m)


# --- teardown -----------------------------------------------------------------------------------------------


def netns_pids(ns: str) -> list[int]:
    """Processes whose network namespace is ns (the kernel's view via `ip netns pids`)."""
    res = run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


def kill_netns_pids(ns: str) -> int:
    """SIGKILL every process left in a namespace: `ip netns del` would otherwise leave it alive, unreachable."""
    pids = netns_pids(ns)
    for pid in pids:
        signal_pid(pid, signal.SIGKILL)
    left = wait_gone(pids, 5)
    if left:
        raise RuntimeError(f"processes in {ns} survived SIGKILL: {left}")
    return len(pids)


def teardown_network() -> None:
    """Delete the lab's namespaces (their links go with them), the mgmt bridge, stray ports and the root table."""
    present = set(netns_list())
    for ns in all_netns():
        if ns in present:
            n = kill_netns_pids(ns)
            run(["ip", "netns", "del", ns])
            changed(f"deleted netns {ns}" + (f" (killed {n} processes)" if n else ""))
    # A namespace's links die asynchronously after `ip netns del`; wait for the mgmt ports to go with them and
    # delete any that stay (a half-pair from an interrupted run).
    deadline = time.monotonic() + 5
    while any(link(m.mgmt_port) for m in MACHINES) and time.monotonic() < deadline:
        time.sleep(0.1)
    for m in MACHINES:
        if link(m.mgmt_port):
            ip("link", "del", m.mgmt_port, check=False)
            changed(f"deleted link {m.mgmt_port}")
    if link(MGMT_BRIDGE):
        ip("link", "del", MGMT_BRIDGE)
        changed(f"deleted bridge {MGMT_BRIDGE}")
    if run(["nft", "list", "table", "inet", NFT_TABLE], check=False).returncode == 0:
        run(["nft", "delete", "table", "inet", NFT_TABLE])
        changed(f"deleted root nftables table inet {NFT_TABLE}")

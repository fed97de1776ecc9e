# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Filters that turn the inventory into a mesh and judge a mesh's health.

In Python rather than Jinja because the rules (same site or not, reachable or not, which address) are the
part most worth unit tests. Variables are read from hostvars with the same defaults as the agent role
(roles/agent/defaults/main.yml), because another host's role defaults are not visible in hostvars: set these
variables in inventory, not as role parameters.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress

from ansible.errors import AnsibleFilterError

from ansible_collections.weft.mesh.plugins.module_utils.weft_api import DEFAULT_PORT, normalize_address

DEFAULT_SITE = "default"


def _var(hostvars, host, name, default=None):
    """A host's variable; undefined, null and empty count as unset."""
    try:
        value = hostvars[host].get(name)
    except KeyError:
        raise AnsibleFilterError("%r is not a host in the inventory" % (host,)) from None
    return default if value is None or value == "" else value


def _site(hostvars, host):
    return str(_var(hostvars, host, "weft_site", DEFAULT_SITE))


def _truthy(value):
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "no", "off", "0", "")
    return bool(value)


def dial_address(hostvars, host, from_site):
    """The address a host at ``from_site`` dials to reach ``host``; None when it cannot be reached from there."""
    port = int(_var(hostvars, host, "weft_port", DEFAULT_PORT))
    # ansible_host is how the controller reaches the host, which may be a management network: the last resort.
    advertised = _var(hostvars, host, "weft_advertise_address", _var(hostvars, host, "ansible_host", host))
    if _site(hostvars, host) == from_site:
        address = advertised
    elif not _truthy(_var(hostvars, host, "weft_site_reachable", True)):
        return None  # behind NAT: it dials out to us, and discovery does the rest
    else:
        address = _var(hostvars, host, "weft_public_address", advertised)  # a routed site needs no public address
    try:
        return normalize_address(str(address), port)
    except ValueError as exc:
        raise AnsibleFilterError("peer address of %s: %s" % (host, exc)) from None


def peer_addresses(hosts, hostvars, me):
    """Addresses ``me`` should dial: every other host in ``hosts``, by site rules (see dial_address)."""
    site = _site(hostvars, me)
    addresses = set()
    for host in hosts:
        if host == me:
            continue
        address = dial_address(hostvars, host, site)
        if address is not None:
            addresses.add(address)
    return sorted(addresses)


def weft_address(address, port=DEFAULT_PORT):
    """One address in the agent's canonical HOST:PORT form (the port added when missing)."""
    try:
        return normalize_address(str(address), int(port))
    except ValueError as exc:
        raise AnsibleFilterError(str(exc)) from None


def _encrypted(connection):
    """Traffic to the peer is sealed: the data path's word when it carries traffic, else the control channel's."""
    datapath = connection.get("datapath") or {}
    if datapath.get("path") not in (None, "down"):
        return bool(datapath.get("encrypted"))
    return bool(connection.get("encrypted"))


def _ip(address):
    """The IP of an agent address (HOST:PORT, [V6]:PORT); None when it is a name or missing."""
    if not address:
        return None
    host = str(address)
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.split(":", maxsplit=1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _subnets(hostvars, host):
    networks = []
    for subnet in _var(hostvars, host, "weft_trusted_subnets", []) or []:
        try:
            networks.append(ipaddress.ip_network(str(subnet), strict=False))
        except ValueError:
            raise AnsibleFilterError("weft_trusted_subnets of %s: %r is not a subnet" % (host, subnet)) from None
    return networks


def _addresses(connections):
    """Where the peer's traffic comes from: its connections' addresses and its data path's UDP address."""
    ips = set()
    for c in connections:
        for address in (c.get("address"), (c.get("datapath") or {}).get("udp")):
            ip = _ip(address)
            if ip is not None:
                ips.add(ip)
    return sorted(ips, key=str)


def _how(connections):
    """The path and the source addresses, as in "fast from 10.10.1.12"."""
    paths = sorted(set(str((c.get("datapath") or {}).get("path") or "control channel") for c in connections))
    return "%s from %s" % (
        "/".join(paths),
        ", ".join(str(ip) for ip in _addresses(connections)) or "an unknown address",
    )


def _judge_plaintext(hostvars, me, host, connections):
    """(scope, verdict, acceptable) for a peer whose established connections are all unencrypted.

    Acceptable: every address the peer uses is in ``me``'s trusted subnets and it is at ``me``'s site (or not
    in the inventory at all) -- the agent's own rule for the fast path with a secret -- or both ends set
    weft_allow_unencrypted.
    """
    site = _site(hostvars, me)
    ips = _addresses(connections)
    subnets = _subnets(hostvars, me)
    trusted = bool(ips) and all(any(ip in net for net in subnets) for ip in ips)
    if host is not None and _site(hostvars, host) != site:
        scope = "across sites (%s to %s)" % (site, _site(hostvars, host))
    elif trusted:
        # A peer outside the inventory (just removed from it, say) that only uses trusted addresses gets
        # plaintext by the same rule as any host there: the agent's rule, which the operator chose.
        return ("at the same site" if host is not None else "to a peer outside the inventory"), "trusted subnet", True
    elif host is None:
        scope = "to a peer outside the inventory"
    else:
        scope = "at the same site from outside the trusted subnets"
    allowed = _truthy(_var(hostvars, me, "weft_allow_unencrypted", False)) and (
        host is None or _truthy(_var(hostvars, host, "weft_allow_unencrypted", False))
    )
    return scope, "allowed by weft_allow_unencrypted" if allowed else "not allowed", allowed


def _plaintext_peers(status, hosts, hostvars, me):
    """[(nickname, how, scope, verdict, acceptable)] for every peer whose established connections are all
    unencrypted, sorted by nickname."""
    by_nickname = dict((str(_var(hostvars, h, "weft_nickname", h)), h) for h in hosts if h != me)
    established = {}
    for c in status.get("connections") or []:
        if c.get("state") == "established" and c.get("nickname"):
            established.setdefault(str(c["nickname"]), []).append(c)
    found = []
    for nickname, connections in sorted(established.items()):
        if any(_encrypted(c) for c in connections):
            continue
        scope, verdict, acceptable = _judge_plaintext(hostvars, me, by_nickname.get(nickname), connections)
        found.append((nickname, _how(connections), scope, verdict, acceptable))
    return found


def _check_status(status, name):
    if not isinstance(status, dict):
        raise AnsibleFilterError("%s expects the weft_info status (a dict), got %r" % (name, status))


def plaintext_connections(status, hosts, hostvars, me):
    """One line per peer ``me`` reaches without encryption, saying whether that is acceptable and why."""
    _check_status(status, "plaintext_connections")
    return ["%s: %s, %s, %s" % peer[:4] for peer in _plaintext_peers(status, hosts, hostvars, me)]


def mesh_problems(status, hosts, hostvars, me, require_encryption=True, require_datapath=True):
    """What keeps ``me``'s agent (its weft_info status) from being whole with ``hosts``; [] when healthy.

    Healthy: the agent is ready, and every other host is among its peers with an established connection,
    whose data path is up (when the agent runs one and ``require_datapath``). With ``require_encryption``,
    every peer (in the inventory or not) is reached encrypted, unless it is at the same site in a trusted subnet
    of ``me``, or both ends set weft_allow_unencrypted (see plaintext_connections).
    """
    _check_status(status, "mesh_problems")
    problems = [] if status.get("ready") else ["the agent is not ready"]
    known = set(p.get("nickname") for p in status.get("peers") or [])
    connections = status.get("connections") or []
    for host in hosts:
        if host == me:
            continue
        nickname = str(_var(hostvars, host, "weft_nickname", host))
        if nickname not in known:
            problems.append("%s: not among the peers" % nickname)
            continue
        mine = [c for c in connections if c.get("nickname") == nickname]
        established = [c for c in mine if c.get("state") == "established"]
        if not established:
            states = sorted(set(str(c.get("state")) for c in mine)) or ["none"]
            problems.append("%s: no established connection (connections: %s)" % (nickname, ", ".join(states)))
            continue
        paths = [c["datapath"] for c in established if c.get("datapath")]
        if require_datapath and paths and all(p.get("path") in (None, "down") for p in paths):
            reasons = sorted(set(str(p.get("reason") or "no reason given") for p in paths))
            problems.append("%s: data path down (%s)" % (nickname, "; ".join(reasons)))
    if require_encryption:
        for nickname, how, scope, _verdict, acceptable in _plaintext_peers(status, hosts, hostvars, me):
            if not acceptable:
                problems.append("%s: connection %s is not encrypted (%s)" % (nickname, scope, how))
    return problems


class FilterModule:
    def filters(self):
        return {
            "peer_addresses": peer_addresses,
            "mesh_problems": mesh_problems,
            "plaintext_connections": plaintext_connections,
            "weft_address": weft_address,
        }

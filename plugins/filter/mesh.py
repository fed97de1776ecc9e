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


def mesh_problems(status, hosts, hostvars, me, require_encryption=True, require_datapath=True):
    """What keeps ``me``'s agent (its weft_info status) from being whole with ``hosts``; [] when healthy.

    Healthy: the agent is ready, and every other host is among its peers with an established connection,
    whose data path is up (when the agent runs one and ``require_datapath``), encrypted when the two hosts
    are at different sites (and ``require_encryption``).
    """
    if not isinstance(status, dict):
        raise AnsibleFilterError("mesh_problems expects the weft_info status (a dict), got %r" % (status,))
    problems = [] if status.get("ready") else ["the agent is not ready"]
    known = set(p.get("nickname") for p in status.get("peers") or [])
    connections = status.get("connections") or []
    site = _site(hostvars, me)
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
            continue
        other_site = _site(hostvars, host)
        if require_encryption and other_site != site and not any(_encrypted(c) for c in established):
            problems.append("%s: connection across sites (%s to %s) is not encrypted" % (nickname, site, other_site))
    return problems


class FilterModule:
    def filters(self):
        return {
            "peer_addresses": peer_addresses,
            "mesh_problems": mesh_problems,
            "weft_address": weft_address,
        }

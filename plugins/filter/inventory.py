# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The agent role's checks of the inventory itself, on the controller, before any host is changed.

A duplicate address or a site whose hosts disagree is pushed to every host's peer list and caught, at best,
by the mesh check afterwards, once agents have reloaded or restarted into it. These filters judge the whole
mesh group from hostvars, with the same rules and defaults as the peer_addresses filter (mesh.py), so they see
what every host would be told to dial.

``stale_peers`` is the other side of ``--limit``: which mesh hosts outside the run keep a peer list that no
longer matches the mesh because of the hosts in it.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress

from ansible.errors import AnsibleFilterError

from ansible_collections.weft.mesh.plugins.filter.ipam import ipam_problems
from ansible_collections.weft.mesh.plugins.filter.mesh import _site, _truthy, _var, dial_address, peer_addresses
from ansible_collections.weft.mesh.plugins.module_utils.weft_api import DEFAULT_PORT, normalize_address

ADVERTISE = "weft_advertise_address"
PUBLIC = "weft_public_address"
REACHABLE = "weft_site_reachable"
TRUSTED = "weft_trusted_subnets"


def _names(hosts):
    hosts = list(hosts)
    return hosts[0] if len(hosts) == 1 else "%s and %s" % (", ".join(hosts[:-1]), hosts[-1])


def _port(hostvars, host):
    value = _var(hostvars, host, "weft_port", DEFAULT_PORT)
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ValueError("%s: weft_port %r is not a port number" % (host, value)) from None
    if not 0 < port < 65536:
        raise ValueError("%s: weft_port %r is not a port number" % (host, value))
    return port


def address_problems(variables, host, port=DEFAULT_PORT):
    """One line per value of ``variables`` ({name: an address or a list of them}) that is not an agent address.

    For the host's own settings (its listen address, weft_peers, weft_extra_peers), which may be role
    parameters and are not in hostvars: the role renders them on the host's behalf before anything changes.
    """
    lines = []
    for name, values in variables.items():
        if values is None or values == "":
            continue  # unset
        for value in [values] if isinstance(values, str) or not isinstance(values, (list, tuple)) else values:
            try:
                normalize_address(str(value), int(port))
            except ValueError as exc:
                lines.append("%s: %s %s is not HOST[:PORT] (%s)" % (host, name, _show(value), exc))
    return lines


def _show(value):
    return '"%s"' % value if isinstance(value, str) else repr(value)


def _addresses(hostvars, host):
    """(advertised, public, where each comes from): the host's addresses as peer_addresses dials them.

    Same site: weft_advertise_address, else ansible_host, else the inventory name. Other sites:
    weft_public_address, else the advertised address. Raises ValueError with the line to show.
    """
    port = _port(hostvars, host)
    advertise_from = next(
        (n for n in (ADVERTISE, "ansible_host") if _var(hostvars, host, n) is not None), "the inventory name"
    )
    advertised = _var(hostvars, host, ADVERTISE, _var(hostvars, host, "ansible_host", host))
    public_from = PUBLIC if _var(hostvars, host, PUBLIC) is not None else advertise_from
    public = _var(hostvars, host, PUBLIC, advertised)
    found = []
    for name, value in ((advertise_from, advertised), (public_from, public)):
        try:
            found.append(normalize_address(str(value), port).lower())
        except ValueError as exc:
            raise ValueError("%s: %s %s is not HOST[:PORT] (%s)" % (host, name, _show(value), exc)) from None
    return found[0], found[1], advertise_from, public_from


def _subnets(hostvars, host):
    value = _var(hostvars, host, TRUSTED, []) or []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError("%s: %s must be a list of subnets, not %s" % (host, TRUSTED, _show(value)))
    networks = set()
    for subnet in value:
        try:
            networks.add(ipaddress.ip_network(str(subnet), strict=False))
        except ValueError:
            raise ValueError("%s: %s has %s, which is not a subnet" % (host, TRUSTED, _show(subnet))) from None
    return tuple(str(n) for n in sorted(networks, key=lambda n: (n.version, n)))


def _duplicates(hosts, hostvars, addresses):
    """One line per address that two or more hosts would be dialled at from the same site."""
    sites = sorted(set(_site(hostvars, h) for h in hosts))
    clashes = {}  # (address, hosts) -> [(the site dialling, {host: the variable its address comes from})]
    for site in sites:
        dialled = {}
        for host in hosts:
            advertised, public, advertise_from, public_from = addresses[host]
            if _site(hostvars, host) == site:
                dialled.setdefault(advertised, {})[host] = advertise_from
            elif _truthy(_var(hostvars, host, REACHABLE, True)):
                dialled.setdefault(public, {})[host] = public_from
            # else: behind NAT, nobody at this site dials it
        for address, by in dialled.items():
            if len(by) > 1:
                clashes.setdefault((address, tuple(sorted(by))), []).append((site, by))
    lines = []
    for (address, on), views in sorted(clashes.items(), key=lambda c: (c[0][1], c[0][0])):
        both = "both" if len(on) == 2 else "all"
        # Seen from a site where no public address is involved, the advertised addresses themselves clash.
        if any(PUBLIC not in by.values() for _site_, by in views):
            lines.append("%s %s advertise %s: give each host its own %s" % (_names(on), both, address, ADVERTISE))
            continue
        sources = dict((h, sorted(set(by[h] for _site_, by in views))) for h in on)
        where = ", ".join("%s's %s" % (h, " and ".join(sources[h])) for h in on)
        if len(set(_site(hostvars, h) for h in on)) == 1:
            hint = "behind one NAT, a port forward each; or %s: false for a site nobody can dial into" % REACHABLE
        else:
            hint = "the address other sites reach each one at"
        lines.append(
            "hosts at %s would dial %s %s at %s (%s): give each host its own %s (%s)"
            % (", ".join(site for site, _by in views), _names(on), both, address, where, PUBLIC, hint)
        )
    return lines


def _disagreements(hosts, hostvars, subnets):
    """One line per site whose hosts hold different values of a setting that must be the same across it."""
    lines = []
    by_site = {}
    for host in hosts:
        by_site.setdefault(_site(hostvars, host), []).append(host)
    for site, members in sorted(by_site.items()):
        settings = (
            (REACHABLE, lambda h: "true" if _truthy(_var(hostvars, h, REACHABLE, True)) else "false"),
            (TRUSTED, lambda h: "[%s]" % ", ".join(subnets[h])),
        )
        for name, value_of in settings:
            holders = {}
            for host in members:
                if name == TRUSTED and host not in subnets:
                    continue  # its own error says why
                holders.setdefault(value_of(host), []).append(host)
            if len(holders) < 2:
                continue
            held = "; ".join(
                "%s %s %s" % (", ".join(on), "has" if len(on) == 1 else "have", value)
                for value, on in sorted(holders.items(), key=lambda item: item[1])
            )
            lines.append(
                "the hosts of site %s disagree on %s (%s): set it once for the site, in its group_vars"
                % (site, name, held)
            )
    return lines


def inventory_problems(hosts, hostvars):
    """What is wrong with the mesh group ``hosts`` as the inventory describes it: one line per problem.

    Addresses and subnets that do not parse; two hosts that one site would dial at the same address (their
    advertised address at the same site, their public one elsewhere, as peer_addresses computes them; a host
    behind NAT is dialled by nobody outside its site, so hosts behind one NAT may share its address); hosts
    of one site with different weft_site_reachable or weft_trusted_subnets; the mesh's IPAM settings
    (ipam.ipam_problems: hosts that disagree on weft_ipalloc_range or weft_ipalloc_init, peer names).
    """
    hosts = sorted(set(hosts))  # the order of groups[] is not to be relied on
    for host in hosts:
        if host not in hostvars:
            raise AnsibleFilterError("%r is not a host in the inventory" % (host,))
    errors, addresses, subnets = [], {}, {}
    for host in hosts:
        try:
            addresses[host] = _addresses(hostvars, host)
        except ValueError as exc:
            errors.append(str(exc))
        try:
            subnets[host] = _subnets(hostvars, host)
        except ValueError as exc:
            errors.append(str(exc))
    errors.extend(_duplicates([h for h in hosts if h in addresses], hostvars, addresses))
    errors.extend(_disagreements(hosts, hostvars, subnets))
    errors.extend(ipam_problems(hosts, hostvars))
    return errors


def _new_or_leaving(hostvars, host):
    """'joins', 'leaves' or None, from what the role recorded about ``host`` in this run (validate.yml)."""
    facts = hostvars[host].get("_weft_preflight")
    if not isinstance(facts, dict):
        return None  # not judged in this batch (yet)
    if not _truthy(facts.get("present", True)):
        return "leaves"
    old = hostvars[host].get("_weft_old_config")
    if isinstance(old, dict) and "content" not in old:
        return "joins"  # no weft.yaml before this run (not found, or not read for want of /etc/weft)
    return None


def stale_peers(batch, hostvars, group, play_hosts):
    """The mesh hosts outside the run whose peer list the hosts of ``batch`` change, and what to do about it.

    ``group`` is the mesh group, ``play_hosts`` every host of the play (``ansible_play_hosts_all``), so the
    hosts of later batches do not count as outside. A host of the batch changes the others' peer lists when it
    is new to the mesh (it had no weft.yaml before this run) or is being removed (weft_state absent). A host
    outside the run is stale when it would dial such a host: same site, or a reachable one; hosts with an
    explicit weft_peers in inventory keep it.

    Returns {'stale': [...], 'joining': [...], 'leaving': [...], 'msg': one line, or '' when nothing is stale}.
    """
    group = sorted(set(group))  # the order of groups[] is not to be relied on
    running = set(play_hosts)
    outside = [h for h in group if h not in running]
    changes = dict((h, _new_or_leaving(hostvars, h)) for h in sorted(set(batch)) if h in group)
    joining = [h for h in changes if changes[h] == "joins"]
    leaving = [h for h in changes if changes[h] == "leaves"]
    stale, causes, still_listed = [], set(), set()
    for host in outside:
        if _var(hostvars, host, "weft_peers") is not None:
            continue
        site = _site(hostvars, host)
        peers = None
        for changed in joining + leaving:
            try:
                address = dial_address(hostvars, changed, site)
            except AnsibleFilterError:
                continue  # a bad address is an error of its own (inventory_problems)
            if address is None:
                continue  # behind NAT: it dials us, our peer list does not name it
            if host not in stale:
                stale.append(host)
            causes.add(changed)
            if changed in leaving:
                if peers is None:
                    peers = peer_addresses(group, hostvars, host)
                if address in peers:
                    still_listed.add(changed)
    result = {"stale": stale, "joining": joining, "leaving": leaving, "msg": ""}
    if not stale:
        return result
    why = []
    new = [h for h in joining if h in causes]
    gone = [h for h in leaving if h in causes]
    if new:
        why.append("%s %s new to the mesh" % (_names(new), "is" if len(new) == 1 else "are"))
    if gone:
        why.append("%s %s removed" % (_names(gone), "is" if len(gone) == 1 else "are"))
    first = ""
    if still_listed:
        kept = sorted(still_listed, key=leaving.index)
        first = "take %s out of the inventory (or of the mesh group), then " % _names(kept)
    result["msg"] = (
        "%s %s outside --limit and will still list the old peers (%s): after this run, %srun site.yml "
        "--limit %s (a reload, no restart)"
        % (", ".join(stale), "is" if len(stale) == 1 else "are", "; ".join(why), first, ",".join(stale))
    )
    return result


class FilterModule:
    def filters(self):
        return {
            "inventory_problems": inventory_problems,
            "stale_peers": stale_peers,
            "weft_address_problems": address_problems,
        }

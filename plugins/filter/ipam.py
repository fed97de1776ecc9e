# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The mesh's address space (IPAM) as the inventory sees it: peer names, the first ring, and reclaim.

The agents share one address range as a ring of ranges, each owned by a peer *name* (docs/ipam.md). Three things
about that ring are decided from inventory, on the controller, and are worth unit tests:

- **peer names**: each host's name is pinned in its configuration, derived from its inventory name, so the
  controller knows every host's name before any agent has run (``weft_peer_name``, ``peer_names``);
- **the first ring**: ``ipalloc_init: seed=NAME,...`` names the peers that share the range at the start. It only
  shapes a host's first ring, and peers refuse a ring seeded differently from theirs, so a mesh keeps the seed it
  started with: a host joining a running mesh gets the running hosts' value, and only a mesh where no host runs
  with one takes the current group (``ipalloc_init``);
- **reclaim**: the ranges of a host that left the inventory stay its own until a surviving agent takes them over
  (``weft rmpeer``). That is safe only once every surviving agent sees the peer unreachable (``reclaim_plan``).

Variables are read from hostvars with the role's defaults (roles/agent/defaults/main.yml): set them in inventory.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import hashlib
import ipaddress
import re

import yaml
from ansible.errors import AnsibleFilterError

from ansible_collections.weft.mesh.plugins.filter.mesh import _truthy, _var

PEER_NAME = "weft_peer_name"
RANGE = "weft_ipalloc_range"
INIT = "weft_ipalloc_init"
DEFAULT_RANGE = "10.32.0.0/12"
_NAME_RE = re.compile(r"^[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}$")


# --- peer names -------------------------------------------------------------------------------------------------


def normalize_name(text):
    """A peer name in the agent's printed form (``02:1f:aa:00:00:01``); ValueError when it is not one."""
    text = str(text).strip()
    if not _NAME_RE.match(text):
        raise ValueError("%r is not a peer name: six colon-separated hex bytes, like 02:1f:aa:00:00:01" % text)
    parts = [p.zfill(2).lower() for p in text.split(":")]
    if parts == ["00"] * 6:
        raise ValueError("peer name 00:00:00:00:00:00 is reserved")
    return ":".join(parts)


def _name_or_none(text):
    try:
        return normalize_name(text)
    except ValueError:
        return None


def weft_peer_name(hostname, override=None):
    """The peer name a host runs with: ``override`` (``weft_peer_name``) when set, else one derived from the
    inventory name: the first six bytes of its SHA-256, made a locally administered unicast MAC."""
    if override is not None and str(override).strip():
        try:
            return normalize_name(override)
        except ValueError as exc:
            raise AnsibleFilterError("%s of %s: %s" % (PEER_NAME, hostname, exc)) from None
    raw = bytearray(hashlib.sha256(str(hostname).encode("utf-8")).digest()[:6])
    raw[0] = (raw[0] | 0x02) & 0xFE  # locally administered, unicast: never a vendor's MAC, never zero
    return ":".join("%02x" % b for b in raw)


def peer_names(hosts, hostvars):
    """{host: its peer name} for ``hosts``, each with its inventory ``weft_peer_name`` if it sets one."""
    names = {}
    for host in hosts:
        names[host] = weft_peer_name(host, _var(hostvars, host, PEER_NAME))
    return names


# --- the first ring ---------------------------------------------------------------------------------------------


def normalize_init(text):
    """``ipalloc_init`` in one spelling, so that equal values compare equal (a seed's names sorted, lower case)."""
    text = str(text).strip()
    mode, _, arg = text.partition("=")
    if mode.strip() != "seed":
        return text
    names = []
    for part in arg.split(","):
        if part.strip():
            name = _name_or_none(part)
            if name is None:
                return text  # not ours to judge: the agent's parser says what is wrong with it
            names.append(name)
    return "seed=" + ",".join(sorted(set(names)))


def _removing(hostvars, host):
    facts = hostvars[host].get("_weft_preflight")
    if isinstance(facts, dict) and not _truthy(facts.get("present", True)):
        return True
    return str(_var(hostvars, host, "weft_state", "present")) == "absent"


OBSERVER = "observer"


def _observer(hostvars, host):
    return str(_var(hostvars, host, INIT, "")).strip() == OBSERVER


def _outside(results):
    """What the role read from hosts outside the run (a slurp loop's results), as _weft_old_config values:
    {host: {'content': base64} or {'msg': why there is none}}; a host that could not be read is left out."""
    if not results:
        return {}
    if isinstance(results, dict) and "results" in results:
        results = results["results"]
    if isinstance(results, dict):
        return dict(results)
    found = {}
    for r in results:
        if not isinstance(r, dict) or r.get("item") is None or r.get("unreachable") or r.get("skipped"):
            continue
        if r.get("content"):
            found[r["item"]] = {"content": r["content"]}
        elif re.search(r"(?i)not found|no such file", str(r.get("msg", ""))):  # failed, or failed_when: false
            found[r["item"]] = {"msg": str(r.get("msg"))}
    return found


def _old_config(hostvars, host, outside):
    """(read, the configuration the host runs with): (False, None) when unknown, (True, None) when it has none."""
    value = hostvars[host].get("_weft_old_config")
    if not isinstance(value, dict):
        value = outside.get(host)
    if not isinstance(value, dict):
        return False, None
    if "content" not in value:
        return True, None
    try:
        config = yaml.safe_load(base64.b64decode(value["content"]).decode("utf-8", "replace"))
    except (ValueError, TypeError, yaml.YAMLError):
        config = None
    return True, config if isinstance(config, dict) else {}


def _hosts_text(hosts):
    return ", ".join(hosts)


def ipalloc_init(hosts, hostvars, outside=None):
    """How the mesh's first ring comes about: the ``ipalloc_init`` every host of ``hosts`` (the mesh) is given.

    - a value some hosts run with already (their weft.yaml, read by the role: ``_weft_old_config``, or
      ``outside``, what was read from hosts outside the run; ``observer`` aside): every host gets it, so that a
      joining host's first ring is the mesh's; hosts that run with different values are an error;
    - else ``seed=`` the pinned names of the group's hosts (but those being removed and observers), sorted.

    Per host (``hosts``), one exception to the mesh's value: with a seed the mesh runs with, a host that has no
    weft.yaml yet but whose name is in that seed (a seed host purged and brought back, a terminated instance
    replaced under its inventory name) is an ``observer``, and stays one: computing its seed part again could
    hand out addresses that were reclaimed meanwhile, while an observer takes the mesh's ring as it is.

    Returns {'init', 'source' ('running', 'group' or ''), 'hosts': {host: its value}, 'running': {value: [hosts]},
    'unread': [hosts whose configuration is not known], 'errors': [...], 'warnings': [...]}. The group's seed with
    hosts unread and no host known to have a configuration at all is an error: the run cannot tell a new mesh from
    a run limited to new hosts of a running one.
    """
    outside = _outside(outside)
    members, unread, configured, running, ranges = [], [], [], {}, {}
    fresh, observing = [], []
    hosts = sorted(set(hosts))
    for host in hosts:
        if host not in hostvars:
            raise AnsibleFilterError("%r is not a host in the inventory" % (host,))
        if _removing(hostvars, host):
            continue
        if not _observer(hostvars, host):
            members.append(host)
        read, config = _old_config(hostvars, host, outside)
        if not read:
            unread.append(host)
            continue
        if config is None:
            fresh.append(host)
            continue
        configured.append(host)
        if str(config.get("ipalloc_init") or "").strip() == OBSERVER:
            observing.append(host)
        elif config.get("ipalloc_init"):
            running.setdefault(normalize_init(config["ipalloc_init"]), []).append(host)
        if config.get("ipalloc_range"):
            ranges[host] = str(config["ipalloc_range"])
    names = peer_names(members, hostvars)
    seed = "seed=" + ",".join(sorted(set(names.values()))) if names else ""
    names.update(peer_names([h for h in fresh if h not in names], hostvars))
    result = {
        "init": "",
        "source": "",
        "hosts": {},
        "running": running,
        "unread": unread,
        "errors": [],
        "warnings": [],
    }
    if len(running) == 1:
        result["init"], result["source"] = next(iter(running)), "running"
        value = result["init"]
        seeded = set(value[len("seed=") :].split(",")) if value.startswith("seed=") else set()
        for host in hosts:
            if host in observing or (host in fresh and names.get(host) in seeded):
                result["hosts"][host] = OBSERVER
    elif running:
        held = "; ".join("%s: %s" % (_hosts_text(on), value) for value, on in sorted(running.items()))
        result["errors"].append(
            "the mesh's hosts run with different ipalloc_init (%s): one mesh needs one ring; set %s (in "
            "group_vars/all) to the value whose ring you keep" % (held, INIT)
        )
    elif unread and not configured:
        result["errors"].append(
            "cannot tell whether the mesh has an address ring already: %s could not be read and no host of this run "
            "has a weft.yaml; run with them reachable, or set %s (for a new mesh: %s)"
            % (_hosts_text(unread), INIT, seed or "seed=NAME,...")
        )
    else:
        result["init"], result["source"] = seed, "group" if seed else ""
        if unread and seed:
            result["warnings"].append(
                "the first address ring is seeded by the group (%s): %s could not be read" % (seed, _hosts_text(unread))
            )
    for host, was in sorted(ranges.items()):
        now = str(_var(hostvars, host, RANGE, DEFAULT_RANGE))
        if _network(was) != _network(now):
            result["warnings"].append(
                "%s changes ipalloc_range from %s to %s: its agent forgets its ring and its allocations at the "
                "restart" % (host, was, now)
            )
    return result


def _network(text):
    try:
        return ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        return str(text).strip()


def ipam_problems(hosts, hostvars):
    """What is wrong with the mesh's IPAM settings in inventory: one line per problem.

    Hosts that disagree on ``weft_ipalloc_range`` (peers of one mesh refuse each other's ring otherwise) or set
    different ``weft_ipalloc_init`` values (but observers); a ``weft_peer_name`` that is not a peer name; two hosts
    with one peer name.
    """
    hosts = sorted(set(hosts))
    errors = []
    for host in hosts:
        if host not in hostvars:
            raise AnsibleFilterError("%r is not a host in the inventory" % (host,))
    ranges, inits, names = {}, {}, {}
    for host in hosts:
        value = _var(hostvars, host, RANGE, DEFAULT_RANGE)
        network = _network(value)
        if isinstance(network, str) or network.version != 4:
            errors.append("%s: %s %s is not an IPv4 subnet like %s" % (host, RANGE, value, DEFAULT_RANGE))
        else:
            ranges.setdefault(str(network), []).append(host)
        init = _var(hostvars, host, INIT)
        if init is None or str(init).strip() != "observer":
            inits.setdefault(normalize_init(init) if init is not None else "none", []).append(host)
        try:
            names.setdefault(weft_peer_name(host, _var(hostvars, host, PEER_NAME)), []).append(host)
        except AnsibleFilterError as exc:
            errors.append(str(exc))
    if list(inits) == ["none"]:
        inits = {}  # nobody sets it: the role decides (ipalloc_init)
    for name, values in ((RANGE, ranges), (INIT, inits)):
        if len(values) > 1:
            held = "; ".join(
                "%s %s %s" % (_hosts_text(on), "has" if len(on) == 1 else "have", value)
                for value, on in sorted(values.items(), key=lambda item: item[1])
            )
            errors.append(
                "the mesh's hosts disagree on %s (%s): set it once for the whole mesh, in group_vars/all (peers "
                "refuse a ring %s)" % (name, held, "of another range" if name == RANGE else "seeded differently")
            )
    for name, on in sorted(names.items()):
        if len(on) > 1:
            errors.append(
                "%s share the peer name %s: give each host its own %s, or none" % (" and ".join(on), name, PEER_NAME)
            )
    return errors


# --- reclaim ----------------------------------------------------------------------------------------------------


def _owns(row):
    try:
        return int(row.get("addresses") or 0) > 0
    except (TypeError, ValueError):
        return False


def _ring_of(value):
    """A host's ``weft status ipam`` from what the play has: the status itself, or a weft_info result registered
    with ``ipam: true`` (``{'weft': {'ipam': ...}}``); None when there is none (failed, skipped, an older agent)."""
    if not isinstance(value, dict):
        return None
    if "weft" in value:
        value = value["weft"].get("ipam") if isinstance(value["weft"], dict) else None
        return value if isinstance(value, dict) else None
    if "peers" in value or "state" in value:
        return value
    return None


def reclaim_plan(statuses, names, ignore=()):
    """Which ring owners to reclaim, and from which host: the hands-off reclaim of hosts that left the inventory.

    ``statuses`` maps each surviving host, in play order, to its agent's ``weft status ipam``, or to the result of
    weft_info with ``ipam: true`` (None, a failed or a skipped result when it could not be read); ``names`` are
    the peer names of every inventory host (a list, or {host: name}); ``ignore`` names peers (by name or
    nickname) never to reclaim, such as hosts outside the inventory that belong to the mesh.

    An owner is reclaimed when it owns addresses, is no inventory host's name and not ignored, and every host
    whose agent has a ring and lists it sees it unreachable. One that any of them reaches is a warning, never a
    reclaim: a host taken out of the inventory whose agent still runs. The reclaim runs on the first host in
    ``statuses`` whose agent has a ring.

    Returns {'host': the host to reclaim from or None, 'peers': [names], 'labels': ['NAME(nickname)'],
    'addresses': how many addresses they own, 'warnings': [...], 'unread': [hosts], 'msg': one line or ''}.
    """
    if not isinstance(statuses, dict):
        raise AnsibleFilterError("reclaim_plan expects {host: weft status ipam}, got %r" % (statuses,))
    known = set()
    for name in names.values() if isinstance(names, dict) else names or []:
        normal = _name_or_none(name)
        if normal is not None:
            known.add(normal)
    ignored = set()
    for item in ignore or []:
        ignored.add(_name_or_none(item) or str(item))
    answered, unread = [], []
    for host, value in statuses.items():
        status = _ring_of(value)
        if status is None:
            unread.append(host)
        elif status.get("peers"):
            answered.append((host, status))
    owners = {}  # name -> {'nickname', 'addresses', 'reachable': [hosts], 'unreachable': [hosts]}
    for host, status in answered:
        for row in status.get("peers") or []:
            if not isinstance(row, dict) or row.get("ourself") or not _owns(row):
                continue
            name = _name_or_none(row.get("name"))
            if name is None or name in known:
                continue
            owner = owners.setdefault(name, {"nickname": "", "addresses": 0, "reachable": [], "unreachable": []})
            owner["nickname"] = owner["nickname"] or str(row.get("nickname") or "")
            owner["addresses"] = max(owner["addresses"], int(row.get("addresses") or 0))
            owner["reachable" if _truthy(row.get("reachable")) else "unreachable"].append(host)
    peers, labels, total, warnings = [], [], 0, []
    for name, owner in sorted(owners.items()):
        label = "%s(%s)" % (name, owner["nickname"]) if owner["nickname"] else name
        if name in ignored or (owner["nickname"] and owner["nickname"] in ignored):
            continue
        if owner["reachable"]:
            warnings.append(
                "%s owns %d addresses of the ring and is no inventory host, but %s reach%s it: not reclaimed. If it "
                "left, stop its agent (or decommission it) and run site.yml again; if it belongs to the mesh, add it "
                "to the inventory or to weft_reclaim_ignore"
                % (
                    label,
                    owner["addresses"],
                    _hosts_text(owner["reachable"]),
                    "es" if len(owner["reachable"]) == 1 else "",
                )
            )
            continue
        peers.append(name)
        labels.append(label)
        total += owner["addresses"]
    host = answered[0][0] if answered and peers else None
    msg = ""
    if peers:
        msg = "%s takes over the ranges of %s (%d addresses): no inventory host, unreachable from %s" % (
            host,
            ", ".join(labels),
            total,
            _hosts_text(h for h, _s in answered),
        )
    return {
        "host": host,
        "peers": peers,
        "labels": labels,
        "addresses": total,
        "warnings": warnings,
        "unread": unread,
        "msg": msg,
    }


class FilterModule:
    def filters(self):
        return {
            "weft_peer_name": weft_peer_name,
            "peer_names": peer_names,
            "ipalloc_init": ipalloc_init,
            "ipam_problems": ipam_problems,
            "reclaim_plan": reclaim_plan,
        }

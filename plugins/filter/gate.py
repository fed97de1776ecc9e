# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The restart gate: an agent restarted (upgraded, reconfigured) must come back as it was.

restart.yml takes the agent's status and its containers' bridge ports before the restart and compares them
after: every peer that was established is established again, over the same path (fast, sleeve, relay) or a better
one, with the same encryption, and every container port still holds the same MAC. A restart that loses any of that
is a regression, and the role rolls the host back. A better path is not: a peer relayed before the restart (its
direct connection not yet up, as while a mesh re-forms after a reset) may well be direct after it.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError


def _peers(status):
    """{nickname or name: (path, encrypted)} for the peers ``status`` reaches (established or relayed)."""
    if not isinstance(status, dict):
        raise AnsibleFilterError("restart_problems expects weft_info statuses (dicts), got %r" % (status,))
    found = {}
    for c in status.get("connections") or []:
        if c.get("state") not in ("established", "relayed"):
            continue
        datapath = c.get("datapath") or {}
        who = str(c.get("nickname") or c.get("peer"))
        # Of two connections to one peer, the one that carries traffic speaks for it.
        if who not in found or found[who][0] in (None, "down"):
            found[who] = (datapath.get("path"), bool(datapath.get("encrypted", c.get("encrypted"))))
    return found


# The paths from best to worst, as an agent chooses them; a path not named here (none, "down") is worst.
_RANK = {"fast": 0, "sleeve": 1, "relay": 2}


def _as_good(now, before):
    """``now`` (path, encrypted) is ``before`` or a better path with the same encryption."""
    return now[1] == before[1] and _RANK.get(now[0], len(_RANK)) <= _RANK.get(before[0], len(_RANK))


def _how(path, encrypted):
    return "%s, %s" % (path or "no data path", "encrypted" if encrypted else "plaintext")


def restart_problems(after, before):
    """What differs in ``after`` (the restarted agent's status) from ``before``; [] when it is back as it was."""
    problems = [] if isinstance(after, dict) and after.get("ready") else ["the agent is not ready"]
    now = _peers(after)
    for who, (path, encrypted) in sorted(_peers(before).items()):
        if who not in now:
            problems.append("%s is not back (it was %s)" % (who, _how(path, encrypted)))
        elif not _as_good(now[who], (path, encrypted)):
            problems.append("%s is %s, it was %s" % (who, _how(*now[who]), _how(path, encrypted)))
    return problems


def container_ports(fdb):
    """The container ports' MACs from `bridge -j fdb show br BRIDGE`, as sorted "port mac" strings."""
    if not isinstance(fdb, list):
        raise AnsibleFilterError("container_ports expects the JSON list `bridge -j fdb show` prints")
    return sorted(
        set(
            "%s %s" % (e.get("ifname"), e.get("mac"))
            for e in fdb
            if isinstance(e, dict)
            and str(e.get("ifname", "")).startswith("vwe")
            and "self" not in (e.get("flags") or [])
        )
    )


class FilterModule(object):
    def filters(self):
        return {"restart_problems": restart_problems, "container_ports": container_ports}

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: weft_rmpeer
short_description: Take over the address ranges of Weft peers that are gone
version_added: 0.5.0
description:
  - The agents share their address range (IPAM) as a ring of ranges, each owned by a peer. A peer that is gone for
    good (a terminated instance, a decommissioned host) keeps its ranges until another peer takes them over; this
    module asks the agent on the managed host to do so, like C(weft rmpeer).
  - Reads the ring first (C(weft status ipam)) and asks only for the peers that still own addresses, so it reports
    RV(ignore:changed) only when something was reclaimed, and a second run changes nothing.
  - Run it on B(one) surviving host; the ring spreads the change to every other peer.
  - The agent refuses to take over a peer it can reach (its agent still runs), unless O(force) is set.
author:
  - Weft engineers (@weft)
options:
  peers:
    description:
      - The peers to reclaim, by peer name (six hex bytes, like C(02:1f:aa:00:00:01)) or by nickname.
      - A nickname is looked up among the ring's owners. One that owns nothing, or a name the ring does not know,
        has nothing to reclaim.
    type: list
    elements: str
    required: true
  force:
    description:
      - Reclaim a peer even though this agent reaches it. Only for a peer that will never allocate again (its agent
        is being removed), since two peers owning the same range hand out the same addresses.
    type: bool
    default: false
  state:
    description:
      - V(absent) - the peers own no part of the ring afterwards; their ranges belong to the managed host's agent.
    type: str
    choices: [absent]
    default: absent
extends_documentation_fragment:
  - weft.mesh.api
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Reads the ring and reports the peers that still own addresses and how many, without changing it.
  diff_mode:
    support: full
    details: The diff lists what each named peer owns before and after.
  platform:
    platforms: posix
notes:
  - Needs an agent with address management (C(GET /status/ipam) and C(POST /rmpeer) on its API).
  - The C(site.yml) playbook reclaims hosts that left the inventory by itself, with this module, once every surviving
    agent sees them unreachable; C(playbooks/decommission.yml) reclaims the hosts it removes.
seealso:
  - module: weft.mesh.weft_info
"""

EXAMPLES = r"""
- name: Reclaim the ranges of a terminated instance (by nickname), from one surviving host
  weft.mesh.weft_rmpeer:
    peers: [aws-c]
  run_once: true
  delegate_to: "{{ groups['weft_mesh'][0] }}"

- name: Reclaim by peer name
  weft.mesh.weft_rmpeer:
    peers:
      - "02:5e:91:0c:7a:13"

- name: Reclaim a peer whose agent is being removed right now, reachable or not
  weft.mesh.weft_rmpeer:
    peers: "{{ leaving_names }}"
    force: true
"""

RETURN = r"""
reclaimed:
  description:
    - Per peer name, the addresses that came to this agent (in check mode, that would come); only peers that owned
      something.
  returned: success
  type: dict
  sample: {"02:5e:91:0c:7a:13": 209715}
peers:
  description: What each named peer owned before, as the ring's owners table shows it; a peer that owns nothing
    has C(addresses) 0.
  returned: success
  type: list
  elements: dict
  sample:
    - {requested: aws-c, name: "02:5e:91:0c:7a:13", nickname: aws-c, addresses: 209715, reachable: false}
msg:
  description: One line saying what was (or would be) done.
  returned: success
  type: str
  sample: "reclaimed 209715 addresses of 02:5e:91:0c:7a:13(aws-c)"
"""

import re

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.weft.mesh.plugins.module_utils.weft_api import (
    WeftApi,
    WeftApiError,
    api_argument_spec,
)

_NAME_RE = re.compile(r"^[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){5}$")


def peer_name(text):
    """A peer name in the agent's printed form, or None when ``text`` is not one (then it is a nickname)."""
    text = str(text).strip()
    if not _NAME_RE.match(text):
        return None
    return ":".join(p.zfill(2).lower() for p in text.split(":"))


def _label(row):
    return "%s(%s)" % (row["name"], row["nickname"]) if row.get("nickname") else row["name"]


def resolve(requested, status):
    """(rows, problem): one row per requested peer with what it owns in ``status`` (weft status ipam), or the
    one-line reason the request cannot be served (a nickname two owners share, this agent itself)."""
    owners = [p for p in status.get("peers") or [] if isinstance(p, dict) and p.get("name")]
    by_name = dict((peer_name(p["name"]), p) for p in owners)
    rows, seen = [], set()
    for text in requested:
        name = peer_name(text)
        if name is not None:
            found = by_name.get(name)
        else:
            matches = [p for p in owners if str(p.get("nickname") or "") == str(text).strip()]
            if len(matches) > 1:
                names = ", ".join(sorted(peer_name(p["name"]) for p in matches))
                return None, "nickname %r is ambiguous among the ring's owners (%s): give the peer name" % (text, names)
            found = matches[0] if matches else None
            name = peer_name(found["name"]) if found else None
        if found is not None and found.get("ourself"):
            return None, "%s is this agent itself: run weft_rmpeer on another host of the mesh" % _label(found)
        if name is not None and name in seen:
            continue
        seen.add(name)
        rows.append(
            dict(
                requested=str(text),
                name=name,
                nickname=str((found or {}).get("nickname") or ""),
                addresses=int((found or {}).get("addresses") or 0),
                reachable=bool((found or {}).get("reachable")),
            )
        )
    return rows, None


def _diff_lines(rows, reclaimed=()):
    lines = []
    for row in rows:
        if row["name"] is None:
            continue
        owns = 0 if row["name"] in reclaimed else row["addresses"]
        lines.append("%s owns %d addresses\n" % (_label(row), owns))
    return "".join(lines)


def main():
    argument_spec = api_argument_spec()
    argument_spec.update(
        peers=dict(type="list", elements="str", required=True),
        force=dict(type="bool", default=False),
        state=dict(type="str", choices=["absent"], default="absent"),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    requested = [str(p).strip() for p in module.params["peers"] if str(p).strip()]
    if not requested:
        module.fail_json(msg="peers is empty: name the peers to reclaim, by peer name or nickname")
    force = module.params["force"]
    api = WeftApi.from_module(module)

    try:
        status = api.ipam_status()
    except WeftApiError as exc:
        module.fail_json(msg=str(exc))
    if not isinstance(status, dict):
        module.fail_json(msg="the agent's IPAM status is not a JSON object: %r" % (status,))
    rows, problem = resolve(requested, status)
    if problem:
        module.fail_json(msg=problem)

    owning = [r for r in rows if r["name"] is not None and r["addresses"] > 0]
    reachable = [r for r in owning if r["reachable"]]
    if reachable and not force:
        module.fail_json(
            msg="%s is reachable from this agent: reclaim is for peers that are gone for good (stop its agent "
            "first, or set force if it will never allocate again)" % ", ".join(_label(r) for r in reachable),
            peers=rows,
        )

    reclaimed = {}
    if owning and module.check_mode:
        reclaimed = dict((r["name"], r["addresses"]) for r in owning)
    elif owning:
        try:
            answer = api.rmpeer([r["name"] for r in owning], force)
        except WeftApiError as exc:
            module.fail_json(msg=str(exc), peers=rows)
        for name, count in ((answer or {}).get("reclaimed") or {}).items():
            try:
                count = int(count)
            except (TypeError, ValueError):
                count = 0
            if count > 0:
                reclaimed[peer_name(name) or name] = count

    done = [r for r in rows if r["name"] in reclaimed]
    if done:
        msg = "%s %d addresses of %s" % (
            "would reclaim" if module.check_mode else "reclaimed",
            sum(reclaimed.values()),
            ", ".join(_label(r) for r in done),
        )
    else:
        msg = "nothing to reclaim: %s own%s no addresses" % (
            ", ".join(_label(r) if r["name"] else r["requested"] for r in rows),
            "s" if len(rows) == 1 else "",
        )
    if status.get("state") and not status.get("peers"):
        msg += " (this agent has no ring yet: %s)" % status["state"]
    result = dict(changed=bool(reclaimed), reclaimed=reclaimed, peers=rows, msg=msg)
    if module._diff:
        result["diff"] = dict(
            before_header="ring owners",
            after_header="ring owners",
            before=_diff_lines(rows),
            after=_diff_lines(rows, reclaimed),
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()

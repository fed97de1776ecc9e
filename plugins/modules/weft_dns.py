#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: weft_dns
short_description: Give a name in the Weft mesh's DNS to addresses that are no container's, or take it away
version_added: 0.5.0
description:
  - Every Weft agent answers DNS for the containers of its host, with the names of the whole mesh (docs/dns.md).
    Containers get their names when they are attached (C(weft attach --name), the CNI plugin); this module names
    what is no container, like a host's exposed address or a service's address, through the agent on the managed
    host, like C(weft dns-add) and C(weft dns-remove).
  - The name belongs to the managed host (its agent registers it and keeps it across restarts); every container of
    the mesh resolves it.
  - Reads what this host gives the name first (C(weft status dns)), and asks the agent only for what is missing or
    extra, so a second run changes nothing.
author:
  - Weft engineers (@weft)
options:
  name:
    description:
      - The name. A single label (C(db)) is put in the agent's domain (C(db.weft.local)); a name with a dot must
        lie in that domain.
      - Labels are 1-63 characters of C(a-z), C(0-9), C(-) and C(_); upper case is taken as lower case.
    type: str
    required: true
  addresses:
    description:
      - IPv4 addresses, like C(10.32.9.9).
      - With O(state=present), at least one is required; the name gets each of them (the ones it has keep).
      - With O(state=absent), only these are taken from the name; none takes every address this host gives it.
      - Addresses no container may have (C(0.0.0.0/8), loopback, link-local, multicast, C(240.0.0.0/4)) are
        refused, as the agent refuses them.
    type: list
    elements: str
    default: []
  exclusive:
    description:
      - With O(state=present), also take from the name the addresses this host gave it with this module or
        C(weft dns-add) that are not in O(addresses), so it has exactly these (names other hosts give it are
        theirs).
    type: bool
    default: false
  state:
    description: Whether the name should have the addresses on this host, or not.
    type: str
    choices: [present, absent]
    default: present
extends_documentation_fragment:
  - weft.mesh.api
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Reads this host's names (C(GET /status/dns)) and reports what would be added or removed, without
      asking the agent to change anything.
  diff_mode:
    support: full
    details: The diff lists the addresses this host gives the name before and after.
  platform:
    platforms: posix
notes:
  - Needs an agent that serves DNS (version 0.5.0 or later, with C(dns) on, the role's C(weft_dns)).
  - O(state=absent) without O(addresses) also takes the name from this host's containers that have it (like
    C(weft dns-remove)); attaching the container again with its name gives it back.
  - Another host giving the same name other addresses is not affected; the mesh answers every address of the name.
seealso:
  - module: weft.mesh.weft_attach
  - module: weft.mesh.weft_info
"""

EXAMPLES = r"""
- name: A name for this host's overlay address (weft expose)
  weft.mesh.weft_dns:
    name: "{{ inventory_hostname }}-host"
    addresses: ["{{ exposed_address }}"]

- name: A service behind two addresses, and no others from this host
  weft.mesh.weft_dns:
    name: db
    addresses: [10.32.9.9, 10.32.9.10]
    exclusive: true

- name: Take one address away
  weft.mesh.weft_dns:
    name: db
    addresses: [10.32.9.10]
    state: absent

- name: Take the name away (every address this host gives it)
  weft.mesh.weft_dns:
    name: db
    state: absent
"""

RETURN = r"""
name:
  description: The name, absolute and in lower case.
  returned: success
  type: str
  sample: db.weft.local.
addresses:
  description: The addresses this host gives the name afterwards (in check mode, those it would give), sorted.
  returned: success
  type: list
  elements: str
  sample: ["10.32.9.9", "10.32.9.10"]
added:
  description: The addresses given to the name by this run (or that check mode would give).
  returned: success
  type: list
  elements: str
  sample: ["10.32.9.10"]
removed:
  description: The addresses taken from the name by this run (or that check mode would take).
  returned: success
  type: list
  elements: str
  sample: []
"""

import ipaddress
import re

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.weft.mesh.plugins.module_utils.weft_api import (
    WeftApi,
    WeftApiError,
    api_argument_spec,
)

STATIC_PREFIX = "name:"  # the key the agent registers a dns-add name under (weft.dns.registrations)
MAX_NAME = 253
LABEL = re.compile(r"^[a-z0-9_-]{1,63}$")
# What the agent refuses as a name's address (docs/dns.md, "Refusals and limits").
REFUSED = [
    ipaddress.IPv4Network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
]


def absolute(domain):
    domain = domain.strip().lower()
    return domain if domain.endswith(".") else domain + "."


def fqdn(name, domain):
    """The agent's normal form of ``name`` (weft.dns.names.normalise), checked to lie in ``domain``; ValueError."""
    domain = absolute(domain)
    text = name.strip().lower()
    if not text or text == ".":
        raise ValueError("name is empty")
    if not text.endswith("."):
        text = "%s.%s" % (text, domain) if "." not in text else text + "."
    body = text[:-1]
    if len(body) > MAX_NAME:
        raise ValueError("name %r is %d characters long; at most %d are allowed" % (name, len(body), MAX_NAME))
    for label in body.split("."):
        if not LABEL.match(label):
            raise ValueError(
                "name %r has an invalid label %r: labels are 1-63 characters of a-z, 0-9, '-' and '_'" % (name, label)
            )
    if not (text.endswith("." + domain) and len(text) > len(domain) + 1):
        raise ValueError("%s is not in the agent's domain %s: give a single label, like 'db'" % (text, domain))
    return text


def parse_addresses(texts):
    """Sorted, unique IPv4 addresses; ValueError naming the first that is not one or that the agent refuses."""
    out = set()
    for text in texts:
        try:
            address = ipaddress.IPv4Address(str(text).strip())
        except ValueError:
            raise ValueError("%r is not an IPv4 address" % text) from None
        bad = next((n for n in REFUSED if address in n), None)
        if bad is not None:
            raise ValueError(
                "%s is in %s, which no container may have: the agent refuses it as a name's address" % (address, bad)
            )
        out.add(address)
    return [str(a) for a in sorted(out)]


def held(status, name):
    """(every address this host gives ``name``, those it gave with dns-add), from ``GET /status/dns``."""
    mine = [r for r in status.get("registered") or [] if r.get("name") == name]
    every = {ipaddress.IPv4Address(r["address"]) for r in mine}
    static = {ipaddress.IPv4Address(r["address"]) for r in mine if r.get("key") == STATIC_PREFIX + name}
    return [str(a) for a in sorted(every)], [str(a) for a in sorted(static)]


def by_address(addresses):
    return sorted(addresses, key=ipaddress.IPv4Address)


def main():
    argument_spec = api_argument_spec()
    argument_spec.update(
        name=dict(type="str", required=True),
        addresses=dict(type="list", elements="str", default=[]),
        exclusive=dict(type="bool", default=False),
        state=dict(type="str", choices=["present", "absent"], default="present"),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    p = module.params
    state = p["state"]
    try:
        wanted = parse_addresses(p["addresses"])
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    if state == "present" and not wanted:
        module.fail_json(msg="state=present needs at least one address in addresses")
    if state == "absent" and p["exclusive"]:
        module.fail_json(msg="exclusive is for state=present")
    api = WeftApi.from_module(module)

    try:
        status = api.dns_status()
        try:
            name = fqdn(p["name"], status.get("domain") or "weft.local.")
        except ValueError as exc:
            module.fail_json(msg=str(exc))
        before, static = held(status, name)
        if state == "present":
            added = [a for a in wanted if a not in static]
            removed = [a for a in static if a not in wanted] if p["exclusive"] else []
        else:
            removed = [a for a in (wanted or before) if a in before]
            added = []
        if not module.check_mode:
            if added:
                api.dns_add(name, wanted)
            if removed:
                api.dns_remove(name, removed if (state == "present" or wanted) else None)
            if added or removed:
                after, _ = held(api.dns_status(), name)
            else:
                after = before
        else:
            # A removal takes the address from every registration of the name on this host (the agent's rule).
            after = by_address(set(before) - set(removed) | set(added))
    except WeftApiError as exc:
        module.fail_json(msg=str(exc))

    result = dict(changed=bool(added or removed), name=name, addresses=after, added=added, removed=removed)
    if module._diff:
        result["diff"] = dict(
            before_header="%s on this host" % name,
            after_header="%s on this host" % name,
            before="".join(a + "\n" for a in before),
            after="".join(a + "\n" for a in after),
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()

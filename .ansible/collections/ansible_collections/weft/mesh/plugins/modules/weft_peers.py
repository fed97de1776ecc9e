#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: weft_peers
short_description: Add or remove the peers a running Weft agent dials
version_added: 0.1.0
description:
  - Changes the running agent's direct targets (the addresses it dials because it was told to) through its
    control API, like C(weft connect) and C(weft forget), without a restart or a reload.
  - Reads the current targets first and sends only the difference, so it reports RV(ignore:changed) only when
    something changed.
  - Targets the agent found by gossip (origin C(discovered)) are not direct targets; this module neither counts
    nor removes them.
  - Changes made here last until the agent restarts or reloads its configuration (a reload makes the
    C(config) targets exactly the config file's C(peers) again, leaving targets added here alone); to make
    peers permanent, put them in the configuration (the C(weft.mesh.agent) role does).
author:
  - Weft engineers (@weft)
options:
  peers:
    description:
      - Peer addresses, C(HOST[:PORT]) (port 6783 when left out; IPv6 as C([ADDR]:PORT)).
      - Compared in the agent's canonical form, so C(10.0.0.1) and C(10.0.0.1:6783) are the same peer.
    type: list
    elements: str
    required: true
  state:
    description:
      - V(present) makes sure the agent dials every address in O(peers); V(absent) makes it stop dialling them.
      - A connection already up to a forgotten address stays up until it ends.
    type: str
    choices: [present, absent]
    default: present
  exclusive:
    description:
      - With O(state=present), make O(peers) the only direct targets, forgetting every other one (including
        those from the config file, until the next reload).
      - Cannot be combined with O(state=absent).
    type: bool
    default: false
extends_documentation_fragment:
  - weft.mesh.api
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: The diff lists the direct targets before and after.
  platform:
    platforms: posix
seealso:
  - module: weft.mesh.weft_info
"""

EXAMPLES = r"""
- name: Dial two more peers
  weft.mesh.weft_peers:
    peers:
      - 10.10.2.11
      - "[2001:db8::7]:6783"

- name: Stop dialling a decommissioned host
  weft.mesh.weft_peers:
    peers: [10.10.1.13]
    state: absent

- name: Dial exactly these peers and no others
  weft.mesh.weft_peers:
    peers: "{{ groups['weft_mesh'] | map('extract', hostvars, 'weft_advertise_address') | list }}"
    exclusive: true
"""

RETURN = r"""
targets:
  description: The direct targets after the change (in check mode, what they would be), in canonical form.
  returned: success
  type: list
  elements: str
  sample: ["10.10.1.12:6783", "10.10.2.11:6783"]
added:
  description: Addresses that were (or in check mode would be) added.
  returned: success
  type: list
  elements: str
  sample: ["10.10.2.11:6783"]
removed:
  description: Addresses that were (or in check mode would be) forgotten.
  returned: success
  type: list
  elements: str
  sample: []
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.weft.mesh.plugins.module_utils.weft_api import (
    WeftApi,
    WeftApiError,
    api_argument_spec,
    direct_targets,
    normalize_address,
)


def plan(current, wanted, state, exclusive):
    """(added, removed) that turn the direct targets ``current`` into what ``state``/``exclusive`` ask for."""
    if state == "absent":
        return [], [a for a in wanted if a in current]
    added = [a for a in wanted if a not in current]
    removed = [a for a in current if a not in wanted] if exclusive else []
    return added, removed


def main():
    argument_spec = api_argument_spec()
    argument_spec.update(
        peers=dict(type="list", elements="str", required=True),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        exclusive=dict(type="bool", default=False),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    state, exclusive = module.params["state"], module.params["exclusive"]
    if exclusive and state == "absent":
        module.fail_json(msg="exclusive=true only makes sense with state=present")

    wanted = []
    for text in module.params["peers"]:
        try:
            address = normalize_address(text)
        except ValueError as exc:
            module.fail_json(msg=str(exc))
        if address not in wanted:
            wanted.append(address)

    api = WeftApi.from_module(module)
    try:
        before = direct_targets(api.status())
        added, removed = plan(before, wanted, state, exclusive)
        after = sorted((set(before) - set(removed)) | set(added))
        if (added or removed) and not module.check_mode:
            if exclusive:
                # One call, so the agent never runs with only part of the new list.
                api.connect(wanted, replace=True)
            elif added:
                api.connect(added)
            else:
                api.forget(removed)
            after = direct_targets(api.status())  # what the agent really holds now
    except WeftApiError as exc:
        module.fail_json(msg=str(exc))

    result = dict(changed=bool(added or removed), targets=after, added=added, removed=removed)
    if module._diff:
        result["diff"] = dict(
            before_header="direct targets",
            after_header="direct targets",
            before="".join(a + "\n" for a in before),
            after="".join(a + "\n" for a in after),
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()

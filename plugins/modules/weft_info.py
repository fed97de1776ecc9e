#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: weft_info
short_description: Read the status of the Weft agent on the host
version_added: 0.1.0
description:
  - Asks the Weft agent on the managed host for its status through the agent's control API and returns it as
    the fact C(weft) (C(ansible_facts.weft)) and as RV(weft).
  - The status is what C(weft status --json) prints; it says whether the agent is ready, which peers it knows
    and which connections it holds, and how traffic to each peer travels.
  - Never changes anything, so it is safe in check mode and as a health gate.
author:
  - Weft engineers (@weft)
options:
  ipam:
    description:
      - Also read the agent's address ring (C(weft status ipam --json)) into the C(ipam) key of the status.
      - Fails on an agent without address management (one that does not answer C(GET /status/ipam)).
    type: bool
    default: false
    version_added: 0.5.0
extends_documentation_fragment:
  - weft.mesh.api
  - ansible.builtin.action_common_attributes
  - ansible.builtin.action_common_attributes.facts
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  facts:
    support: full
  platform:
    platforms: posix
seealso:
  - module: weft.mesh.weft_peers
  - module: weft.mesh.weft_attach
"""

EXAMPLES = r"""
- name: Read the agent's status
  weft.mesh.weft_info:
  become: true

- name: Wait until the agent is ready
  weft.mesh.weft_info:
  register: weft_status
  until: weft_status is not failed and weft_status.weft.ready
  retries: 30
  delay: 2

- name: Read the address ring too
  weft.mesh.weft_info:
    ipam: true
  register: weft_status
  # weft_status.weft.ipam.peers: who owns how much of the range, and whether this agent reaches them

- name: Show the connections that are not encrypted
  ansible.builtin.debug:
    msg: "{{ ansible_facts.weft.connections | rejectattr('encrypted') | map(attribute='nickname') | list }}"
"""

RETURN = r"""
weft:
  description:
    - The agent's status, also set as the fact C(weft).
    - Keys not listed here may be added by newer agents.
  returned: success
  type: dict
  contains:
    version:
      description: Version of the running agent.
      type: str
      returned: success
      sample: 0.1.0
    ready:
      description: Whether the agent has finished starting (its API, listener and data plane are up).
      type: bool
      returned: success
      sample: true
    name:
      description: The agent's peer name (six hex bytes).
      type: str
      returned: success
      sample: "02:1f:aa:00:00:01"
    nickname:
      description: The human-friendly peer name (the hostname unless configured).
      type: str
      returned: success
      sample: dc1-a
    encryption:
      description: C(enabled) when the agent holds at least one mesh secret, else C(disabled).
      type: str
      returned: success
      sample: enabled
    loop_lag_s:
      description:
        - The most the agent's event loop ran late in the last 10 seconds (C(weft_event_loop_lag_seconds)). From
          a second on, the host gives the agent too little CPU; handshake and read deadlines allow for it.
      type: float
      returned: success, from agents that report it
      sample: 0.004
    peers:
      description: Every peer in this agent's view of the mesh (itself included), with the connections each reports.
      type: list
      elements: dict
      returned: success
      sample:
        - name: "02:1f:aa:00:00:01"
          nickname: dc1-a
          connections:
            - peer: "02:1f:aa:00:00:02"
              nickname: dc1-b
              address: "10.10.1.12:6783"
              outbound: true
              established: true
    connections:
      description:
        - This agent's connections. C(state) is C(pending), C(established) or C(relayed) (reached only
          through another peer); C(encrypted) is the control channel's; C(datapath) says which path carries
          traffic (C(fast), C(sleeve), C(relay) or C(down)), whether it is encrypted, its MTU and why a faster
          path is not used.
      type: list
      elements: dict
      returned: success
      sample:
        - peer: "02:1f:aa:00:00:02"
          nickname: dc1-b
          address: "10.10.1.12:6783"
          state: established
          encrypted: true
          datapath: {path: sleeve, encrypted: true, mtu: 1376, reason: not trusted}
    targets:
      description:
        - Addresses the agent dials, with their C(origin) (C(config), C(api) or C(discovered)) and C(state)
          (C(waiting), C(connecting), C(connected), C(retrying) or C(failed)).
      type: list
      elements: dict
      returned: success
      sample:
        - {address: "10.10.1.12:6783", origin: config, state: connected, last_error: null, next_try: null}
    ipam:
      description:
        - With O(ipam), the address ring as C(weft status ipam --json) prints it - C(range), C(default_subnet),
          C(init), C(state) (C(ready), C(awaiting consensus - K of Q peers)...), C(seed), C(tokens), C(peers) (per
          owner - C(name), C(nickname), C(addresses), C(share), C(in_use), C(free), C(ranges), C(reachable),
          C(ourself)), C(unreachable_ratio), C(allocations), C(pending), C(refused).
      type: dict
      returned: when O(ipam) is true
      sample:
        range: 10.32.0.0/12
        default_subnet: 10.32.0.0/12
        init: seed=02:1f:aa:00:00:01,02:1f:aa:00:00:02
        state: ready
        seed: ["02:1f:aa:00:00:01", "02:1f:aa:00:00:02"]
        tokens: 2
        peers:
          - {name: "02:1f:aa:00:00:01", nickname: dc1-a, addresses: 524288, share: 50.0, in_use: 1, free: 524286,
             ranges: 1, reachable: true, ourself: true}
        unreachable_ratio: 0.0
        allocations: [{address: 10.32.0.1/12, holder: web1, key: "netns:web1", interface: vwe3f2a91c0}]
        pending: 0
        refused: []
ansible_facts:
  description: Facts set by the module.
  returned: success
  type: dict
  contains:
    weft:
      description: The same status as RV(weft).
      type: dict
      returned: success
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.weft.mesh.plugins.module_utils.weft_api import (
    WeftApi,
    WeftApiError,
    api_argument_spec,
)


def main():
    argument_spec = api_argument_spec()
    argument_spec.update(ipam=dict(type="bool", default=False))
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    api = WeftApi.from_module(module)
    try:
        status = api.status()
        if not isinstance(status, dict):
            module.fail_json(msg="the agent's status is not a JSON object: %r" % (status,))
        if module.params["ipam"]:
            status["ipam"] = api.ipam_status()
    except WeftApiError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, weft=status, ansible_facts=dict(weft=status))


if __name__ == "__main__":
    main()

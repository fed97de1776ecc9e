#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: weft_attach
short_description: Put a container on the Weft overlay, or take it off
version_added: 0.1.0
description:
  - Asks the Weft agent on the managed host to attach a container (a network namespace) to the overlay, like
    C(weft attach), or to detach it, like C(weft detach).
  - Attaching gives the container an interface (O(ifname)) on the agent's bridge, with the addresses in
    O(cidrs), the overlay MTU and a multicast route; only what is missing is added.
  - Without O(cidrs), the agent allocates the container an address from its address ring (IPAM), in its default
    subnet; C(net:SUBNET) in O(cidrs) allocates one in that subnet. RV(addresses) says which. Attaching again
    keeps the address the container has.
  - The agent says whether it changed anything, so the module is idempotent.
author:
  - Weft engineers (@weft)
options:
  netns:
    description:
      - The container's network namespace, by name (as listed by C(ip netns list)).
      - Exactly one of O(netns) and O(pid) is required.
    type: str
  pid:
    description:
      - A process in the container's network namespace.
      - Exactly one of O(netns) and O(pid) is required.
    type: int
  ifname:
    description: Name of the interface inside the container.
    type: str
    default: ethwe
  cidrs:
    description:
      - Addresses with prefix length, like C(10.32.0.5/12), or C(net:SUBNET) (like C(net:10.40.0.0/16)) for an
        address the agent allocates in that subnet.
      - With O(state=present) and none, the agent allocates an address in its default subnet
        (C(ipalloc_default_subnet)); that needs an agent with address management.
      - With O(state=absent), only these addresses are removed (the interface goes when none remain); when
        empty, the whole interface is removed. C(net:) entries are for O(state=present) only.
    type: list
    elements: str
    default: []
  state:
    description: Whether the container should be on the overlay (with these addresses) or not.
    type: str
    choices: [present, absent]
    default: present
extends_documentation_fragment:
  - weft.mesh.api
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: partial
    details:
      - Check mode cannot ask the agent (attach and detach change things), so it looks at the container's
        interfaces with C(ip) (and C(nsenter) for O(pid)) and predicts from the interface and its addresses.
      - An allocation (no O(cidrs), or C(net:SUBNET)) is predicted as a change when the interface has no address
        in the subnet (the default one from C(weft status ipam)); the address it would get is not known.
      - It assumes an interface named O(ifname) of kind veth is the agent's, and it does not inspect what an
        attach would also repair (the MTU, the multicast route, the bridge port); a real run may report a
        change check mode did not predict.
  diff_mode:
    support: full
    details: The diff lists the interface's global addresses before and after.
  platform:
    platforms: linux
notes:
  - The agent must run with its data plane on (the C(datapath) setting); the module fails otherwise.
seealso:
  - module: weft.mesh.weft_info
"""

EXAMPLES = r"""
- name: Attach a container by the PID of its init process
  weft.mesh.weft_attach:
    pid: "{{ container_pid }}"
    cidrs: [10.32.1.5/12]

- name: Attach a network namespace with two addresses
  weft.mesh.weft_attach:
    netns: web1
    cidrs:
      - 10.32.1.6/12
      - fd00:32::6/64

- name: Attach a container with an address the agent allocates (IPAM)
  weft.mesh.weft_attach:
    netns: web2
  register: web2
  # web2.addresses: ["10.32.0.1/12"]

- name: Attach a container with an address allocated in another subnet of the range
  weft.mesh.weft_attach:
    netns: web3
    cidrs: [net:10.40.0.0/16]

- name: Take one address away (the interface stays while others remain)
  weft.mesh.weft_attach:
    netns: web1
    cidrs: [fd00:32::6/64]
    state: absent

- name: Detach the container completely
  weft.mesh.weft_attach:
    netns: web1
    state: absent
"""

RETURN = r"""
interface:
  description: The interface inside the container.
  returned: state is present and not check mode
  type: str
  sample: ethwe
host_interface:
  description: The host end of the veth pair, on the agent's bridge.
  returned: state is present and not check mode
  type: str
  sample: vwe3f2a91c0
mac:
  description: MAC address of the container's interface.
  returned: state is present and not check mode
  type: str
  sample: "a2:4e:10:7c:3b:01"
addresses:
  description:
    - Addresses on the container's interface afterwards, allocated ones included (in check mode, the predicted
      ones; an allocation not made yet is not among them).
  returned: success
  type: list
  elements: str
  sample: ["10.32.1.5/12"]
"""

import ipaddress
import json
import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.weft.mesh.plugins.module_utils.weft_api import (
    WeftApi,
    WeftApiError,
    api_argument_spec,
)

NETNS_RUN_DIR = "/run/netns"


NET_PREFIX = "net:"


def normalize_cidrs(module, cidrs):
    """The agent's canonical form (10.32.0.5/12, net:10.40.0.0/16); an address without a prefix length is refused,
    as the agent does, and so is a subnet with host bits set."""
    out = []
    for cidr in cidrs:
        cidr = cidr.strip()
        if cidr.startswith(NET_PREFIX):
            subnet = cidr[len(NET_PREFIX) :].strip()
            try:
                if "/" not in subnet:
                    raise ValueError
                text = NET_PREFIX + str(ipaddress.IPv4Network(subnet))
            except ValueError:
                try:
                    hint = ": did you mean %s%s?" % (NET_PREFIX, ipaddress.IPv4Network(subnet, strict=False))
                except ValueError:
                    hint = ""
                module.fail_json(
                    msg="invalid subnet %r: expected net:NETWORK/PREFIXLEN, e.g. net:10.40.0.0/16%s" % (cidr, hint)
                )
        else:
            try:
                if "/" not in cidr:
                    raise ValueError
                text = str(ipaddress.ip_interface(cidr))
            except ValueError:
                module.fail_json(
                    msg="invalid CIDR %r: expected ADDRESS/PREFIXLEN (e.g. 10.32.0.5/12) or net:SUBNET" % cidr
                )
        if text not in out:
            out.append(text)
    return out


def allocations(cidrs, default_subnet=None):
    """The subnets ``cidrs`` asks the agent to allocate in: each net: entry, or the default subnet when there are
    no entries at all (None when it is not known)."""
    if not cidrs:
        return [default_subnet]
    return [c[len(NET_PREFIX) :] for c in cidrs if c.startswith(NET_PREFIX)]


def _inside(address, subnet):
    try:
        return ipaddress.ip_interface(address).ip in ipaddress.ip_network(subnet)
    except (TypeError, ValueError):
        return False


class Inspector:
    """Reads a container's interface with iproute2, without changing anything (for check mode and diffs)."""

    def __init__(self, module, netns, pid, ifname):
        self.module, self.netns, self.pid, self.ifname = module, netns, pid, ifname

    def namespace_path(self):
        if self.netns is not None:
            return os.path.join(NETNS_RUN_DIR, self.netns)
        return "/proc/%d/ns/net" % self.pid

    def exists(self):
        return os.path.exists(self.namespace_path())

    def interface(self):
        """{'kind', 'addresses'} of the interface, None when it is absent; raises RuntimeError if unreadable."""
        ip = self.module.get_bin_path("ip")
        if ip is None:
            raise RuntimeError("the ip command (iproute2) is not installed")
        if self.netns is not None:
            cmd = [ip, "-n", self.netns, "-d", "-j", "addr", "show"]
        else:
            nsenter = self.module.get_bin_path("nsenter")
            if nsenter is None:
                raise RuntimeError("the nsenter command (util-linux) is not installed")
            cmd = [nsenter, "--net=" + self.namespace_path(), ip, "-d", "-j", "addr", "show"]
        rc, out, err = self.module.run_command(cmd)
        if rc != 0:
            raise RuntimeError("%s failed: %s" % (" ".join(cmd), err.strip() or out.strip()))
        try:
            links = json.loads(out or "[]")
        except ValueError:
            raise RuntimeError("cannot read the output of %s" % " ".join(cmd)) from None
        for link in links:
            if link.get("ifname") == self.ifname:
                return dict(
                    kind=(link.get("linkinfo") or {}).get("info_kind"),
                    addresses=[
                        str(ipaddress.ip_interface("%s/%s" % (a["local"], a["prefixlen"])))
                        for a in link.get("addr_info") or []
                        if a.get("scope") != "link" and "local" in a and "prefixlen" in a
                    ],
                )
        return None


def predict(module, inspector, state, cidrs, default_subnet=None):
    """(changed, addresses after) for check mode; fails where the real run would fail. An allocation (no cidrs,
    or net:SUBNET) changes something when the interface has no address in its subnet."""
    if not inspector.exists():
        if state == "absent":
            return False, []  # a namespace that is gone took its interface with it
        if inspector.netns is not None:
            what = "network namespace named %r" % inspector.netns
        else:
            what = "process with pid %d" % inspector.pid
        module.fail_json(msg="no %s" % what)
    link = inspector.interface()
    if state == "present":
        static = [c for c in cidrs if not c.startswith(NET_PREFIX)]
        subnets = allocations(cidrs, default_subnet)
        if link is None:
            return True, static
        if link["kind"] != "veth":
            module.fail_json(
                msg="the container already has an interface %r that weft did not create: "
                "remove it or attach with another ifname" % inspector.ifname
            )
        missing = [c for c in static if c not in link["addresses"]]
        unallocated = [s for s in subnets if not any(_inside(a, s) for a in link["addresses"])]
        return bool(missing or unallocated), link["addresses"] + missing
    if link is None or link["kind"] != "veth":
        return False, []
    if not cidrs:
        return True, []
    remaining = [a for a in link["addresses"] if a not in cidrs]
    return len(remaining) != len(link["addresses"]), remaining


def main():
    argument_spec = api_argument_spec()
    argument_spec.update(
        netns=dict(type="str"),
        pid=dict(type="int"),
        ifname=dict(type="str", default="ethwe"),
        cidrs=dict(type="list", elements="str", default=[]),
        state=dict(type="str", choices=["present", "absent"], default="present"),
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        mutually_exclusive=[("netns", "pid")],
        required_one_of=[("netns", "pid")],
        supports_check_mode=True,
    )
    p = module.params
    state, cidrs = p["state"], normalize_cidrs(module, p["cidrs"])
    if state == "absent" and any(c.startswith(NET_PREFIX) for c in cidrs):
        module.fail_json(
            msg="net: entries allocate an address: they are for state=present (give the address to remove)"
        )
    api = WeftApi.from_module(module)
    inspector = Inspector(module, p["netns"], p["pid"], p["ifname"])

    # Before: best effort, for the diff (a missing ip command must not stop a real attach).
    before = None
    if module._diff or module.check_mode:
        try:
            link = inspector.interface() if inspector.exists() else None
            before = link["addresses"] if link else []
        except RuntimeError as exc:
            if module.check_mode:
                module.fail_json(msg="check mode cannot inspect the container: %s" % exc)
            module.warn("cannot inspect the container for the diff: %s" % exc)

    try:
        if module.check_mode:
            api.status()  # the real run would need the agent: fail the same way when it is not there
            default_subnet = None
            if state == "present" and not cidrs:
                default_subnet = api.ipam_status().get("default_subnet")  # and its IPAM, to allocate
            changed, after = predict(module, inspector, state, cidrs, default_subnet)
            result = dict(changed=changed, addresses=after)
        else:
            body = dict(ifname=p["ifname"], cidrs=cidrs)
            body.update(dict(netns=p["netns"]) if p["netns"] is not None else dict(pid=p["pid"]))
            answer = api.attach(body) if state == "present" else api.detach(body)
            result = dict(changed=bool(answer.get("changed")), addresses=answer.get("addresses") or [])
            for key in ("interface", "host_interface", "mac"):
                if key in answer:
                    result[key] = answer[key]
    except (WeftApiError, RuntimeError) as exc:
        module.fail_json(msg=str(exc))

    if module._diff and before is not None:
        result["diff"] = dict(
            before_header="%s addresses" % p["ifname"],
            after_header="%s addresses" % p["ifname"],
            before="".join(a + "\n" for a in before),
            after="".join(a + "\n" for a in result["addresses"]),
        )
    module.exit_json(**result)


if __name__ == "__main__":
    main()

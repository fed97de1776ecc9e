"""What attach, detach, expose and hide ask of IPAM: which addresses a request means, and who holds them.

A request's CIDRs are read as: nothing (an address from the default subnet), ``net:SUBNET`` (an address from that
subnet of the range), an address inside the range (a claim: refused if another container holds it) or one outside
it (not IPAM's: the ARP probe alone guards it, as before). The holder is keyed stably, so asking twice gives the
same address: a named namespace by its name, a PID by its network namespace's inode, the host itself as ``host``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from weft.addresses import AddressError, overlay_cidr
from weft.ipam.bootstrap import BootstrapError, parse_range
from weft.ipam.service import Ipam
from weft.ipam.space import Allocation, Subnet

log = logging.getLogger(__name__)

HOST_KEY = "host"
SUBNET_PREFIX = "net:"


class HolderError(Exception):
    """A request IPAM cannot serve; one line for the operator."""


@dataclass
class Wanted:
    subnets: list[Subnet] = field(default_factory=list)  # an address from each
    claims: list[ipaddress.IPv4Interface] = field(default_factory=list)  # these, reserved in the ring
    unmanaged: list[str] = field(default_factory=list)  # outside the range: used as given


KEY_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@=+-]{0,199}$")


def given_key(body: dict[str, Any]) -> str | None:
    """A key the caller chose (the CNI plugin: its container ID), checked; None if it gave none."""
    key = body.get("key")
    if key is None:
        return None
    if not isinstance(key, str) or not KEY_CHARS.match(key) or key == HOST_KEY:
        raise HolderError("'key' must be 1-200 characters of letters, digits and _ . : / @ = + -")
    return key


def holder(body: dict[str, Any]) -> tuple[str, str]:
    """(key, label) of the container a request names; the caller has checked it names exactly one."""
    netns, pid = body.get("netns"), body.get("pid")
    key = given_key(body)
    if key is not None:
        return key, str(netns) if netns is not None else key
    if netns is not None:
        return f"netns:{netns}", str(netns)
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        raise HolderError(f"no process with pid {pid} (has the container exited?)") from None
    return f"netns-inode:{st.st_dev}:{st.st_ino}", f"pid {pid}"


def wanted(cidrs: list[str], ipam: Ipam) -> Wanted:
    want = Wanted()
    universe = ipam.universe
    for text in cidrs:
        if text.startswith(SUBNET_PREFIX):
            try:
                subnet = parse_range(text[len(SUBNET_PREFIX) :], "subnet")
            except BootstrapError as exc:
                raise HolderError(str(exc)) from None
            if not (universe.lo <= subnet.lo and subnet.hi <= universe.hi):
                raise HolderError(f"subnet {subnet} is outside the allocation range {universe} (ipalloc_range)")
            want.subnets.append(subnet)
            continue
        try:
            iface = overlay_cidr(text)
        except AddressError as exc:
            raise HolderError(str(exc)) from None
        if isinstance(iface, ipaddress.IPv4Interface) and universe.contains(int(iface.ip)):
            want.claims.append(iface)
        else:
            want.unmanaged.append(str(iface))
    if not cidrs:
        want.subnets.append(ipam.default_subnet)
    return want


async def reserve(ipam: Ipam, key: str, label: str, want: Wanted) -> tuple[list[str], bool]:
    """Allocate and claim what ``want`` asks for; (the CIDRs to give, whether IPAM reserved every one of them).

    All or nothing: when one part is refused, what this call reserved is released and HolderError says why.
    """
    held_before = set(ipam.holdings(key))
    cidrs: list[str] = []
    reserved = True
    try:
        for subnet in want.subnets:
            cidr = await _wait(lambda done, s=subnet: ipam.allocate(key, s, label, done))
            cidrs.append(cidr)
        for iface in want.claims:
            cidr = await _wait(
                lambda done, i=iface: ipam.claim(key, int(i.ip), i.network.prefixlen, label, done), lenient=True
            )
            if cidr is None:
                reserved = False
                cidrs.append(str(iface))
            else:
                cidrs.append(cidr)
    except HolderError:
        release(ipam, key, held_before)
        raise
    cidrs += want.unmanaged
    return cidrs, reserved and not want.unmanaged


def release(ipam: Ipam, key: str, keep: set[str]) -> None:
    """Free what ``key`` holds beyond ``keep`` (what a failed request reserved)."""
    extra = [c for c in ipam.holdings(key) if c not in keep]
    if extra:
        ipam.free(key, [int(ipaddress.ip_interface(c).ip) for c in extra])


async def _wait(start: Callable[[Callable[[str | None, str | None], None]], None], lenient: bool = False) -> Any:
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[tuple[str | None, str | None]] = loop.create_future()

    def done(cidr: str | None, reason: str | None) -> None:
        if not answer.done():
            answer.set_result((cidr, reason))

    start(done)
    cidr, reason = await answer
    if reason is not None:
        raise HolderError(reason)
    if cidr is None and not lenient:
        raise HolderError("no address was allocated")
    return cidr


def alive_check(link_exists: Callable[[str], bool], host_addresses: Callable[[], list[str]]) -> Callable[..., bool]:
    """Whether an allocation's holder is still there: its veth exists, or (the host's) the bridge holds it."""
    held: list[str] | None = None

    def alive(address: int, allocation: Allocation) -> bool:
        nonlocal held
        if allocation.key == HOST_KEY:
            if held is None:
                held = host_addresses()
            return allocation.cidr(address) in held
        return allocation.host_ifname is not None and link_exists(allocation.host_ifname)

    return alive


FOUND_CLAIM_WAIT = 120.0  # a container found attached at start waits this long for its address's owner to be met


def claim_found(ipam: Ipam, found: list[tuple[str, str, list[str]]]) -> None:
    """Reserve the addresses of containers found attached at start that the store does not know (attached by a
    release without IPAM, or before the state dir was lost), so nobody else is given them. An address owned by
    another peer is asked of it once it is reachable."""
    for netns, host_ifname, cidrs in found:
        key = f"netns:{netns}"
        held = set(ipam.holdings(key))
        for cidr in cidrs:
            iface = ipaddress.ip_interface(cidr)
            if cidr in held or not isinstance(iface, ipaddress.IPv4Interface):
                continue
            if not ipam.universe.contains(int(iface.ip)):
                continue

            def done(got: str | None, reason: str | None, cidr: str = cidr, key: str = key, host: str = host_ifname):
                if got is not None:
                    ipam.attached(key, host)
                    log.info("IPAM: reserved %s, found on container %s at start", got, key)
                else:
                    log.warning("IPAM: could not reserve %s, found on container %s at start: %s", cidr, key, reason)

            ipam.claim(
                key, int(iface.ip), iface.network.prefixlen, netns, done, lenient=False, patience=FOUND_CLAIM_WAIT
            )


OverlayCall = Callable[[str, dict[str, Any], list[str], bool], Awaitable[dict]]


async def carry_out(ipam: Ipam, overlay: OverlayCall, action: str, body: dict[str, Any], cidrs: list[str]) -> dict:
    """An overlay request with IPAM in the loop: addresses reserved before an attach or expose (released if it
    fails), freed after a detach or hide. ``overlay(action, body, cidrs, probe)`` does the data-plane part."""
    if action in ("attach", "detach"):
        one = (body.get("netns") is not None) != (body.get("pid") is not None)
        key, label = holder(body) if one else ("", "")
        if not key and action == "detach" and body.get("netns") is None and body.get("pid") is None:
            key = given_key(body) or ""  # the container is gone (CNI DEL without a namespace): free by key
            if key:
                freed = ipam.free(key)
                return {"changed": bool(freed), "addresses": freed, "key": key}
        if not key:
            return await overlay(action, body, cidrs, True)  # the data plane words the error
    else:
        key, label = HOST_KEY, "host"
    if action == "attach" and body.get("exclusive") is True and ipam.holdings(key):
        raise HolderError(
            f"the container already has an interface attached by weft ({', '.join(ipam.holdings(key))}): "
            "detach it first (a CNI ADD twice without a DEL)"
        )
    if action in ("attach", "expose"):
        held_before = set(ipam.holdings(key))
        began = time.perf_counter()
        given, reserved = await reserve(ipam, key, label, wanted(cidrs, ipam))
        log.debug("%s %s: IPAM %.2f ms", action, label, 1e3 * (time.perf_counter() - began))
        try:
            result = await overlay(action, body, given, not reserved)
        except BaseException:
            release(ipam, key, held_before)
            raise
        ipam.attached(key, result.get("host_interface") if action == "attach" else HOST_KEY)
        return {**result, "key": key}
    if action == "hide" and not cidrs:
        cidrs = ipam.holdings(key)
        if not cidrs:
            return {"changed": False, "addresses": []}
    result = await overlay(action, body, cidrs, True)
    addresses = None
    if cidrs:
        addresses = [int(ipaddress.ip_interface(c).ip) for c in cidrs if not c.startswith(SUBNET_PREFIX)]
    freed = ipam.free(key, addresses)
    if freed and not result["changed"]:
        result = {**result, "changed": True, "addresses": result.get("addresses") or freed}
    return {**result, "key": key}

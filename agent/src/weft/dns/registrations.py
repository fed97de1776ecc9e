"""What attach, detach, dns-add and dns-remove mean for names on this host.

A registration is a name for a container (its key, as IPAM keys it) or for addresses that are no container's
(``weft dns-add``, keyed by the name). Each is written to the store before it is put in the table, and at start the
agent registers again every one whose container is still attached, so names survive an agent restart. A named
network namespace's resolver is pointed at the agent (``/etc/netns/NAME/resolv.conf``, which ``ip netns exec``
shows as the namespace's ``/etc/resolv.conf``) unless it already has a resolv.conf that weft did not write.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from weft.dns import names
from weft.dns.persist import DnsStore, Registration
from weft.dns.service import Dns, container_key, parse_address

log = logging.getLogger(__name__)

STATIC_PREFIX = "name:"  # the key of a dns-add registration
NETNS_ETC = Path("/etc/netns")
RESOLV_HEADER = "# written by weft: this container's names are answered by its host's agent (docs/dns.md)\n"


class Registrations:
    def __init__(self, dns: Dns, store: DnsStore | None, *, address: str, netns_etc: Path = NETNS_ETC) -> None:
        self.dns = dns
        self.store = store
        self.address = address
        self.netns_etc = netns_etc

    @property
    def domain(self) -> str:
        return self.dns.domain

    def settings(self) -> dict[str, Any]:
        """What a container's resolver needs (the CNI result's ``dns``, the API's answer)."""
        bare = self.domain.rstrip(".")
        return {"nameservers": [self.address], "domain": bare, "search": [bare]}

    # -- at start --------------------------------------------------------------------------------------------------

    def register_kept(self) -> int:
        """Register what the store holds, before any peer is met: a peer that still has our names from the last run
        then finds them current (not stale ones to take back). Returns how many."""
        if self.store is None:
            return 0
        count = 0
        for reg in self.store.load():
            try:
                self.dns.register(reg.key, reg.name, reg.addresses)
                count += 1
            except ValueError as exc:  # e.g. the domain changed since: that name cannot be had any more
                log.warning("DNS: not registering %s again: %s", reg.name, exc)
                self.store.delete(reg.key, reg.name)
        return count

    def forget_gone(self, attached: Callable[[str], bool]) -> int:
        """Once the data plane can tell: remove the names of containers whose veth is gone (detached or deleted
        while the agent was down). Returns how many names are kept."""
        if self.store is None:
            return 0
        kept = 0
        for reg in self.store.load():
            if reg.host_ifname is not None and not attached(reg.host_ifname):
                self.dns.unregister(reg.key, reg.name)
                self.store.delete(reg.key, reg.name)
            else:
                kept += 1
        if kept:
            log.info("DNS: registered %d name(s) of this host's containers again", kept)
        return kept

    # -- containers ------------------------------------------------------------------------------------------------

    def fqdn(self, name: str) -> str:
        """The name a request asks for, checked; ValueError saying what is wrong."""
        fqdn = names.normalise(name, self.domain)
        if not names.in_domain(fqdn, self.domain):
            raise ValueError(f"{fqdn} is not in the domain {self.domain}: give a single label, like 'web'")
        return fqdn

    def attached(self, key: str, name: str | None, cidrs: Iterable[str], host_ifname: str | None) -> str | None:
        """A container was attached with ``cidrs``: its name (if any) gets their IPv4 addresses; the absolute name."""
        if not name:
            return None
        fqdn = self.fqdn(name)
        addresses = tuple(sorted({int(i.ip) for i in map(ipaddress.ip_interface, cidrs) if i.version == 4}))
        if not addresses:
            raise ValueError(f"{fqdn}: the container has no IPv4 address to give the name")
        for old in self._names_of(key):
            if old != fqdn:  # attached again under another name: the old one goes
                self.dns.unregister(key, old)
                if self.store is not None:
                    self.store.delete(key, old)
        reg = Registration(key, fqdn, addresses, host_ifname)
        if self.store is not None:
            self.store.save(reg)
        self.dns.register(key, fqdn, addresses)
        return fqdn

    def detached(self, key: str, addresses: Iterable[int] | None = None) -> list[str]:
        """A container was detached (``addresses``: only those of it): its names no longer have them."""
        gone = self.dns.unregister(key, None, addresses)
        if self.store is not None:
            for reg in self.store.load():
                if reg.key != key:
                    continue
                left = tuple(a for a in reg.addresses if addresses is not None and a not in set(addresses))
                if left:
                    self.store.save(Registration(reg.key, reg.name, left, reg.host_ifname))
                else:
                    self.store.delete(reg.key, reg.name)
        return sorted({e.name for e in gone})

    def _names_of(self, key: str) -> set[str]:
        return {e.name for e in self.dns.table.own(container_key(key))}

    # -- names that are no container's ------------------------------------------------------------------------------

    def add(self, name: str, addresses: Iterable[str]) -> tuple[str, list[str]]:
        """``weft dns-add``: ``name`` also has ``addresses`` (kept across restarts). (the name, its addresses)."""
        fqdn = self.fqdn(name)
        wanted = {parse_address(a) for a in addresses}
        if not wanted:
            raise ValueError("give at least one IPv4 address")
        key = STATIC_PREFIX + fqdn
        held = {e.address for e in self.dns.table.own(container_key(key), fqdn)}
        merged = tuple(sorted(held | wanted))
        if self.store is not None:
            self.store.save(Registration(key, fqdn, merged, None))
        self.dns.register(key, fqdn, merged)
        return fqdn, [str(ipaddress.IPv4Address(a)) for a in merged]

    def remove(self, name: str, addresses: Iterable[str] = ()) -> tuple[str, list[str]]:
        """``weft dns-remove``: ``name`` no longer has ``addresses`` (all of them if none given), whoever
        registered it on this host (a container's name too). (the name, the addresses removed)."""
        fqdn = self.fqdn(name)
        only = {parse_address(a) for a in addresses} or None
        removed: set[int] = set()
        mine = [e for e in self.dns.table.entries() if e.origin == self.dns.me and e.live and e.name == fqdn]
        for table_key in sorted({e.key for e in mine}):
            gone = self.dns.unregister(table_key, fqdn, only)
            removed |= {e.address for e in gone}
            if self.store is not None:
                for reg in self.store.load():
                    if container_key(reg.key) == table_key and reg.name == fqdn:
                        left = tuple(a for a in reg.addresses if only is not None and a not in only)
                        if left:
                            self.store.save(Registration(reg.key, fqdn, left, reg.host_ifname))
                        else:
                            self.store.delete(reg.key, fqdn)
        return fqdn, [str(ipaddress.IPv4Address(a)) for a in sorted(removed)]

    # -- the container's resolver ----------------------------------------------------------------------------------

    def point_resolver(self, netns: str) -> bool:
        """Write the named namespace's resolv.conf, unless one that weft did not write is there. True if written."""
        if not _safe_netns(netns):
            return False
        path = self.netns_etc / netns / "resolv.conf"
        text = f"{RESOLV_HEADER}nameserver {self.address}\nsearch {self.domain.rstrip('.')}\n"
        try:
            if path.exists() and not path.read_text().startswith(RESOLV_HEADER):
                return False
            if path.exists() and path.read_text() == text:
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".weft-tmp")
            tmp.write_text(text)
            tmp.replace(path)
            return True
        except OSError as exc:
            log.warning("DNS: cannot write %s: %s", path, exc)
            return False

    def unpoint_resolver(self, netns: str) -> None:
        """Remove the resolv.conf we wrote (and the directory, if that leaves it empty)."""
        if not _safe_netns(netns):
            return
        path = self.netns_etc / netns / "resolv.conf"
        with contextlib.suppress(OSError):
            if path.read_text().startswith(RESOLV_HEADER):
                path.unlink()
                path.parent.rmdir()


def _safe_netns(netns: str) -> bool:
    return bool(netns) and "/" not in netns and netns not in (".", "..") and "\0" not in netns

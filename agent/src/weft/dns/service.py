"""weaveDNS's table on the mesh: the ``dns`` gossip channel, registrations of this peer's containers, and answers.

Each peer holds every peer's entries (weft.dns.table) and answers from its own replica: a name's live addresses
whose origin is in its topology now. A change goes out at once as a delta of the entries it changed; the whole
table goes to a peer on connect and in anti-entropy. Tombstones are dropped 30 minutes after the removal, and the
entries of an origin out of the topology for 30 minutes with them (``PURGE_INTERVAL`` later at most).

The table persists nothing. A restarted agent registers its attached containers again (weft.dns.registrations keeps
what it registered), before its first connection so that its old entries, which peers send it on connect, meet the
new ones: what it no longer registers it answers with a tombstone (weft.dns.table, ``Table.answer``). Versions are
the wall clock in milliseconds, or one above the version they replace if that is higher, so a new run's entries
beat the old run's without any state kept; if the clock went back, the same answer corrects it (docs/dns.md,
"Table").

Input from peers is guarded: malformed gossip is a DecodeError (counted by the router in
``weft_decode_errors_total{kind="dns"}``); well-formed entries that are refused are counted one by one in
``weft_dns_refused_updates_total{reason}``: ``address`` (no container has such an address: loopback, link-local,
multicast, unspecified or reserved), ``ours`` (names this peer as origin but says other than it does), ``size``
(the table would grow past what one message carries).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from weft.dns import names
from weft.dns.table import MAX_ENTRIES, PURGE_AGE, Entry, Table, wins
from weft.dns.wire import KIND, MAX_KEY, DnsUpdate, check_key
from weft.mesh.clock import Handle
from weft.mesh.codec import DecodeError
from weft.mesh.peer import format_name
from weft.mesh.router import Router
from weft.metrics import Metrics

log = logging.getLogger(__name__)

CHANNEL = "dns"
PURGE_INTERVAL = 60.0  # how often tombstones and long-absent origins are looked for
LOG_AGAIN = 60.0  # the same refusal from the same peer is logged at most this often (it is counted every time)

# Addresses no container has; a name pointing at one would send clients to the host itself, or to a cloud's
# metadata service (169.254.169.254): an entry with one is refused.
_UNUSABLE = [
    (ipaddress.IPv4Network("0.0.0.0/8"), "an unspecified address"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "a loopback address"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "a link-local address"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "a multicast address"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "a reserved address"),
]


def unusable(address: int) -> str | None:
    """Why ``address`` can be no container's address, or None if it can."""
    ip = ipaddress.IPv4Address(address)
    return next((why for net, why in _UNUSABLE if ip in net), None)


def container_key(key: str) -> str:
    """The key an entry carries for a container: as given, or a digest of it when it is longer than the wire
    allows (a network namespace's name may be 255 characters). ValueError for an empty key or control characters."""
    if not isinstance(key, str) or not key:
        raise ValueError("a container key cannot be empty")
    if len(key) > MAX_KEY:
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return check_key(key)


def parse_address(address: int | str | ipaddress.IPv4Address) -> int:
    """An IPv4 address as the table holds it (an int), from an int, a string or an IPv4Address."""
    if isinstance(address, bool):
        raise ValueError(f"not an IPv4 address: {address!r}")
    try:
        return int(ipaddress.IPv4Address(address))
    except ValueError:
        raise ValueError(f"not an IPv4 address: {str(address)[:60]!r}") from None


class Dns:
    """The name table of this peer. ``wall`` is the wall clock (seconds) that versions are made from; every other
    time is the router's scheduler's."""

    def __init__(
        self,
        router: Router,
        metrics: Metrics,
        *,
        domain: str = names.DEFAULT_DOMAIN,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.me = router.ourself.name
        self.domain = names.domain_of(domain)
        self.table = Table(self.me)
        self.refusals: list[str] = []  # the latest, for status
        self._wall = wall
        self._logged: dict[tuple[str, int], float] = {}
        self._nicknames: dict[int, str] = {}  # of peers seen, for the origins that have left the topology since
        self._now = router.scheduler.now
        self.channel = router.new_channel(CHANNEL, self)
        router.topology_listeners.append(self._topology_changed)
        self._purge: Handle | None = router.scheduler.call_later(PURGE_INTERVAL, self._on_purge)

    def stop(self) -> None:
        if self._purge is not None:
            self._purge.cancel()
            self._purge = None

    # -- this peer's containers ------------------------------------------------------------------------------------

    def register(self, key: str, name: str, addresses: Iterable[int | str]) -> list[Entry]:
        """``name`` (a single label is put in the domain) has ``addresses``, for the container ``key``, besides what
        it had. Idempotent. Returns the live entries of those addresses. ValueError, changing nothing, for a name
        outside the domain or invalid, an address no container can have, or a full table."""
        key = container_key(key)
        fqdn = names.normalise(name, self.domain)
        if isinstance(addresses, (str, int)):
            addresses = [addresses]
        if not names.in_domain(fqdn, self.domain):
            raise ValueError(f"{fqdn} is not in the domain {self.domain}: only names in it can be registered")
        wanted = sorted({parse_address(a) for a in addresses})
        for address in wanted:
            why = unusable(address)
            if why is not None:
                raise ValueError(f"{ipaddress.IPv4Address(address)} is {why}: no container has one")
        new = sum(1 for a in wanted if self.table.get((self.me, key, fqdn, a)) is None)
        if len(self.table) + new > MAX_ENTRIES:
            raise ValueError(f"the name table holds {len(self.table)} entries, the most one message carries")
        wall_ms = self._wall_ms()
        changed = [e for e in (self.table.add(key, fqdn, a, wall_ms) for a in wanted) if e is not None]
        self._announce(changed)
        return [self.table.get((self.me, key, fqdn, a)) for a in wanted]  # type: ignore[misc]

    def unregister(
        self, key: str, name: str | None = None, addresses: Iterable[int | str] | None = None
    ) -> list[Entry]:
        """Remove the container's names (only ``name``, only ``addresses``, if given). Idempotent. Returns the
        tombstones made: none if nothing was registered."""
        key = container_key(key)
        fqdn = names.normalise(name, self.domain) if name is not None else None
        only = None if addresses is None else {parse_address(a) for a in addresses}
        wall_ms, now = self._wall_ms(), self._now()
        gone = []
        for entry in self.table.own(key, fqdn):
            if only is None or entry.address in only:
                tombstone = self.table.remove(entry.identity, wall_ms, now)
                if tombstone is not None:
                    gone.append(tombstone)
        self._announce(gone)
        return gone

    # -- answers ---------------------------------------------------------------------------------------------------

    def lookup(self, name: str) -> list[int]:
        """The addresses of ``name`` (a single label is looked up in the domain), in address order; none for a
        name that is not valid."""
        try:
            fqdn = names.normalise(name, self.domain)
        except ValueError:
            return []
        return self.table.lookup(fqdn, self.router.topology.peers)

    def reverse(self, address: int | str) -> list[str]:
        """The names of ``address`` (for PTR), absolute, in order."""
        return self.table.reverse(parse_address(address), self.router.topology.peers)

    def entries(self) -> list[Entry]:
        """Every entry held, live or not, answered or hidden (its origin out of the topology)."""
        return sorted(self.table.entries(), key=lambda e: (e.name, e.address, e.origin, e.key))

    # -- the gossiper ----------------------------------------------------------------------------------------------

    def gossip(self) -> DnsUpdate | None:
        # Only the entries of origins in our topology: a peer that sees an origin gone does not keep its entries
        # going round after every peer that saw it leave has dropped them.
        entries = self.table.entries(self.router.topology.peers)
        return DnsUpdate.of(entries, self.me, self._now) if entries else None

    def on_gossip(self, payload: bytes) -> DnsUpdate | None:
        return self._receive(DnsUpdate.decode(payload, self._now()))

    def on_gossip_broadcast(self, source: int, payload: bytes) -> DnsUpdate | None:
        return self._receive(DnsUpdate.decode(payload, self._now()))

    def on_gossip_unicast(self, source: int, payload: bytes) -> None:
        raise DecodeError(KIND, "the dns channel has no unicasts")

    def _receive(self, update: DnsUpdate) -> DnsUpdate | None:
        """Merge what a peer sent, entry by entry; return what was news (to pass on)."""
        now = self._now()
        news: list[Entry] = []
        answers: list[Entry] = []
        for entry in update.entries.values():
            if entry.origin == self.me:
                if self.table.contradicts(entry):
                    answer = None
                    if self.table.get(entry.identity) is not None or len(self.table) < MAX_ENTRIES:
                        # (a flood of forged identities fills the table with our tombstones up to the limit only)
                        answer = self.table.answer(entry, self._wall_ms(), now)
                    if answer is not None:
                        answers.append(answer)
                    self._refuse_ours(update.sender, entry, answer)
                continue
            why = unusable(entry.address)
            if why is not None:
                self._refuse(
                    "address",
                    update.sender,
                    f"DNS: refusing {_text(entry)} from {self._label(entry.origin)}, sent by "
                    f"{self._label(update.sender)}: it is {why}, which no container has",
                )
                continue
            mine = self.table.get(entry.identity)
            if entry.tombstone is not None and now - entry.tombstone >= PURGE_AGE:
                # A tombstone already past its purge age: it still ends what it beats, and is forgotten at once.
                if mine is not None and wins(entry, mine):
                    self.table.drop(entry.identity)
                continue
            if mine is None and len(self.table) >= MAX_ENTRIES:
                self._refuse(
                    "size",
                    update.sender,
                    f"DNS: refusing new entries from {self._label(update.sender)}: the table holds {len(self.table)},"
                    " the most one message carries",
                )
                continue
            merged = self.table.merge(entry)
            if merged is not None:
                news.append(merged)
        self._announce(answers)
        return DnsUpdate.of(news, self.me, self._now) if news else None

    def _announce(self, changed: list[Entry]) -> None:
        if changed:
            self.channel.broadcast(DnsUpdate.of(changed, self.me, self._now))

    # -- forgetting ------------------------------------------------------------------------------------------------

    def _topology_changed(self) -> None:
        peers = self.router.topology.peers
        self.table.track(peers, self._now())
        self._nicknames.update((name, entry.nickname) for name, entry in peers.items())

    def _on_purge(self) -> None:
        self._purge = self.router.scheduler.call_later(PURGE_INTERVAL, self._on_purge)
        self.purge()

    def purge(self) -> list[Entry]:
        """Drop the tombstones and the long-absent origins' entries that are due (also done every minute)."""
        now = self._now()
        self.table.track(self.router.topology.peers, now)
        dropped = self.table.purge(now)
        held = self.table.origins()
        self._nicknames = {n: nick for n, nick in self._nicknames.items() if n in held}
        if dropped:
            log.debug("DNS: purged %d entries", len(dropped))
        return dropped

    # -- refusals ----------------------------------------------------------------------------------------------------

    def _refuse_ours(self, sender: int, entry: Entry, answer: Entry | None) -> None:
        said = "live" if entry.live else "removed"
        if answer is None and len(self.table) >= MAX_ENTRIES:
            outcome = f"not answered: the table holds {len(self.table)} entries, the most one message carries"
        elif answer is None:
            outcome = "its version cannot be outdone (forged at the maximum); it stands"
        elif answer.live:
            outcome = f"answered with ours at version {answer.version}"
        else:
            outcome = f"answered with a tombstone at version {answer.version}"
        self._refuse(
            "ours",
            sender,
            f"DNS: {_text(entry)} ({said}, version {entry.version}), sent by {self._label(sender)}, names this peer "
            f"as its origin but this peer does not say so (stale from before a restart or a purge, or forged): "
            f"{outcome}",
            level=logging.INFO if answer is not None else logging.ERROR,
        )

    def _refuse(self, reason: str, peer: int, message: str, level: int = logging.WARNING) -> None:
        self.metrics.dns_refused.labels(reason).inc()
        now = self._now()
        if now - self._logged.get((reason, peer), -LOG_AGAIN) >= LOG_AGAIN:
            self._logged[(reason, peer)] = now
            log.log(level, "%s", message)
            self.refusals = [*self.refusals[-4:], message]

    # -- status ----------------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        present = self.router.topology.peers
        now = self._now()
        origins = []
        totals = {"answered": 0, "hidden": 0, "tombstones": 0}
        for origin, entries in sorted(self.table.origins().items()):
            live = sum(1 for e in entries if e.live)
            tombstones = len(entries) - live
            shown = origin in present
            totals["answered" if shown else "hidden"] += live
            totals["tombstones"] += tombstones
            since = self.table.absent_since(origin)
            origins.append(
                {
                    "name": format_name(origin),
                    "nickname": self._nickname(origin),
                    "live": live,
                    "tombstones": tombstones,
                    "in_topology": shown,
                    "absent_for": None if shown or since is None else round(now - since, 1),
                    "ourself": origin == self.me,
                }
            )
        registered = [
            {"name": e.name, "address": str(ipaddress.IPv4Address(e.address)), "key": e.key}
            for e in sorted(self.table.entries({self.me}), key=lambda e: (e.name, e.address, e.key))
            if e.live
        ]
        return {
            "domain": self.domain,
            "entries": totals,
            "origins": origins,
            "registered": registered,
            "refused": list(self.refusals),
        }

    def update_metrics(self) -> None:
        self.metrics.dns_entries.set(self.table.shown(self.router.topology.peers))

    # -- helpers -----------------------------------------------------------------------------------------------------

    def _wall_ms(self) -> int:
        return int(self._wall() * 1000)

    def _nickname(self, peer: int) -> str:
        entry = self.router.topology.peers.get(peer)
        return entry.nickname if entry is not None else self._nicknames.get(peer, "")

    def _label(self, peer: int) -> str:
        nickname = self._nickname(peer)
        return f"{format_name(peer)}({nickname})" if nickname else format_name(peer)


def _text(entry: Entry) -> str:
    return f"{entry.name} -> {ipaddress.IPv4Address(entry.address)} (key {entry.key})"

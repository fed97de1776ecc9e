"""Allocate, claim and free on this peer: the ring says which ranges are ours, the space what is taken in them.

Every operation is idempotent per holder (the same key asking twice gets the same address), is written to the store
before it returns, and returns the ring tokens it changed (their free counts), for the caller to gossip. Nothing here
talks to other peers; weft.ipam.service does that.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace

from weft.ipam.persist import IpamStore
from weft.ipam.ring import Entry, Ring
from weft.ipam.space import Allocation, Space, Subnet


class ClaimRefused(Exception):
    """An address this peer owns that is not free for this holder: the message says who holds it."""


@dataclass(frozen=True, slots=True)
class Conflict:
    """A ring update that would give away an address we have allocated."""

    address: int
    allocation: Allocation
    new_owner: int


class Allocator:
    def __init__(self, me: int, universe: Subnet, store: IpamStore | None) -> None:
        self.me = me
        self.universe = universe
        self.ring: Ring | None = None
        self.space = Space(universe)
        self._store = store

    # -- reading -----------------------------------------------------------------------------------------------------

    def our_ranges(self) -> list[tuple[int, int]]:
        """Our ranges, one per token (a donation must stay inside one token's range)."""
        if self.ring is None:
            return []
        return [(lo, hi) for lo, hi, _t, e in self.ring.ranges() if e.owner == self.me]

    def held(self, key: str, subnet: Subnet | None = None) -> list[int]:
        return [a for a in self.space.held_by(key) if subnet is None or subnet.contains(a)]

    def owned(self) -> int:
        return sum(hi - lo for lo, hi in self.our_ranges())

    # -- local operations ------------------------------------------------------------------------------------------

    def allocate(self, key: str, subnet: Subnet, label: str) -> tuple[int, dict[int, Entry]] | None:
        """The holder's address in ``subnet`` (an existing one, else the lowest free of ours); None: no space here."""
        existing = self.held(key, subnet)
        if existing:
            return existing[0], {}
        address = self.space.lowest_free(self.our_ranges(), subnet)
        if address is None:
            return None
        return address, self._add(address, Allocation(key, subnet.prefixlen, label))

    def claim(self, key: str, address: int, prefixlen: int, label: str) -> dict[int, Entry] | None:
        """Give ``address`` (which must be ours) to the holder; None when it is not ours to give.

        Raises ClaimRefused when another holder has it, or it is a network or broadcast address.
        """
        current = self.space.allocations.get(address)
        if current is not None:
            if current.key != key:
                raise ClaimRefused(f"{_ip(address)} is already held by {current.label or current.key} on this host")
            return {}
        if address in self.universe.reserved():
            raise ClaimRefused(f"{_ip(address)} is the network or broadcast address of the range {self.universe}")
        if self.ring is None or self.ring.owner_of(address) != self.me:
            return None
        return self._add(address, Allocation(key, prefixlen, label))

    def free(self, key: str, addresses: list[int] | None = None) -> tuple[list[int], dict[int, Entry]]:
        """Release the holder's addresses (all, or those listed); returns what was freed."""
        gone = [a for a in self.space.held_by(key) if addresses is None or a in addresses]
        for address in gone:
            self.space.remove(address)
        tokens = self._free_counts(gone)
        if gone or tokens:
            self._commit(tokens=tokens, remove=gone)
        return gone, tokens

    def attached(self, key: str, host_ifname: str | None) -> None:
        """Remember the holder's veth: at the next start, an allocation whose veth is gone is freed."""
        changed = {}
        for address in self.space.held_by(key):
            allocation = self.space.allocations[address]
            if allocation.host_ifname != host_ifname:
                changed[address] = replace(allocation, host_ifname=host_ifname)
                self.space.add(address, changed[address])
        if changed:
            self._commit(add=changed)

    def _add(self, address: int, allocation: Allocation) -> dict[int, Entry]:
        self.space.add(address, allocation)
        tokens = self._free_counts([address])
        self._commit(tokens=tokens, add={address: allocation})
        return tokens

    def _free_counts(self, addresses: list[int]) -> dict[int, Entry]:
        """Re-count the free addresses of the tokens that hold ``addresses``; the tokens whose count changed."""
        ring = self.ring
        if ring is None:
            return {}
        changed: dict[int, Entry] = {}
        for token in {ring.token_at(a) for a in addresses} - {None}:
            assert token is not None
            if ring.entries[token].owner != self.me:
                continue
            entry = ring.set_free(token, self.space.free_count(token, ring.token_end(token)))
            if entry is not None:
                changed[token] = entry
        return changed

    def recount(self, tokens: Iterable[int | None] | None = None) -> dict[int, Entry]:
        """Our tokens re-counted (all of them, or those of ``tokens``), after a merge, a takeover or a start."""
        ring = self.ring
        if ring is None:
            return {}
        changed = {}
        wanted = ring.tokens() if tokens is None else sorted({t for t in tokens if t is not None})
        for token in wanted:
            entry = ring.entries.get(token)
            if entry is not None and entry.owner == self.me:
                new = ring.set_free(token, self.space.free_count(token, ring.token_end(token)))
                if new is not None:
                    changed[token] = new
        if changed:
            self._commit(tokens=changed)
        return changed

    # -- the ring ----------------------------------------------------------------------------------------------------

    def adopt(self, ring: Ring) -> dict[int, Entry]:
        """Take a whole ring as ours to start from (seeded, agreed, or learned from a peer)."""
        self.ring = ring.copy()
        self._commit(seed=ring.seed, tokens=dict(ring.entries))
        return self.recount()

    def conflicts(self, update: Ring) -> list[Conflict]:
        """Allocations of ours that merging ``update`` would hand to another owner."""
        ring = self.ring
        if ring is None:
            return []
        found = []
        for token, theirs in update.entries.items():
            mine = ring.entries.get(token)
            if theirs.owner == self.me or (mine is not None and not theirs > mine):
                continue
            end = min(ring.next_token(token), update.next_token(token))
            for address in self.space.allocated_in(token, end):
                found.append(Conflict(address, self.space.allocations[address], theirs.owner))
        return found

    def merge(self, update: Ring) -> dict[int, Entry]:
        """Merge a checked update (see :meth:`conflicts`); returns the tokens that changed here."""
        assert self.ring is not None
        changed = self.ring.merge(update)
        if changed:
            self._commit(tokens=changed)
        return changed

    def grant(self, lo: int, hi: int, to: int) -> dict[int, Entry]:
        assert self.ring is not None
        changed = self.ring.grant(lo, hi, to, self.me, self.space.free_count)
        self._commit(tokens=changed)
        return changed

    def take_over(self, dead: int) -> dict[int, Entry]:
        assert self.ring is not None
        changed = self.ring.take_over(dead, self.me)
        self._commit(tokens=changed)
        changed.update(self.recount())
        return changed

    def _commit(self, **changes: object) -> None:
        if self._store is not None:
            self._store.commit(**changes)  # type: ignore[arg-type]


def _ip(address: int) -> str:
    return str(ipaddress.IPv4Address(address))

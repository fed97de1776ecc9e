"""The addresses this peer has given out, and the arithmetic on the ranges it owns: free counts, the lowest free
address, the largest free run (what it can give to a peer that ran out).

Pure: the ranges come from the ring, the allocations from the allocator; nothing here does I/O.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Subnet:
    """A subnet of the allocation range, as integers: addresses ``[lo, hi)``, handed out with ``prefixlen``."""

    lo: int
    hi: int
    prefixlen: int

    @classmethod
    def parse(cls, network: ipaddress.IPv4Network) -> Subnet:
        return cls(int(network.network_address), int(network.broadcast_address) + 1, network.prefixlen)

    def __str__(self) -> str:
        return f"{ipaddress.IPv4Address(self.lo)}/{self.prefixlen}"

    def reserved(self) -> tuple[int, ...]:
        """Its network and broadcast addresses, which no container gets (a /31 or /32 has neither)."""
        return (self.lo, self.hi - 1) if self.prefixlen < 31 else ()

    def contains(self, address: int) -> bool:
        return self.lo <= address < self.hi

    def usable(self) -> int:
        return self.hi - self.lo - len(self.reserved())


@dataclass(frozen=True, slots=True)
class Allocation:
    """One address given to one holder. ``key`` names the holder stably (see weft.ipam.holders)."""

    key: str
    prefixlen: int
    label: str = ""  # what the operator called it: a netns name, a PID, "host"
    host_ifname: str | None = None  # the holder's veth on the bridge, once attached: gone means the holder is gone

    def cidr(self, address: int) -> str:
        return f"{ipaddress.IPv4Address(address)}/{self.prefixlen}"


class Space:
    """Allocations (address -> Allocation) and what is free around them, within ranges the caller names."""

    def __init__(self, universe: Subnet) -> None:
        self.universe = universe
        self.allocations: dict[int, Allocation] = {}
        self._sorted: list[int] = []

    def add(self, address: int, allocation: Allocation) -> None:
        if address not in self.allocations:
            bisect.insort(self._sorted, address)
        self.allocations[address] = allocation

    def remove(self, address: int) -> Allocation | None:
        allocation = self.allocations.pop(address, None)
        if allocation is not None:
            del self._sorted[bisect.bisect_left(self._sorted, address)]
        return allocation

    def held_by(self, key: str) -> list[int]:
        return [a for a, alloc in self.allocations.items() if alloc.key == key]

    def allocated_in(self, lo: int, hi: int) -> list[int]:
        return self._sorted[bisect.bisect_left(self._sorted, lo) : bisect.bisect_left(self._sorted, hi)]

    def free_count(self, lo: int, hi: int) -> int:
        """Addresses of ``[lo, hi)`` that a container could get (the range's own reserved addresses excluded)."""
        reserved = sum(1 for r in self.universe.reserved() if lo <= r < hi)
        return hi - lo - reserved - len(self.allocated_in(lo, hi))

    def lowest_free(self, ranges: Iterable[tuple[int, int]], subnet: Subnet) -> int | None:
        """The lowest address of ``ranges`` inside ``subnet`` that is neither allocated nor reserved."""
        reserved = set(self.universe.reserved()) | set(subnet.reserved())
        for lo, hi in sorted(ranges):
            lo, hi = max(lo, subnet.lo), min(hi, subnet.hi)
            if lo >= hi:
                continue
            address = lo
            for taken in self.allocated_in(lo, hi):
                while address < taken and address in reserved:
                    address += 1
                if address < taken:
                    return address
                address = taken + 1
            while address < hi and address in reserved:
                address += 1
            if address < hi:
                return address
        return None

    def free_runs(self, ranges: Iterable[tuple[int, int]], subnet: Subnet) -> list[tuple[int, int]]:
        """Runs ``[lo, hi)`` of addresses inside ``subnet`` that are neither allocated nor reserved."""
        reserved = sorted(set(self.universe.reserved()) | set(subnet.reserved()))
        runs: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            lo, hi = max(lo, subnet.lo), min(hi, subnet.hi)
            if lo >= hi:
                continue
            cuts = sorted({*self.allocated_in(lo, hi), *(r for r in reserved if lo <= r < hi)})
            start = lo
            for cut in cuts:
                if cut > start:
                    runs.append((start, cut))
                start = cut + 1
            if start < hi:
                runs.append((start, hi))
        return runs

    def donation(self, ranges: Iterable[tuple[int, int]], subnet: Subnet) -> tuple[int, int] | None:
        """What to give a peer that ran out in ``subnet``: the upper half of our largest free run there (all of a
        run of one), so we keep allocating from the bottom; None when we have nothing free in it."""
        runs = self.free_runs(ranges, subnet)
        if not runs:
            return None
        lo, hi = max(runs, key=lambda r: (r[1] - r[0], -r[0]))
        size = hi - lo
        give = max(1, size // 2)
        return hi - give, hi

"""The ring: who owns which part of the allocation range, replicated to every peer as a CRDT.

The range is cut at tokens. A token's range runs from it to the next token (the last one to the range's end), and
the token says who owns it, at which version, and how many addresses in it are free. Tokens are never removed, and
each token is merged on its own: the higher (version, owner, free) wins. Both are join operations, so merging is
commutative, associative and idempotent, and every address always has exactly one owner: the owner of the token at
or below it.

Only a token's owner changes it (bumping its version), so two owners never race for one token, with one exception:
``weft rmpeer``, which takes a dead peer's tokens over with a version far ahead. Two peers reclaiming the same peer
at once make the same version with different owners; the higher owner wins everywhere. What the loser may have
allocated meanwhile is guarded one level up (weft.ipam.allocator refuses a ring that would take an allocated address
away, and counts it).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

RECLAIM_VERSION_STEP = 100  # how far a reclaim's version jumps, so it beats the dead peer's last changes in flight
MAX_VERSION = (1 << 63) - 1  # what SQLite's INTEGER holds


@dataclass(frozen=True, slots=True, order=True)
class Entry:
    """One token's state. Field order is the merge order: version first, then the tie-breaks."""

    version: int
    owner: int
    free: int


class Ring:
    """Tokens over ``[start, end)``; ``seed`` names the peers the first ring was made for (sorted)."""

    __slots__ = ("_tokens", "end", "entries", "seed", "start")

    def __init__(self, start: int, end: int, seed: tuple[int, ...] = ()) -> None:
        if not start < end:
            raise ValueError("a ring needs a non-empty range")
        self.start = start
        self.end = end
        self.seed = seed
        self.entries: dict[int, Entry] = {}
        self._tokens: list[int] = []  # sorted keys of ``entries``

    # -- construction ------------------------------------------------------------------------------------------------

    @classmethod
    def seeded(cls, start: int, end: int, peers: Iterable[int]) -> Ring:
        """The first ring for ``peers``: the range cut into equal consecutive parts, one per peer in name order.

        Every peer given the same list computes the same ring, so a seeded mesh needs no agreement.
        """
        seed = tuple(sorted(set(peers)))
        if not seed:
            raise ValueError("a seed needs at least one peer")
        ring = cls(start, end, seed)
        size = end - start
        if size < len(seed):
            raise ValueError(f"a range of {size} addresses cannot be shared among {len(seed)} peers")
        cuts = [start + size * i // len(seed) for i in range(len(seed))] + [end]
        for i, peer in enumerate(seed):
            ring.put(cuts[i], Entry(1, peer, cuts[i + 1] - cuts[i]))
        return ring

    def copy(self) -> Ring:
        ring = Ring(self.start, self.end, self.seed)
        ring.entries = dict(self.entries)
        ring._tokens = list(self._tokens)
        return ring

    # -- reading -----------------------------------------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return not self.entries

    def tokens(self) -> list[int]:
        return list(self._tokens)

    def ranges(self) -> Iterator[tuple[int, int, int, Entry]]:
        """(start, end, token, entry) for every range, in address order. Addresses below the first token have no
        owner (a ring is only whole once its first token is at ``start``)."""
        tokens = self._tokens
        for i, token in enumerate(tokens):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else self.end
            yield token, nxt, token, self.entries[token]

    def owned_by(self, peer: int) -> list[tuple[int, int]]:
        """``peer``'s ranges, adjacent ones joined."""
        out: list[tuple[int, int]] = []
        for lo, hi, _token, entry in self.ranges():
            if entry.owner != peer:
                continue
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        return out

    def token_at(self, address: int) -> int | None:
        """The token whose range holds ``address``, or None outside the ring."""
        if not self.start <= address < self.end:
            return None
        i = bisect.bisect_right(self._tokens, address)
        return self._tokens[i - 1] if i else None

    def owner_of(self, address: int) -> int | None:
        token = self.token_at(address)
        return None if token is None else self.entries[token].owner

    def token_end(self, token: int) -> int:
        i = bisect.bisect_right(self._tokens, token)
        return self._tokens[i] if i < len(self._tokens) else self.end

    def next_token(self, address: int) -> int:
        """The first token above ``address``, or the range's end."""
        i = bisect.bisect_right(self._tokens, address)
        return self._tokens[i] if i < len(self._tokens) else self.end

    def owners(self) -> set[int]:
        return {e.owner for e in self.entries.values()}

    # -- changing ----------------------------------------------------------------------------------------------------

    def put(self, token: int, entry: Entry) -> None:
        if not self.start <= token < self.end:
            raise ValueError(f"token {token} is outside the ring")
        if token not in self.entries:
            bisect.insort(self._tokens, token)
        self.entries[token] = entry

    def merge(self, other: Ring) -> dict[int, Entry]:
        """Take every token of ``other`` that is new or wins; return those that changed here."""
        changed: dict[int, Entry] = {}
        for token, theirs in other.entries.items():
            mine = self.entries.get(token)
            if mine is None or theirs > mine:
                self.put(token, theirs)
                changed[token] = theirs
        return changed

    def merged_with(self, other: Ring) -> tuple[Ring, dict[int, Entry]]:
        """What :meth:`merge` would make, leaving this ring alone."""
        result = self.copy()
        return result, result.merge(other)

    def grant(self, lo: int, hi: int, to: int, by: int, free: Callable[[int, int], int]) -> dict[int, Entry]:
        """``by`` gives ``[lo, hi)``, inside one of its ranges, to ``to``; returns the tokens made or changed, and the
        token where the part given ends.

        ``free(lo, hi)`` counts the free addresses of a range after the grant (its owner knows its allocations).
        """
        token = self.token_at(lo)
        if token is None or self.entries[token].owner != by or hi > self.token_end(token) or lo >= hi:
            raise ValueError("can only grant part of a range one owns")
        end = self.token_end(token)
        changed: dict[int, Entry] = {}
        if hi < end:  # the part above what is given stays ours, under a token of its own
            changed[hi] = self._bump(hi, by, free=free(hi, end))
        else:
            # Unchanged, but sent along: the grantee may not have that token yet (a grant we made a moment ago, whose
            # answer it never got), and without it would take the addresses above it for its own as well. If that
            # range is already the grantee's, the same goes for the token that ends it, and so on, up to the first
            # range that is not the grantee's.
            after = end
            while after < self.end:
                changed[after] = self.entries[after]
                if self.entries[after].owner != to:
                    break
                after = self.token_end(after)
        if lo > token:
            changed[token] = self._bump(token, by, free=free(token, lo))
        changed[lo] = self._bump(lo, to, free=free(lo, hi))
        return changed

    def _bump(self, token: int, owner: int, *, free: int, step: int = 1) -> Entry:
        old = self.entries.get(token)
        version = min((old.version if old else 0) + step, MAX_VERSION)
        entry = Entry(version, owner, free)
        self.put(token, entry)
        return entry

    def set_free(self, token: int, free: int) -> Entry | None:
        """The owner reports a range's free count; None when it did not change."""
        old = self.entries[token]
        if old.free == free:
            return None
        return self._bump(token, old.owner, free=free)

    def take_over(self, dead: int, by: int) -> dict[int, Entry]:
        """Reclaim: every token of ``dead`` becomes ``by``'s, far enough ahead to beat whatever ``dead`` sent last."""
        changed = {}
        for token, entry in list(self.entries.items()):
            if entry.owner == dead:
                changed[token] = self._bump(token, by, free=entry.free, step=RECLAIM_VERSION_STEP)
        return changed

    def subset(self, tokens: Iterable[int]) -> Ring:
        """A ring holding only ``tokens`` (a delta)."""
        ring = Ring(self.start, self.end, self.seed)
        for token in tokens:
            ring.put(token, self.entries[token])
        return ring

"""``--ipalloc-init consensus[=N]``: the peers agree on who shares the first ring, by single-decree Paxos over gossip.

Each peer is acceptor and proposer. Its vote (what it promised, what it accepted) is its own entry, changed only by
itself and only upwards, so votes merge like the topology: the newer wins. Every peer runs the same step after each
merge: promise the highest proposal seen; a proposer whose proposal a quorum promised accepts a value (the value a
promiser accepted under the highest proposal, else every peer it has heard from); an acceptor accepts what its
promised proposer accepted. A value is chosen once a quorum accepted under one proposal. The first ring is then the
seeded ring of that value, which every peer computes alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from weft.mesh.codec import DecodeError, expect, expect_uint
from weft.mesh.peer import NAME_BITS

NONE = (0, 0)
MAX_VALUE = 4096


@dataclass(frozen=True, slots=True)
class Vote:
    """A peer's Paxos state; proposals are (round, proposer name), ordered as tuples."""

    node: int
    promise: tuple[int, int] = NONE
    accepted: tuple[int, int] = NONE
    value: tuple[int, ...] = ()

    def newer_than(self, other: Vote) -> bool:
        return (self.promise, self.accepted) > (other.promise, other.accepted)

    def to_wire(self) -> list:
        return [self.node, list(self.promise), list(self.accepted), list(self.value)]

    @classmethod
    def from_wire(cls, raw: object, kind: str) -> Vote:
        expect(raw, list, kind, "vote")
        if len(raw) != 4:
            raise DecodeError(kind, "vote must have 4 fields")
        node = expect_uint(raw[0], NAME_BITS, kind, "vote node")
        proposals = []
        for item in raw[1:3]:
            expect(item, list, kind, "proposal")
            if len(item) != 2:
                raise DecodeError(kind, "proposal must be [round, proposer]")
            round_ = expect_uint(item[0], 32, kind, "round")
            proposals.append((round_, expect_uint(item[1], NAME_BITS, kind, "proposer")))
        value = expect(raw[3], list, kind, "vote value")
        if len(value) > MAX_VALUE:
            raise DecodeError(kind, "vote value too long")
        names = tuple(expect_uint(v, NAME_BITS, kind, "vote value") for v in value)
        if node == 0 or 0 in names:
            raise DecodeError(kind, "name 0 is reserved")
        return cls(node, proposals[0], proposals[1], names)


class Consensus:
    """One peer's view of the vote. ``quorum`` peers must agree."""

    def __init__(self, me: int, quorum: int) -> None:
        self.me = me
        self.quorum = quorum
        self.votes: dict[int, Vote] = {me: Vote(me)}

    @property
    def mine(self) -> Vote:
        return self.votes[self.me]

    def merge(self, votes: dict[int, Vote]) -> dict[int, Vote]:
        """Take newer votes of others (ours is ours alone); return those that changed."""
        changed = {}
        for node, vote in votes.items():
            if node == self.me:
                continue
            mine = self.votes.get(node)
            if mine is None or vote.newer_than(mine):
                self.votes[node] = vote
                changed[node] = vote
        return changed

    def propose(self) -> Vote:
        """Start (or restart) a proposal above every round seen."""
        top = max(v.promise[0] for v in self.votes.values())
        self.votes[self.me] = replace(self.mine, promise=(top + 1, self.me))
        return self.step() or self.mine

    def step(self) -> Vote | None:
        """Advance our vote on what we know; the new vote (to gossip), or None when it did not change."""
        before = mine = self.mine
        highest = max(v.promise for v in self.votes.values())
        if highest > mine.promise:
            mine = replace(mine, promise=highest)
        if mine.accepted < mine.promise:
            proposer = mine.promise[1]
            if proposer == self.me:
                promised = [v for n, v in self.votes.items() if v.promise == mine.promise and n != self.me] + [mine]
                if len(promised) >= self.quorum:
                    prior = max(promised, key=lambda v: v.accepted)
                    value = prior.value if prior.accepted != NONE else tuple(sorted(self.votes))
                    mine = replace(mine, accepted=mine.promise, value=value)
            else:
                theirs = self.votes.get(proposer)
                if theirs is not None and theirs.accepted == mine.promise:
                    mine = replace(mine, accepted=theirs.accepted, value=theirs.value)
        self.votes[self.me] = mine
        return mine if mine != before else None

    def decided(self) -> tuple[int, ...] | None:
        """The chosen value: what a quorum accepted under one proposal."""
        counts: dict[tuple[int, int], int] = {}
        for vote in self.votes.values():
            if vote.accepted != NONE:
                counts[vote.accepted] = counts.get(vote.accepted, 0) + 1
        for proposal, count in counts.items():
            if count >= self.quorum:
                return next(v.value for v in self.votes.values() if v.accepted == proposal)
        return None

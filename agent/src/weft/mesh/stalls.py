"""How late this process's event loop runs: the time handshake and read deadlines do not count.

A handshake has a deadline so that a peer that stops answering does not hold a slot for long, and a connection one
so that a silent peer is noticed. On a starved host (every core busy, this agent given a sliver of one) the loop
itself runs seconds late: when a deadline fires, the peer's answer is already there, unread, and every handshake
with this host fails, and its connections end, for as long as that lasts. A hundred agents on two cores showed it:
the host all of them were told of ran its loop 6 to more than 20 s late, and most of the mesh never formed. A tick
every ``TICK`` seconds measures how late the loop runs; :class:`Deadline` keeps a deadline by the time the loop ran
on time, up to a ceiling.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

# Seconds between two looks at the loop. Deadlines are seconds long, and a stall that matters to one spans a look;
# ten looks a second were a few percent of a settled agent's CPU.
TICK = 0.5
WINDOW = 10.0  # the lag reported is the most the loop ran late over this long


class LoopStalls:
    """The loop's lateness, summed (``stalled``) and as the most of the last ``WINDOW`` seconds (``lag``)."""

    def __init__(self, tick: float = TICK) -> None:
        self.tick = tick
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._total = 0.0
        self._recent: deque[tuple[float, float]] = deque()  # (when, how late) of the ticks that ran late

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due = loop.time() + self.tick
        self._handle = loop.call_at(self._due, self._on_tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _on_tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        late = max(0.0, now - self._due)
        if late > 0.0:
            self._total += late
            self._recent.append((now, late))
        while self._recent and self._recent[0][0] < now - WINDOW:
            self._recent.popleft()
        self._due = now + self.tick
        self._handle = self._loop.call_at(self._due, self._on_tick)

    def stalled(self) -> float:
        """Seconds the loop has run late since it started, the lateness of the tick still due included."""
        if self._loop is None:
            return 0.0
        return self._total + max(0.0, self._loop.time() - self._due)

    def lag(self) -> float:
        """The most the loop ran late over the last ``WINDOW`` seconds (0 on a loop that keeps time)."""
        if self._loop is None:
            return 0.0
        now = self._loop.time()
        recent = max((late for when, late in self._recent if when >= now - WINDOW), default=0.0)
        return max(recent, now - self._due)


class Deadline:
    """``async with Deadline(seconds, stalls, most=...)``: TimeoutError once ``seconds`` have passed that the loop
    ran on time, and at ``most`` seconds in all however late it runs. Without ``stalls``, ``asyncio.timeout``.

    Built on ``asyncio.timeout`` with no deadline of its own: a timer looks at the loop's stalls when the deadline
    comes, and either moves on to the new one or lets the timeout expire. One timer per wait, as a plain timeout.
    """

    __slots__ = ("_handle", "_most", "_seconds", "_stalled", "_stalls", "_start", "_timeout")

    def __init__(self, seconds: float, stalls: LoopStalls | None, *, most: float = float("inf")) -> None:
        self._seconds, self._stalls, self._most = seconds, stalls, max(seconds, most)
        self._timeout = asyncio.timeout(None if stalls is not None else seconds)
        self._handle: asyncio.TimerHandle | None = None
        self._start = self._stalled = 0.0

    async def __aenter__(self) -> Deadline:
        await self._timeout.__aenter__()
        if self._stalls is not None:
            loop = asyncio.get_running_loop()
            self._start, self._stalled = loop.time(), self._stalls.stalled()
            self._handle = loop.call_at(self._start + self._seconds, self._check)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool | None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        return await self._timeout.__aexit__(kind, exc, tb)  # type: ignore[arg-type]

    def _check(self) -> None:
        assert self._stalls is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = min(self._start + self._seconds + self._stalls.stalled() - self._stalled, self._start + self._most)
        if now >= due:
            self._handle = None
            self._timeout.reschedule(now)  # expires now: the task is cancelled, the exit raises TimeoutError
        else:
            self._handle = loop.call_at(due, self._check)


async def within(aw: Awaitable[T], timeout: float, stalls: LoopStalls | None, *, most: float) -> T:
    """``aw``'s result, or TimeoutError once ``timeout`` seconds have passed that the loop ran on time (and at
    ``most`` seconds in all, however late it runs). Without ``stalls``, a plain deadline."""
    async with Deadline(timeout, stalls, most=most):
        return await aw

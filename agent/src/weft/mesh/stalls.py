"""How late this process's event loop runs: the time a handshake's deadline does not count.

A handshake has a deadline so that a peer that stops answering does not hold a slot for long. On a starved host
(every core busy, this agent given a sliver of one) the loop itself runs seconds late: when the deadline fires, the
peer's answer is already there, unread, and every handshake with this host fails, with every peer, for as long as
that lasts. A hundred agents on two cores showed it: the host all of them were told of answered in 6 to 14 s, and
a fifth of them never got in. A tick every ``TICK`` seconds measures how late the loop runs; :func:`within` keeps a
deadline by the time the loop ran on time, up to a ceiling.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

TICK = 0.1  # seconds between two looks at the loop: ten callbacks a second
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


async def within(aw: Awaitable[T], timeout: float, stalls: LoopStalls | None, *, most: float) -> T:
    """``aw``'s result, or TimeoutError once ``timeout`` seconds have passed that the loop ran on time (and at
    ``most`` seconds in all, however late it runs). Without ``stalls``, a plain deadline."""
    if stalls is None:
        return await asyncio.wait_for(aw, timeout)
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(aw)
    start, stalled = loop.time(), stalls.stalled()
    try:
        while True:
            deadline = min(start + timeout + stalls.stalled() - stalled, start + max(timeout, most))
            now = loop.time()
            if now >= deadline:
                raise TimeoutError
            await asyncio.wait((task,), timeout=deadline - now)
            if task.done():
                return task.result()
    finally:
        if not task.done():
            task.cancel()

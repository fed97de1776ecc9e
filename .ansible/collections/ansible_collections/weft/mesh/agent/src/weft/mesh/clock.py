"""Timers behind one small interface, so the same mesh code runs on asyncio or on a virtual clock."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Protocol


class Handle(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """What the mesh needs from time: the current time and callbacks later."""

    def now(self) -> float: ...

    def call_later(self, delay: float, fn: Callable[[], None]) -> Handle: ...


class AsyncioScheduler:
    """Real time, on the running asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def now(self) -> float:
        return self._loop.time()

    def call_later(self, delay: float, fn: Callable[[], None]) -> Handle:
        return self._loop.call_later(max(0.0, delay), fn)


class _VirtualHandle:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualScheduler:
    """A discrete-event clock: time jumps straight to the next callback. Used by the simulator."""

    def __init__(self) -> None:
        self._now = 0.0
        self._queue: list[tuple[float, int, _VirtualHandle, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_later(self, delay: float, fn: Callable[[], None]) -> Handle:
        handle = _VirtualHandle()
        heapq.heappush(self._queue, (self._now + max(0.0, delay), next(self._seq), handle, fn))
        return handle

    def run_until(self, done: Callable[[], bool], deadline: float, resolution: float = 0.0) -> bool:
        """Run callbacks in time order until ``done()`` or virtual ``deadline``; True if done.

        ``done`` is checked whenever the clock moves on by at least ``resolution`` (0: at every step),
        so an expensive check can be made cheap at the price of that much timing precision.
        """
        checked_at = self._now
        if done():
            return True
        while self._queue:
            when, _, handle, fn = heapq.heappop(self._queue)
            # Check before the clock jumps past a resolution step, so the reported time is not late.
            if when - checked_at >= resolution and when > self._now:
                checked_at = self._now
                if done():
                    heapq.heappush(self._queue, (when, next(self._seq), handle, fn))
                    return True
            if when > deadline:
                heapq.heappush(self._queue, (when, next(self._seq), handle, fn))
                break
            self._now = when
            if not handle.cancelled:
                fn()
        return done()

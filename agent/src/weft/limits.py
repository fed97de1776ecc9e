"""Staying up under floods: the process's file limit, per-episode logging, and accept errors.

Anyone who can reach a listener can open connections faster than the agent should log them, so a
refusal is counted per connection but logged once per episode. And if the process does run out of
files, asyncio's listeners back off for a second and report the error: that report becomes a metric
and one log line per episode instead of a traceback per listener per second.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from typing import Any

from weft.metrics import Metrics

log = logging.getLogger(__name__)

_OUT_OF_RESOURCES = {errno.EMFILE: "EMFILE", errno.ENFILE: "ENFILE", errno.ENOBUFS: "ENOBUFS", errno.ENOMEM: "ENOMEM"}


def raise_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (allowed without privileges); return (old, new)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
            return soft, soft
        return soft, hard
    return soft, soft


class Episode:
    """Log a condition once when it starts and once when it has been quiet for ``quiet`` seconds.

    ``hit`` is cheap and may be called for every connection of a flood.
    """

    def __init__(self, logger: logging.Logger, started: str, ended: str, quiet: float = 10.0) -> None:
        self._log = logger
        self._started, self._ended = started, ended
        self.quiet = quiet
        self.active = False
        self._count = 0
        self._since = 0.0
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def hit(self) -> None:
        now = time.monotonic()
        if not self.active:
            self.active, self._count, self._since = True, 0, now
            self._log.warning(self._started)
        self._count += 1
        self._last = now
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.quiet, self._check)

    def _check(self) -> None:
        self._timer = None
        now = time.monotonic()
        if now - self._last < self.quiet:
            self._timer = asyncio.get_running_loop().call_later(self.quiet - (now - self._last), self._check)
            return
        self.active = False
        self._log.warning("%s (%d in %.0fs)", self._ended, self._count, self._last - self._since)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def install_accept_error_handler(loop: asyncio.AbstractEventLoop, metrics: Metrics) -> None:
    """Turn asyncio's per-listener "accept() out of system resource" reports into a counter and an episode.

    asyncio already stops accepting on that listener for a second, so nothing spins; everything else goes
    to the handler that was there before.
    """
    previous = loop.get_exception_handler()
    episode = Episode(
        log,
        "the agent ran out of open files (or socket buffers) and cannot accept connections for now;"
        " see weft_accept_errors_total",
        "accepting connections again after running out of open files",
    )

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES and "accept" in context.get("message", ""):
            metrics.accept_errors.labels(_OUT_OF_RESOURCES[exc.errno]).inc()
            episode.hit()
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)

"""Floods are counted per event but logged once per episode; running out of files is one of them."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource

import pytest

from weft.limits import Episode, install_accept_error_handler, raise_file_limit
from weft.metrics import Metrics


def test_an_episode_logs_its_start_and_end_once(caplog: pytest.LogCaptureFixture) -> None:
    async def flood() -> None:
        episode = Episode(logging.getLogger("weft.test"), "flood started", "flood over", quiet=0.05)
        for _ in range(10_000):
            episode.hit()
        await asyncio.sleep(0.15)
        episode.hit()  # a second episode
        await asyncio.sleep(0.15)

    with caplog.at_level(logging.INFO, logger="weft.test"):
        asyncio.run(flood())
    messages = [r.getMessage() for r in caplog.records if r.name == "weft.test"]
    assert messages[0] == "flood started"
    assert messages[1].startswith("flood over (10000 in ")
    assert messages[2:] == ["flood started", messages[3]] and messages[3].startswith("flood over (1 in ")


def test_accept_out_of_files_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()

    async def emfile_storm() -> None:
        loop = asyncio.get_running_loop()
        install_accept_error_handler(loop, metrics)
        for _ in range(1000):  # what asyncio reports, per listener per second, while the process is out of files
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": OSError(errno.EMFILE, "Too many")}
            )

    with caplog.at_level(logging.DEBUG):
        asyncio.run(emfile_storm())
    assert metrics.registry.get_sample_value("weft_accept_errors_total", {"reason": "EMFILE"}) == 1000
    lines = [r for r in caplog.records if "open files" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING


def test_other_loop_errors_still_reach_the_log(caplog: pytest.LogCaptureFixture) -> None:
    async def other() -> None:
        loop = asyncio.get_running_loop()
        install_accept_error_handler(loop, Metrics())
        loop.call_exception_handler({"message": "something else broke", "exception": ValueError("x")})

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(other())
    assert any("something else broke" in r.getMessage() for r in caplog.records)


def test_the_soft_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        before, after = raise_file_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == after
        assert after == (hard if hard != resource.RLIM_INFINITY else before)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

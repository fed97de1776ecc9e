"""Shared fixtures for the agent's tests, in three directories:

- ``unit/``: no root and no namespaces (``make unit``);
- ``netns/``: real agents, links and namespaces (root); every test there is marked ``netns``;
- ``harness/``: the helpers both import (the ``lab`` fixture's Lab, workloads run in namespaces), on sys.path.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "harness"))  # `import lab` from any rootdir and test dir

from lab import Lab, netns_unavailable_reason

NETNS_DIR = Path(__file__).resolve().parent / "netns"

_LABS_KEY = pytest.StashKey[list[Lab]]()
_LOG_TAIL_LINES = 200


@functools.cache
def _skip_reason() -> str | None:
    """Probe once per session (it creates and deletes a namespace)."""
    return netns_unavailable_reason()


def pytest_configure(config: pytest.Config) -> None:
    """Make SIGTERM (CI cancel, `kill`) behave like Ctrl-C so lab teardown still runs.

    Python's default SIGTERM action skips finalizers and atexit, which would leak namespaces.
    """
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in netns/ or that uses the lab needs root and namespaces: tag it ``netns`` for -m selection."""
    for item in items:
        if item.path.is_relative_to(NETNS_DIR) or "lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.netns)


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """An empty Lab; call ``lab(n)`` for hosts. Always torn down, even on failure or Ctrl-C."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    the_lab = Lab()
    request.node.stash.setdefault(_LABS_KEY, []).append(the_lab)
    with the_lab:
        yield the_lab


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach each host's agent log to the report: the first thing anyone asks for."""
    report = yield
    if report.when == "call" and report.failed:
        for the_lab in item.stash.get(_LABS_KEY, []):
            for host in the_lab.hosts:
                log = host.agent_log()
                if log:
                    tail = "\n".join(log.splitlines()[-_LOG_TAIL_LINES:])
                    report.sections.append((f"weft agent log {host.name} ({host.netns})", tail))
    return report

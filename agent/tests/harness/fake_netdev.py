"""A stand-in for NetDev in tests that replace fdb.read and fdb.apply: batches run where they are called."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class InlineNetDev:
    def batch(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

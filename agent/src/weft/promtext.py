"""Counters and gauges with labels, and the Prometheus text format (0.0.4) they are scraped in.

The agent needs only these two kinds, counted in memory and rendered on a scrape: prometheus-client's import
(its exposition servers, WSGI and ASGI glue, multiprocess files, decorators) cost the agent about 3 MiB of
resident memory for that, so this module does the little it used of it. The text is the format's simplest form:
``# HELP`` and ``# TYPE`` lines, then one sample a line; a counter's samples carry the ``_total`` suffix.
Values may be set from any thread: each update holds its family's lock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple


class Sample(NamedTuple):
    name: str  # with the counter's _total suffix
    labels: dict[str, str]
    value: float


class Family(NamedTuple):
    name: str  # without the counter's _total suffix
    type: str  # counter or gauge
    documentation: str
    samples: list[Sample]


class Child:
    """One labelled series (or the only series of a family without labels)."""

    __slots__ = ("_lock", "value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        with self._lock:
            self.value += amount

    def set(self, value: float) -> None:
        with self._lock:
            self.value = float(value)


class _Family:
    kind = "untyped"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: Registry) -> None:
        if self.kind == "counter":
            name = name.removesuffix("_total")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], Child] = {}
        if not self.labelnames:
            self._children[()] = Child(self._lock)
        registry.register(self)

    def labels(self, *values: object) -> Child:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes {len(self.labelnames)} label(s), got {len(values)}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.setdefault(key, Child(self._lock))
        return child

    def clear(self) -> None:
        """Forget every labelled series (a family without labels keeps its one series)."""
        with self._lock:
            if self.labelnames:
                self._children.clear()

    def _only(self) -> Child:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels: use .labels(...)")
        return self._children[()]

    def samples(self) -> list[Sample]:
        suffix = "_total" if self.kind == "counter" else ""
        with self._lock:
            items = list(self._children.items())
        return [Sample(self.name + suffix, dict(zip(self.labelnames, key, strict=True)), c.value) for key, c in items]

    def collect(self) -> list[Family]:
        """This family with its samples now (as prometheus-client's metrics offer it)."""
        return [Family(self.name, self.kind, self.documentation, self.samples())]


class Counter(_Family):
    kind = "counter"

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)


class Gauge(_Family):
    kind = "gauge"

    def set(self, value: float) -> None:
        self._only().set(value)


# Families made at scrape time.
Collector = Callable[[], Iterable[Family]]


class Registry:
    """The families one agent reports (many agents may share a process, each with its own registry)."""

    def __init__(self) -> None:
        self._families: list[_Family] = []
        self._collectors: list[Collector] = []

    def register(self, family: _Family | Collector) -> None:
        if isinstance(family, _Family):
            self._families.append(family)
        else:
            self._collectors.append(family)

    def collect(self) -> Iterator[Family]:
        for family in self._families:
            yield from family.collect()
        for collector in self._collectors:
            yield from collector()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of the sample called ``name`` with exactly ``labels``, or None."""
        wanted = labels or {}
        for _, _, _, samples in self.collect():
            for sample, sample_labels, value in samples:
                if sample == name and sample_labels == wanted:
                    return value
        return None

    def render(self) -> bytes:
        out: list[str] = []
        for name, kind, documentation, samples in self.collect():
            shown = f"{name}_total" if kind == "counter" else name
            out.append(f"# HELP {shown} {_escape_help(documentation)}\n# TYPE {shown} {kind}\n")
            for sample, labels, value in samples:
                if labels:
                    pairs = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                    out.append(f"{sample}{{{pairs}}} {_number(value)}\n")
                else:
                    out.append(f"{sample} {_number(value)}\n")
        return "".join(out).encode()


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))

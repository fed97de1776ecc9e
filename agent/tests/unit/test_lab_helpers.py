"""The lab harness's pure helpers (harness/lab.py): waiting and reading metrics, with no namespace."""

from __future__ import annotations

import pytest
from lab import metric_value, wait_until


def test_wait_until_returns_value_and_reports_last_exception() -> None:
    calls = iter([0, None, 7])
    assert wait_until(lambda: next(calls), timeout=2, interval=0.01) == 7

    def boom() -> bool:
        raise ValueError("still broken")

    with pytest.raises(AssertionError, match=r"peer never came up.*still broken"):
        wait_until(boom, timeout=0.1, interval=0.02, message=lambda: "peer never came up")


def test_metric_value_sums_matching_samples() -> None:
    text = (
        "# TYPE weft_peers gauge\n"
        'weft_peers{state="up",proto="udp"} 2\n'
        'weft_peers{state="up",proto="tcp"} 1\n'
        'weft_peers{state="down",proto="udp"} 4\n'
        "# TYPE weft_rx_bytes counter\n"
        "weft_rx_bytes_total 10\n"
    )
    assert metric_value(text, "weft_peers") == 7
    assert metric_value(text, "weft_peers", state="up") == 3
    assert metric_value(text, "weft_peers", state="up", proto="tcp") == 1
    assert metric_value(text, "weft_rx_bytes") == 10  # counter without its _total suffix
    assert metric_value(text, "weft_rx_bytes_total") == 10
    assert metric_value(text, "weft_missing") == 0.0
    assert metric_value(text, "weft_peers", state="gone") == 0.0

"""Attaching a container: what is refused before the kernel is touched (netns/test_netdev.py does the rest)."""

from __future__ import annotations

import pytest

from weft.datapath.attach import AttachError, attach

BR = "weft"
MTU = 1450


def test_cidr_validation_needs_no_kernel() -> None:
    class NoKernel:
        def link(self, name: str) -> None:
            raise AssertionError("should fail before touching the kernel")

    with pytest.raises(AttachError, match="invalid CIDR 'x/24'"):
        attach(NoKernel(), bridge=BR, cidrs=["x/24"], mtu=MTU, netns="n")  # type: ignore[arg-type]

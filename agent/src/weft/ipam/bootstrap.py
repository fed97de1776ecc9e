"""How the first ring comes about (``--ipalloc-init``), and the range settings, parsed once for the config and the
allocator alike."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from weft.ipam.space import Subnet
from weft.mesh.peer import PeerNameError, format_name, parse_name

SEED = "seed"
CONSENSUS = "consensus"
OBSERVER = "observer"
DEFAULT_RANGE = "10.32.0.0/12"


class BootstrapError(ValueError):
    """An --ipalloc-init, --ipalloc-range or --ipalloc-default-subnet value that cannot work; says what would."""


@dataclass(frozen=True, slots=True)
class Init:
    """``mode`` with its ``seed`` (names) or ``count`` (consensus over that many peers; None: from the targets)."""

    mode: str
    seed: tuple[int, ...] = ()
    count: int | None = None

    def quorum(self, targets: int) -> int:
        """A majority of ``count`` peers, else of this peer and its configured targets."""
        n = self.count if self.count is not None else targets + 1
        return n // 2 + 1

    def __str__(self) -> str:
        if self.mode == SEED:
            return "seed=" + ",".join(format_name(n) for n in self.seed)
        if self.mode == CONSENSUS and self.count is not None:
            return f"consensus={self.count}"
        return self.mode


def parse_init(text: str | None) -> Init:
    """``seed=NAME,...``, ``consensus[=N]`` or ``observer``; none means consensus among the targets."""
    if text is None or not text.strip():
        return Init(CONSENSUS)
    text = text.strip()
    mode, _, arg = text.partition("=")
    if mode == SEED:
        try:
            names = tuple(sorted({parse_name(n) for n in arg.split(",") if n.strip()}))
        except PeerNameError as exc:
            raise BootstrapError(f"ipalloc_init {text!r}: {exc}") from None
        if not names:
            raise BootstrapError("ipalloc_init seed= needs at least one peer name, like seed=02:1f:aa:00:00:01")
        return Init(SEED, seed=names)
    if mode == CONSENSUS:
        if not arg:
            return Init(CONSENSUS)
        if not arg.isdigit() or int(arg) < 1:
            raise BootstrapError(f"ipalloc_init {text!r}: consensus=N needs a whole number of peers N >= 1")
        return Init(CONSENSUS, count=int(arg))
    if mode == OBSERVER and not arg:
        return Init(OBSERVER)
    raise BootstrapError(f"ipalloc_init {text!r}: expected seed=NAME,..., consensus[=N] or observer")


def parse_range(text: str, what: str = "ipalloc_range") -> Subnet:
    """An IPv4 subnet of at least 4 addresses, written with its host bits clear."""
    try:
        network = ipaddress.IPv4Network(text.strip())
    except ipaddress.AddressValueError:
        raise BootstrapError(f"{what} {text!r} is not an IPv4 subnet like {DEFAULT_RANGE}") from None
    except ValueError as exc:
        if "host bits set" in str(exc):
            fixed = ipaddress.IPv4Network(text.strip(), strict=False)
            raise BootstrapError(f"{what} {text!r} has host bits set: did you mean {fixed}?") from None
        raise BootstrapError(f"{what} {text!r} is not an IPv4 subnet like {DEFAULT_RANGE}") from None
    if network.prefixlen > 30:
        raise BootstrapError(f"{what} {text!r} is too small: give a /30 or larger")
    return Subnet.parse(network)


def parse_subnets(range_text: str, default_text: str | None) -> tuple[Subnet, Subnet]:
    """(the range, the default subnet); the default subnet must lie inside the range."""
    universe = parse_range(range_text)
    if default_text is None:
        return universe, universe
    default = parse_range(default_text, "ipalloc_default_subnet")
    if not (universe.lo <= default.lo and default.hi <= universe.hi):
        raise BootstrapError(f"ipalloc_default_subnet {default} is not inside ipalloc_range {universe}")
    return universe, default

"""Container ports accept only frames from the MACs attached to them: an nftables bridge table the agent owns.

A container can send frames with any source MAC. Were the bridge to accept them, it would deliver the victim's
traffic to the forger's port. So every frame entering a container port ("vwe...") is checked against a set of
allowed (port, MAC) pairs, filled from the static FDB entries attach puts on each port. Anything else is dropped
before the bridge learns or forwards it, and counted. A port the table does not know yet (a veth that came up an
instant before its static entry) drops everything, so the guard fails closed.

The forged pairs go into a dynamic set with per-element counters. The agent reads the table every five data-plane
intervals (a read costs about a millisecond) and logs a line per port at most once a minute, naming the port and the
forged MAC. The table stays when the agent stops (containers stay guarded while it restarts) and is replaced in one
transaction when it starts; `weft reset` removes it.

The agent drives nftables through libnftables in its own process (:class:`InProcessNft`) when the library is there:
the same commands as the `nft` program, without a process started for each (an attach waited for one).
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from weft.datapath.attach import HOST_PREFIX

__all__ = ["TABLE", "InProcessNft", "NftError", "PortGuard", "default_runner", "remove_table", "ruleset"]

log = logging.getLogger(__name__)

TABLE = "weft_portguard"
FAMILY = "bridge"
LOG_EVERY = 60.0  # seconds between log lines about one port
FORGED_SIZE = 4096  # (port, MAC) pairs remembered for the log; past that, frames are still dropped and counted
FORGED_TIMEOUT = "10m"
SONAME = "libnftables.so.1"
_PORT = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # names we can write into a ruleset unquoted-safe
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")

Runner = Callable[[list[str], "str | None"], str]


class NftError(Exception):
    """nft refused or could not run; the message is its first error line."""


def run_nft(args: list[str], script: str | None = None) -> str:
    """`nft ARGS` (with `-f -` and the script on stdin when given); returns stdout."""
    cmd = ["nft", *args] if script is None else ["nft", "-f", "-"]
    try:
        proc = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"cannot run nft: {exc}") from None
    if proc.returncode != 0:
        first = next((line for line in proc.stderr.splitlines() if line.strip()), f"exit code {proc.returncode}")
        raise NftError(f"nft: {first.strip()}")
    return proc.stdout


class InProcessNft:
    """A :data:`Runner` on libnftables, the library the `nft` program is made of: the same commands and scripts (a
    script is one transaction, as with `nft -f`), the same errors, no process per call.

    Its netlink socket belongs to the network namespace of the thread that first uses it: use it from the agent's
    event loop (or any one thread in the namespace whose nftables it is meant to change), one call at a time.
    """

    OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._ctx: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls) -> InProcessNft | None:
        """The runner, or None when libnftables cannot be loaded (run `nft` then)."""
        try:
            lib = cls._open()
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        except (OSError, AttributeError):
            return None
        return cls(lib)

    @staticmethod
    def _open() -> ctypes.CDLL:
        """The library by its soname, which the dynamic loader finds; else by whatever ldconfig knows it as
        (``ctypes.util`` imports shutil and tempfile and runs ldconfig: only when the soname is not there)."""
        try:
            return ctypes.CDLL(SONAME)
        except OSError:
            from ctypes.util import find_library

            return ctypes.CDLL(find_library("nftables") or SONAME)

    def __call__(self, args: list[str], script: str | None = None) -> str:
        as_json = "-j" in args
        command = script if script is not None else " ".join(a for a in args if a != "-j")
        lib = self._lib
        with self._lock:
            if self._ctx is None:
                ctx = lib.nft_ctx_new(0)
                if not ctx or lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
                    raise NftError("nft: cannot set up libnftables")
                self._ctx = ctx
            ctx = self._ctx
            flags = lib.nft_ctx_output_get_flags(ctx)
            lib.nft_ctx_output_set_flags(ctx, flags | self.OUTPUT_JSON if as_json else flags & ~self.OUTPUT_JSON)
            rc = lib.nft_run_cmd_from_buffer(ctx, command.encode())
            out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")  # each read empties it
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        if rc != 0:
            first = next((line for line in err.splitlines() if line.strip()), f"exit code {rc}")
            raise NftError(f"nft: {first.strip()}")
        return out

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None


def default_runner() -> Runner:
    """libnftables in this process if it loads, else the `nft` program."""
    return InProcessNft.load() or run_nft


def _pairs(allowed: Mapping[str, Collection[str]]) -> dict[str, frozenset[str]]:
    """Only ports this guard covers, with well-formed MACs; anything else never reaches a ruleset."""
    out: dict[str, frozenset[str]] = {}
    for port, macs in allowed.items():
        if port.startswith(HOST_PREFIX) and _PORT.match(port):
            out[port] = frozenset(m.lower() for m in macs if _MAC.match(m.lower()))
    return out


def _elements(pairs: Mapping[str, Collection[str]]) -> list[str]:
    return [f'"{port}" . {mac}' for port, macs in sorted(pairs.items()) for mac in sorted(macs)]


def ruleset(allowed: Mapping[str, Collection[str]]) -> str:
    """The whole table: container ports pass frames from their allowed MACs, and drop (and record) the rest."""
    elements = _elements(_pairs(allowed))
    init = f" elements = {{ {', '.join(elements)} }};" if elements else ""
    return f"""table {FAMILY} {TABLE} {{
    counter dropped {{ }}
    set allowed {{ type ifname . ether_addr;{init} }}
    set forged {{
        type ifname . ether_addr; size {FORGED_SIZE}; flags dynamic,timeout; timeout {FORGED_TIMEOUT}; counter;
    }}
    chain prerouting {{
        type filter hook prerouting priority -300; policy accept;
        iifname != "{HOST_PREFIX}*" accept
        iifname . ether saddr @allowed accept
        update @forged {{ iifname . ether saddr }}
        counter name "dropped" drop
    }}
}}
"""


def remove_table(run: Runner = run_nft) -> bool:
    """Delete the table (for `weft reset`); True if there was one."""
    try:
        run(["list", "table", FAMILY, TABLE], None)
    except NftError:
        return False  # none (or no nft at all, so none either)
    run(["delete", "table", FAMILY, TABLE], None)
    return True


class PortGuard:
    """Keeps the table equal to the attach state, and turns its counters into a metric and log lines."""

    def __init__(self, run: Runner = run_nft, *, log_every: float = LOG_EVERY) -> None:
        self._run = run
        self.log_every = log_every
        self.ports: dict[str, frozenset[str]] = {}  # what the table allows now
        self.dropped = 0  # frames dropped since this run started the table
        self._seen: dict[tuple[str, str], int] = {}  # (port, MAC) -> packets at the last poll
        self._logged: dict[str, float] = {}  # port -> when we last logged about it
        self._pending: dict[str, dict[str, int]] = {}  # port -> forged MAC -> frames not logged yet

    def start(self, allowed: Mapping[str, Collection[str]]) -> None:
        """Replace whatever table there is with a fresh one, atomically: no frame passes unchecked meanwhile."""
        pairs = _pairs(allowed)
        script = f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n{ruleset(pairs)}"
        self._run([], script)
        self.ports, self._seen, self.dropped = pairs, {}, 0

    def sync(self, allowed: Mapping[str, Collection[str]]) -> bool:
        """Change only the elements that differ; True if anything changed. Rebuilds the table if nft refuses."""
        want = _pairs(allowed)
        if want == self.ports:
            return False
        add = {p: macs - self.ports.get(p, frozenset()) for p, macs in want.items()}
        drop = {p: macs - want.get(p, frozenset()) for p, macs in self.ports.items()}
        cmds = [f"delete element {FAMILY} {TABLE} allowed {{ {e} }}" for e in _elements(drop)]
        cmds += [f"add element {FAMILY} {TABLE} allowed {{ {e} }}" for e in _elements(add)]
        try:
            if cmds:
                self._run([], "\n".join(cmds) + "\n")
            self.ports = want
        except NftError as exc:
            log.warning("port guard out of step (%s); rebuilding its table", exc)
            self.poll()
            self.start(want)
        for port in self._logged.keys() - want.keys():
            del self._logged[port]
        for port in self._pending.keys() - want.keys():
            del self._pending[port]
        return True

    def poll(self, now: float | None = None) -> None:
        """Read the counters: add new drops to the total, and log forged MACs per port, rate-limited."""
        now = time.monotonic() if now is None else now
        try:
            listing = json.loads(self._run(["-j", "list", "table", FAMILY, TABLE], None))
        except (NftError, ValueError) as exc:
            log.warning("cannot read the port guard's counters: %s", exc)
            return
        seen: dict[tuple[str, str], int] = {}
        for obj in listing.get("nftables", []):
            counter = obj.get("counter")
            if isinstance(counter, dict) and counter.get("name") == "dropped":
                self.dropped = max(self.dropped, _int(counter.get("packets")))
            forged = obj.get("set")
            if isinstance(forged, dict) and forged.get("name") == "forged":
                seen.update(_forged(forged.get("elem", [])))
        for key, packets in seen.items():
            before = self._seen.get(key, 0)
            rise = packets - before if packets >= before else packets  # the element expired and came back
            port, mac = key
            # A port not yet synced is a container still being attached: its first frames are dropped (and
            # counted) but are not a forgery to report, and must not use up the port's log line for the minute.
            if rise > 0 and port in self.ports and mac not in self.ports[port]:
                found = self._pending.setdefault(port, {})
                found[mac] = found.get(mac, 0) + rise
        self._seen = seen
        for port in sorted(self._pending):
            if now - self._logged.get(port, -self.log_every) < self.log_every:
                continue
            found = self._pending.pop(port)
            self._logged[port] = now
            own = ", ".join(sorted(self.ports.get(port, ()))) or "none attached"
            log.warning(
                "dropped frames with a forged source MAC on container port %s: %s (its own: %s)",
                port,
                ", ".join(f"{mac} x{n}" for mac, n in sorted(found.items())),
                own,
            )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _forged(elements: Any) -> dict[tuple[str, str], int]:
    """(port, MAC) -> packets, from `nft -j` set elements ({"elem": {"val": {"concat": [...]}, "counter": ...}})."""
    out: dict[tuple[str, str], int] = {}
    if not isinstance(elements, list):
        return out
    for item in elements:
        elem = item.get("elem") if isinstance(item, dict) else None
        if not isinstance(elem, dict):
            continue
        val = elem.get("val")
        concat = val.get("concat") if isinstance(val, dict) else None
        counter = elem.get("counter")
        if isinstance(concat, list) and len(concat) == 2 and isinstance(counter, dict):
            out[(str(concat[0]), str(concat[1]).lower())] = _int(counter.get("packets"))
    return out

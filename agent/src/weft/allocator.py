"""Keep the C allocator from fragmenting the heap with netlink's large, short-lived read buffers, and hand back what
starting left free.

pyroute2 reads every netlink reply through an asyncio datagram transport, which receives into a fresh
256 KiB buffer and shrinks it to the reply's size. glibc serves blocks of 128 KiB and up with mmap until
the first such block is freed; then it raises its mmap threshold past 256 KiB, and from there on every
receive buffer is cut from the heap and shrunk in place. The holes between the replies that live on are
too small for the next buffer, so the heap grew by tens of KB per attach or peer restart, for good.
A fixed threshold keeps those buffers in mmap, where freeing one returns it to the system at once.

Each thread that allocates while another holds the main arena's lock gets an arena of its own (up to 8 per core),
each with its own free pages and fragmentation; the agent's threads (forwarding workers, the netlink thread, the
loop's executor) allocate little and rarely at once, so ``limit_arenas`` caps them at two, before any thread starts.

The C library is the process's own (``ctypes.CDLL(None)``): ``ctypes.util.find_library`` would import shutil and
tempfile, most of a megabyte resident, to find a library that is loaded already.

Starting frees much (import-time objects, the first netlink dumps, the config's parsing), but glibc keeps freed heap
pages resident until something asks for them back: ``trim`` asks once the agent is up (about 1 MiB).
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter: the most arenas threads may share
ARENA_MAX = 2
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also turns off the dynamic adjustment
MMAP_THRESHOLD = 128 * 1024  # glibc's default, kept fixed


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)  # the process's own symbols: the C library it runs on
    except OSError:
        return None


def trim() -> bool:
    """Return the heap's free pages to the system (glibc's malloc_trim); False where there is no such call."""
    libc = _libc()
    malloc_trim = getattr(libc, "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return malloc_trim(0) == 1


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt; False (and nothing changed) on a C library without it, e.g. musl."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        log.debug("no mallopt in this C library: leaving the allocator's settings alone")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(param, value) == 1


def fix_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold; False where there is no mallopt."""
    return _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def limit_arenas(arenas: int = ARENA_MAX) -> bool:
    """Cap glibc's malloc arenas (before threads start: an arena made stays); False where there is no mallopt."""
    return _mallopt(M_ARENA_MAX, arenas)

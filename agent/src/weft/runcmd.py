"""``weft run``: the agent's flags, and its start.

The flags are read with argparse rather than click (see ``weft.cli``). Each is also a setting: the same name with
underscores in the config file, or WEFT_<NAME> in the environment; the config model (``weft.config``) checks them
all, whichever source they come from.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from weft import __version__

DESCRIPTION = """\
Run the agent in the foreground until SIGTERM; SIGHUP re-reads peers and secrets.

Every flag can also be set in the config file (same name, underscores) or as WEFT_<NAME>
(lists comma- or space-separated: WEFT_PEER="10.0.0.1 10.0.0.2"). Flags win over the
environment, the environment over the file.
"""


class _HelpFormat(argparse.RawDescriptionHelpFormatter):
    """argparse's own, 80 columns wide as click's help is: left to itself it asks for the terminal's width through
    shutil (which imports bz2, lzma and zlib), and it is made once for every flag as the parser is built."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=80)


def parser() -> argparse.ArgumentParser:
    """The flags of ``weft run``; every one defaults to None (unset: the environment, the file or the default)."""
    p = argparse.ArgumentParser(
        prog="weft run",
        usage="%(prog)s [options]  (weft run --help lists them)",
        description=DESCRIPTION,
        formatter_class=_HelpFormat,
        allow_abbrev=False,  # a flag is its whole name: a later flag must not change what a shortened one meant
    )
    add = p.add_argument
    add(
        "--config",
        dest="config_path",
        type=Path,
        default=os.environ.get("WEFT_CONFIG") or None,
        metavar="FILE",
        help="Config file (default /etc/weft/weft.yaml if it exists; also WEFT_CONFIG).",
    )
    add("--name", help="Peer name, like 02:1f:aa:00:00:01. Default: made once, kept in the state dir.")
    add("--nickname", help="Human-friendly peer name. Default: the hostname.")
    add("--listen", metavar="HOST:PORT", help="Control address. Default 0.0.0.0:6783.")
    add("--advertise", metavar="HOST[:PORT]", help="Where other peers should dial this one (NAT, public IP).")
    add("--peer", dest="peers", action="append", metavar="HOST[:PORT]", help="A peer to connect to. Repeatable.")
    add(
        "--secret-file",
        dest="secret_files",
        action="append",
        type=Path,
        metavar="FILE",
        help="File (mode 0600) holding a mesh secret. Repeatable: the first is offered, all accepted.",
    )
    add("--state-dir", type=Path, metavar="DIR", help="State directory. Default /var/lib/weft.")
    add("--api-socket", type=Path, metavar="PATH", help="Where to serve the control API. Default /run/weft/weft.sock.")
    add("--metrics-addr", metavar="HOST:PORT", help="For /metrics and read-only /status. Default 127.0.0.1:6782.")
    add(
        "--no-discovery",
        dest="discovery",
        action="store_false",
        default=None,
        help="Only connect to configured peers; do not dial peers learned from gossip.",
    )
    add("--resume", action="store_true", default=None, help="Also connect to the targets kept in the state dir.")
    add(
        "--datapath",
        action=argparse.BooleanOptionalAction,
        help="Run the data plane (bridge, fast path, sleeve). Default on.",
    )
    add("--bridge", metavar="NAME", help="Bridge name (its devices are named after it). Default weft.")
    add("--vxlan-port", type=int, metavar="PORT", help="UDP port of the kernel fast path (VXLAN). Default 6784.")
    add("--mtu", type=int, metavar="BYTES", help="Overlay MTU given to containers. Default 1376.")
    add(
        "--datapath-workers",
        type=int,
        metavar="N",
        help="Forwarding threads of the encrypted path, each on its own TAP queue and UDP socket (1-16). "
        "Default: the number of cores, at most 4. Needs a restart to change.",
    )
    add(
        "--trusted-subnet",
        dest="trusted_subnets",
        action="append",
        metavar="CIDR",
        help="Underlay subnet whose peers need no encryption: they use the fast path. Repeatable.",
    )
    add("--ipalloc-range", metavar="CIDR", help="Subnet containers get addresses from (IPAM). Default 10.32.0.0/12.")
    add(
        "--ipalloc-default-subnet",
        metavar="CIDR",
        help="Subnet of the range an attach with no address uses. Default: the whole range.",
    )
    add(
        "--ipalloc-init",
        metavar="MODE",
        help="How the first ring is made: seed=NAME,... (the same list on every peer: allocates at once), "
        "consensus[=N] (a majority of N peers agree; default N: this peer and its --peer targets) or observer "
        "(owns no space until it asks). Only shapes a first ring: a kept ring stands.",
    )
    add(
        "--dns",
        action=argparse.BooleanOptionalAction,
        help="Answer containers' DNS queries at --dns-address on the bridge (names in --dns-domain from the "
        "mesh's table, the rest from upstream servers). Default on.",
    )
    add("--dns-domain", metavar="DOMAIN", help="Domain of container names. Default weft.local.")
    add(
        "--dns-address",
        metavar="IP",
        help="Link-local address each host answers DNS at, on its bridge (169.254.53.53).",
    )
    add("--dns-ttl", type=int, metavar="SECONDS", help="TTL of the answers for container names. Default 30.")
    add(
        "--dns-upstream",
        dest="dns_upstream",
        action="append",
        metavar="IP[:PORT]",
        help="Server for names outside the domain. Repeatable. Default: those of /etc/resolv.conf.",
    )
    add("--log-level", choices=["debug", "info", "warning", "error"], help="Default info.")
    return p


def parse(argv: list[str]) -> tuple[Path | None, dict[str, Any]]:
    """The config file and the flags given (settings by name; a flag not given is None). Usage errors exit 2."""
    flags = vars(parser().parse_args(argv))
    return flags.pop("config_path"), flags


def run(argv: list[str]) -> NoReturn:
    """Start the agent with these flags and serve until it stops; a bad configuration is one line and exit 1."""
    from weft.footprint import keep_openssl_out, lean_stdlib

    keep_openssl_out()  # before anything imports asyncio or logging: see weft.footprint
    lean_stdlib()
    config_path, flags = parse(argv)

    import asyncio
    import logging
    import signal

    from weft.config import ConfigError, load_config
    from weft.safetext import EscapingFormatter
    from weft.store import StoreError

    early_reloads: list[int] = []  # a SIGHUP before the agent's loop runs must not kill it: keep it for later
    signal.signal(signal.SIGHUP, lambda signum, frame: early_reloads.append(signum))
    try:
        config = load_config(config_path, os.environ, flags)
    except ConfigError as exc:
        _fail(exc)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))  # one line each
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])
    # pyroute2's debug output is every netlink message, and importing it resets its logger's level: filter here.
    handler.addFilter(lambda record: record.levelno >= logging.WARNING or not record.name.startswith("pyroute2"))
    logging.getLogger("weft").info("starting weft %s (config %s)", __version__, config_path or "none")

    from weft.agent import Agent
    from weft.allocator import fix_mmap_threshold, limit_arenas

    fix_mmap_threshold()  # before the data plane's netlink traffic starts: see weft.allocator
    limit_arenas()  # before the agent's first thread
    try:
        agent = Agent(config, lambda: load_config(config_path, os.environ, flags), early_reloads)
        asyncio.run(agent.run())
    except (ConfigError, StoreError) as exc:
        _fail(exc)
    # Stopped in order: connections closed, threads joined, the state database closed, the kernel's state left as
    # it is. Tearing the interpreter down (its modules, one by one) would only hold up a restart: end here.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _fail(exc: Exception) -> NoReturn:
    sys.exit(f"Error: {exc}")

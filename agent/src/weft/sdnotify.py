"""Tell systemd the agent is ready (``Type=notify``), so ``systemctl reload`` never lands mid-start.

With ``Type=simple`` a unit counts as started the moment the process exists, and a reload sent then finds
an agent that has not yet set up its handlers. The protocol is one datagram to ``$NOTIFY_SOCKET``; outside
systemd the variable is unset and this does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd; True if there was a socket to send it to."""
    path = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # '@' names an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot tell systemd %s through %s: %s", state, path, exc)
        return False
    return True

"""Peer-supplied text is refused at decode time and escaped wherever it is written out."""

from __future__ import annotations

import io
import logging

import pytest

from weft.api import render
from weft.config import AgentConfig
from weft.mesh.codec import DecodeError
from weft.mesh.topology import PeerEntry
from weft.safetext import EscapingFormatter, escape, has_control, refuse_control

HOSTILE = "evil\n2030-01-01 WARNING forged\r\x1b[2J\x07\u202e"


def test_escape_makes_one_printable_line() -> None:
    out = escape(HOSTILE)
    assert out == "evil\\x0a2030-01-01 WARNING forged\\x0d\\x1b[2J\\x07\\u202e"
    assert not has_control(out)
    assert escape("plain h1 10.0.0.1:6783 ünïcode") == "plain h1 10.0.0.1:6783 ünïcode"


def test_refuse_control_names_the_character() -> None:
    with pytest.raises(ValueError, match="nickname contains a control character \\(U\\+000A\\)"):
        refuse_control("a\nb", "nickname")
    assert refuse_control("h1", "nickname") == "h1"


def test_log_lines_cannot_be_forged_through_arguments() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("weft.test.safetext")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connection established with %s", HOSTILE)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("with a traceback %s", "x\ny")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("WARNING connection established with evil\\x0a2030")
    assert lines[1] == "ERROR with a traceback x\\x0ay"
    assert lines[2].startswith("Traceback")  # our own traceback keeps its lines


def test_topology_refuses_control_characters_in_nicknames_and_addresses() -> None:
    with pytest.raises(DecodeError, match="nickname contains a control character"):
        PeerEntry.from_wire([0x020000000001, HOSTILE, 1, 1, []])
    with pytest.raises(DecodeError, match="connection address contains a control character"):
        PeerEntry.from_wire([0x020000000001, "h1", 1, 1, [[0x020000000002, "10.0.0.1:6783\n", True, True]]])


def test_status_output_escapes_every_string() -> None:
    status = {
        "peers": [
            {
                "name": "02:00:00:00:00:01",
                "nickname": HOSTILE,
                "connections": [
                    {
                        "outbound": True,
                        "address": "a\nb",
                        "peer": "02:00:00:00:00:02",
                        "nickname": HOSTILE,
                        "established": True,
                    }
                ],
            }
        ]
    }
    out = render.peers(status)
    assert "\x1b" not in out and "\r" not in out
    assert len(out.splitlines()) == 2


def test_our_own_nickname_is_checked_like_a_peers() -> None:
    with pytest.raises(ValueError, match="nickname contains a control character"):
        AgentConfig(nickname="h1\x1b[31m")
    assert AgentConfig(nickname="h1 ünïcode").nickname == "h1 ünïcode"

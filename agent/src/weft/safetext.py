"""Text that came from a peer, made safe to log and to print.

A peer chooses its nickname, its advertised address and much else that ends up in our logs and in
`weft status`. A newline there would forge a log line and an escape sequence would drive the operator's
terminal, so strings from the wire are checked once when they are decoded (``has_control``) and every
string is escaped again where it is written out (``escape``, ``EscapingFormatter``).
"""

from __future__ import annotations

import logging
import re

# C0 controls, DEL, C1 controls, and the Unicode characters that break or reorder a line on a terminal:
# line/paragraph separators and the bidirectional overrides and isolates.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def has_control(text: str) -> bool:
    """True if ``text`` holds a character that could change how a line of output looks or splits."""
    return _CONTROL.search(text) is not None


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: object) -> str:
    """``text`` as one printable line: control characters become visible ``\\xNN``/``\\uNNNN`` escapes.

    A backslash is left alone, so text that is already escaped stays readable.
    """
    value = str(text)
    return _CONTROL.sub(_escape_one, value) if has_control(value) else value


def refuse_control(text: str, what: str) -> str:
    """Return ``text`` if it has no control characters, else raise ValueError naming ``what``."""
    match = _CONTROL.search(text)
    if match is not None:
        raise ValueError(f"{what} contains a control character (U+{ord(match.group()):04X})")
    return text


class EscapingFormatter(logging.Formatter):
    """A formatter whose message part is always one line, whatever the arguments held.

    The traceback of a logged exception is our own text and keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


def escape_all(value: object) -> object:
    """A copy of decoded JSON (dicts, lists, strings) with every string escaped: status ready to print."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {escape_all(k): escape_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escape_all(v) for v in value]
    return value

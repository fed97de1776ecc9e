"""DNS names in one form everywhere: lower case, absolute (with the trailing dot), checked.

A single-label name (``web``) means that name in the domain (``web.weft.local.``); a name with a dot is taken as
given, made absolute (``web.example`` is ``web.example.``). Labels are 1-63 characters of ``a-z 0-9 - _``, and the
whole name at most 253 characters without its trailing dot. Anything else is a ValueError saying what is wrong.
"""

from __future__ import annotations

import re

DEFAULT_DOMAIN = "weft.local."
MAX_NAME = 253  # characters, without the trailing dot
MAX_LABEL = 63
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


def check(name: str) -> str:
    """``name`` if it is already in normal form (lower case, absolute, valid labels); ValueError otherwise. What a
    name from the wire must be."""
    if not isinstance(name, str):
        raise ValueError(f"a DNS name must be text, not {type(name).__name__}")
    if not name.endswith(".") or name == ".":
        raise ValueError(f"DNS name {name[:80]!r} is not absolute (it must end with a dot)")
    body = name[:-1]
    if len(body) > MAX_NAME:
        raise ValueError(f"DNS name {name[:40]!r}... is {len(body)} characters long; at most {MAX_NAME} are allowed")
    for label in body.split("."):
        if not _LABEL.fullmatch(label):
            raise ValueError(_label_problem(name, label))
    return name


def normalise(name: str, domain: str = DEFAULT_DOMAIN) -> str:
    """The absolute, lower-case form of ``name``: a single label is put in ``domain``."""
    if not isinstance(name, str):
        raise ValueError(f"a DNS name must be text, not {type(name).__name__}")
    text = name.strip().lower()
    if not text or text == ".":
        raise ValueError("a DNS name cannot be empty")
    if not text.endswith("."):
        text = f"{text}.{domain_of(domain)}" if "." not in text else text + "."
    return check(text)


def domain_of(domain: str) -> str:
    """The domain in normal form (``weft.local`` becomes ``weft.local.``)."""
    if not isinstance(domain, str):
        raise ValueError(f"a DNS domain must be text, not {type(domain).__name__}")
    text = domain.strip().lower()
    if not text or text == ".":
        raise ValueError("the DNS domain cannot be empty (the root cannot be Weft's)")
    return check(text if text.endswith(".") else text + ".")


def in_domain(name: str, domain: str) -> bool:
    """Whether the normalised ``name`` lies strictly inside the normalised ``domain``."""
    return name.endswith("." + domain) and len(name) > len(domain) + 1


def _label_problem(name: str, label: str) -> str:
    shown = name if len(name) <= 80 else name[:77] + "..."
    if not label:
        return f"DNS name {shown!r} has an empty label (two dots in a row, or a leading dot)"
    if len(label) > MAX_LABEL:
        return f"DNS name {shown!r} has a label of {len(label)} characters; at most {MAX_LABEL} are allowed"
    bad = next((c for c in label if not _LABEL.fullmatch(c)), "?")
    return f"DNS name {shown!r} has the character {bad!r}: labels may hold only a-z, 0-9, '-' and '_'"

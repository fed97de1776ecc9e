# -*- coding: utf-8 -*-
# Copyright: (c) 2026, Weft engineers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The agent role's pre-flight verdict over every host of the play, before any host is changed.

A misspelt or missing ``weft_secrets`` must not quietly turn a mesh into a plaintext one, so the role judges all
hosts at once, on the controller, and fails the whole play with one line saying what to do. In Python because
the rules (who lacks secrets, which variable looks like a misspelling of which) are worth unit tests.

Each host contributes a fact ``_weft_preflight`` that the role sets in that host's own variable scope (so role
defaults, play variables and role parameters count) and, once read from the host, ``_weft_host_secrets``: how
many secret files the host has now. Misspellings are looked for in ``hostvars`` (inventory and extra variables),
where a user's typo lives.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import difflib

from ansible.errors import AnsibleFilterError

ALLOW = "weft_allow_unencrypted"
SECRETS = "weft_secrets"
# How alike a name must be to a known one to count as its misspelling (difflib ratio; 'weft_secert' is 0.87).
CLOSE = 0.8


def _names(hosts):
    return ", ".join(hosts)


def _facts(hostvars, host):
    try:
        facts = hostvars[host].get("_weft_preflight")
    except KeyError:
        raise AnsibleFilterError("%r is not a host in the inventory" % (host,)) from None
    if not isinstance(facts, dict):
        raise AnsibleFilterError("%s has no pre-flight facts: run the role's validate tasks on it first" % (host,))
    return facts


def misspellings(variables, known):
    """Names in ``variables`` that look like the role's but are not known: {name: the known name it resembles}.

    Anything starting with "weft" (any case) counts; a name that resembles no known one maps to None.
    """
    known = sorted(set(known))
    found = {}
    for name in variables:
        name = str(name)
        if not name.lower().startswith("weft") or name in known:
            continue
        close = difflib.get_close_matches(name.lower(), known, 1, CLOSE)
        found[name] = close[0] if close else None
    return found


def preflight_problems(hosts, hostvars, known=()):
    """Judge every host of the play: {'errors': [one line each], 'warnings': [one line each]}.

    Errors, in order: hosts without secrets that do not allow a plaintext mesh (naming variables that look
    like a misspelt weft_secrets); hosts that have secret files now and would lose them all without that flag;
    hosts with bad secrets; variables that look like a misspelling of a role variable the host does not set.
    Warnings: hosts about to drop their secrets because the flag allows it; other unknown weft_* variables.
    """
    hosts = list(hosts)
    facts = dict((h, _facts(hostvars, h)) for h in hosts)
    present = [h for h in hosts if facts[h].get("present", True)]
    unset = [h for h in present if not int(facts[h].get("secrets", 0))]
    allowed = [h for h in unset if facts[h].get("allow_unencrypted")]
    refused = [h for h in unset if h not in allowed]
    # What the hosts have now (known once the role has read them): some secrets to none is the dangerous move.
    losing = [h for h in unset if int(hostvars[h].get("_weft_host_secrets") or 0) > 0]

    typos = dict((h, misspellings(hostvars[h], known)) for h in hosts)
    errors, warnings = [], []

    encrypted_now = [h for h in refused if h in losing]
    never = [h for h in refused if h not in losing]
    if never:
        lookalikes = ["%s on %s" % (n, h) for h in never for n, k in sorted(typos[h].items()) if k == SECRETS]
        hint = " (%s: misspelt?)" % ", ".join(lookalikes) if lookalikes else ""
        errors.append(
            "%s is not set for %s%s: set it from Vault, or set %s: true to run a plaintext mesh"
            % (SECRETS, _names(never), hint, ALLOW)
        )
    if encrypted_now:
        errors.append(
            "%s would go from secret files to none (%s is empty): set %s, or set %s: true to make the mesh "
            "plaintext" % (_names(encrypted_now), SECRETS, SECRETS, ALLOW)
        )
    bad = [h for h in present if not facts[h].get("secrets_ok", True)]
    if bad:
        errors.append(
            "%s must be a list of strings of at least 8 characters each on %s (values not shown)"
            % (SECRETS, _names(bad))
        )
    # A misspelling matters when the variable it stands for is left unset (so its default applies).
    wrong = {}
    for h in hosts:
        for name, like in typos[h].items():
            if like is None or (like == SECRETS and h in never):
                continue  # an unknown name, or already named in the error about weft_secrets
            if like in hostvars[h]:
                warnings.append("%s sets %s, which is not a weft.mesh variable (did you mean %s?)" % (h, name, like))
            else:
                wrong.setdefault((name, like), []).append(h)
    for (name, like), on in sorted(wrong.items()):
        errors.append(
            "%s is not a weft.mesh variable (did you mean %s?), set for %s: rename it" % (name, like, _names(on))
        )
    unknown = sorted(set(n for h in hosts for n, k in typos[h].items() if k is None))
    if unknown:
        warnings.append("not weft.mesh variables, ignored: %s" % ", ".join(unknown))
    dropping = [h for h in allowed if h in losing]
    if dropping:
        warnings.append(
            "going from secrets to none on %s (%s: true): their connections become plaintext"
            % (_names(dropping), ALLOW)
        )
    return {"errors": errors, "warnings": warnings}


def serial_problems(serial):
    """What is wrong with weft_upgrade_serial (site.yml's restart batches), [] when nothing.

    Ansible reads a serial of 0 (or "0%") as every host at once: a typo there would restart the whole mesh in one
    batch, the one thing the restart play exists to prevent. Each batch must be a positive count or percentage.
    """
    sizes = serial if isinstance(serial, (list, tuple)) else [serial]
    bad = []
    for size in sizes:
        text = str(size).strip()
        number = text[:-1] if text.endswith("%") else text
        try:
            ok = (
                not isinstance(size, bool)
                and float(number) > 0
                and (text.endswith("%") or float(number) == int(float(number)))
            )
        except ValueError:
            ok = False
        if not ok or (text.endswith("%") and float(number) > 100):
            bad.append(text)
    if not sizes or bad:
        return [
            "weft_upgrade_serial %s: each restart batch must be a host count of at least 1 or a percentage above 0%% "
            '(like 1, "25%%" or [1, "25%%"]); 0 would restart every host at once' % (", ".join(bad) or "is empty")
        ]
    return []


class FilterModule:
    def filters(self):
        return {"preflight_problems": preflight_problems, "serial_problems": serial_problems}

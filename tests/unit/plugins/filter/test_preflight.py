"""The role's pre-flight verdict: a missing or misspelt weft_secrets fails every host before any is changed."""

from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleFilterError

from ansible_collections.weft.mesh.plugins.filter.preflight import misspellings, preflight_problems, serial_problems

ROOT = Path(__file__).resolve().parents[4]
SPECS = yaml.safe_load((ROOT / "roles/agent/meta/argument_specs.yml").read_text())
KNOWN = [*sorted(SPECS["argument_specs"]["main"]["options"]), "weft_verify_retries"]


def host(secrets=1, allow=False, present=True, ok=True, on_host=None, **inventory):
    """One host's hostvars: what the role's validate step records, plus inventory variables."""
    facts = {"present": present, "secrets": secrets, "secrets_ok": ok, "allow_unencrypted": allow}
    hv = dict(inventory, _weft_preflight=facts)
    if on_host is not None:
        hv["_weft_host_secrets"] = on_host
    return hv


def verdict(**hosts):
    return preflight_problems(list(hosts), hosts, KNOWN)


def test_every_host_with_secrets_passes():
    assert verdict(a=host(weft_secrets=["x"]), b=host(weft_secrets=["x"])) == {"errors": [], "warnings": []}


def test_missing_secrets_name_every_host_in_one_line():
    result = verdict(**{"dc1-a": host(secrets=0), "dc1-b": host(), "dc2-a": host(secrets=0)})
    assert result["errors"] == [
        "weft_secrets is not set for dc1-a, dc2-a: set it from Vault, or set weft_allow_unencrypted: true to run "
        "a plaintext mesh"
    ]


@pytest.mark.parametrize("typo", ["weft_secret", "weft_secrets_", "weft_secert", "weft_scerets", "Weft_secrets"])
def test_misspelt_secrets_are_named(typo):
    result = verdict(**{"dc1-a": host(secrets=0, **{typo: ["s3cr3t-value"]}), "dc2-a": host(secrets=0)})
    assert result["errors"] == [
        "weft_secrets is not set for dc1-a, dc2-a (%s on dc1-a: misspelt?): set it from Vault, or set "
        "weft_allow_unencrypted: true to run a plaintext mesh" % typo
    ]
    assert "s3cr3t" not in repr(result)


def test_allowed_plaintext_passes_but_a_misspelt_secret_still_fails():
    assert verdict(a=host(secrets=0, allow=True), b=host(secrets=0, allow=True))["errors"] == []
    result = verdict(a=host(secrets=0, allow=True, weft_secert=["x"]))
    assert result["errors"] == [
        "weft_secert is not a weft.mesh variable (did you mean weft_secrets?), set for a: rename it"
    ]


def test_misspelling_of_another_variable():
    # The real name is unset, so the role would run with its default: fail.
    result = verdict(a=host(weft_trusted_subnet=["10.0.0.0/8"]), b=host(weft_trusted_subnet=["10.0.0.0/8"]))
    assert result["errors"] == [
        "weft_trusted_subnet is not a weft.mesh variable (did you mean weft_trusted_subnets?), set for a, b: rename it"
    ]
    # Next to the real one (weft_secrets_prod feeding weft_secrets, say), it is only a warning.
    result = verdict(a=host(weft_secrets=["x"], weft_secrets_prod=["x"], weft_colour="blue"))
    assert result["errors"] == []
    assert result["warnings"] == [
        "a sets weft_secrets_prod, which is not a weft.mesh variable (did you mean weft_secrets?)",
        "not weft.mesh variables, ignored: weft_colour",
    ]


def test_some_secrets_to_none():
    # Read from the host: it has secret files, and the inventory gives it none.
    result = verdict(a=host(secrets=0, on_host=2), b=host(on_host=1))
    assert result["errors"] == [
        "a would go from secret files to none (weft_secrets is empty): set weft_secrets, or set "
        "weft_allow_unencrypted: true to make the mesh plaintext"
    ]
    result = verdict(a=host(secrets=0, allow=True, on_host=2))
    assert result == {
        "errors": [],
        "warnings": [
            "going from secrets to none on a (weft_allow_unencrypted: true): their connections become plaintext"
        ],
    }


def test_bad_secrets_and_absent_hosts():
    assert verdict(a=host(ok=False))["errors"] == [
        "weft_secrets must be a list of strings of at least 8 characters each on a (values not shown)"
    ]
    # A host being removed needs no secrets.
    assert verdict(a=host(secrets=0, present=False))["errors"] == []


def test_known_names_and_other_prefixes():
    assert misspellings(["weft_site", "weft_verify_retries", "ansible_host", "vault_weft_secrets"], KNOWN) == {}
    assert misspellings(["weftsecrets", "weft_zzz"], KNOWN) == {"weftsecrets": "weft_secrets", "weft_zzz": None}


def test_host_without_facts():
    with pytest.raises(AnsibleFilterError, match="b has no pre-flight facts"):
        preflight_problems(["a", "b"], {"a": host(), "b": {}}, KNOWN)
    with pytest.raises(AnsibleFilterError, match="'c' is not a host"):
        preflight_problems(["c"], {"a": host()}, KNOWN)


@pytest.mark.parametrize("serial", [1, "1", "25%", [1, "25%"], (2, "100%")])
def test_restart_batches_that_keep_restarts_serial(serial):
    assert serial_problems(serial) == []


@pytest.mark.parametrize("serial", [0, "0", "0%", [1, 0], "-1", "1.5", "150%", "all", [], True])
def test_restart_batches_that_would_restart_everything_at_once_or_make_no_sense(serial):
    (problem,) = serial_problems(serial)
    assert problem.startswith("weft_upgrade_serial ") and "0 would restart every host at once" in problem

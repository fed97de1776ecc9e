"""The build key and plan: an agent changed without a version bump is a new build; a rollback needs no build."""

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.weft.mesh.plugins.filter.build import build_plan, source_digest


def make_source(root, version="0.3.0", body="x = 1\n"):
    (root / "src" / "weft").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "weft"\nversion = "%s"\n' % version)
    (root / "src" / "weft" / "__init__.py").write_text(body)
    return root


def test_digest_follows_content_not_caches(tmp_path):
    source = make_source(tmp_path / "a")
    first = source_digest(str(source))
    assert len(first) == 12
    # Caches and tests are not build inputs.
    (source / "src" / "weft" / "__pycache__").mkdir()
    (source / "src" / "weft" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    (source / "tests").mkdir()
    (source / "tests" / "test_x.py").write_text("assert True\n")
    assert source_digest(str(source)) == first
    # A change to the code, with the same version, is a new build; so is a new pin.
    (source / "src" / "weft" / "__init__.py").write_text("x = 2\n")
    changed = source_digest(str(source))
    assert changed != first
    (source / "constraints.txt").write_text("pyyaml==6.0.4\n")
    assert source_digest(str(source)) != changed


def test_digest_refuses_a_directory_that_is_not_the_agent(tmp_path):
    with pytest.raises(AnsibleFilterError, match="weft_agent_source must be the agent's source"):
        source_digest(str(tmp_path))


def build(version, digest, at, root="/opt/weft"):
    return {"version": version, "build": digest, "dir": "%s/%s-%s" % (root, version, digest), "installed_at": at}


def test_a_new_host_installs_and_starts_on_the_build():
    plan = build_plan({"builds": [], "current": None}, "0.3.0", "0.3.0", "abc", "/opt/weft")
    assert plan["target"]["dir"] == "/opt/weft/0.3.0-abc"
    assert plan["install"] and plan["switch"]
    assert plan["current"] is None and plan["previous"] is None


def test_the_running_build_is_a_no_op():
    running = build("0.3.0", "abc", 10)
    plan = build_plan({"builds": [running], "current": running["dir"]}, "0.3.0", "0.3.0", "abc", "/opt/weft")
    assert not plan["install"] and not plan["switch"] and plan["remove"] == []


def test_a_changed_agent_with_the_same_version_is_installed_beside():
    running = build("0.3.0", "abc", 10)
    plan = build_plan({"builds": [running], "current": running["dir"]}, "0.3.0", "0.3.0", "def", "/opt/weft")
    assert plan["install"] and plan["switch"]
    assert plan["target"]["dir"] == "/opt/weft/0.3.0-def"
    assert plan["previous"]["dir"] == running["dir"]


def test_a_rollback_uses_the_installed_build_and_builds_nothing():
    old, new = build("0.2.0", "aaa", 10), build("0.3.0", "bbb", 20)
    plan = build_plan({"builds": [old, new], "current": new["dir"]}, "0.2.0", "0.3.0", "bbb", "/opt/weft")
    assert not plan["install"] and plan["switch"]
    assert plan["target"]["dir"] == old["dir"] and plan["previous"]["dir"] == new["dir"]
    assert plan["remove"] == []


def test_a_rollback_to_a_version_no_longer_there_says_what_to_do():
    new = build("0.3.0", "bbb", 20)
    plan = build_plan({"builds": [new], "current": new["dir"]}, "0.1.0", "0.3.0", "bbb", "/opt/weft")
    assert "weft 0.1.0 is not installed on this host (installed: 0.3.0)" in plan["error"]


def test_old_builds_go_but_the_target_and_the_running_one_stay():
    builds = [build("0.1.0", "a", 1), build("0.2.0", "b", 2), build("0.2.1", "c", 3)]
    running = builds[0]  # the oldest is the one that runs: it stays, as the way back
    plan = build_plan({"builds": builds, "current": running["dir"]}, "0.3.0", "0.3.0", "d", "/opt/weft", 2)
    assert plan["remove"] == sorted([builds[1]["dir"], builds[2]["dir"]])
    plan = build_plan({"builds": builds, "current": running["dir"]}, "0.3.0", "0.3.0", "d", "/opt/weft", 3)
    assert plan["remove"] == [builds[1]["dir"]]  # the newest other one is kept


def test_a_build_from_an_older_role_counts_by_its_version():
    legacy = {"version": "0.2.0", "build": "", "dir": "/opt/weft/0.2.0", "installed_at": 5}
    plan = build_plan({"builds": [legacy], "current": legacy["dir"]}, "0.2.0", "0.3.0", "x", "/opt/weft")
    assert not plan["install"] and not plan["switch"]


def test_secret_file_digests_match_the_files_the_role_writes(tmp_path):
    import hashlib

    from ansible_collections.weft.mesh.plugins.filter.build import secret_file_digests

    (tmp_path / "secret-1").write_text("s3cret-value\n")  # what configure.yml writes: the secret and a newline
    assert secret_file_digests(["s3cret-value"]) == [hashlib.sha1((tmp_path / "secret-1").read_bytes()).hexdigest()]
    assert secret_file_digests([]) == []


def test_the_target_says_whether_it_has_ipam(tmp_path):
    from ansible_collections.weft.mesh.plugins.filter.build import source_ipam

    # The source's build: as the source says; an installed build (a rollback): as the host's probe found it.
    plan = build_plan({"builds": [], "current": None}, "0.5.0", "0.5.0", "abc", "/opt/weft", 2, True)
    assert plan["target"]["ipam"] is True
    old = dict(build("0.4.1", "aaa", 10), ipam=False)
    new = dict(build("0.5.0", "bbb", 20), ipam=True)
    plan = build_plan({"builds": [old, new], "current": new["dir"]}, "0.4.1", "0.5.0", "bbb", "/opt/weft", 2, True)
    assert plan["target"]["ipam"] is False
    legacy = {"version": "0.2.0", "build": "", "dir": "/opt/weft/0.2.0", "installed_at": 5}  # probed before the flag
    plan = build_plan({"builds": [legacy], "current": None}, "0.2.0", "0.5.0", "x", "/opt/weft")
    assert plan["target"]["ipam"] is False
    (tmp_path / "src" / "weft").mkdir(parents=True)
    assert source_ipam(tmp_path) is False
    (tmp_path / "src" / "weft" / "config.py").write_text("ipalloc_range: str = DEFAULT_RANGE\n")
    assert source_ipam(tmp_path) is True


def test_the_target_says_whether_it_serves_dns(tmp_path):
    from ansible_collections.weft.mesh.plugins.filter.build import source_dns

    plan = build_plan({"builds": [], "current": None}, "0.5.0", "0.5.0", "abc", "/opt/weft", 2, True, True)
    assert plan["target"]["dns"] is True
    assert (
        build_plan({"builds": [], "current": None}, "0.5.0", "0.5.0", "abc", "/opt/weft", 2, True)["target"]["dns"]
        is False
    )
    old = dict(build("0.4.1", "aaa", 10), ipam=False, dns=False)
    new = dict(build("0.5.0", "bbb", 20), ipam=True, dns=True)
    plan = build_plan(
        {"builds": [old, new], "current": new["dir"]}, "0.4.1", "0.5.0", "bbb", "/opt/weft", 2, True, True
    )
    assert plan["target"]["dns"] is False  # a rollback: as the probe found the installed build
    (tmp_path / "src" / "weft").mkdir(parents=True)
    assert source_dns(tmp_path) is False
    (tmp_path / "src" / "weft" / "config.py").write_text('dns_domain: str = "weft.local."\n')
    assert source_dns(tmp_path) is True

"""The collection as users get it: built from this checkout by the real `ansible-galaxy collection build`, then
installed into an empty directory and used from another one, with an inventory of the user's own.

The tarball must hold the role, the plugins, the playbooks and the agent's source (the role builds its wheels
from agent/), and nothing of the lab, the tests or the checkout's tooling; above all no vault file, not even the
lab's live one, which is gitignored but sits in the working tree of anyone who ran the lab."""

import contextlib
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAB_VAULT = ROOT / "inventories" / "lab" / "group_vars" / "all" / "vault.yml"
# Looks like a vaulted file to anything that reads it; never decrypted.
DECOY = b"$ANSIBLE_VAULT;1.1;AES256\n" + b"3" * 80 + b"\n"

pytestmark = pytest.mark.skipif(
    not (BIN / "ansible-galaxy").exists(), reason="ansible-galaxy is not installed next to python"
)


def agent_version():
    # The way the role's weft_version default reads it.
    text = (ROOT / "agent" / "pyproject.toml").read_text()
    return re.search(r'(?m)^version *= *"([^"]+)"', text).group(1)


def neutral_env(tmp, **extra):
    """os.environ without any ANSIBLE_* setting, an empty ansible.cfg, and Ansible's own files under tmp."""
    cfg = tmp / "neutral.cfg"
    cfg.write_text("[defaults]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        ANSIBLE_CONFIG=str(cfg),
        ANSIBLE_HOME=str(tmp / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_STDOUT_CALLBACK="default",
        **extra,
    )
    return env


def run(argv, cwd, env, timeout=300):
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@contextlib.contextmanager
def decoy_lab_vault():
    """A stand-in for the lab's vault while the collection is built, when the checkout has none (a fresh
    clone): the build must have one to leave out. Only the file planted here is removed afterwards."""
    made_dirs = [p for p in reversed(LAB_VAULT.parents) if not p.exists()]
    for d in made_dirs:
        d.mkdir()
    try:
        fd = os.open(LAB_VAULT, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        planted = False
    else:
        planted = True
        with os.fdopen(fd, "wb") as f:
            f.write(DECOY)
    try:
        yield
    finally:
        # The lab may have written its real vault in the meantime: leave any other content alone.
        if planted and LAB_VAULT.read_bytes() == DECOY:
            LAB_VAULT.unlink()
        for d in reversed(made_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(path of the tarball, {member name: bytes of regular files, None for others})."""
    tmp = tmp_path_factory.mktemp("build")
    with decoy_lab_vault():
        assert LAB_VAULT.exists()
        result = run(["ansible-galaxy", "collection", "build", "--output-path", str(tmp)], ROOT, os.environ)
    assert result.returncode == 0, result.stdout + result.stderr
    (tarball,) = tmp.glob("weft-mesh-*.tar.gz")
    with tarfile.open(tarball) as tar:
        members = {m.name: (tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()}
    return tarball, members


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory):
    """The tarball installed into an empty collections directory; (env, user directory, collection path).
    The env reads no ansible.cfg of this checkout and finds collections only there (and the bundled ones)."""
    tmp = tmp_path_factory.mktemp("user")
    collections = tmp / "collections"
    env = neutral_env(tmp, ANSIBLE_COLLECTIONS_PATH=str(collections))
    result = run(["ansible-galaxy", "collection", "install", str(built[0]), "-p", str(collections)], tmp, env)
    assert result.returncode == 0, result.stdout + result.stderr
    # A user's own inventory and working directory, far from this checkout. Nothing listens on port 1, so a
    # task that reaches for a host shows up as unreachable.
    user = tmp / "ops"
    user.mkdir()
    inventory = {
        "weft_mesh": {
            "vars": {"ansible_host": "127.0.0.1", "ansible_port": 1, "ansible_user": "nobody"},
            "hosts": {
                "node-1": {"weft_site": "one", "weft_advertise_address": "192.0.2.1"},
                "node-2": {"weft_site": "two", "weft_advertise_address": "192.0.2.2"},
            },
        }
    }
    (user / "hosts.yml").write_text(yaml.safe_dump(inventory))
    return env, user, collections / "ansible_collections" / "weft" / "mesh"


def test_collection_version_follows_the_agent():
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    assert str(galaxy["version"]) == agent_version(), "galaxy.yml's version must be agent/pyproject.toml's"


def test_tarball_holds_the_collection(built):
    tarball, members = built
    assert tarball.name == f"weft-mesh-{agent_version()}.tar.gz"
    for name in (
        "MANIFEST.json",
        "README.md",
        "site.yml",
        "meta/runtime.yml",
        "docs/ansible.md",
        "roles/agent/tasks/main.yml",
        "roles/agent/meta/argument_specs.yml",
        "roles/agent/files/build_wheelhouse.py",
        "plugins/modules/weft_info.py",
        "plugins/filter/mesh.py",
        "playbooks/site.yml",
        "playbooks/verify.yml",
        "inventories/example/10-datacenters.yml",
        "agent/pyproject.toml",
        "agent/src/weft/cli.py",
    ):
        assert name in members, f"{name} is missing from {tarball.name}"


def test_tarball_holds_nothing_else(built):
    tarball, members = built
    unwanted_tops = {"lab", "bench", "molecule", "tests", ".ci", ".venv", ".git", "collections"}
    unwanted = []
    for name in members:
        path = PurePosixPath(name)
        if (
            path.parts[0] in unwanted_tops
            or name in ("Makefile", "ansible.cfg")
            or name.startswith(("inventories/lab", "agent/tests"))
            or "__pycache__" in path.parts
            or path.suffix == ".pyc"
            or any(part.endswith(("_cache", ".egg-info")) for part in path.parts)
        ):
            unwanted.append(name)
    assert not unwanted, f"{tarball.name} holds {sorted(unwanted)}"


def test_tarball_holds_no_vault(built):
    tarball, members = built
    vaults = [
        name
        for name, content in members.items()
        if PurePosixPath(name).name == "vault.yml"
        or re.search(r"vault[-_]password", PurePosixPath(name).name)
        or (content is not None and b"$ANSIBLE_VAULT;" in content)
    ]
    assert not vaults, f"{tarball.name} holds vault files or vault passwords: {sorted(vaults)}"


def test_installed_collection_ships_the_agent_source(installed):
    _env, _user, mesh = installed
    # The role's default weft_agent_source, resolved inside the installed collection.
    source = mesh / "roles" / "agent" / ".." / ".." / "agent"
    assert (source / "pyproject.toml").is_file()
    assert (source / "src" / "weft" / "cli.py").is_file()


def test_installed_site_passes_syntax_check(installed):
    env, user, mesh = installed
    result = run(["ansible-playbook", "weft.mesh.site", "--syntax-check", "-i", "hosts.yml"], user, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"playbook: {mesh}/playbooks/site.yml" in result.stdout


def test_installed_role_documents_itself(installed):
    env, user, mesh = installed
    result = run(["ansible-doc", "-t", "role", "weft.mesh.agent"], user, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(mesh) in result.stdout and "weft_secrets" in result.stdout


def test_installed_site_gets_to_the_hosts(installed):
    # The controller side of the role works from the installed copy: the version comes from its agent/, the
    # pre-flight checks pass, and the first task that needs a host finds it unreachable.
    env, user, _mesh = installed
    result = run(
        ["ansible-playbook", "weft.mesh.site", "-i", "hosts.yml", "-e", "weft_allow_unencrypted=true"], user, env
    )
    output = result.stdout + result.stderr
    assert result.returncode == 4, output
    tasks = re.findall(r"^TASK \[(?:weft\.mesh\.agent : )?(.*?)\] \*", result.stdout, re.M)
    assert "Check the agent version" in tasks, output
    assert tasks[-1] == "Look for systemd and weft_python on the host", output

"""What every playbook test needs to run the real ansible-playbook from the repository root."""

import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]


def inventory_and_env(tmp_path, inventory, **extra):
    """Write ``inventory`` to tmp_path/hosts.yml; return the environment to run ansible-playbook with: this
    checkout's ansible.cfg, a private local temp, plain output."""
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    return dict(
        os.environ,
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_STDOUT_CALLBACK="default",
        **extra,
    )

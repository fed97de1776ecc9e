"""Fixtures for the module and module_utils tests: a fake agent API on a unix socket, and a module runner."""

import json
import os
import tempfile

import pytest
from ansible.module_utils.testing import patch_module_args

from .modules.fake_agent import FakeAgent


@pytest.fixture
def agent():
    """A fake agent serving the control API on a temporary unix socket, in a thread."""
    # A short path: unix socket paths are limited to ~107 bytes and pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(prefix="weft-ut-")
    fake = FakeAgent(os.path.join(directory, "weft.sock"))
    fake.start()
    yield fake
    fake.stop()
    os.rmdir(directory)


class ModuleResult(dict):
    @property
    def failed(self):
        return bool(self.get("failed"))


@pytest.fixture
def run_module(capsys):
    """run_module(main, args, check_mode=False, diff=False) -> the module's result (exit_json or fail_json)."""

    def run(main, args, check_mode=False, diff=False):
        args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
        capsys.readouterr()
        with patch_module_args(args), pytest.raises(SystemExit) as exited:
            main()
        result = ModuleResult(json.loads(capsys.readouterr().out))
        assert (exited.value.code != 0) == result.failed, result
        return result

    return run

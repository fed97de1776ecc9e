"""Every plugin's documentation parses as YAML: ansible-doc shows nothing for a filter or module whose DOCUMENTATION
does not (a `: ` inside a plain scalar is enough), and the role's argument spec and filters' docs are read by it."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FILTER_DOCS = sorted((ROOT / "plugins" / "filter").glob("*.yml"))
MODULES = sorted((ROOT / "plugins" / "modules").glob("*.py"))


@pytest.mark.parametrize("path", FILTER_DOCS, ids=lambda p: p.name)
def test_filter_docs_parse(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["DOCUMENTATION"]["name"] == path.stem
    assert isinstance(doc["RETURN"], dict)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_docs_parse(path):
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) in (
            "DOCUMENTATION",
            "EXAMPLES",
            "RETURN",
        ):
            found[node.targets[0].id] = yaml.safe_load(node.value.value)
    assert sorted(found) == ["DOCUMENTATION", "EXAMPLES", "RETURN"]
    assert found["DOCUMENTATION"]["module"] == path.stem


def test_every_filter_has_its_doc():
    import importlib

    names = set()
    for path in (ROOT / "plugins" / "filter").glob("*.py"):
        module = importlib.import_module("ansible_collections.weft.mesh.plugins.filter." + path.stem)
        names |= set(module.FilterModule().filters())
    assert names == set(p.stem for p in FILTER_DOCS)

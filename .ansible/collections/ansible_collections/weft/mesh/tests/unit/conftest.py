"""Make `ansible_collections.weft.mesh` importable for a plain `pytest tests/unit` from the repository root.

The checkout reaches itself as a collection through collections/ansible_collections/weft/mesh -> ../../..
(the same link ansible-playbook uses). Under `ansible-test units` the collection is already importable and
this does nothing.
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

try:
    _found = importlib.util.find_spec("ansible_collections.weft.mesh") is not None
except ImportError:
    _found = False
if not _found:
    sys.path.insert(0, str(ROOT / "collections"))

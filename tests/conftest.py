"""Make the repository root importable (``tests.lab``, ``netplugin``) however pytest is run."""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# One set of Ceph fixtures for all directories, so the session-scoped cluster exists once.
pytest_plugins = ["tests.lab.ceph_fixtures"]

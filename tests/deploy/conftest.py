"""Real etcd for test_deploy_compose_bootstrap.py (fixtures from tests/support/etcd.py).

`python -m pytest` (the Makefile, CI) has the repo root on sys.path already;
the insert below also lets a bare `pytest` import `tests.support`.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.etcd import *  # noqa: E402, F403

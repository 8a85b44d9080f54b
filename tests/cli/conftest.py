"""The CLI as users run it: `python -m lepton_mesh ...` in a subprocess, against a real
admin API on a real etcd (fixtures from tests/admin_api and tests/policy_store)."""

from __future__ import annotations

from tests.admin_api.admin_support import *  # noqa: F403
from tests.cli.cli_support import *  # noqa: F403
from tests.policy_store.policy_support import *  # noqa: F403

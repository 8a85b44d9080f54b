"""A real etcd for the policy store tests, one per module, wiped between tests.

The policy store's keys are fixed (`/lepton/v1/...`), so these tests cannot
share the run-wide etcd with per-test prefixes: each module gets its own
etcd, and each test starts from an empty `/lepton/`.
"""

from __future__ import annotations

from tests.policy_store.policy_support import *  # noqa: F403
from tests.support.etcd import eventually  # noqa: F401

"""A real etcd (one per module) and a real admin API on it, per test."""

from __future__ import annotations

from tests.admin_api.admin_support import *  # noqa: F403
from tests.policy_store.policy_support import *  # noqa: F403
from tests.support.etcd import etcd_private  # noqa: F401

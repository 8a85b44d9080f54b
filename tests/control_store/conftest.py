"""Real etcd for the store tests (fixtures from tests/support/etcd.py)."""

from tests.support.etcd import *  # noqa: F403

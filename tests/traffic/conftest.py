"""Fixtures for the end-to-end traffic-management tests.

The sidecar, upstream and loop fixtures are tests/proxy's own (`upstreams`,
`sidecars`, the uvloop loop factory), imported from its conftest rather than
copied, so both suites run the sidecar the same way. That conftest is loaded
under its own module name: pytest imports every conftest.py as `conftest`,
so a plain import would collide.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_PROXY_TESTS = Path(__file__).resolve().parent.parent / "proxy"
if str(_PROXY_TESTS) not in sys.path:
    sys.path.insert(0, str(_PROXY_TESTS))  # for `import proxy_harness`, here and there


def _load_proxy_conftest():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "proxy_tests_conftest", _PROXY_TESTS / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_proxy = _load_proxy_conftest()
pytest_asyncio_loop_factories = _proxy.pytest_asyncio_loop_factories
upstreams = _proxy.upstreams
sidecars = _proxy.sidecars

SEED = 1


@pytest.fixture(autouse=True)
def seeded(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Seed what can be seeded: the module RNG the exchange draws backend
    weights, faults, mirrors and backoff from, and every balancer's RNG (one
    seeded `random.Random` per cluster, in creation order). Timing between
    concurrent requests still varies; assertions allow for that."""
    from lepton_mesh.proxy.outbound import balance, clusters

    state = random.getstate()
    random.seed(SEED)
    seeds = itertools.count(SEED)

    def seeded_balancer(*args, **kw):  # type: ignore[no-untyped-def]
        kw.setdefault("rng", random.Random(next(seeds)))
        return balance.make_balancer(*args, **kw)

    monkeypatch.setattr(
        clusters, "make_balancer", functools.update_wrapper(seeded_balancer, balance.make_balancer)
    )
    yield
    random.setstate(state)

"""Fixtures for the data-plane mTLS tests: real sidecars, real TLS, 127.0.0.1.

The sidecar runs on uvloop, so these tests do too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from mtls_support import DEADLINE, App, Pki

from lepton_mesh.policy.sidecar_config import SidecarConfig
from tests.support.sidecars import sidecar_starter


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def pki() -> Pki:
    return Pki()


@pytest.fixture(scope="session")
def foreign_pki() -> Pki:
    """Another CA for the same trust domain: its certificates are never accepted."""
    return Pki()


@pytest.fixture
async def apps() -> AsyncIterator[Callable[[], Awaitable[App]]]:
    started: list[App] = []

    async def start() -> App:
        app = await App().start()
        started.append(app)
        return app

    yield start
    for app in started:
        await app.stop()


@pytest.fixture
async def app(apps: Callable[[], Awaitable[App]]) -> App:
    return await apps()


@pytest.fixture
async def sidecars() -> AsyncIterator[Callable[[SidecarConfig], Awaitable[Any]]]:
    """`await sidecars(cfg)` starts a Sidecar on this loop; all stop at teardown."""
    async with sidecar_starter(DEADLINE) as start:
        yield start

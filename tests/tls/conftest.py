"""Fixtures for real TLS on 127.0.0.1: every test runs on asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from tls_support import Pki, TlsServer


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The sidecar runs on uvloop; asyncio's own SSL layer is checked too."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def pki() -> Pki:
    """One mesh CA for the session (key generation is cheap, but not free)."""
    return Pki()


@pytest.fixture(scope="session")
def foreign_pki() -> Pki:
    """Another CA for the same trust domain: its certificates must never be accepted."""
    return Pki()


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Awaitable[TlsServer]]]:
    """Factory: `await servers(ctx)` starts a TlsServer; all stop at teardown."""
    started: list[TlsServer] = []

    async def start(ctx: Any, **kwargs: Any) -> TlsServer:
        srv = TlsServer(ctx, **kwargs)
        await srv.start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        await srv.stop()

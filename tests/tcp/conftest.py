"""Fixtures for the tunnel and L4 proxy tests (helpers live in tcp_support).

The sidecar runs on uvloop, so every test runs there; the tunnel and the L4
proxy also run on the stdlib loop, because `set_protocol`, pause/resume and
EOF handling differ between the two and the tunnel relies on each of them.
Tests that only make sense once (the 200 MB transfer) select uvloop with
`@pytest.mark.asyncio(loop_factories=["uvloop"])`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop
from tcp_support import Servers


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    """Starts test servers and closes them, and every connection they hold, at teardown."""
    s = Servers()
    yield s
    await s.close()

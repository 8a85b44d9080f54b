from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from obs_support import Admin, FakeHooks, StartAdmin

from lepton_mesh.proxy.observe.admin import AdminLimits, start_admin_server


@pytest.fixture
async def start_admin() -> AsyncIterator[StartAdmin]:
    servers: list[asyncio.Server] = []

    async def start(limits: AdminLimits | None = None, hooks: FakeHooks | None = None) -> Admin:
        hooks = hooks or FakeHooks()
        server = await start_admin_server(hooks, "127.0.0.1", 0, limits=limits)
        servers.append(server)
        return Admin(server, hooks, server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def admin(start_admin: StartAdmin) -> Admin:
    return await start_admin()

"""In-process sidecars for a test: started on the test's loop, all stopped at its end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from lepton_mesh.policy.sidecar_config import SidecarConfig


@contextlib.asynccontextmanager
async def sidecar_starter(
    deadline: float, prepare: Callable[..., None] | None = None
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Yields `start(cfg, **kw)`, which starts a Sidecar and returns it; every one
    started is stopped (newest first, each within `deadline`) on exit.
    `prepare(sidecar, **kw)`, when given, runs before the start."""
    from lepton_mesh.proxy.sidecar import Sidecar

    started: list[Any] = []

    async def start(cfg: SidecarConfig, **kw: Any) -> Any:
        sc = Sidecar(cfg)
        if prepare is not None:
            prepare(sc, **kw)
        started.append(sc)
        await sc.start()
        return sc

    try:
        yield start
    finally:
        for sc in reversed(started):
            await asyncio.wait_for(sc.stop(), deadline)

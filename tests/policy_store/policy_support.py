"""Fixtures and helpers shared by the policy store, admin API and CLI tests.

`mesh_etcd` is a real etcd of the module's own; `control` assembles what the
control daemon would (Store, WatchCache of /lepton/v1/, PolicyStore,
Registry) against it, from an empty `/lepton/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from lepton_mesh.control.etcd_local import LocalEtcd
from lepton_mesh.control.policy_store import PolicyStore
from lepton_mesh.control.store import Store
from lepton_mesh.control.watch_cache import WatchCache
from lepton_mesh.policy.yaml_source import Document, load_documents

__all__ = [
    "Control",
    "control",
    "dest",
    "docs",
    "mesh_etcd",
    "open_control",
    "route",
]

ROOT = "/lepton/v1/"


@pytest.fixture(scope="module")
def mesh_etcd() -> Iterator[LocalEtcd]:
    server = LocalEtcd(fast=True).start()
    try:
        yield server
    finally:
        server.close()


@dataclass
class Control:
    store: Store
    cache: WatchCache
    policies: PolicyStore
    task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def open_control(
    endpoints: list[str], *, wipe: bool = True, timeout: float = 2.0
) -> AsyncIterator[Control]:
    store = await Store.connect(endpoints, timeout=timeout)
    if wipe:
        await store.delete("/lepton/", prefix=True)
    cache = WatchCache(store, ROOT)
    task = asyncio.create_task(cache.run())
    try:
        await asyncio.wait_for(cache.ready.wait(), 10)
        yield Control(store, cache, PolicyStore(store, cache), task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()


@pytest.fixture
async def control(mesh_etcd: LocalEtcd) -> AsyncIterator[Control]:
    async with open_control(list(mesh_etcd.endpoints)) as ctl:
        yield ctl


# --- manifests -------------------------------------------------------------------


def route(destination: str = "dialog", *, subset: str = "v1", name: str | None = None) -> str:
    return textwrap.dedent(f"""\
        apiVersion: lepton-mesh/v1
        kind: Route
        metadata: {{name: {name or destination}}}
        spec:
          destination: {destination}
          rules:
            - name: all
              backends: [{{service: {destination}, subset: {subset}}}]
        """)


def dest(
    service: str = "dialog", subsets: tuple[str, ...] = ("v1", "v2"), timeout: str = "30s"
) -> str:
    items = ", ".join(f"{{name: {s}, labels: {{version: {s}}}}}" for s in subsets)
    return textwrap.dedent(f"""\
        apiVersion: lepton-mesh/v1
        kind: DestinationPolicy
        metadata: {{name: {service}}}
        spec:
          service: {service}
          subsets: [{items}]
          timeout: {timeout}
        """)


def docs(*texts: str, source: str = "policies.yaml") -> list[Document]:
    return load_documents("---\n".join(texts), source)

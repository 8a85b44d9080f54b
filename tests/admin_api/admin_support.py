"""A real admin API over a real etcd, and a real HTTP client, for the admin API and CLI tests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from lepton_mesh.control.admin_api import AdminServer, start_admin_api
from lepton_mesh.control.auth import TokenIssuer, TokenVerifier, init_key
from lepton_mesh.control.etcd_local import LocalEtcd
from lepton_mesh.control.policy_store import PolicyStore
from lepton_mesh.control.registry import Registry
from lepton_mesh.control.store import Store
from lepton_mesh.control.watch_cache import WatchCache
from tests.policy_store.policy_support import Control, open_control

__all__ = ["Api", "Reply", "api", "instance", "open_api", "put_instance"]

INSTANCES = "/lepton/v1/instances/"
SIDECARS = "/lepton/v1/sidecars/"


@dataclass
class Context:
    """What daemon.ControlContext gives the admin API."""

    store: Store
    cache: WatchCache
    registry: Registry
    policies: PolicyStore
    token_verifier: TokenVerifier | None
    replica_id: str = "replica-test"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: Any
    body: Any


@dataclass
class Api:
    url: str
    ctl: Control
    server: AdminServer
    session: aiohttp.ClientSession
    issuer: TokenIssuer
    key_file: Path
    verifier_public_pem: bytes
    tokens: dict[str, str] = field(default_factory=dict)

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "admin",
        body: Any = None,
        params: dict[str, str] | None = None,
        raw_token: str | None = None,
    ) -> Reply:
        """`token` is a role (its token is sent) or None; `raw_token` is sent as is."""
        headers = {}
        if raw_token is not None:
            headers["Authorization"] = raw_token
        elif token is not None:
            headers["Authorization"] = f"Bearer {self.tokens[token]}"
        data = None if body is None else orjson.dumps(body)
        async with self.session.request(
            method, self.url + path, data=data, params=params, headers=headers
        ) as resp:
            raw = await resp.read()
            parsed = orjson.loads(raw) if raw else None
            return Reply(resp.status, resp.headers, parsed)


@contextlib.asynccontextmanager
async def open_api(
    endpoints: list[str],
    tmp: Path,
    *,
    wipe: bool = True,
    auth: bool = True,
    store_timeout: float = 2.0,
) -> AsyncIterator[Api]:
    key_file = tmp / "token.key"
    key = init_key(key_file)
    issuer = TokenIssuer(key)
    async with open_control(endpoints, wipe=wipe, timeout=store_timeout) as ctl:
        ctx = Context(
            ctl.store,
            ctl.cache,
            Registry(ctl.store, ctl.cache, replica_id="replica-test"),
            ctl.policies,
            TokenVerifier(key.public_key()) if auth else None,
        )
        server = await start_admin_api(ctx, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                public_pem = key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                api = Api(server.url, ctl, server, session, issuer, key_file, public_pem)
                for role, subject in (("admin", "alice"), ("read", "rita")):
                    api.tokens[role] = issuer.create(subject=subject, role=role, ttl=600)
                api.tokens["join"] = issuer.create(
                    subject="chat-1", role="join", ttl=600, service="chat"
                )
                yield api
        finally:
            await server.close()


@pytest.fixture
async def api(mesh_etcd: LocalEtcd, tmp_path: Path) -> AsyncIterator[Api]:
    async with open_api(list(mesh_etcd.endpoints), tmp_path) as a:
        yield a


def instance(
    service: str, node: str, *, namespace: str = "default", healthy: bool = True, **labels: str
) -> dict[str, Any]:
    return {
        "id": node,
        "service": service,
        "namespace": namespace,
        "address": "127.0.0.1",
        "ports": {"http": 15006},
        "labels": labels,
        "weight": 1,
        "healthy": healthy,
        "draining": False,
        "node_id": node,
        "registered_at": time.time(),
    }


async def put_instance(ctl: Control, inst: dict[str, Any], *, nack: bool = False) -> None:
    """Write an instance and its sidecar status as a connected sidecar's replica would."""
    key = f"{INSTANCES}{inst['namespace']}/{inst['service']}/{inst['id']}"
    status = {
        "node_id": inst["node_id"],
        "service": inst["service"],
        "namespace": inst["namespace"],
        "control": "replica-test",
        "applied_version": 7,
        "last_nack": {"version": 8, "error": "bad route"} if nack else None,
        "last_seen": time.time(),
        "connected_at": time.time(),
    }
    await ctl.store.put(key, orjson.dumps(inst))
    rev = await ctl.store.put(f"{SIDECARS}{inst['node_id']}", orjson.dumps(status))
    await ctl.cache.wait_for_revision(rev, timeout=5)

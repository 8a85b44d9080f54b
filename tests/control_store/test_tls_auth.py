"""TLS (with client certificates) and username/password auth against a real etcd."""

from __future__ import annotations

import asyncio
import time

import pytest

from lepton_mesh.control.etcd_local import LocalEtcd
from lepton_mesh.control.store import Put, Store, StoreAuthFailed, StoreUnavailable
from tests.support.etcd import make_tls


async def test_tls_with_client_certificates(etcd_tls: LocalEtcd) -> None:
    tls = etcd_tls.tls
    assert tls is not None and etcd_tls.endpoints[0].startswith("https://")
    store = await Store.connect(
        etcd_tls.endpoints,
        ca_file=tls.ca_file,
        cert_file=tls.client_cert_file,
        key_file=tls.client_key_file,
    )
    try:
        start = await store.put("/tls/a", b"1")
        assert (await store.get("/tls/a")).value == b"1"
        result = await store.txn([], [Put("/tls/b", b"2")])
        async with asyncio.timeout(5):
            batches = [b async for b in _take(store.watch_prefix("/tls/", start), 2)]
        assert [b[0].revision for b in batches] == [start, result.revision]
        lease = await store.grant_lease(1)
        lease.keep_alive()
        await asyncio.sleep(1.5)  # time passing is the test: past the TTL over TLS
        assert lease.alive
        await lease.revoke()
    finally:
        await store.close()


async def _take(it, n):  # type: ignore[no-untyped-def]
    async for item in it:
        yield item
        n -= 1
        if n == 0:
            return


async def test_tls_refuses_a_server_signed_by_another_ca(etcd_tls: LocalEtcd, tmp_path) -> None:
    other = make_tls(tmp_path / "other")
    store = await Store.connect(
        etcd_tls.endpoints,
        ca_file=other.ca_file,
        cert_file=other.client_cert_file,
        key_file=other.client_key_file,
        timeout=1.0,
    )
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get("/x")
        assert time.monotonic() - started < 2.5
    finally:
        await store.close()


@pytest.fixture
def etcd_auth(tmp_path):  # type: ignore[no-untyped-def]
    # Tokens live 1 s: the store must re-authenticate by itself after idling.
    server = LocalEtcd(tmp_path / "data", fast=True, extra_args=["--auth-token-ttl=1"]).start()
    try:
        server.etcdctl("user", "add", "root", "--new-user-password=rootpw", "--interactive=false")
        server.etcdctl("user", "add", "lepton", "--new-user-password=s3cret", "--interactive=false")
        server.etcdctl("role", "add", "lepton")
        server.etcdctl(
            "role", "grant-permission", "lepton", "--prefix=true", "readwrite", "/lepton/"
        )
        server.etcdctl("user", "grant-role", "lepton", "lepton")
        server.etcdctl("auth", "enable")
        yield server
    finally:
        server.close()


async def test_username_password_and_token_refresh(etcd_auth: LocalEtcd) -> None:
    store = await Store.connect(etcd_auth.endpoints, username="lepton", password="s3cret")
    try:
        rev = await store.put("/lepton/a", b"1")
        watch = store.watch_prefix("/lepton/", rev)
        assert (await anext(watch))[0].revision == rev
        lease = await store.grant_lease(1)
        lease.keep_alive()
        await asyncio.sleep(2.5)  # the token expires (1 s TTL) while we idle
        assert (await store.get("/lepton/a")).value == b"1"  # re-authenticated
        assert lease.alive  # keep-alive went on with the refreshed token
        rev2 = await store.put("/lepton/b", b"2")
        assert (await anext(watch))[0].revision == rev2
        with pytest.raises(StoreAuthFailed):
            await store.put("/elsewhere", b"no")  # outside the role's prefix
        with pytest.raises(StoreAuthFailed):
            async with asyncio.timeout(5):
                await anext(store.watch_prefix("/elsewhere/", 1))
        await lease.revoke()
        await watch.aclose()
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("username", "password"), [("lepton", "wrong"), ("nobody", "s3cret")], ids=["password", "user"]
)
async def test_bad_credentials_are_auth_failed(etcd_auth: LocalEtcd, username, password) -> None:
    with pytest.raises(StoreAuthFailed) as info:
        await Store.connect(etcd_auth.endpoints, username=username, password=password)
    assert info.value.reason == "store_auth_failed"


async def test_no_credentials_on_an_auth_cluster_is_auth_failed(etcd_auth: LocalEtcd) -> None:
    store = await Store.connect(etcd_auth.endpoints)
    try:
        with pytest.raises(StoreAuthFailed):
            await store.put("/lepton/a", b"1")
    finally:
        await store.close()

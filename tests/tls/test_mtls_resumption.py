"""TLS session resumption: one session per endpoint, tied to one context."""

from __future__ import annotations

import pytest
from tls_support import Pki, client_ctx, connect, server_ctx, spiffe

from lepton_mesh.proxy.security import tls


async def test_second_connection_resumes_and_both_sides_still_know_the_peer(
    pki: Pki, servers
) -> None:
    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    ctx = client_ctx(pki.creds("web"), pki.bundle_pem)
    cache = tls.SessionCache(ctx)

    first = await connect(srv.port, ctx, expect=spiffe("chat"), cache=cache)
    assert (first.reused, first.session_stored) == (False, True)
    assert not (await srv.next_outcome()).reused

    second = await connect(srv.port, ctx, expect=spiffe("chat"), cache=cache)
    assert second.reused
    assert second.identity == spiffe("chat").uri  # the session keeps the peer certificate
    outcome = await srv.next_outcome()
    assert outcome.reused and outcome.identity == spiffe("web").uri


async def test_sessions_are_per_endpoint(pki: Pki, servers) -> None:
    a = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    b = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    ctx = client_ctx(pki.creds("web"), pki.bundle_pem)
    cache = tls.SessionCache(ctx)
    await connect(a.port, ctx, cache=cache, endpoint=("127.0.0.1", a.port))
    # b has never seen us: no session offered, full handshake.
    assert not (await connect(b.port, ctx, cache=cache, endpoint=("127.0.0.1", b.port))).reused
    assert (await connect(a.port, ctx, cache=cache, endpoint=("127.0.0.1", a.port))).reused
    assert cache.size == 2


async def test_new_server_context_means_full_handshake(pki: Pki, servers) -> None:
    """A server that reloaded its certificate (new context, new ticket keys)
    does not resume sessions made under the old one, and the client copes."""
    ctx = client_ctx(pki.creds("web"), pki.bundle_pem)
    cache = tls.SessionCache(ctx)
    old = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    await connect(old.port, ctx, cache=cache, endpoint="chat-0")
    new = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    result = await connect(new.port, ctx, cache=cache, endpoint="chat-0", expect=spiffe("chat"))
    assert not result.reused
    assert result.session_stored  # the fresh session replaces the stale one


async def test_cache_keeps_only_sessions_of_its_own_context(pki: Pki, servers) -> None:
    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    ctx = client_ctx(pki.creds("web"), pki.bundle_pem)
    other_cache = tls.SessionCache(client_ctx(pki.creds("web"), pki.bundle_pem))
    result = await connect(srv.port, ctx, cache=other_cache)
    assert not result.session_stored
    assert other_cache.size == 0


def test_cache_is_bounded_and_evicts_oldest(pki: Pki) -> None:
    ctx = client_ctx(pki.creds("web"), pki.bundle_pem)
    cache = tls.SessionCache(ctx, max_entries=2)

    class FakeSession:
        has_ticket = True
        time = 2**40  # far future: never expired
        timeout = 300

    class FakeConn:
        context = ctx
        session = FakeSession()

    for endpoint in ("a", "b", "c"):
        assert cache.store(endpoint, FakeConn())  # type: ignore[arg-type]
    assert cache.size == 2
    assert cache.get("a") is None and cache.get("c") is not None


def test_expired_session_is_not_offered(pki: Pki) -> None:
    ctx = client_ctx(pki.creds("web"), pki.bundle_pem)
    cache = tls.SessionCache(ctx)

    class OldSession:
        has_ticket = True
        time = 1_000_000
        timeout = 300

    class FakeConn:
        context = ctx
        session = OldSession()

    cache.store("a", FakeConn())  # type: ignore[arg-type]
    with cache.resuming("a") as offered:
        assert offered is None
    assert cache.size == 0


def test_cache_needs_a_positive_bound(pki: Pki) -> None:
    with pytest.raises(ValueError):
        tls.SessionCache(client_ctx(pki.creds("web"), pki.bundle_pem), max_entries=0)


async def test_a_session_offered_to_another_context_is_ignored(pki: Pki, servers) -> None:
    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem))
    ctx = client_ctx(pki.creds("web"), pki.bundle_pem)
    cache = tls.SessionCache(ctx)
    await connect(srv.port, ctx, cache=cache)
    other = client_ctx(pki.creds("web"), pki.bundle_pem)
    with cache.resuming("endpoint") as offered:
        assert offered is not None
        # A connection on another context in the same block: full handshake, no error.
        result = await connect(srv.port, other)
    assert not result.reused

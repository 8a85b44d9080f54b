"""Root rotation as TLS peers see it: a bundle holding old and new roots lets
workloads with certificates from either talk; after the old root is removed,
its certificates are refused."""

from __future__ import annotations

import pytest
from tls_support import Pki, client_ctx, connect, server_ctx, spiffe

from lepton_mesh.proxy.security.tls import HandshakeFailure


@pytest.mark.parametrize(("server_side", "client_side"), [("old", "new"), ("new", "old")])
async def test_bundle_with_both_roots_accepts_leaves_from_both(
    servers, server_side: str, client_side: str
) -> None:
    old, new = Pki(), Pki()
    both = old.bundle.with_root(new.root.cert).to_pem()
    issuer = {"old": old, "new": new}
    srv = await servers(server_ctx(issuer[server_side].creds("chat"), both))
    result = await connect(
        srv.port, client_ctx(issuer[client_side].creds("web"), both), expect=spiffe("chat")
    )
    assert result.identity == spiffe("chat").uri
    assert (await srv.next_outcome()).identity == spiffe("web").uri


async def test_after_rotation_old_root_leaves_are_refused(servers) -> None:
    old, new = Pki(), Pki()
    srv = await servers(server_ctx(new.creds("chat"), new.bundle_pem))
    with pytest.raises(ConnectionResetError):
        await connect(
            srv.port, client_ctx(old.creds("web"), old.bundle.with_root(new.root.cert).to_pem())
        )
    assert (await srv.next_outcome()).reason == HandshakeFailure.UNKNOWN_CA

"""PERMISSIVE mode's first-bytes test: a table for the sans-IO classifier,
then real sockets (peek consumes nothing) and one port serving both."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
from tls_support import DEADLINE, Pki, client_ctx, connect, connect_plain, server_ctx, spiffe

from lepton_mesh.proxy.security.tls import PeekTLS

TLS, PLAIN, MORE = PeekTLS.TLS, PeekTLS.PLAINTEXT, PeekTLS.NEED_MORE


@pytest.mark.parametrize(
    ("first_bytes", "verdict"),
    [
        (b"", MORE),
        (b"\x16", MORE),
        (b"\x16\x03", TLS),
        (b"\x16\x03\x01\x02\x00\x01", TLS),  # a ClientHello record, TLS 1.0 record version
        (b"\x16\x03\x03", TLS),
        (b"\x16\x02", PLAIN),  # not TLS: let the HTTP parser reject it
        (b"\x15\x03\x03", PLAIN),  # an alert record is not a ClientHello
        (b"G", PLAIN),
        (b"GET / HTTP/1.1\r\n", PLAIN),
        (b"POST /x HTTP/1.1\r\n", PLAIN),
        (b"PRI * HTTP/2.0\r\n", PLAIN),
        (b"\x80\x2e\x01", PLAIN),  # SSLv2-style hello: never accepted
        (b"\x00", PLAIN),
    ],
)
def test_classify(first_bytes: bytes, verdict: str) -> None:
    assert PeekTLS.classify(first_bytes) == verdict


def test_every_prefix_of_a_client_hello_is_tls_or_need_more() -> None:
    hello = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + bytes(32)
    for n in range(len(hello) + 1):
        assert PeekTLS.classify(hello[:n]) in (TLS, MORE)
        assert PeekTLS.classify(hello[:n]) == (MORE if n < 2 else TLS)


async def _accepted_pair() -> tuple[socket.socket, socket.socket]:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    try:
        client = socket.socket()
        client.setblocking(False)
        accept = loop.create_task(loop.sock_accept(listener))
        await loop.sock_connect(client, listener.getsockname())
        server, _ = await accept
    finally:
        listener.close()
    server.setblocking(False)
    return server, client


@pytest.mark.parametrize(
    ("sends", "verdict"),
    [
        ([b"\x16\x03\x01\x00\x05hello"], TLS),
        ([b"GET / HTTP/1.1\r\n\r\n"], PLAIN),
        ([b"\x16", b"\x03\x01"], TLS),  # a lone 0x16 first, the rest later
        ([b"\x16", b"ET"], PLAIN),
        ([], PeekTLS.CLOSED),  # the peer closes before sending anything
    ],
)
async def test_peek_on_a_socket_consumes_nothing(sends: list[bytes], verdict: str) -> None:
    server, client = await _accepted_pair()
    loop = asyncio.get_running_loop()
    try:
        peek = loop.create_task(PeekTLS.peek(server, timeout=DEADLINE))
        for chunk in sends:
            await loop.sock_sendall(client, chunk)
            await asyncio.sleep(0)  # let peek see a partial first flight
        if not sends:
            client.shutdown(socket.SHUT_WR)
        assert await peek == verdict
        sent = b"".join(sends)
        got = b""
        async with asyncio.timeout(DEADLINE):
            while len(got) < len(sent):
                got += await loop.sock_recv(server, 1024)
        assert got == sent  # every byte is still there for the real reader
    finally:
        server.close()
        client.close()


async def test_peek_times_out_on_a_silent_peer() -> None:
    server, client = await _accepted_pair()
    try:
        with pytest.raises(TimeoutError):
            await PeekTLS.peek(server, timeout=0.05)
    finally:
        server.close()
        client.close()


async def test_permissive_port_serves_mtls_and_plaintext(pki: Pki, servers) -> None:
    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem), permissive=True)
    result = await connect(
        srv.port, client_ctx(pki.creds("web"), pki.bundle_pem), expect=spiffe("chat")
    )
    assert result.identity == spiffe("chat").uri
    outcome = await srv.next_outcome()
    assert (outcome.kind, outcome.identity) == ("tls", spiffe("web").uri)

    payload = b"GET / HTTP/1.1\r\nHost: chat\r\n\r\n"
    assert await connect_plain(srv.port, payload) == payload
    assert (await srv.next_outcome()).kind == "plaintext"


async def test_permissive_port_still_verifies_tls_clients(
    pki: Pki, foreign_pki: Pki, servers
) -> None:
    srv = await servers(server_ctx(pki.creds("chat"), pki.bundle_pem), permissive=True)
    with pytest.raises((ConnectionResetError, ssl.SSLError)):
        await connect(srv.port, client_ctx(foreign_pki.creds("web"), pki.bundle_pem))
    assert (await srv.next_outcome()).reason == "unknown_ca"

"""The shared TLS context builders: the settings every context carries, which
handshakes each pair of contexts completes or refuses (in memory, both sides
at once), session tickets, and credentials loaded without a file left behind."""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from identity_support import TD, make_pki

from lepton_mesh.identity import tls_contexts as tc
from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
from lepton_mesh.identity.spiffe import SpiffeId, spiffe_id_of_peercert

OURS = make_pki()
FOREIGN = make_pki()  # same trust domain, another root: never trusted
BUNDLE = OURS.bundle.to_pem()


@dataclass(frozen=True)
class Creds:
    chain_pem: bytes
    key_pem: bytes


def creds(service: str, pki=OURS) -> Creds:
    key = generate_key()
    sid = SpiffeId(TD, "default", service)
    return Creds(pki.ca.issue(build_csr(key, sid), sid).chain_pem, private_key_pem(key))


CONTROL, CHAT, STRANGER = creds("control"), creds("chat"), creds("chat", FOREIGN)


class Resuming(ssl.SSLContext):
    """Stands for a subclass such as the sidecar's session-resuming context."""


def server(
    c: Creds = CONTROL, *, required: bool = True, tickets: int = 0, bundle: bytes | str = BUNDLE
) -> ssl.SSLContext:
    return tc.server_context(
        c.chain_pem, c.key_pem, bundle, require_client_cert=required, tickets=tickets
    )


def client(
    c: Creds | None, *, bundle: bytes | str = BUNDLE, cls: type[ssl.SSLContext] = ssl.SSLContext
) -> ssl.SSLContext:
    if c is None:
        return tc.client_context_without_certificate(bundle)
    return tc.client_context(c.chain_pem, c.key_pem, bundle, cls=cls)


# --- settings -----------------------------------------------------------------------

# (id, build, verify_mode, num_tickets or None for a client, roots in the store)
SETTINGS = [
    ("server", lambda: server(tickets=1), ssl.CERT_REQUIRED, 1, 1),
    ("server-optional", lambda: server(required=False), ssl.CERT_OPTIONAL, 0, 1),
    ("server-str-bundle", lambda: server(bundle=BUNDLE.decode()), ssl.CERT_REQUIRED, 0, 1),
    (
        "server-without-credentials",
        lambda: tc.server_context_without_credentials(require_client_cert=False, tickets=0),
        ssl.CERT_OPTIONAL,
        0,
        0,
    ),
    ("client", lambda: client(CHAT), ssl.CERT_REQUIRED, None, 1),
    ("client-subclass", lambda: client(CHAT, cls=Resuming), ssl.CERT_REQUIRED, None, 1),
    ("client-without-certificate", lambda: client(None), ssl.CERT_REQUIRED, None, 1),
    (
        "client-without-certificate-str-bundle",
        lambda: client(None, bundle=BUNDLE.decode()),
        ssl.CERT_REQUIRED,
        None,
        1,
    ),
]


@pytest.mark.parametrize(
    ("build", "verify_mode", "tickets", "roots"),
    [s[1:] for s in SETTINGS],
    ids=[s[0] for s in SETTINGS],
)
def test_every_context_carries_the_mesh_settings(
    build: Callable[[], ssl.SSLContext],
    verify_mode: ssl.VerifyMode,
    tickets: int | None,
    roots: int,
) -> None:
    ctx = build()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == verify_mode
    assert not ctx.check_hostname  # SPIFFE IDs are checked by the caller, not host names
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert not ctx.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
    # TLS 1.2 suites: ECDHE and AEAD only (TLS 1.3 suites are listed too).
    for c in ctx.get_ciphers():
        if c["protocol"] == "TLSv1.2":
            assert c["kea"] == "kx-ecdhe" and c["aead"], c["name"]
    assert ctx.cert_store_stats()["x509_ca"] == roots  # the bundle only, no system store
    if tickets is not None:
        assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
        assert ctx.num_tickets == tickets


def test_client_cls_is_the_class_built() -> None:
    assert type(tc.client_context(CHAT.chain_pem, CHAT.key_pem, BUNDLE, cls=Resuming)) is Resuming
    assert type(tc.client_context(CHAT.chain_pem, CHAT.key_pem, BUNDLE)) is ssl.SSLContext


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (
            lambda: tc.server_context(CONTROL.chain_pem, CHAT.key_pem, BUNDLE, tickets=0),
            ssl.SSLError,
        ),
        (lambda: tc.client_context(CHAT.chain_pem, CONTROL.key_pem, BUNDLE), ssl.SSLError),
        (lambda: tc.client_context_without_certificate(b"junk"), ssl.SSLError),
        (lambda: tc.client_context_without_certificate(b"\xff"), ValueError),
    ],
    ids=["server-wrong-key", "client-wrong-key", "junk-bundle", "non-ascii-bundle"],
)
def test_bad_material_is_refused_at_load(build: Callable[[], ssl.SSLContext], error: type) -> None:
    with pytest.raises(error):
        build()


# --- handshakes, in memory ----------------------------------------------------------


class Handshake:
    """Both sides of one TLS connection over memory BIOs. Deterministic: no
    sockets, no event loop. `failed` is the side whose handshake raised
    ("server" or "client"), `reason` that error's OpenSSL reason."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
        self._c_in, self._c_out, self._s_in, self._s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = client_ctx.wrap_bio(self._c_in, self._c_out, server_side=False)
        self.server = server_ctx.wrap_bio(self._s_in, self._s_out, server_side=True)
        self.failed: str | None = None
        self.reason: str | None = None
        self._run()

    def pump(self) -> None:
        """Move what each side wrote to the other."""
        self._s_in.write(self._c_out.read())
        self._c_in.write(self._s_out.read())

    def _run(self) -> None:
        done = {"client": False, "server": False}
        for _ in range(10):
            for name, obj in (("client", self.client), ("server", self.server)):
                if done[name]:
                    continue
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as e:
                    self.failed, self.reason = name, e.reason
                    return
            self.pump()
            if all(done.values()):
                return
        raise AssertionError("the handshake neither finished nor failed")

    def client_identity(self) -> str | None:
        cert = self.server.getpeercert()
        return spiffe_id_of_peercert(cert).uri if cert else None


CHAT_ID = "spiffe://cluster.local/ns/default/svc/chat"


@pytest.mark.parametrize(
    ("server_ctx", "client_ctx", "failed", "reason", "identity"),
    [
        (lambda: server(), lambda: client(CHAT), None, None, CHAT_ID),
        (lambda: server(required=False), lambda: client(CHAT), None, None, CHAT_ID),
        (lambda: server(required=False), lambda: client(None), None, None, None),
        (lambda: server(), lambda: client(None), "server", "PEER_DID_NOT_RETURN_A_CERTIFICATE", None),
        # A certificate the client did not have to present must still verify.
        (lambda: server(required=False), lambda: client(STRANGER), "server", "CERTIFICATE_VERIFY_FAILED", None),
        # The certless client still authenticates the server.
        (lambda: server(STRANGER, required=False), lambda: client(None), "client", "CERTIFICATE_VERIFY_FAILED", None),
        (lambda: server(STRANGER), lambda: client(CHAT), "client", "CERTIFICATE_VERIFY_FAILED", None),
    ],
    ids=[
        "required-presented",
        "optional-presented",
        "optional-absent",
        "required-absent",
        "optional-foreign",
        "foreign-server-certless-client",
        "foreign-server",
    ],
)  # fmt: skip
def test_handshakes(
    server_ctx: Callable[[], ssl.SSLContext],
    client_ctx: Callable[[], ssl.SSLContext],
    failed: str | None,
    reason: str | None,
    identity: str | None,
) -> None:
    hs = Handshake(server_ctx(), client_ctx())
    assert (hs.failed, hs.reason) == (failed, reason)
    if failed is None:
        assert hs.client_identity() == identity
        assert hs.client.version() == "TLSv1.3"


@pytest.mark.parametrize(("tickets", "resumable"), [(0, False), (1, True)])
def test_a_server_issues_the_tickets_it_was_given(tickets: int, resumable: bool) -> None:
    hs = Handshake(server(tickets=tickets), client(CHAT))
    assert hs.failed is None
    # TLS 1.3 tickets follow the handshake: the client takes them in with data.
    hs.server.write(b"x")
    hs.pump()
    assert hs.client.read(1) == b"x"
    assert hs.client.session is not None
    assert hs.client.session.has_ticket is resumable


# --- credentials reach OpenSSL without a file ------------------------------------------


def test_memfd_loading_leaves_no_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    server()
    client(CHAT)
    assert list(tmp_path.iterdir()) == []


def test_without_memfd_the_key_file_is_private_and_removed(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delattr(os, "memfd_create")
    created: list[tuple[int, int]] = []  # (file mode, its directory's mode)
    real_open = os.open

    def spy_open(path, flags, mode=0o777, *args, **kwargs):
        if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
            created.append((mode, os.stat(os.path.dirname(path)).st_mode & 0o777))
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    srv, cli = server(), client(CHAT)
    monkeypatch.undo()
    assert created == [(0o600, 0o700), (0o600, 0o700)]
    assert list(tmp_path.iterdir()) == []  # each file and its directory are gone
    hs = Handshake(srv, cli)  # and the contexts hold what was loaded
    assert (hs.failed, hs.client_identity()) == (None, CHAT_ID)


# --- real sockets -----------------------------------------------------------------------


async def test_bootstrap_over_a_socket() -> None:
    """The control stream's first connection: a certless client, a server
    that lets it in without a certificate and issues no tickets."""
    seen: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(writer.get_extra_info("peercert"))
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server(required=False))
    port = srv.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client(None))
            cert = writer.get_extra_info("peercert")
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            assert await seen is None  # no client certificate
            assert not writer.get_extra_info("ssl_object").session.has_ticket
            writer.close()
            await writer.wait_closed()
        assert spiffe_id_of_peercert(cert).service == "control"
    finally:
        srv.close()
        await srv.wait_closed()

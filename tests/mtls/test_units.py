"""Unit-level pieces of the data-plane mTLS: the lepton-tcp/1 frame decoder,
the malloc_trim timer, the handshake cap, which endpoints stay plaintext, and
the `tls` config section."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from types import MappingProxyType

import pytest
from mtls_support import LOCAL, Pki, sidecar_config, wait_for, write_tls

from lepton_mesh.policy.errors import ConfigError
from lepton_mesh.policy.sidecar_config import Address, Endpoint, ServiceConfig
from lepton_mesh.policy.sidecar_loader import (
    load_sidecar_config,
    sidecar_config_from_mapping,
    sidecar_config_to_json,
)
from lepton_mesh.policy.traffic import ExternalService, TrafficPolicies
from lepton_mesh.proxy.l4.tcp_proxy import END_FRAME, FrameDecoder, FrameError
from lepton_mesh.proxy.security import mtls
from lepton_mesh.proxy.security.mtls import (
    MallocTrimmer,
    MeshIdentity,
    TlsAcceptor,
    plaintext_endpoints,
)


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


# --- lepton-tcp/1 frames --------------------------------------------------------------------

STREAMS = [
    pytest.param([b"hello"], b"hello", True, id="one frame"),
    pytest.param([b"a", b"bc", b"def"], b"abcdef", True, id="three frames"),
    pytest.param([b"x" * 70_000], b"x" * 70_000, True, id="large frame"),
    pytest.param([b"abc"], b"abc", False, id="no end frame yet"),
    pytest.param([], b"", True, id="only the end"),
]


def _wire(payloads: list[bytes], end: bool) -> bytes:
    return b"".join(frame(p) for p in payloads) + (END_FRAME if end else b"")


def _decode(chunks: list[bytes]) -> tuple[bytes, bool]:
    d = FrameDecoder()
    out = b"".join(bytes(piece) for c in chunks for piece in d.feed(c))
    return out, d.ended


@pytest.mark.parametrize(("payloads", "expected", "end"), STREAMS)
@pytest.mark.parametrize("split", ["whole", "bytewise", "every_prefix"])
def test_decoder_reads_any_split(
    payloads: list[bytes], expected: bytes, end: bool, split: str
) -> None:
    wire = _wire(payloads, end)
    if split == "whole":
        cases = [[wire]]
    elif split == "bytewise":
        cases = [[wire[i : i + 1] for i in range(len(wire))]] if len(wire) < 5000 else [[wire]]
    else:
        cases = [[wire[:i], wire[i:]] for i in range(0, len(wire) + 1, max(1, len(wire) // 40))]
    for chunks in cases:
        assert _decode(chunks) == (expected, end)


def test_decoder_hands_out_the_read_itself_when_it_is_all_payload() -> None:
    d = FrameDecoder()
    assert [bytes(p) for p in d.feed(struct.pack(">I", 10) + b"abc")] == [b"abc"]
    chunk = b"defghij"
    (piece,) = d.feed(chunk)
    assert piece is chunk  # no copy on the hot path


@pytest.mark.parametrize("after", [b"x", frame(b"more")])
def test_data_after_the_end_frame_is_an_error(after: bytes) -> None:
    d = FrameDecoder()
    with pytest.raises(FrameError):
        d.feed(frame(b"a") + END_FRAME + after)
    d2 = FrameDecoder()
    d2.feed(END_FRAME)
    with pytest.raises(FrameError):
        d2.feed(after)
    assert d2.feed(b"") == []


# --- malloc_trim ------------------------------------------------------------------------------


async def test_trim_timer_arms_once_on_close_and_fires_once() -> None:
    calls: list[int] = []
    trimmer = MallocTrimmer(lambda pad: calls.append(pad) or 1, interval=0.01)
    assert not trimmer.armed
    for _ in range(50):  # a burst of closes: one timer
        trimmer.connection_closed()
    assert trimmer.armed
    await wait_for(lambda: calls == [0])
    assert not trimmer.armed and trimmer.trims == 1
    trimmer.connection_closed()  # churn goes on: armed again, at most once per interval
    assert trimmer.armed
    await wait_for(lambda: calls == [0, 0])
    assert not trimmer.armed


async def test_trim_is_a_no_op_without_glibc() -> None:
    trimmer = MallocTrimmer(None)
    trimmer.connection_closed()
    assert not trimmer.armed and not trimmer.available


async def test_close_disarms_the_timer() -> None:
    calls: list[int] = []
    trimmer = MallocTrimmer(lambda pad: calls.append(pad) or 1, interval=0.01)
    trimmer.connection_closed()
    handle = trimmer._handle
    trimmer.close()
    assert not trimmer.armed
    assert handle is not None and handle.cancelled()
    assert calls == []


def test_glibc_malloc_trim_is_found_here() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not a glibc system")
    assert mtls._find_malloc_trim() is not None
    assert mtls._find_malloc_trim()(0) in (0, 1)  # type: ignore[misc]


# --- the handshake cap ------------------------------------------------------------------------


async def test_handshakes_in_flight_are_capped(tmp_path: Path, pki: Pki) -> None:
    creds = pki.issue("chat")
    identity = MeshIdentity.create(
        creds.chain_pem,
        creds.key_pem,
        pki.bundle_pem,
        trust_domain="cluster.local",
        namespace="default",
        service="chat",
        max_handshakes=2,
    )
    acceptor = TlsAcceptor(
        identity, lambda secure: asyncio.Protocol(), permissive=False, handshake_timeout=lambda: 5.0
    )
    await acceptor.start(LOCAL, 0)
    port = acceptor.sockets[0].getsockname()[1]
    silent = []
    try:
        for _ in range(3):  # connect, never send a ClientHello
            s = socket.create_connection((LOCAL, port))
            silent.append(s)
        await wait_for(lambda: acceptor.handshakes_in_flight == 2)
        # No slot left: the accept loop waits for one, the third stays in the backlog.
        assert acceptor._slots.locked()
        silent.pop(0).close()  # one gives up: its slot goes to the third
        await wait_for(lambda: identity.failures["other"] == 1)
        await wait_for(lambda: acceptor.handshakes_in_flight == 2)
    finally:
        for s in silent:
            s.close()
        acceptor.abort()
        await acceptor.wait_closed()
        identity.close()


# --- which endpoints are called in plaintext ------------------------------------------------


def test_plaintext_endpoints() -> None:
    app = Address(LOCAL, 8080)
    labelled = Endpoint(
        Address("10.0.0.9", 6379), labels=MappingProxyType({"lepton.io/tls": "disabled"})
    )
    meshed = Endpoint(Address("10.0.0.1", 15006), labels=MappingProxyType({"version": "v1"}))
    external = Endpoint(Address("203.0.113.5", 443))
    cfg = sidecar_config("web", app)
    cfg = cfg.__class__(
        **{
            **{f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
            "services": MappingProxyType(
                {
                    "chat": ServiceConfig("chat", endpoints=(meshed,)),
                    "cache": ServiceConfig("cache", endpoints=(labelled,)),
                }
            ),
            "traffic": TrafficPolicies(
                external=MappingProxyType(
                    {"pay": ExternalService("pay", "default", "pay", (external,))}
                )
            ),
        }
    )
    assert plaintext_endpoints(cfg) == {app, labelled.address, external.address}


# --- the tls config section -------------------------------------------------------------------


def test_tls_section_loads_with_paths_relative_to_the_file(tmp_path: Path, pki: Pki) -> None:
    write_tls(tmp_path / "certs", pki.issue("chat"), pki.bundle_pem)
    (tmp_path / "chat.yaml").write_text(
        "service: chat\napp: 127.0.0.1:8080\n"
        "tls:\n  mode: PERMISSIVE\n  cert: certs/cert.pem\n  key: certs/key.pem\n"
        "  bundle: certs/bundle.pem\n  tcp_app: 127.0.0.1:5432\n"
    )
    cfg = load_sidecar_config(tmp_path / "chat.yaml")
    assert cfg.tls is not None
    assert (cfg.tls.mode, cfg.tls.trust_domain, cfg.tls.max_handshakes) == (
        "PERMISSIVE",
        "cluster.local",
        256,
    )
    assert cfg.tls.cert == str(tmp_path / "certs" / "cert.pem")
    assert cfg.tls.tcp_app == Address("127.0.0.1", 5432)
    data = sidecar_config_to_json(cfg)
    data.pop("source")
    assert sidecar_config_from_mapping(data, "again").tls == cfg.tls  # control rebuilds it so


def test_no_tls_section_means_no_tls(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("service: chat\napp: 127.0.0.1:8080\n")
    cfg = load_sidecar_config(tmp_path / "a.yaml")
    assert cfg.tls is None
    assert "tls" not in sidecar_config_to_json(cfg)


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ("{key: k, bundle: b}", "tls.cert: required field is missing"),
        ("{cert: '', key: k, bundle: b}", "tls.cert: must not be empty"),
        ("{cert: c, key: k, bundle: b, mode: strict}", "did you mean 'STRICT'?"),
        (
            "{cert: c, key: k, bundle: b, trust_domain: Cluster}",
            "tls.trust_domain: invalid trust domain",
        ),
        ("{cert: c, key: k, bundle: b, tcp_app: 'x'}", "tls.tcp_app: invalid address"),
        ("{cert: c, key: k, bundle: b, max_handshakes: 0}", "tls.max_handshakes"),
        (
            "{cert: c, key: k, bundle: b, tcp_app: '127.0.0.1:15006'}",
            "tls.tcp_app: 127.0.0.1:15006 is also listeners.inbound",
        ),
        ("{cert: c, key: k, bundle: b, ciphers: all}", "tls.ciphers: unknown field"),
        ("yes", "tls: expected a mapping"),
    ],
)
def test_tls_section_problems(tmp_path: Path, tls: str, message: str) -> None:
    (tmp_path / "a.yaml").write_text(f"service: chat\napp: 127.0.0.1:8080\ntls: {tls}\n")
    with pytest.raises(ConfigError) as err:
        load_sidecar_config(tmp_path / "a.yaml")
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("missing_key", "tls.key: cannot read"),
        ("other_service", "the certificate names spiffe://cluster.local/ns/default/svc/intent"),
    ],
)
def test_sidecar_refuses_to_start_with_bad_files(
    tmp_path: Path, pki: Pki, broken: str, message: str
) -> None:
    from lepton_mesh.proxy.sidecar import Sidecar

    service = "intent" if broken == "other_service" else "chat"
    tls = write_tls(tmp_path / "c", pki.issue(service), pki.bundle_pem)
    if broken == "missing_key":
        Path(tls.key).unlink()
    with pytest.raises(ConfigError) as err:
        Sidecar(sidecar_config("chat", Address(LOCAL, 8080), tls_cfg=tls))
    assert message in str(err.value)

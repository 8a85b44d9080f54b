"""The identity messages of the control stream: they round-trip, every field is
required and typed, and a peer that predates them sees `Unknown` (ignored)."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest

from lepton_mesh import meshproto as mp

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
MESSAGES = [
    mp.Csr("-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"),
    mp.Certificate(PEM + PEM, PEM, 1764190000.5),
    mp.Trust(PEM, "ab" * 32),
    mp.Hello("chat-1", "chat", "default", mp.Instance("10.0.0.5", {"http": 15006}), token="jwt"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.TYPE)
def test_round_trip_whole_and_byte_by_byte(msg: mp.Message) -> None:
    frame = mp.encode(msg)
    decoder = mp.FrameDecoder()
    out = []
    for i in range(len(frame)):
        decoder.feed(frame[i : i + 1])
        while (got := decoder.next_message()) is not None:
            out.append(got)
    assert out == [msg]


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        ({"type": "csr"}, "csr: missing field 'csr_pem'"),
        ({"type": "csr", "csr_pem": ""}, "csr.csr_pem: expected a non-empty string"),
        ({"type": "certificate", "chain_pem": PEM, "bundle_pem": PEM},
         "certificate: missing field 'not_after'"),
        ({"type": "certificate", "chain_pem": PEM, "bundle_pem": PEM, "not_after": "soon"},
         "certificate.not_after: expected a number"),
        ({"type": "trust", "bundle_pem": PEM}, "trust: missing field 'issuer'"),
        ({"type": "trust", "bundle_pem": 7, "issuer": "ab"}, "trust.bundle_pem: expected a non-empty"),
    ],
)  # fmt: skip
def test_malformed_identity_messages_are_protocol_errors(obj: dict, problem: str) -> None:
    with pytest.raises(mp.ProtocolError) as err:
        mp.message_from_json(obj)
    assert err.value.reason == mp.Reason.BAD_MESSAGE
    assert problem in err.value.detail


def test_a_peer_that_predates_them_sees_unknown_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a version 1 peer built before identity does with them: nothing."""
    for kind in ("csr", "certificate", "trust"):
        monkeypatch.delitem(mp._BY_TYPE, kind)
    decoder = mp.FrameDecoder()
    for msg in MESSAGES[:3]:
        decoder.feed(mp.encode(msg))
    kinds = []
    while (got := decoder.next_message()) is not None:
        assert isinstance(got, mp.Unknown)
        kinds.append(got.type)
    assert kinds == ["csr", "certificate", "trust"]


def test_a_hello_without_a_token_is_still_valid() -> None:
    msg = replace(MESSAGES[3], token=None)
    data = orjson.loads(mp.encode(msg)[4:])
    del data["token"]
    assert mp.message_from_json(data) == msg

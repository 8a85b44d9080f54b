"""Malformed requests get a precise JSON 4xx, never a 500, a write, or a traceback in the log."""

from __future__ import annotations

import asyncio
import gzip
import logging
import time

import jwt
import pytest

from lepton_mesh.control.auth import TokenVerifier
from tests.admin_api.admin_support import Api
from tests.policy_store.policy_support import dest

pytestmark = pytest.mark.timeout(30)


def files(*texts: str) -> dict:
    return {"files": [{"name": "p.yaml", "content": "---\n".join(texts)}]}


def bad(reply, status: int = 400, reason: str = "bad_request") -> bool:
    return reply.status == status and reply.body["reason"] == reason


# --- 5: unknown fields ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/policies:apply", {"dryrun": True}, "dryrun"),
        ("/api/v1/policies:validate", {"prunee": True}, "prunee"),
        ("/api/v1/policies:diff", {"manifest": []}, "manifest"),
        ("/api/v1/rollback", {"revision": 0, "msg": "x"}, "msg"),
    ],
)
async def test_an_unknown_field_is_a_400_naming_it(
    api: Api, path: str, body: dict, field: str
) -> None:
    reply = await api.call("POST", path, body=files(dest()) | body if "files" not in body else body)
    assert bad(reply), reply.body
    assert repr(field) in reply.body["error"]
    assert api.ctl.policies.revision() == 0  # the typo'd dry run wrote nothing


async def test_an_unknown_field_in_a_file_is_a_400(api: Api) -> None:
    body = {"files": [{"name": "p.yaml", "content": dest(), "contnet": ""}]}
    reply = await api.call("POST", "/api/v1/policies:apply", body=body)
    assert bad(reply) and "'contnet'" in reply.body["error"]
    assert api.ctl.policies.revision() == 0


# --- 11: strict types -------------------------------------------------------------------


async def test_numbers_must_be_numbers(api: Api) -> None:
    await api.call("POST", "/api/v1/policies:apply", body=files(dest()))
    await api.call("POST", "/api/v1/policies:apply", body=files(dest(timeout="5s")))
    reply = await api.call("POST", "/api/v1/rollback", body={"revision": "1"})
    assert bad(reply), reply.body
    body = files(dest(timeout="7s")) | {"base_revision": "2"}
    assert bad(await api.call("POST", "/api/v1/policies:apply", body=body))
    assert api.ctl.policies.revision() == 2  # neither wrote
    for path, params in (
        ("/api/v1/history/\uff11", None),  # a full-width digit one
        ("/api/v1/history", {"limit": "\uff11"}),
        ("/api/v1/history", {"limit": "-1"}),
        ("/api/v1/history/+1", None),
    ):
        reply = await api.call("GET", path, token="read", params=params)
        assert bad(reply), (path, params, reply.status)
    path = "/api/v1/policies/DestinationPolicy/default/dialog"
    reply = await api.call("DELETE", path, params={"base_revision": "\uff12"})
    assert bad(reply)
    assert (await api.call("GET", "/api/v1/history/1", token="read")).status == 200


# --- 7 and 12: tokens -------------------------------------------------------------------


def _signed(api: Api, **claims) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(api.key_file.read_bytes(), password=None)
    now = int(time.time())
    base = {"iss": "lepton-mesh", "sub": "mallory", "role": "admin", "iat": now, "exp": now + 60}
    return jwt.encode(base | claims, key, algorithm="ES256")


async def test_odd_tokens_are_401_invalid_token(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    cases = {
        "non-ascii": "Bearer a\xff.b.c",
        "exp 10**400": "Bearer " + _signed(api, exp=10**400),
        "exp a string": "Bearer " + _signed(api, exp="99999999999"),
        "iat a string": "Bearer " + _signed(api, iat=str(int(time.time()))),
    }
    with caplog.at_level(logging.ERROR):
        for case, header in cases.items():
            reply = await _raw(api, "GET", "/api/v1/overview", {"Authorization": header})
            assert (reply[0], reply[2].get("reason")) == (401, "invalid_token"), case
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_the_verifier_refuses_them_too(api: Api) -> None:
    from lepton_mesh.control.auth import Unauthenticated

    verifier = TokenVerifier.from_key_file(api.key_file)
    for token in ("a\xff.b.c", _signed(api, exp=10**400), _signed(api, exp="99999999999")):
        with pytest.raises(Unauthenticated) as info:
            verifier.verify(token)
        assert info.value.reason == "invalid_token"


# --- 8: bodies and headers aiohttp cannot take ------------------------------------------


async def _raw(api: Api, method: str, path: str, headers: dict[str, str], body: bytes = b""):
    """One request over a raw socket (headers as given, even non-ASCII): (status, headers, json)."""
    import orjson

    host, port = api.server.host, api.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        raw = await reader.read()
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    got = dict(line.split(": ", 1) for line in header_lines)
    status = int(status_line.split()[1])
    assert got.get("Content-Type", "").startswith("application/json"), (status, payload[:200])
    return status, got, orjson.loads(payload)


async def test_a_body_that_is_not_what_its_encoding_says_is_a_400(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    auth = {"Authorization": f"Bearer {api.tokens['admin']}", "Content-Encoding": "gzip"}
    with caplog.at_level(logging.ERROR):
        status, _, body = await _raw(api, "POST", "/api/v1/policies:apply", auth, b"not gzip" * 10)
        assert (status, body["reason"]) == (400, "bad_request"), body
        # Refused before the body is read (no token): no traceback either.
        status, _, body = await _raw(
            api, "POST", "/api/v1/policies:apply", {"Content-Encoding": "gzip"}, b"not gzip" * 10
        )
        assert (status, body["reason"]) == (401, "missing_token")
        # A real gzip body still works.
        status, _, body = await _raw(
            api, "POST", "/api/v1/policies:validate", auth, gzip.compress(b'{"files": []}')
        )
        assert status == 200, body
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


@pytest.mark.parametrize("size", [9_000, 20_000, 100_000])
async def test_an_oversized_authorization_header_is_a_json_4xx(
    api: Api, caplog: pytest.LogCaptureFixture, size: int
) -> None:
    with caplog.at_level(logging.ERROR):
        status, _, body = await _raw(
            api, "GET", "/api/v1/overview", {"Authorization": "Bearer " + "a" * size}
        )
    # Within what a header line may be, it is a token that is not one; beyond, too large.
    expected = (401, "invalid_token") if size < 16_000 else (431, "too_large")
    assert (status, body["reason"]) == expected, body
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# --- 13: a dry run answers what the write would --------------------------------------------


async def test_a_dry_run_over_the_transaction_limits_is_the_writes_413(api: Api) -> None:
    many = files(*(dest(f"s{i}") for i in range(127)))
    dry = await api.call("POST", "/api/v1/policies:apply", body=many | {"dry_run": True})
    real = await api.call("POST", "/api/v1/policies:apply", body=many)
    assert bad(dry, 413, "too_large") and bad(real, 413, "too_large")
    assert dry.body["error"] == real.body["error"]

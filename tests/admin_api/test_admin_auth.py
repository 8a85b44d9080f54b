"""Tokens: ES256 only, expiry, roles, the key file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lepton_mesh.control.auth import (
    Forbidden,
    KeyFileError,
    TokenIssuer,
    TokenVerifier,
    Unauthenticated,
    init_key,
    load_key,
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, claims: dict, sign) -> str:
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    return head + "." + b64(sign(head.encode()))


@pytest.fixture
def key(tmp_path: Path) -> ec.EllipticCurvePrivateKey:
    return init_key(tmp_path / "token.key")


def test_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "token.key"
    key = init_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(path).private_numbers() == key.private_numbers()
    with pytest.raises(KeyFileError, match="already exists"):
        init_key(path)
    assert load_key(path).private_numbers() == key.private_numbers()


def test_load_key_refuses_other_keys(tmp_path: Path) -> None:
    other = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "p384.key").write_bytes(other)
    (tmp_path / "junk.key").write_text("hello")
    with pytest.raises(KeyFileError, match="P-256"):
        load_key(tmp_path / "p384.key")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM"):
        load_key(tmp_path / "junk.key")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key(tmp_path / "missing.key")


def test_round_trip_and_roles(key) -> None:
    issuer, verifier = TokenIssuer(key), TokenVerifier(key.public_key())
    claims = verifier.verify(issuer.create(subject="alice", role="admin", ttl=60))
    assert (claims.subject, claims.role) == ("alice", "admin")
    claims.require("read")
    claims.require("admin")
    with pytest.raises(Forbidden):
        claims.require("join")
    reader = verifier.verify(issuer.create(subject="bob", role="read", ttl=60))
    with pytest.raises(Forbidden) as info:
        reader.require("admin")
    assert (info.value.status, info.value.reason) == (403, "insufficient_role")
    join = verifier.verify(
        issuer.create(subject="chat-1", role="join", ttl=60, service="chat", namespace="prod")
    )
    assert (join.service, join.namespace) == ("chat", "prod")
    with pytest.raises(Forbidden):
        join.require("read")


def _attack(key: ec.EllipticCurvePrivateKey, name: str) -> str | None:
    plain = {"missing": None, "empty": "", "garbage": "not-a-jwt"}
    if name in plain:
        return plain[name]
    now = int(time.time())
    good = {"iss": "lepton-mesh", "sub": "mallory", "role": "admin", "iat": now, "exp": now + 60}
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if name == "hs256-with-public-key":  # HMAC "signed" with our public key: the classic confusion
        sign = lambda m: hmac.new(public_pem, m, hashlib.sha256).digest()  # noqa: E731
        return forge({"alg": "HS256", "typ": "JWT"}, good, sign)
    if name == "alg-none":
        return forge({"alg": "none", "typ": "JWT"}, good, lambda m: b"")
    if name == "other-key":
        return jwt.encode(good, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    if name == "expired":
        return TokenIssuer(key).create(subject="a", role="admin", ttl=60, now=now - 3600)
    if name == "tampered":  # the payload changed after signing: role read -> admin
        token = TokenIssuer(key).create(subject="a", role="read", ttl=60)
        head, _, rest = token.partition(".")
        _, _, sig = rest.partition(".")
        return f"{head}.{b64(json.dumps(good).encode())}.{sig}"
    changed = {
        "unknown-role": good | {"role": "root"},
        "no-exp": {k: v for k, v in good.items() if k != "exp"},
        "wrong-issuer": good | {"iss": "someone-else"},
    }
    return jwt.encode(changed[name], key, algorithm="ES256")


REFUSED = [
    ("missing", "missing_token"),
    ("empty", "missing_token"),
    ("garbage", "invalid_token"),
    ("hs256-with-public-key", "invalid_token"),
    ("alg-none", "invalid_token"),
    ("other-key", "invalid_token"),
    ("expired", "expired_token"),
    ("tampered", "invalid_token"),
    ("unknown-role", "invalid_token"),
    ("no-exp", "invalid_token"),
    ("wrong-issuer", "invalid_token"),
]


@pytest.mark.parametrize(("name", "reason"), REFUSED, ids=[n for n, _ in REFUSED])
def test_refused_tokens(key, name: str, reason: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        TokenVerifier(key.public_key()).verify(_attack(key, name))
    assert (info.value.status, info.value.reason) == (401, reason)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subject": "a", "role": "root", "ttl": 1}, "unknown role"),
        ({"subject": "", "role": "read", "ttl": 1}, "subject"),
        ({"subject": "a", "role": "read", "ttl": 0}, "ttl"),
        ({"subject": "a", "role": "join", "ttl": 1}, "join token names"),
        ({"subject": "a", "role": "read", "ttl": 1, "service": "x"}, "only join"),
    ],
)
def test_issuer_refuses_bad_requests(key, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenIssuer(key).create(**kwargs)

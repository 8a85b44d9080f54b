"""Bearer tokens for the admin API and sidecar joins: ES256 JWTs signed by the daemon's key.

The control daemon holds one EC P-256 private key (`--token-key FILE`,
created by `lepton-mesh token init-key`). `TokenIssuer` signs tokens with it;
`TokenVerifier` checks them with the public half, so a replica that only
verifies could be given the public key alone.

Claims: `sub` (who: written into history for every write), `role`
(`read`, `admin` or `join`), `iat`, `exp`, and for `join` tokens the
`service` and `namespace` the sidecar may register as.

Verification is pinned to ES256: a token whose header says `none`, or an
HMAC algorithm (the classic attack: HS256 "signed" with the public key PEM
as the secret), is refused before any signature check, whatever the key.
Every failure is a typed error carrying its HTTP status and reason code:
401 for a missing, malformed, badly signed or expired token (the response
carries `WWW-Authenticate: Bearer`), 403 for a valid token whose role is
not enough.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "ROLES",
    "AuthError",
    "Claims",
    "Forbidden",
    "KeyFileError",
    "TokenIssuer",
    "TokenVerifier",
    "Unauthenticated",
    "init_key",
    "load_key",
]

Role = Literal["read", "admin", "join"]
ROLES: tuple[Role, ...] = ("read", "admin", "join")
ALGORITHM = "ES256"
ISSUER = "lepton-mesh"
# Replicas' clocks may differ a little; a token is honoured this long past `exp`.
CLOCK_SKEW = 10.0

# Which roles satisfy a requirement. `admin` can do what `read` can; `join`
# (a sidecar registering) is apart: it reads nothing through the admin API.
_SATISFIES: dict[Role, frozenset[Role]] = {
    "read": frozenset({"read", "admin"}),
    "admin": frozenset({"admin"}),
    "join": frozenset({"join"}),
}


class AuthError(Exception):
    """Base of the token errors: `status` and `reason` as the admin API answers them."""

    status = 401
    reason = "unauthenticated"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class Unauthenticated(AuthError):
    """401: no token, or one that is not ours or no longer valid.

    Reasons: `missing_token`, `invalid_token`, `expired_token`.
    """

    status = 401


class Forbidden(AuthError):
    """403: a valid token whose role does not allow the operation."""

    status = 403
    reason = "insufficient_role"


class KeyFileError(Exception):
    """The token key file cannot be created or read (exit code 2 in the CLI)."""

    exit_code = 2
    reason = "bad_token_key"


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says."""

    subject: str
    role: Role
    expires: float
    service: str | None = None
    namespace: str | None = None

    def require(self, role: Role) -> None:
        """Raise `Forbidden` unless this token's role satisfies `role`."""
        if self.role not in _SATISFIES[role]:
            raise Forbidden(f"this operation needs the {role!r} role; the token has {self.role!r}")


# --- the key file -----------------------------------------------------------------


def init_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Create a new P-256 private key at `path` (PEM, PKCS#8, mode 0600).

    Never overwrites: replacing the key silently would invalidate every
    token issued, so an existing file is an error.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # O_EXCL: no race with another writer; the mode applies at creation,
        # so the key is never readable by others, not even for a moment.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise KeyFileError(f"{os.fspath(path)}: already exists; not overwriting a token key") from e
    except OSError as e:
        raise KeyFileError(f"{os.fspath(path)}: cannot create: {e.strerror or e}") from e
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def load_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Read a P-256 private key written by `init_key` (or any PEM P-256 key)."""
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KeyFileError(f"{where}: cannot read: {e.strerror or e}") from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{where}: not an unencrypted PEM private key ({e})") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise KeyFileError(f"{where}: expected an EC P-256 key (ES256)")
    return key


# --- issuing and verifying -------------------------------------------------------


class TokenIssuer:
    """Signs tokens with the daemon's private key."""

    __slots__ = ("_key",)

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def create(
        self,
        *,
        subject: str,
        role: Role,
        ttl: float,
        service: str | None = None,
        namespace: str | None = None,
        now: float | None = None,
    ) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
        if not subject:
            raise ValueError("a token needs a subject: history names it for every write")
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, found {ttl}")
        if role == "join" and not service:
            raise ValueError("a join token names the service the sidecar registers as")
        if role != "join" and (service or namespace):
            raise ValueError("only join tokens carry a service and namespace")
        issued = time.time() if now is None else now
        claims: dict[str, object] = {
            "iss": ISSUER,
            "sub": subject,
            "role": role,
            "iat": int(issued),
            "exp": int(issued + ttl),
        }
        if role == "join":
            claims["service"] = service
            claims["namespace"] = namespace or "default"
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)


class TokenVerifier:
    """Checks tokens against the daemon's public key; ES256 only."""

    __slots__ = ("_key",)

    def __init__(self, public_key: ec.EllipticCurvePublicKey) -> None:
        self._key = public_key

    @classmethod
    def from_key_file(cls, path: str | os.PathLike[str]) -> TokenVerifier:
        return cls(load_key(path).public_key())

    def verify(self, token: str | None) -> Claims:
        """The token's claims, or `Unauthenticated` with the precise reason."""
        if not token:
            raise Unauthenticated("a bearer token is required", "missing_token")
        if not token.isascii():  # a JWT is base64url and dots; PyJWT would fail to encode it
            raise Unauthenticated("malformed token: not ASCII", "invalid_token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"malformed token: {e}", "invalid_token") from e
        # Checked before decoding so the message says why; `algorithms` below
        # pins it again, so this is not the only guard.
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated(
                f"token algorithm {header.get('alg')!r} is not accepted: only {ALGORITHM}",
                "invalid_token",
            )
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                leeway=CLOCK_SKEW,
                options={"require": ["exp", "iat", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError as e:
            raise Unauthenticated("the token has expired", "expired_token") from e
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid token: {e}", "invalid_token") from e
        return _claims(claims)


# Larger `exp`/`iat` values are not times (2**53: the largest integer a float,
# and so any JSON parser, holds exactly; ~285 million years from now).
_MAX_TIME = 2**53


def _claims(claims: dict[str, object]) -> Claims:
    role, subject, exp = claims.get("role"), claims.get("sub"), claims.get("exp")
    for name in ("exp", "iat"):
        value = claims.get(name)
        # PyJWT accepts a numeric string and converts it; we issue integers only.
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise Unauthenticated(f"invalid token: {name} is not a number", "invalid_token")
        if not 0 <= value < _MAX_TIME:
            raise Unauthenticated(f"invalid token: {name} is out of range", "invalid_token")
    if role not in ROLES:
        raise Unauthenticated(f"invalid token: unknown role {role!r}", "invalid_token")
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("invalid token: empty subject", "invalid_token")
    service, namespace = claims.get("service"), claims.get("namespace")
    if role == "join" and not isinstance(service, str):
        raise Unauthenticated("invalid token: a join token names its service", "invalid_token")
    return Claims(
        subject=subject,
        role=role,  # type: ignore[arg-type]
        expires=float(exp),  # type: ignore[arg-type]
        service=service if isinstance(service, str) else None,
        namespace=namespace if isinstance(namespace, str) else None,
    )

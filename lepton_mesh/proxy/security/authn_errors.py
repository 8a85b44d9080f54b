"""Why JWT authentication refused a request, or made it wait: the light half of authn.py.

The inbound guard (inbound_policy.py) raises and catches these on the
request path of every service with security policies; the verifier that
produces them (authn.py) imports PyJWT and `cryptography` (~20 MB of RSS),
so it is imported only when a snapshot has a RequestAuthentication. This
module imports nothing but the standard library.
"""

from __future__ import annotations

from typing import Any


class JwtCause:
    """Why a token was refused: the access log's `jwt_cause`. Stable strings."""

    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    BAD_SIGNATURE = "bad_signature"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    UNKNOWN_KEY = "unknown_key"
    MALFORMED = "malformed"
    ALGORITHM_NOT_ALLOWED = "algorithm_not_allowed"
    OVERSIZED = "oversized"
    MISSING = "missing"  # no token, and one is required


class JwtFailure(Exception):
    """A token that does not authenticate; `cause` is a Cause value."""

    __slots__ = ("cause", "detail", "provider")

    def __init__(self, cause: str, detail: str, provider: str | None = None) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.detail = detail
        self.provider = provider


class NeedKeys(Exception):
    """Verification must wait for `future` (a key fetch) and then be tried once more."""

    __slots__ = ("future",)

    def __init__(self, future: Any) -> None:
        super().__init__("waiting for keys")
        self.future = future

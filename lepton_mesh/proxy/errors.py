"""Errors the sidecar originates, each knowing its HTTP status and reason code.

The reason code is the short, stable word a user greps for (like Envoy's
response flags): it goes in the `x-lepton-reason` header, the JSON body, the
access log and the `response_flags` metric label. Never a traceback, never a
bare 503.
"""

from __future__ import annotations

import orjson


class Reason:
    """Reason codes. Stable strings: dashboards and alerts key on them."""

    NO_ROUTE = "no_route"
    BAD_REQUEST = "bad_request"
    HEADERS_TOO_LARGE = "headers_too_large"
    BODY_TOO_LARGE = "body_too_large"
    HEADER_TIMEOUT = "header_timeout"
    BODY_TIMEOUT = "body_timeout"
    IDLE_TIMEOUT = "idle_timeout"  # L4: no byte either way for timeouts.tcp_idle
    UNSUPPORTED = "unsupported"
    UPSTREAM_CONNECT_FAILED = "upstream_connect_failed"
    UPSTREAM_RESET = "upstream_reset"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
    NO_HEALTHY_ENDPOINT = "no_healthy_endpoint"
    OVERFLOW = "overflow"
    DOWNSTREAM_RESET = "downstream_reset"
    INTERNAL = "internal_error"
    RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"
    UPSTREAM_IDENTITY_MISMATCH = "upstream_identity_mismatch"
    FAULT_INJECTED = "fault_injected"
    # Plaintext HTTP sent to a STRICT mTLS inbound port (proxy/security/mtls.py).
    MTLS_REQUIRED = "mtls_required"
    # Inbound request security (proxy/security/inbound_policy.py).
    JWT_INVALID = "jwt_invalid"
    JWT_MISSING = "jwt_missing"
    RBAC_DENIED = "rbac_denied"
    RATE_LIMITED = "rate_limited"


class ProxyError(Exception):
    """An error answered to the client with `status` and `reason`.

    `close` says the connection must be closed after the answer (the byte
    stream can no longer be trusted, e.g. after a framing error). `headers`
    are pre-rendered header lines the answer carries (`www-authenticate`,
    `retry-after`).
    """

    __slots__ = ("close", "detail", "headers", "reason", "status")

    def __init__(
        self, status: int, reason: str, detail: str, *, close: bool = False, headers: bytes = b""
    ) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.close = close
        self.headers = headers


class UpstreamError(ProxyError):
    """A try that failed at the upstream: `kind` is how, for retry decisions
    (policy.decisions.Outcome kinds: connect_failure, refused, reset, timeout)."""

    __slots__ = ("kind",)

    def __init__(self, status: int, reason: str, detail: str, kind: str) -> None:
        super().__init__(status, reason, detail)
        self.kind = kind


def bad_request(detail: str) -> ProxyError:
    return ProxyError(400, Reason.BAD_REQUEST, detail, close=True)


def error_body(err: ProxyError, request_id: str) -> bytes:
    return orjson.dumps({"error": err.detail, "reason": err.reason, "request_id": request_id})

"""How a failed etcd call is read (pure table), and what each error says to a caller."""

from __future__ import annotations

import grpc
import pytest

from lepton_mesh.control.store import (
    Compacted,
    StoreAuthFailed,
    StoreError,
    StoreUnavailable,
    UnknownOutcome,
    classify,
)

C = grpc.StatusCode
REFUSED = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused"
NO_BACKEND = "connections to all backends failing; last error: UNKNOWN: ipv4:127.0.0.1:1: connection attempt timed out before receiving SETTINGS frame"

CASES = [
    # (code, details, idempotent, verdict)
    (C.UNAVAILABLE, REFUSED, False, "retry"),  # never left: a txn may be retried
    (C.UNAVAILABLE, NO_BACKEND, False, "retry"),
    (C.UNAVAILABLE, "Socket closed", False, "unknown"),  # it may have reached etcd
    (C.UNAVAILABLE, "etcdserver: request timed out", False, "unknown"),
    (C.UNAVAILABLE, "etcdserver: leader changed", False, "unknown"),
    (C.DEADLINE_EXCEEDED, "Deadline Exceeded", False, "unknown"),
    (C.DEADLINE_EXCEEDED, "Deadline Exceeded", True, "retry"),  # a read or a put
    (C.UNAVAILABLE, "Socket closed", True, "retry"),
    # gRPC core could not send on a connection that broke (etcd restarting).
    (C.INTERNAL, "Internal error from Core", True, "retry"),
    (C.INTERNAL, "Internal error from Core", False, "unknown"),
    (C.INTERNAL, "etcdserver: something etcd itself refused", True, "error"),
    (C.UNAUTHENTICATED, "etcdserver: invalid auth token", True, "token"),
    (C.INVALID_ARGUMENT, "etcdserver: user name is empty", True, "token"),
    (C.PERMISSION_DENIED, "etcdserver: permission denied", False, "denied"),
    (C.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted", True, "compacted"),
    (C.OUT_OF_RANGE, "etcdserver: mvcc: required revision is a future revision", True, "error"),
    (C.INVALID_ARGUMENT, "etcdserver: too many operations in txn request", False, "error"),
    (C.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded", False, "error"),
]


@pytest.mark.parametrize(("code", "details", "idempotent", "verdict"), CASES)
def test_classify(code, details, idempotent, verdict) -> None:
    assert classify(code, details, idempotent=idempotent) == verdict


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (StoreError("x"), 500, "store_error"),
        (StoreUnavailable("x"), 503, "store_unavailable"),
        (UnknownOutcome("x"), 503, "store_unknown_outcome"),
        (StoreAuthFailed("x"), 503, "store_auth_failed"),
        (Compacted("x", 7), 410, "store_compacted"),
    ],
)
def test_errors_know_status_and_reason(error: StoreError, status: int, reason: str) -> None:
    assert isinstance(error, StoreError)
    assert (error.status, error.reason, error.detail) == (status, reason, "x")

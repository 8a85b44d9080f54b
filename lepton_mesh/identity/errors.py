"""Typed errors of the identity package: each knows its reason code and exit code.

The reason is a short stable word (metrics, logs and the control stream's
`error` message carry it); `detail` is the human sentence. No error ever
carries key material: messages name files and identities, never bytes.
"""

from __future__ import annotations


class IdentityError(Exception):
    """Base class. The CLI prints `str(err)` and exits with `err.exit_code`."""

    exit_code = 1
    reason = "identity_error"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason


class InvalidSpiffeId(IdentityError):
    """A string is not a mesh SPIFFE ID (`spiffe://<td>/ns/<ns>/svc/<svc>`)."""

    exit_code = 2
    reason = "invalid_spiffe_id"


class CsrRejected(IdentityError):
    """The CA refused to sign a CSR. `reason` says why (see `CsrReason`)."""

    exit_code = 2
    reason = "csr_rejected"


class CsrReason:
    """Why a CSR was refused. Stable strings: the control stream returns them."""

    MALFORMED = "malformed_csr"
    BAD_SIGNATURE = "bad_csr_signature"
    UNSUPPORTED_KEY = "unsupported_key"
    MISSING_IDENTITY = "missing_identity"
    UNEXPECTED_NAMES = "unexpected_names"
    IDENTITY_MISMATCH = "identity_mismatch"


class CaError(IdentityError):
    """The CA's files are missing, unreadable, inconsistent or would be overwritten."""

    reason = "ca_invalid"


class BundleError(IdentityError):
    """A trust bundle is empty, unparsable, or holds something other than root CAs."""

    exit_code = 2
    reason = "invalid_bundle"

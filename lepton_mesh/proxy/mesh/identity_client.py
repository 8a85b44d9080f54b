"""The sidecar's side of workload identity over the control stream: its key,
its CSRs, installing certificates, and rotating them.

    Welcome            -> no certificate yet (or one due): send `csr`
    trust {bundle, issuer}
                       -> differs from what is installed: send `csr` at once
    certificate {chain, bundle, not_after}
                       -> check it is ours, install it (the data plane's reload
                          hook), renew at ~2/3 of its remaining lifetime

Invariants:
- The private key is made here, in memory, for each CSR; only the CSR (a
  public key and the identity) is sent. The key goes nowhere but the
  install hook (which hands it to OpenSSL through a memfd): never a file,
  a log line, a repr or a status document.
- At most one CSR is in flight. Its key replaces the installed one only when
  a certificate for exactly that key and this sidecar's identity has been
  installed; until then the old certificate keeps serving (new connections
  switch when the hook returns; established ones are never cut).
- A certificate whose install is refused is dropped (the old one stays) and
  asked for again after `retry_delay`.
- Renewal is a loop timer at `renew_fraction` (2/3) of the lifetime left
  when the certificate arrived, minus up to `jitter` of it, so a fleet
  issued together does not come back together. It is measured from receipt,
  not from `not_before`, which the CA backdates for clock skew.
- A changed bundle or issuer (root rotation, a new intermediate) means a new
  certificate at once, installed with the bundle it came with.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from lepton_mesh import meshproto as mp
from lepton_mesh.identity.bundle import fingerprint, load_certificates
from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
from lepton_mesh.identity.errors import IdentityError
from lepton_mesh.identity.spiffe import SpiffeId, spiffe_id_of_certificate

__all__ = ["IdentityClient", "InstallHook", "renew_delay"]

log = logging.getLogger(__name__)

# install(cert_chain_pem, key_pem, bundle_pem): raises on material it refuses.
InstallHook = Callable[[bytes, bytes, bytes], None]
# send(message) -> False when there is no welcomed stream to send it on.
Send = Callable[[mp.Message], bool]

RENEW_FRACTION = 2 / 3
RENEW_JITTER = 0.05
# Never renew sooner than this after a certificate arrived: a certificate
# that is (nearly) expired on arrival must not turn into a CSR loop.
MIN_RENEW_DELAY = 0.5


def renew_delay(
    received: float,
    not_after: float,
    *,
    fraction: float = RENEW_FRACTION,
    jitter: float = RENEW_JITTER,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds from `received` until renewal: `fraction` of the time left, less
    up to `jitter` of that, never under MIN_RENEW_DELAY."""
    left = max(not_after - received, 0.0)
    return max(left * fraction * (1.0 - jitter * rng()), MIN_RENEW_DELAY)


class IdentityClient:
    """One sidecar's certificate life cycle. Driven by the control client:
    `connected(send)` on Welcome, `disconnected()`, `on_trust`, `on_certificate`."""

    def __init__(
        self,
        identity: SpiffeId,
        install: InstallHook,
        *,
        renew_fraction: float = RENEW_FRACTION,
        jitter: float = RENEW_JITTER,
        retry_delay: float = 5.0,
        rng: Callable[[], float] = random.random,
        on_installed: Callable[[], None] | None = None,
    ) -> None:
        self.identity = identity
        self._install = install
        self.renew_fraction = renew_fraction
        self.jitter = jitter
        self.retry_delay = retry_delay
        self._rng = rng
        self.on_installed = on_installed  # after each successful install (readiness)

        # What is installed. The key is kept only to rebuild the control
        # stream's client context (and never shown anywhere).
        self.chain_pem: bytes | None = None
        self.bundle_pem: bytes | None = None
        self.certificate: x509.Certificate | None = None
        self.issuer = ""  # fingerprint of the CA certificate that signed ours
        self._key_pem: bytes | None = None
        # What control says is current (the last `trust` message).
        self._trust: tuple[str, str] | None = None
        # The CSR in flight: its key, and whether it was sent on the current stream.
        self._pending: ec.EllipticCurvePrivateKey | None = None
        self._sent = False
        self._send: Send | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.due = False  # the renewal time passed (or a retry is wanted)
        self.renew_at: float | None = None  # time.time() of the next renewal
        # Status and measurements.
        self.requested = 0
        self.installed = 0
        self.last_error: str | None = None
        self.started = time.monotonic()
        self.first_installed_after: float | None = None  # seconds from start to the first

    # -- state ---------------------------------------------------------------------------

    @property
    def has_certificate(self) -> bool:
        return self.certificate is not None

    def usable(self, now: float | None = None) -> bool:
        """A certificate that is still valid (worth presenting to control)."""
        cert = self.certificate
        if cert is None:
            return False
        return (now or time.time()) < cert.not_valid_after_utc.timestamp()

    def credentials(self) -> tuple[bytes, bytes, bytes] | None:
        """(chain, key, bundle) of the installed certificate, for the control
        stream's mTLS context; None before the first one."""
        if self.chain_pem is None or self._key_pem is None or self.bundle_pem is None:
            return None
        return self.chain_pem, self._key_pem, self.bundle_pem

    def not_ready_reason(self) -> str:
        why = f"waiting for a certificate for {self.identity} from control"
        return f"{why} (last error: {self.last_error})" if self.last_error else why

    def status_json(self) -> dict[str, Any]:
        cert = self.certificate
        return {
            "spiffe_id": self.identity.uri,
            "serial": f"{cert.serial_number:x}" if cert is not None else None,
            "not_after": cert.not_valid_after_utc.timestamp() if cert is not None else None,
            "renew_at": self.renew_at,
            "issuer": self.issuer[:16] or None,
            "csr_in_flight": self._pending is not None,
            "renewal_overdue": cert is not None and self.due,
            "requested": self.requested,
            "installed": self.installed,
            "last_error": self.last_error,
        }

    # -- events from the control client --------------------------------------------------------

    def connected(self, send: Send) -> None:
        """A control replica said Welcome: ask for a certificate if one is needed."""
        self._send = send
        self._sent = False  # a CSR sent on a lost stream got no answer: send it again
        if self._wanted():
            self._request()

    def disconnected(self) -> None:
        self._send = None
        self._sent = False

    def on_trust(self, msg: mp.Trust) -> None:
        """Control's current bundle and issuer; a difference means re-issue now."""
        self._trust = (msg.bundle_pem, msg.issuer)
        if self.certificate is not None and self._stale():
            log.info(
                "lepton-mesh sidecar %s: trust bundle or issuer changed: asking for a new "
                "certificate now",
                self.identity.service,
            )
            self.due = True
            self._request()

    def on_certificate(self, msg: mp.Certificate) -> None:
        key, self._pending, self._sent = self._pending, None, False
        try:
            if key is None:
                raise IdentityError("a certificate arrived but no CSR was sent")
            chain = load_certificates(msg.chain_pem.encode("ascii"), what="certificate chain")
            self._check(chain[0], key)
            key_pem = private_key_pem(key)
            bundle = msg.bundle_pem.encode("ascii")
            chain_pem = msg.chain_pem.encode("ascii")
            self._install(chain_pem, key_pem, bundle)
        except Exception as e:  # IdentityError, the hook's refusal, a bad PEM
            self._failed(f"certificate from control not installed: {e}")
            return
        self._installed(chain, chain_pem, key_pem, bundle)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._send = None

    # -- inside --------------------------------------------------------------------------------

    def _wanted(self) -> bool:
        return self.certificate is None or self.due or self._stale()

    def _stale(self) -> bool:
        """Control's bundle or issuer is not the one our certificate was installed with."""
        if self._trust is None or self.certificate is None:
            return False
        bundle, issuer = self._trust
        return bundle.encode("ascii") != self.bundle_pem or issuer != self.issuer

    def _request(self) -> None:
        """Send a CSR unless one is in flight on this stream or there is no stream."""
        if self._send is None or self._sent:
            return
        if self._pending is None:
            self._pending = generate_key()
        csr = build_csr(self._pending, self.identity).decode("ascii")
        if self._send(mp.Csr(csr)):
            self._sent = True
            self.requested += 1

    def _check(self, leaf: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        if leaf.public_key() != key.public_key():
            raise IdentityError("it is not for the key of our CSR")
        got = spiffe_id_of_certificate(leaf)
        if got != self.identity:
            raise IdentityError(f"it names {got}, not {self.identity}")

    def _installed(
        self, chain: list[x509.Certificate], chain_pem: bytes, key_pem: bytes, bundle: bytes
    ) -> None:
        leaf = chain[0]
        self.certificate = leaf
        self.chain_pem, self._key_pem, self.bundle_pem = chain_pem, key_pem, bundle
        # The issuer is the chain's next certificate (or a bundle root issuing directly).
        self.issuer = fingerprint(chain[1]) if len(chain) > 1 else self._root_issuer(leaf)
        self.installed += 1
        self.due = False
        self.last_error = None
        if self.first_installed_after is None:
            self.first_installed_after = time.monotonic() - self.started
        now = time.time()
        delay = renew_delay(
            now,
            leaf.not_valid_after_utc.timestamp(),
            fraction=self.renew_fraction,
            jitter=self.jitter,
            rng=self._rng,
        )
        self.renew_at = now + delay
        self._arm(delay)
        log.info(
            "lepton-mesh sidecar %s: certificate installed: serial %x, valid until %s, "
            "renewal in %.1fs",
            self.identity.service,
            leaf.serial_number,
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}",
            delay,
        )
        if self.on_installed is not None:
            self.on_installed()
        if self._stale():  # the trust changed while this one was being issued
            self.due = True
            self._request()

    def _root_issuer(self, leaf: x509.Certificate) -> str:
        if self.bundle_pem is None:
            return ""
        for root in load_certificates(self.bundle_pem, what="trust bundle"):
            if root.subject == leaf.issuer:
                return fingerprint(root)
        return ""

    def _failed(self, error: str, *, retry: float | None = -1.0) -> None:
        """Record and log `error`; try again after `retry` seconds
        (`retry_delay` by default, never with None)."""
        self.last_error = error
        log.warning("lepton-mesh sidecar %s: %s", self.identity.service, error)
        if retry is not None:
            self._arm(self.retry_delay if retry < 0 else retry)

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.due = True
        if self._send is None and self.certificate is not None:
            self._overdue()
        self._request()

    def _overdue(self) -> None:
        """Renewal is due and no control replica is reachable: the certificate
        in use stays (nothing better exists); say so now, and again when it
        expires (from then on peers refuse it as `expired`)."""
        cert = self.certificate
        assert cert is not None
        end = cert.not_valid_after_utc
        left = end.timestamp() - time.time()
        if left > 0:
            self._failed(
                f"certificate renewal is due but no control replica is reachable: keeping "
                f"serial {cert.serial_number:x}, valid until {end:%Y-%m-%d %H:%M:%SZ} "
                f"({left:.0f}s left)",
                retry=left,
            )
        else:
            self._failed(
                f"certificate serial {cert.serial_number:x} expired at {end:%Y-%m-%d %H:%M:%SZ} "
                "and no control replica is reachable to renew it: peers refuse it until then",
                retry=None,
            )

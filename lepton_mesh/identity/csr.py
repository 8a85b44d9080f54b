"""The workload side of issuance: a private key made in memory, and a CSR for it.

The sidecar calls `generate_key()`, sends `build_csr(key, identity)` to the
control daemon and gets back a certificate chain. The key never leaves the
sidecar process: nothing here writes a file, and `private_key_pem` exists only
to hand the key to `ssl` (see identity/tls_contexts.py for how that avoids the disk).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lepton_mesh.identity.spiffe import SpiffeId, as_spiffe_id

# The one key type the mesh issues for: small, fast to verify, supported by
# every TLS stack the mesh talks to. The CA refuses anything else.
CURVE = ec.SECP256R1


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key, in memory only."""
    return ec.generate_private_key(CURVE())


def build_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId | str) -> bytes:
    """A PEM CSR asking for `identity`: one URI SAN and an empty subject.

    The CA builds the certificate from scratch and takes only the public key and
    the (authorized) URI from this request, so nothing else is worth sending.
    """
    sid = as_spiffe_id(identity)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            # Critical because the subject is empty (RFC 5280, 4.2.1.6).
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM bytes, for `proxy.security.tls` contexts; never write it out."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

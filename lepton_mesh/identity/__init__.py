"""Workload identity: SPIFFE IDs, the mesh CA, CSRs and trust bundles.

- `spiffe`: build/parse/validate `spiffe://<td>/ns/<ns>/svc/<svc>`, read it out of certificates.
- `csr`: the workload side: an in-memory P-256 key and a CSR for an identity.
- `ca`: the CA side: root and intermediate creation, `CertificateAuthority.issue`.
- `bundle`: trust bundles (one or more roots) and chain verification.
- `store`: the CA directory on disk, `certs init` and root rotation steps.
- `tls_contexts`: the SSL contexts both sides build (mesh TLS settings, keys loaded from memory).
- `errors`: typed errors with reason codes.

Imports only the standard library and `cryptography`: the control daemon uses
the CA side, the sidecar (proxy/) the workload side, and neither drags the
other's dependencies in.
"""

"""A sidecar loads `cryptography` and PyJWT only when its config needs them.

Together they are ~20 MB of a sidecar's RSS (the idle target is 40 MB), so a
sidecar with no `tls:` section and no RequestAuthentication must not import
them, and one that has either imports them when that config is applied.
Each case runs a real sidecar in a fresh interpreter (lean_child.py, next to
this file), sends requests through it on 127.0.0.1, and reads back which of
the two modules were in its sys.modules after each step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from lepton_mesh.identity.bundle import TrustBundle
from lepton_mesh.identity.ca import CertificateAuthority, create_intermediate, create_root
from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
from lepton_mesh.identity.spiffe import SpiffeId

CHILD = Path(__file__).with_name("lean_child.py")
TD = "cluster.local"
ISSUER = "https://issuer.lean.test"


def run_child(scenario: str, args: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The scenario's steps by name: {"status": ..., "modules": [...]}."""
    done = subprocess.run(
        [sys.executable, str(CHILD), scenario, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    return {s["step"]: s for s in report["steps"]}


def issue_tls_files(folder: Path, services: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """A root, an intermediate, and a certificate per service: TlsConfig fields by service."""
    root = create_root(TD)
    intermediate = create_intermediate(root)
    bundle = TrustBundle((root.cert,))
    bundle_pem = bundle.to_pem()
    ca = CertificateAuthority(intermediate.cert, intermediate.key, bundle)
    out: dict[str, dict[str, str]] = {}
    for service in services:
        key = generate_key()
        sid = SpiffeId(TD, "default", service)
        issued = ca.issue(build_csr(key, sid), sid)
        files = {"cert": issued.chain_pem, "key": private_key_pem(key), "bundle": bundle_pem}
        out[service] = {}
        for field, pem in files.items():
            path = folder / f"{service}-{field}.pem"
            path.write_bytes(pem)
            out[service][field] = str(path)
    return out


def test_plaintext_sidecar_imports_neither() -> None:
    steps = run_child("plaintext", {})
    assert steps["outbound"]["status"] == 200
    assert steps["inbound"]["status"] == 200
    for name, step in steps.items():
        assert step["modules"] == [], f"after {name}"


def test_tls_sidecar_imports_cryptography_when_its_identity_loads(tmp_path: Path) -> None:
    steps = run_child("tls", issue_tls_files(tmp_path, ("a", "b")))
    assert steps["imported"]["modules"] == []
    assert steps["started"]["modules"] == ["cryptography"]
    assert steps["outbound_mtls"]["status"] == 200
    # STRICT: a plaintext request is refused with a 400 that says why (mtls_required).
    assert steps["inbound_plaintext_refused"]["status"] == 400


def test_jwt_is_imported_by_the_first_config_with_request_authentication() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1", "use": "sig"}
    token = jwt.encode(
        {"iss": ISSUER, "sub": "lean", "exp": int(time.time()) + 600},
        key,
        algorithm="ES256",
        headers={"kid": "k1"},
    )
    args = {"issuer": ISSUER, "jwks": json.dumps({"keys": [jwk]}), "token": token}
    steps = run_child("jwt", args)
    assert steps["plaintext_inbound"] == {
        "step": "plaintext_inbound",
        "status": 200,
        "modules": [],
    }
    assert "jwt" in steps["swapped"]["modules"]
    assert steps["no_token"]["status"] == 401
    assert steps["valid_token"]["status"] == 200


def test_plaintext_sidecar_loaded_from_yaml_imports_neither(tmp_path: Path) -> None:
    steps = run_child("loaded", {"dir": str(tmp_path)})
    assert steps["outbound"]["status"] == 200
    assert steps["outbound"]["modules"] == []

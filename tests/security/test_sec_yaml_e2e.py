"""From the YAML a user writes to what the sidecar enforces: a sidecar config file whose
`policies` list a RequestAuthentication (JWKS from a local server), an
AuthorizationPolicy and a RateLimit, loaded with the real loader and run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from security_support import (
    AUDIENCE,
    ISSUER,
    LOCAL,
    Client,
    EchoApp,
    JwksServer,
    LogCapture,
    claims,
    echoed,
    jwks,
    mint,
    public_jwk,
    rsa_key,
)

from lepton_mesh.policy.sidecar_loader import load_sidecar_config
from lepton_mesh.proxy.sidecar import Sidecar

RSA = rsa_key()


def manifests(jwks_uri: str) -> list[dict[str, Any]]:
    meta = {"name": "intent", "namespace": "default"}
    return [
        {
            "apiVersion": "lepton-mesh/v1",
            "kind": "RequestAuthentication",
            "metadata": meta,
            "spec": {
                "service": "intent",
                "providers": [
                    {
                        "name": "corp-idp",
                        "issuer": ISSUER,
                        "audiences": [AUDIENCE],
                        "jwks_uri": jwks_uri,
                        "algorithms": ["RS256"],
                        "claims_to_headers": [{"claim": "sub", "header": "x-user-id"}],
                    }
                ],
            },
        },
        {
            "apiVersion": "lepton-mesh/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "intent-callers", "namespace": "default"},
            "spec": {
                "service": "intent",
                "action": "ALLOW",
                "rules": [
                    {
                        "name": "alice-classifies",
                        "from": [{"principals": [f"{ISSUER}/alice"]}],
                        "to": [{"methods": ["POST"], "paths": ["/v1/*"]}],
                    },
                    {"name": "health", "to": [{"paths": ["/healthz"]}]},
                ],
            },
        },
        {
            "apiVersion": "lepton-mesh/v1",
            "kind": "RateLimit",
            "metadata": meta,
            "spec": {
                "service": "intent",
                "limits": [
                    {"name": "per-ip", "key": "client_ip", "requests_per_second": 1, "burst": 2}
                ],
            },
        },
    ]


async def test_yaml_policies_are_enforced(tmp_path: Path, app: EchoApp, jwks_server: JwksServer):
    jwks_server.document = jwks(public_jwk(RSA, "k1"))
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "service": "intent",
                "app": f"{app.address.host}:{app.address.port}",
                "listeners": {
                    "outbound": f"{LOCAL}:0",
                    "inbound": f"{LOCAL}:0",
                    "admin": f"{LOCAL}:0",
                },
                "policies": manifests(jwks_server.uri),
            }
        )
    )
    cfg = load_sidecar_config(path)
    sc = Sidecar(cfg)
    await sc.start()
    sc.access_log = log = LogCapture()
    try:
        c = await Client.connect(sc.addresses["inbound"])
        alice = [("authorization", "Bearer " + mint(RSA, claims()))]
        r = await c.request("POST", "/v1/classify", alice)
        assert r.status == 200 and echoed(r, "x-user-id") == ["alice"]
        r = await c.request(
            "POST", "/v1/classify", [("authorization", "Bearer " + mint(RSA, claims(sub="bob")))]
        )
        assert r.status == 403 and r.get("x-lepton-reason") == "rbac_denied"
        assert log.of(r)["authz"]["cause"] == "no_allow_match"
        # Burst 2: alice took one token, bob was refused before the limit, so one is left.
        assert (await c.request("GET", "/healthz")).status == 200
        r = await c.request("GET", "/healthz")
        assert r.status == 429 and r.get("retry-after") == "1"
        assert log.of(r)["rate_limit"] == "per-ip"
    finally:
        await Client.close_all()
        await sc.stop()
        sc.snapshot.inbound_state.close()

"""The admin API over real HTTP, on a real etcd."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import re
import time
from pathlib import Path

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from lepton_mesh.control.admin_api import ROUTES, build_app
from lepton_mesh.control.etcd_local import LocalEtcd
from lepton_mesh.control.openapi import document
from tests.admin_api.admin_support import Api, instance, open_api, put_instance
from tests.policy_store.policy_support import dest, route
from tests.support.etcd import eventually


def files(*texts: str, name: str = "dialog.yaml") -> dict:
    return {"files": [{"name": name, "content": "---\n".join(texts)}]}


# --- the OpenAPI document matches the routes, both ways ----------------------------


def _served() -> dict[tuple[str, str], str | None]:
    app = build_app(None)  # type: ignore[arg-type]  # the router needs no context
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()}
    roles = {(r.method, r.path): r.role for r in ROUTES}
    assert routes == set(roles)
    return roles


def _documented() -> dict[tuple[str, str], dict]:
    return {
        (method.upper(), path): op
        for path, ops in document()["paths"].items()
        for method, op in ops.items()
    }


def test_openapi_documents_every_route_and_serves_every_operation() -> None:
    served, documented = _served(), _documented()
    assert sorted(served) == sorted(documented)
    for key, role in served.items():
        op = documented[key]
        assert op.get("x-lepton-role") == role, key
        assert (op.get("security") == []) == (role is None), key
        in_path = set(re.findall(r"{(\w+)}", key[1]))
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert in_path == declared, key
        if role is not None:
            assert {"401", "403"} <= set(op["responses"]), key


def test_openapi_references_resolve_and_ids_are_unique() -> None:
    doc = document()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    _, section, kind, name = v.split("/")
                    assert name in doc[section][kind], v
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    ids = [op["operationId"] for op in _documented().values()]
    assert len(ids) == len(set(ids))


async def test_openapi_is_served_without_a_token(api: Api) -> None:
    reply = await api.call("GET", "/api/v1/openapi.json", token=None)
    assert reply.status == 200 and reply.body == document()


async def test_probes_answer_without_a_token(api: Api) -> None:
    """Orchestrators' probes: live always, ready once the cache has read etcd."""
    live = await api.call("GET", "/live", token=None)
    ready = await api.call("GET", "/ready", token=None)
    assert (live.status, live.body) == (200, {"live": True})
    assert (ready.status, ready.body) == (200, {"ready": True})


# --- authentication and roles, on every route -------------------------------------------

_SAMPLE = {"kind": "Route", "namespace": "default", "name": "x", "node_id": "n", "revision": "1"}
PROTECTED = [(r.method, r.path, r.role) for r in ROUTES if r.role is not None]
PROTECTED_IDS = [f"{m} {p}" for m, p, _ in PROTECTED]


def _concrete(path: str) -> str:
    return re.sub(r"{(\w+)}", lambda m: _SAMPLE[m[1]], path)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _bad_authorization(api: Api, name: str) -> str:
    now = int(time.time())
    claims = {"iss": "lepton-mesh", "sub": "m", "role": "admin", "iat": now, "exp": now + 60}
    if name == "bad-signature":
        token = api.tokens["admin"]
        return f"Bearer {token[:-6]}{'AAAAAA' if not token.endswith('AAAAAA') else 'BBBBBB'}"
    if name == "expired":
        old = api.issuer.create(subject="old", role="admin", ttl=60, now=time.time() - 7200)
        return f"Bearer {old}"
    if name == "hs256-with-public-key":
        public_pem = api.verifier_public_pem
        head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        head += "." + _b64(json.dumps(claims).encode())
        return f"Bearer {head}.{_b64(hmac.new(public_pem, head.encode(), hashlib.sha256).digest())}"
    if name == "other-key":
        stranger = ec.generate_private_key(ec.SECP256R1())
        return f"Bearer {jwt.encode(claims, stranger, algorithm='ES256')}"
    assert name == "basic-scheme"
    return "Basic YWxpY2U6c2VjcmV0"


BAD = [
    ("bad-signature", "invalid_token"),
    ("expired", "expired_token"),
    ("hs256-with-public-key", "invalid_token"),
    ("other-key", "invalid_token"),
    ("basic-scheme", "invalid_token"),
]


async def test_auth_matrix_on_every_route(api: Api) -> None:
    """Every protected route: no token 401, bad tokens 401, a too-weak role 403."""
    for method, path, role in PROTECTED:
        url = _concrete(path)
        reply = await api.call(method, url, token=None)
        assert (reply.status, reply.body["reason"]) == (401, "missing_token"), (method, path)
        assert reply.headers["WWW-Authenticate"] == 'Bearer realm="lepton-mesh"'
        for name, reason in BAD:
            reply = await api.call(method, url, raw_token=_bad_authorization(api, name))
            assert (reply.status, reply.body["reason"]) == (401, reason), (method, path, name)
            assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
        weak = ["join"] + (["read"] if role == "admin" else [])
        for token in weak:
            reply = await api.call(method, url, token=token)
            assert (reply.status, reply.body["reason"]) == (403, "insufficient_role"), (
                method,
                path,
                token,
            )
    assert await api.ctl.store.get("/lepton/v1/policy-revision") is None  # nothing got through


async def test_the_right_role_gets_through(api: Api) -> None:
    assert (await api.call("GET", "/api/v1/policies", token="read")).status == 200
    assert (await api.call("GET", "/api/v1/policies", token="admin")).status == 200
    reply = await api.call("POST", "/api/v1/policies:apply", body=files(dest()), token="admin")
    assert reply.status == 200


async def test_no_token_key_refuses_everything(mesh_etcd: LocalEtcd, tmp_path: Path) -> None:
    async with open_api(list(mesh_etcd.endpoints), tmp_path, auth=False) as a:
        reply = await a.call("GET", "/api/v1/overview")
        assert (reply.status, reply.body["reason"]) == (503, "auth_not_configured")


# --- policies: apply, history, rollback ------------------------------------------------------


async def test_apply_history_rollback_round_trip(api: Api) -> None:
    reply = await api.call(
        "POST", "/api/v1/policies:apply", body=files(dest(), route()) | {"message": "first"}
    )
    assert reply.status == 200, reply.body
    assert reply.body["revision"] == 1
    assert [c["kind"] for c in reply.body["changes"]] == ["Route", "DestinationPolicy"]

    listed = (await api.call("GET", "/api/v1/policies", token="read")).body
    assert listed["revision"] == 1
    assert [(m["kind"], m["metadata"]["name"]) for m in listed["items"]] == [
        ("Route", "dialog"),
        ("DestinationPolicy", "dialog"),
    ]
    one = await api.call("GET", "/api/v1/policies/Route/default/dialog", token="read")
    assert one.status == 200 and one.headers["X-Lepton-Policy-Revision"] == "1"
    assert one.body["spec"]["rules"][0]["backends"] == [{"service": "dialog", "subset": "v1"}]

    reply = await api.call("POST", "/api/v1/policies:apply", body=files(route(subset="v2")))
    assert reply.body["revision"] == 2
    assert reply.body["changes"][0]["before"]["spec"]["rules"][0]["backends"][0]["subset"] == "v1"

    history = (await api.call("GET", "/api/v1/history", token="read")).body["items"]
    assert [(r["revision"], r["who"], r["message"]) for r in history] == [
        (2, "alice", ""),
        (1, "alice", "first"),
    ]
    by_name = await api.call("GET", "/api/v1/history", token="read", params={"name": "dialog"})
    assert len(by_name.body["items"]) == 2
    record = await api.call("GET", "/api/v1/history/1", token="read")
    assert record.body["changes"] == history[1]["changes"]
    assert (await api.call("GET", "/api/v1/history/9", token="read")).status == 404

    reply = await api.call("POST", "/api/v1/rollback", body={"revision": 1, "message": "undo"})
    assert reply.status == 200 and reply.body["revision"] == 3
    one = await api.call("GET", "/api/v1/policies/Route/default/dialog", token="read")
    assert one.body["spec"]["rules"][0]["backends"][0]["subset"] == "v1"
    record = (await api.call("GET", "/api/v1/history/3", token="read")).body
    assert (record["rollback_of"], record["who"], record["message"]) == (1, "alice", "undo")


async def test_invalid_policy_is_400_naming_the_problem_and_nothing_is_stored(api: Api) -> None:
    etcd_revision = await api.ctl.store.revision()
    bad = route().replace("subset: v1", "subset: v9")
    reply = await api.call("POST", "/api/v1/policies:apply", body=files(dest(), bad))
    assert reply.status == 400
    assert reply.body["reason"] == "invalid_policy"
    (problem,) = reply.body["problems"]
    assert {k: problem[k] for k in ("file", "line", "path")} == {
        "file": "dialog.yaml",
        "line": 16,
        "path": "spec.rules[0].backends[0].subset",
    }
    assert "subset 'v9' is not defined by DestinationPolicy 'dialog'" in problem["message"]
    assert problem["text"].startswith("dialog.yaml:16: spec.rules[0].backends[0].subset: ")
    assert await api.ctl.store.revision() == etcd_revision
    assert (await api.call("GET", "/api/v1/policies", token="read")).body["items"] == []


async def test_yaml_syntax_errors_name_file_and_line(api: Api) -> None:
    reply = await api.call(
        "POST", "/api/v1/policies:apply", body=files("kind: [unclosed\n", name="broken.yaml")
    )
    assert reply.status == 400 and reply.body["reason"] == "invalid_policy"
    assert reply.body["problems"][0]["file"] == "broken.yaml"
    assert reply.body["problems"][0]["line"] == 2


async def test_concurrent_applies_on_one_base_exactly_one_409(api: Api) -> None:
    bodies = [files(dest(timeout=f"{i}s")) | {"base_revision": 0} for i in range(1, 3)]
    replies = await asyncio.gather(
        *(api.call("POST", "/api/v1/policies:apply", body=b) for b in bodies)
    )
    assert sorted(r.status for r in replies) == [200, 409]
    conflict = next(r for r in replies if r.status == 409)
    assert conflict.body["reason"] == "revision_conflict"
    assert (conflict.body["current"], conflict.body["base"]) == (1, 0)


async def test_no_op_apply_writes_nothing(api: Api) -> None:
    await api.call("POST", "/api/v1/policies:apply", body=files(dest()))
    etcd_revision = await api.ctl.store.revision()
    reply = await api.call("POST", "/api/v1/policies:apply", body=files(dest()))
    assert reply.body == {"revision": 1, "changes": [], "dry_run": False}
    assert await api.ctl.store.revision() == etcd_revision


async def test_dry_run_validate_and_diff_write_nothing(api: Api) -> None:
    etcd_revision = await api.ctl.store.revision()
    reply = await api.call("POST", "/api/v1/policies:apply", body=files(dest()) | {"dry_run": True})
    assert (reply.status, reply.body["dry_run"], len(reply.body["changes"])) == (200, True, 1)
    reply = await api.call("POST", "/api/v1/policies:diff", body=files(dest()), token="read")
    assert reply.body["revision"] == 0
    assert [(c["op"], c["name"], c["before"]) for c in reply.body["changes"]] == [
        ("put", "dialog", None)
    ]
    reply = await api.call("POST", "/api/v1/policies:validate", body=files(dest()), token="read")
    assert reply.body == {"valid": True, "revision": 0, "changes": 1}
    reply = await api.call("POST", "/api/v1/policies:validate", body=files(route()), token="read")
    assert reply.status == 400 and reply.body["problems"][0]["path"].endswith(".subset")
    assert await api.ctl.store.revision() == etcd_revision


async def test_put_and_delete_one_policy(api: Api) -> None:
    manifest = {
        "apiVersion": "lepton-mesh/v1",
        "kind": "ExternalService",
        "metadata": {"name": "payments"},
        "spec": {"service": "payments", "endpoints": ["api.payments.example:443"]},
    }
    path = "/api/v1/policies/ExternalService/default/payments"
    reply = await api.call("PUT", path, body=manifest, params={"message": "add payments"})
    assert reply.status == 200 and reply.body["revision"] == 1
    assert (await api.call("GET", path, token="read")).body["metadata"]["namespace"] == "default"
    reply = await api.call("PUT", path, body=manifest, params={"base_revision": "0"})
    assert reply.status == 409
    wrong = manifest | {"metadata": {"name": "other"}}
    reply = await api.call("PUT", path, body=wrong)
    assert (reply.status, reply.body["reason"]) == (400, "bad_request")
    assert "metadata.name" in reply.body["error"]
    invalid = manifest | {"spec": {"service": "payments", "endpoints": []}}
    reply = await api.call("PUT", path, body=invalid)
    assert reply.status == 400 and reply.body["problems"][0]["file"] == "request body"
    reply = await api.call("DELETE", path, params={"message": "gone"})
    assert reply.status == 200 and reply.body["changes"][0]["op"] == "delete"
    assert (await api.call("DELETE", path)).status == 404
    assert (await api.call("GET", path, token="read")).status == 404
    assert (await api.call("GET", "/api/v1/policies/Nope/default/x", token="read")).status == 404
    history = (await api.call("GET", "/api/v1/history", token="read")).body["items"]
    assert [r["message"] for r in history] == ["gone", "add payments"]


async def test_rollback_errors(api: Api) -> None:
    reply = await api.call("POST", "/api/v1/rollback", body={"revision": 5})
    assert (reply.status, reply.body["reason"]) == (400, "bad_request")
    reply = await api.call("POST", "/api/v1/rollback", body={})
    assert (reply.status, reply.body["reason"]) == (400, "bad_request")
    for i in range(3):
        await api.call("POST", "/api/v1/policies:apply", body=files(dest(timeout=f"{i + 1}s")))
    await api.ctl.policies.compact_history(1)
    reply = await api.call("POST", "/api/v1/rollback", body={"revision": 1})
    assert (reply.status, reply.body["reason"]) == (410, "history_compacted")


# --- the mesh: services, instances, sidecars, overview --------------------------------------


async def test_services_instances_sidecars_overview(api: Api) -> None:
    await put_instance(api.ctl, instance("dialog", "dialog-1", version="v1"))
    await put_instance(api.ctl, instance("dialog", "dialog-2", healthy=False, version="v2"))
    await put_instance(api.ctl, instance("chat", "chat-1"), nack=True)
    await api.call("POST", "/api/v1/policies:apply", body=files(dest(), route()))

    services = (await api.call("GET", "/api/v1/services", token="read")).body["items"]
    assert [(s["name"], s["instances"], s["healthy"]) for s in services] == [
        ("chat", 1, 1),
        ("dialog", 2, 1),
    ]
    one = (await api.call("GET", "/api/v1/services/dialog", token="read")).body
    assert [i["id"] for i in one["instance_list"]] == ["dialog-1", "dialog-2"]
    assert sorted(m["kind"] for m in one["policies"]) == ["DestinationPolicy", "Route"]
    missing = await api.call("GET", "/api/v1/services/nope", token="read")
    assert (missing.status, missing.body["reason"]) == (404, "not_found")
    await put_instance(api.ctl, instance("dialog", "dialog-9", namespace="staging"))
    twice = await api.call("GET", "/api/v1/services/dialog", token="read")
    assert (twice.status, twice.body["reason"]) == (400, "bad_request")
    assert "exists in namespaces default, staging" in twice.body["error"]
    one = await api.call("GET", "/api/v1/services/dialog?namespace=staging", token="read")
    assert [i["id"] for i in one.body["instance_list"]] == ["dialog-9"]

    instances = await api.call("GET", "/api/v1/instances", token="read", params={"service": "chat"})
    assert [i["id"] for i in instances.body["items"]] == ["chat-1"]

    sidecars = (await api.call("GET", "/api/v1/sidecars", token="read")).body["items"]
    assert {s["node_id"] for s in sidecars} == {"chat-1", "dialog-1", "dialog-2", "dialog-9"}
    chat = (await api.call("GET", "/api/v1/sidecars/chat-1", token="read")).body
    assert chat["last_nack"] == {"version": 8, "error": "bad route"}
    assert (await api.call("GET", "/api/v1/sidecars/nope", token="read")).status == 404

    overview = (await api.call("GET", "/api/v1/overview", token="read")).body
    assert overview["policy_revision"] == 1
    assert overview["store"]["healthy"] is True
    assert overview["counts"] | {"policies": None} == {
        "services": 3,
        "instances": 4,
        "healthy_instances": 3,
        "sidecars": 4,
        "sidecars_with_nack": 1,
        "policies": None,
    }
    assert overview["counts"]["policies"] == {
        "Route": 1,
        "DestinationPolicy": 1,
        "ExternalService": 0,
        "RequestAuthentication": 0,
        "AuthorizationPolicy": 0,
        "RateLimit": 0,
    }


# --- errors are JSON with the precise status -------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "reason"),
    [
        ("GET", "/api/v1/nothing", None, 404, "not_found"),
        ("DELETE", "/api/v1/policies", None, 405, "method_not_allowed"),
        ("POST", "/api/v1/policies:apply", b"{not json", 400, "bad_request"),
        ("POST", "/api/v1/policies:apply", b"[1]", 400, "bad_request"),
        ("POST", "/api/v1/policies:apply", b'{"dry_run": "yes"}', 400, "bad_request"),
        ("POST", "/api/v1/policies:apply", b'{"files": [{"name": 1}]}', 400, "bad_request"),
        ("POST", "/api/v1/policies:apply", io.BytesIO(b"x" * (5 * 1024 * 1024)), 413, "too_large"),
        ("GET", "/api/v1/history?limit=zero", None, 400, "bad_request"),
        ("GET", "/api/v1/policies?kind=Nope", None, 400, "bad_request"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("/") else None,
)
async def test_errors_are_json(api: Api, method, path, body, status, reason) -> None:
    headers = {"Authorization": f"Bearer {api.tokens['admin']}"}
    async with api.session.request(method, api.url + path, data=body, headers=headers) as resp:
        data = await resp.json()
        assert resp.status == status
        assert resp.content_type == "application/json"
    assert data["reason"] == reason and data["error"] and data["problems"] == []


# --- etcd down: writes 503, reads from the cache ------------------------------------------------


async def test_etcd_down_writes_503_reads_still_answer(
    etcd_private: LocalEtcd, tmp_path: Path
) -> None:
    async with open_api(list(etcd_private.endpoints), tmp_path, store_timeout=0.5) as a:
        await put_instance(a.ctl, instance("dialog", "dialog-1", version="v1"))
        await a.call("POST", "/api/v1/policies:apply", body=files(dest()))
        leader = {"replica": "replica-x", "since": 1.0}
        rev = await a.ctl.store.put("/lepton/v1/election/leader", orjson.dumps(leader))
        await a.ctl.cache.wait_for_revision(rev, timeout=5)
        overview = (await a.call("GET", "/api/v1/overview", token="read")).body
        assert overview["leader"] == leader | {"confirmed": True}
        etcd_private.stop()
        await eventually(lambda: not a.ctl.cache.healthy, 10, "the cache to notice etcd is down")
        # etcd may have expired that leader's lease since: not shown as a fact.
        overview = (await a.call("GET", "/api/v1/overview", token="read")).body
        assert overview["leader"] == leader | {"confirmed": False}

        reply = await a.call("POST", "/api/v1/policies:apply", body=files(route()))
        assert (reply.status, reply.body["reason"]) == (503, "store_unavailable")
        assert reply.headers["Retry-After"] == "1"
        reply = await a.call("POST", "/api/v1/rollback", body={"revision": 0})
        assert (reply.status, reply.body["reason"]) == (503, "store_unavailable")

        for path in ("/api/v1/services", "/api/v1/policies", "/api/v1/history", "/api/v1/sidecars"):
            reply = await a.call("GET", path, token="read")
            assert reply.status == 200 and len(reply.body["items"]) == 1, path
        overview = (await a.call("GET", "/api/v1/overview", token="read")).body
        assert overview["store"]["healthy"] is False and overview["policy_revision"] == 1
        diff = await a.call("POST", "/api/v1/policies:diff", body=files(dest(timeout="1s")))
        assert diff.status == 200 and len(diff.body["changes"]) == 1

        etcd_private.start()
        await eventually(lambda: a.ctl.cache.healthy, 15, "the cache to reconnect")
        reply = await a.call("POST", "/api/v1/policies:apply", body=files(route()))
        assert reply.status == 200 and reply.body["revision"] == 2

"""The admin API's OpenAPI 3.1 document, as data (served at /api/v1/openapi.json).

Kept by hand next to `admin_api.ROUTES`; tests/admin_api checks both ways
that every route is documented with its role and path parameters, and that
every documented operation is served. `x-lepton-role` is the token role an
operation needs (`read` or `admin`); `security: []` marks the public one.
"""

from __future__ import annotations

import copy
from typing import Any

from lepton_mesh.policy.traffic_loader import KINDS

__all__ = ["document"]

VERSION = "1"
BASE = "/api/v1"

_ERROR_STATUSES = {
    "400": ("BadRequest", "invalid input: `problems` name file, line and field for a policy"),
    "401": ("Unauthorized", "no token, or an invalid or expired one (WWW-Authenticate: Bearer)"),
    "403": ("Forbidden", "the token's role is not enough (reason insufficient_role)"),
    "404": ("NotFound", "no such object"),
    "409": ("Conflict", "base_revision is not the current revision (reason revision_conflict)"),
    "410": ("Gone", "a rollback needs history records that were compacted"),
    "413": ("TooLarge", "more changes or bytes than one etcd transaction takes"),
    "503": ("Unavailable", "etcd does not answer (reason store_unavailable): retry later"),
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _list_of(name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {"items": {"type": "array", "items": _ref(name)}}
    return {"type": "object", "required": ["items"], "properties": props | (extra or {})}


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _path(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _op(
    op_id: str,
    summary: str,
    role: str | None,
    ok: dict[str, Any],
    *,
    errors: tuple[str, ...] = (),
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "OK"} | _json_body(ok)}
    statuses = (("401", "403") if role else ()) + errors + (("503",) if role == "admin" else ())
    for status in sorted(set(statuses)):
        responses[status] = {"$ref": f"#/components/responses/{_ERROR_STATUSES[status][0]}"}
    out: dict[str, Any] = {"operationId": op_id, "summary": summary, "responses": responses}
    if role is None:
        out["security"] = []
    else:
        out["x-lepton-role"] = role
    if params:
        out["parameters"] = params
    if body is not None:
        out["requestBody"] = {"required": True} | _json_body(body)
    return out


_NAMESPACE = _query("namespace", "only this namespace")
_POLICY_PATH = [
    _path("kind", "one of: " + ", ".join(KINDS)),
    _path("namespace", "the object's namespace"),
    _path("name", "the object's name"),
]
_WRITE_QUERY = [
    _query("message", "why: kept in history"),
    _query(
        "base_revision", "fail with 409 unless this is the current revision", {"type": "integer"}
    ),
]

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "reason", "problems"],
        "properties": {
            "error": {"type": "string", "description": "for people"},
            "reason": {"type": "string", "description": "a stable code, for scripts"},
            "problems": {"type": "array", "items": _ref("Problem")},
            "current": {"type": "integer", "description": "409 only: the current revision"},
            "base": {"type": ["integer", "null"], "description": "409 only: the base given"},
        },
    },
    "Problem": {
        "type": "object",
        "required": ["file", "line", "path", "message", "text"],
        "properties": {
            "file": {"type": "string"},
            "line": {"type": ["integer", "null"]},
            "path": {"type": "string", "description": "the field, e.g. spec.rules[0].timeout"},
            "message": {"type": "string"},
            "text": {"type": "string", "description": "FILE:LINE: PATH: MESSAGE"},
        },
    },
    "Manifest": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "lepton-mesh/v1"},
            "kind": {"enum": list(KINDS)},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
            },
            "spec": {"type": "object", "description": "docs/policy-reference.md"},
        },
    },
    "File": {
        "type": "object",
        "required": ["name", "content"],
        "properties": {
            "name": {"type": "string", "description": "named in problems"},
            "content": {"type": "string", "description": "YAML, several documents allowed"},
        },
    },
    "Bundle": {
        "type": "object",
        "properties": {
            "files": {"type": "array", "items": _ref("File")},
            "manifests": {"type": "array", "items": _ref("Manifest")},
            "prune": {
                "type": "boolean",
                "description": "delete every stored object not in the bundle",
            },
        },
    },
    "ApplyRequest": {
        "allOf": [
            _ref("Bundle"),
            {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "base_revision": {"type": "integer"},
                    "dry_run": {"type": "boolean"},
                },
            },
        ]
    },
    "Change": {
        "type": "object",
        "required": ["op", "kind", "namespace", "name", "before", "after"],
        "properties": {
            "op": {"enum": ["put", "delete"]},
            "kind": {"type": "string"},
            "namespace": {"type": "string"},
            "name": {"type": "string"},
            "before": {"oneOf": [_ref("Manifest"), {"type": "null"}]},
            "after": {"oneOf": [_ref("Manifest"), {"type": "null"}]},
        },
    },
    "ApplyResult": {
        "type": "object",
        "required": ["revision", "changes", "dry_run"],
        "properties": {
            "revision": {
                "type": "integer",
                "description": "the new revision; the current one if nothing changed or dry_run",
            },
            "changes": {"type": "array", "items": _ref("Change")},
            "dry_run": {"type": "boolean"},
        },
    },
    "Diff": {
        "type": "object",
        "required": ["revision", "changes"],
        "properties": {
            "revision": {"type": "integer"},
            "changes": {"type": "array", "items": _ref("Change")},
        },
    },
    "Validation": {
        "type": "object",
        "required": ["valid", "revision", "changes"],
        "properties": {
            "valid": {"const": True},
            "revision": {"type": "integer"},
            "changes": {"type": "integer", "description": "how many objects an apply would change"},
        },
    },
    "HistoryRecord": {
        "type": "object",
        "required": ["revision", "time", "who", "message", "changes", "rollback_of"],
        "properties": {
            "revision": {"type": "integer"},
            "time": {"type": "number", "description": "Unix time"},
            "who": {"type": "string", "description": "the token's subject"},
            "message": {"type": "string"},
            "changes": {"type": "array", "items": _ref("Change")},
            "rollback_of": {"type": ["integer", "null"]},
            "id": {"type": "string", "description": "the write's unique id"},
        },
    },
    "Rollback": {
        "type": "object",
        "required": ["revision"],
        "properties": {"revision": {"type": "integer"}, "message": {"type": "string"}},
    },
    "Service": {
        "type": "object",
        "required": ["name", "namespace", "instances", "healthy"],
        "properties": {
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "instances": {"type": "integer", "description": "endpoints, external ones included"},
            "healthy": {"type": "integer"},
        },
    },
    "ServiceDetail": {
        "allOf": [
            _ref("Service"),
            {
                "type": "object",
                "properties": {
                    "instance_list": {"type": "array", "items": _ref("Instance")},
                    "policies": {"type": "array", "items": _ref("Manifest")},
                },
            },
        ]
    },
    "Instance": {
        "type": "object",
        "description": "docs/control-plane.md",
        "properties": {
            "id": {"type": "string"},
            "service": {"type": "string"},
            "namespace": {"type": "string"},
            "address": {"type": "string"},
            "ports": {"type": "object", "additionalProperties": {"type": "integer"}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "weight": {"type": "integer"},
            "healthy": {"type": "boolean"},
            "draining": {"type": "boolean"},
            "node_id": {"type": "string"},
            "registered_at": {"type": "number"},
        },
    },
    "Sidecar": {
        "type": "object",
        "properties": {
            "node_id": {"type": "string"},
            "service": {"type": "string"},
            "namespace": {"type": "string"},
            "control": {"type": "string", "description": "the replica it is connected to"},
            "applied_version": {"type": "integer"},
            "last_nack": {
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {"version": {"type": "integer"}, "error": {"type": "string"}},
                    },
                    {"type": "null"},
                ]
            },
            "last_seen": {"type": "number"},
            "connected_at": {"type": "number"},
            "identity": {"type": "string", "description": "the SPIFFE ID its certificate holds"},
            "certificate": {
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {
                            "serial": {"type": "string"},
                            "not_after": {"type": "number"},
                            "issuer": {"type": "string"},
                            "issuer_key_id": {"type": "string"},
                            "roots": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    {"type": "null"},
                ]
            },
        },
    },
    "Overview": {
        "type": "object",
        "required": ["replica", "leader", "policy_revision", "store", "counts"],
        "properties": {
            "replica": {"type": "string"},
            "leader": {"type": ["object", "null"]},
            "policy_revision": {"type": "integer"},
            "store": {
                "type": "object",
                "properties": {"healthy": {"type": "boolean"}, "revision": {"type": "integer"}},
            },
            "counts": {"type": "object"},
            "connections": {"type": ["integer", "null"]},
            "time": {"type": "number"},
        },
    },
}

_PATHS: dict[str, Any] = {
    f"{BASE}/openapi.json": {
        "get": _op("getOpenApi", "this document", None, {"type": "object"}),
    },
    f"{BASE}/overview": {
        "get": _op(
            "getOverview", "counts, revisions, leader, etcd health", "read", _ref("Overview")
        ),
    },
    f"{BASE}/services": {
        "get": _op(
            "listServices",
            "services known to the mesh",
            "read",
            _list_of("Service"),
            params=[_NAMESPACE],
        ),
    },
    f"{BASE}/services/{{name}}": {
        "get": _op(
            "getService",
            "one service: its instances and the policies about it",
            "read",
            _ref("ServiceDetail"),
            errors=("400", "404"),
            params=[_path("name", "service name"), _NAMESPACE],
        ),
    },
    f"{BASE}/instances": {
        "get": _op(
            "listInstances",
            "registered instances",
            "read",
            _list_of("Instance"),
            params=[_query("service", "only this service"), _NAMESPACE],
        ),
    },
    f"{BASE}/sidecars": {
        "get": _op(
            "listSidecars",
            "connected sidecars: version applied, last NACK, last seen",
            "read",
            _list_of("Sidecar"),
            params=[_query("service", "only this service"), _NAMESPACE],
        ),
    },
    f"{BASE}/sidecars/{{node_id}}": {
        "get": _op(
            "getSidecar",
            "one connected sidecar",
            "read",
            _ref("Sidecar"),
            errors=("404",),
            params=[_path("node_id", "the sidecar's node id")],
        ),
    },
    f"{BASE}/policies": {
        "get": _op(
            "listPolicies",
            "stored policy manifests and the policy revision",
            "read",
            _list_of("Manifest", {"revision": {"type": "integer"}}),
            errors=("400",),
            params=[_query("kind", "only this kind"), _NAMESPACE],
        ),
    },
    f"{BASE}/policies/{{kind}}/{{namespace}}/{{name}}": {
        "get": _op(
            "getPolicy",
            "one manifest",
            "read",
            _ref("Manifest"),
            errors=("404",),
            params=_POLICY_PATH,
        ),
        "put": _op(
            "putPolicy",
            "create or replace one manifest (one revision)",
            "admin",
            _ref("ApplyResult"),
            errors=("400", "409", "413"),
            params=_POLICY_PATH + _WRITE_QUERY,
            body=_ref("Manifest"),
        ),
        "delete": _op(
            "deletePolicy",
            "delete one manifest (one revision)",
            "admin",
            _ref("ApplyResult"),
            errors=("400", "404", "409"),
            params=_POLICY_PATH + _WRITE_QUERY,
        ),
    },
    f"{BASE}/policies:apply": {
        "post": _op(
            "applyPolicies",
            "apply a bundle of manifests atomically: all of it or nothing",
            "admin",
            _ref("ApplyResult"),
            errors=("400", "409", "413"),
            body=_ref("ApplyRequest"),
        ),
    },
    f"{BASE}/policies:validate": {
        "post": _op(
            "validatePolicies",
            "validate the set that applying the bundle would leave; writes nothing",
            "read",
            _ref("Validation"),
            errors=("400",),
            body=_ref("Bundle"),
        ),
    },
    f"{BASE}/policies:diff": {
        "post": _op(
            "diffPolicies",
            "what applying the bundle would change; writes nothing",
            "read",
            _ref("Diff"),
            errors=("400",),
            body=_ref("Bundle"),
        ),
    },
    f"{BASE}/history": {
        "get": _op(
            "listHistory",
            "change records, newest first",
            "read",
            _list_of("HistoryRecord"),
            errors=("400",),
            params=[
                _query("name", "only records that changed an object of this name"),
                _query("limit", "at most this many (default 100)", {"type": "integer"}),
            ],
        ),
    },
    f"{BASE}/history/{{revision}}": {
        "get": _op(
            "getHistory",
            "one change record",
            "read",
            _ref("HistoryRecord"),
            errors=("400", "404"),
            params=[_path("revision", "policy revision", {"type": "integer"})],
        ),
    },
    f"{BASE}/rollback": {
        "post": _op(
            "rollback",
            "write a new revision that restores the state at `revision`",
            "admin",
            _ref("ApplyResult"),
            errors=("400", "410", "413"),
            body=_ref("Rollback"),
        ),
    },
}

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "lepton-mesh admin API",
        "version": VERSION,
        "description": "Services, policies, history and sidecars of a lepton-mesh control "
        "plane. Every operation but this document needs `Authorization: Bearer <token>`; "
        "see docs/admin-api.md.",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearer": []}],
    "paths": _PATHS,
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        "schemas": _SCHEMAS,
        "responses": {
            name: {"description": description} | _json_body(_ref("Error"))
            for name, description in _ERROR_STATUSES.values()
        },
    },
}


def document() -> dict[str, Any]:
    """A copy of the document (callers may change theirs)."""
    return copy.deepcopy(_DOCUMENT)

"""The admin API: JSON over HTTP under /api/v1 (aiohttp), described by /api/v1/openapi.json.

docs/admin-api.md documents every endpoint; `openapi.py` holds the same as an
OpenAPI document, and a test checks the two against `ROUTES` both ways.

Rules every handler follows:
- Authentication first: a bearer token (ES256 JWT, `auth.py`); `read` for
  GETs, `admin` for writes. Only the OpenAPI document is public (and
  /metrics, which is outside the API: `add_metrics`).
- Reads answer from this replica's cache (registry, policies, history), so
  they keep working while etcd is down; writes go to etcd and answer 503
  `store_unavailable` when it does not answer.
- Every write is attributed: the token's subject goes into the history record.
- Every error is JSON: `{"error": message, "reason": code, "problems": [...]}`
  with the precise status (400 invalid input naming file/line/field, 401, 403,
  404, 409, 410, 413, 503). `reason` is stable, for scripts; `error` is for people.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_server import Server

from lepton_mesh.control.auth import AuthError, Claims, Role, TokenVerifier, Unauthenticated
from lepton_mesh.control.openapi import document as openapi_document
from lepton_mesh.control.policy_store import (
    PolicyError,
    PolicyStore,
    RevisionConflict,
)
from lepton_mesh.control.store import StoreError
from lepton_mesh.control.watch_cache import WatchCache
from lepton_mesh.policy.errors import ConfigError, Problem
from lepton_mesh.policy.traffic_loader import KINDS
from lepton_mesh.policy.yaml_source import Document, load_documents

__all__ = [
    "ROUTES",
    "AdminContext",
    "AdminServer",
    "ApiError",
    "add_metrics",
    "build_app",
    "start_admin_api",
]

_log = logging.getLogger(__name__)

BASE = "/api/v1"
LEADER_KEY = "/lepton/v1/election/leader"
# Policy bundles are small; etcd takes at most ~1.5 MiB per transaction anyway.
MAX_BODY = 4 * 1024 * 1024
MAX_HISTORY = 1000
# Header lines up to this long reach the handlers (aiohttp's default is
# 8190), so that a long Authorization header is answered in JSON; a token we
# issue is well under 1 KiB.
MAX_AUTHORIZATION = 16 * 1024
MAX_HEADER_LINE = MAX_AUTHORIZATION + 256


class RegistryView(Protocol):
    def services(self) -> list[dict[str, Any]]: ...
    def instances(self, service: str | None = None) -> list[dict[str, Any]]: ...
    def sidecars(self) -> list[dict[str, Any]]: ...


class AdminContext(Protocol):
    """What the admin API uses of a control replica (daemon.ControlContext has it)."""

    cache: WatchCache
    registry: RegistryView
    policies: PolicyStore
    replica_id: str
    token_verifier: TokenVerifier | None


CTX = web.AppKey("ctx", AdminContext)
CLAIMS = web.RequestKey("claims", Claims)


class ApiError(Exception):
    """An error this module raises itself, with its status and reason."""

    def __init__(
        self, status: int, reason: str, message: str, problems: tuple[Problem, ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.problems = problems


# --- responses -------------------------------------------------------------------


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _problem_json(p: Problem) -> dict[str, Any]:
    return {"file": p.file, "line": p.line, "path": p.path, "message": p.message, "text": str(p)}


def _error(
    status: int,
    reason: str,
    message: str,
    *,
    problems: tuple[Problem, ...] = (),
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    body = {"error": message, "reason": reason, "problems": [_problem_json(p) for p in problems]}
    return _json(body | extra, status, headers)


# HTTP errors aiohttp raises itself (unknown path, wrong method, body too large).
_HTTP_REASONS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await _answer(request, handler)
    if response.status >= 400 and request.body_exists and not request.content.is_eof():
        # A body the handler did not read (refused before it): aiohttp would
        # read and drop it after the response, and a body that cannot be
        # decoded (bad gzip) would then log a traceback. Close instead.
        response.force_close()
        request.content.feed_eof()
    return response


async def _answer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except AuthError as e:
        headers = {}
        if e.status == 401:
            # RFC 6750 3: no error code when no credentials were sent at all.
            params = 'realm="lepton-mesh"'
            if e.reason != "missing_token":
                params += ', error="invalid_token"'
            headers["WWW-Authenticate"] = f"Bearer {params}"
        return _error(e.status, e.reason, str(e), headers=headers)
    except RevisionConflict as e:
        return _error(e.status, e.reason, e.detail, current=e.current, base=e.base)
    except PolicyError as e:
        message = f"invalid policy: {len(e.problems)} problem(s)"
        return _error(e.status, e.reason, message, problems=e.problems)
    except StoreError as e:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return _error(e.status, e.reason, e.detail, headers=headers)
    except ApiError as e:
        return _error(e.status, e.reason, str(e), problems=e.problems)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        reason = _HTTP_REASONS.get(e.status, "http_error")
        messages = {
            404: f"no such endpoint: {request.path} (see {BASE}/openapi.json)",
            405: f"{request.method} is not allowed on {request.path}",
        }
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return _error(e.status, reason, messages.get(e.status, e.reason), headers=headers)
    except Exception:
        _log.exception("admin API: %s %s failed", request.method, request.path)
        return _error(500, "internal_error", "internal error; see the control daemon's log")


# --- authentication ------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _claims(request: web.Request, role: Role) -> Claims:
    verifier: TokenVerifier | None = request.app[CTX].token_verifier
    if verifier is None:
        raise ApiError(
            503,
            "auth_not_configured",
            "this control daemon has no token key (--token-key): it accepts no admin requests",
        )
    header = request.headers.get("Authorization", "")
    if len(header) > MAX_AUTHORIZATION:
        raise ApiError(
            431, "too_large", f"the Authorization header is over {MAX_AUTHORIZATION} bytes"
        )
    scheme, _, token = header.partition(" ")
    if not header:
        raise Unauthenticated(
            "a bearer token is required (Authorization: Bearer ...)", "missing_token"
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("expected 'Authorization: Bearer <token>'", "invalid_token")
    claims = verifier.verify(token.strip())
    claims.require(role)
    return claims


def _guarded(role: Role | None, handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if role is not None:
            request[CLAIMS] = _claims(request, role)
        return await handler(request)

    return guarded


# --- request parsing ------------------------------------------------------------------


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


async def _raw_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except (HttpProcessingError, RequestPayloadError) as e:
        # e.g. Content-Encoding: gzip with a body that is not gzip
        message = e.message if isinstance(e, HttpProcessingError) else str(e).replace("\n", " ")
        raise _bad(f"the request body cannot be read: {message}") from None


async def _body(request: web.Request, fields: frozenset[str] | None = None) -> dict[str, Any]:
    """The JSON object of the request; with `fields`, any other key is a 400
    (a typo such as `dryrun` must not turn a dry run into a write)."""
    raw = await _raw_body(request)
    if not raw:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise _bad(f"the request body is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise _bad("the request body must be a JSON object")
    if fields is not None:
        _known(data, fields, "the request body")
    return data


def _known(data: Mapping[str, Any], fields: frozenset[str], where: str) -> None:
    unknown = sorted(set(data) - fields)
    if unknown:
        raise _bad(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"the fields are {', '.join(sorted(fields))}"
        )


def _int(value: Any, field: str, *, minimum: int = 0) -> int | None:
    """An optional integer from a JSON body: a JSON number, never a string."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(f"{field}: expected an integer >= {minimum}, found {value!r}")
    return value


def _text_int(value: str | None, field: str, *, minimum: int = 0) -> int | None:
    """An optional integer from a query string or path: ASCII digits only."""
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdigit()) or int(value) < minimum:
        raise _bad(f"{field}: expected an integer >= {minimum}, found {value!r}")
    return int(value)


def _bool(value: Any, field: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise _bad(f"{field}: expected true or false, found {value!r}")


def _str(value: Any, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(f"{field}: expected a string, found {value!r}")
    return value


# The fields each JSON body may have (docs/admin-api.md).
_FILE_FIELDS = frozenset({"name", "content"})
_DIFF_FIELDS = frozenset({"files", "manifests", "prune"})
_APPLY_FIELDS = _DIFF_FIELDS | {"message", "base_revision", "dry_run"}
_ROLLBACK_FIELDS = frozenset({"revision", "message"})


def _bundle(body: Mapping[str, Any]) -> list[Document]:
    """The documents of a request: `files` (YAML text, so problems name file and line)
    and/or `manifests` (JSON objects, named `manifests[i]`)."""
    docs: list[Document] = []
    problems: list[Problem] = []
    files = body.get("files", [])
    if not isinstance(files, list):
        raise _bad("files: expected a list of {name, content}")
    for i, item in enumerate(files):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("name"), str)
            and isinstance(item.get("content"), str)
        ):
            raise _bad(f"files[{i}]: expected {{name: string, content: string}}")
        _known(item, _FILE_FIELDS, f"files[{i}]")
        try:
            docs.extend(load_documents(item["content"], item["name"]))
        except ConfigError as e:  # not YAML: still report the other files' problems
            problems.extend(e.problems)
    manifests = body.get("manifests", [])
    if not isinstance(manifests, list):
        raise _bad("manifests: expected a list of manifests")
    docs.extend(Document(f"manifests[{i}]", m, {}) for i, m in enumerate(manifests))
    if problems:
        raise PolicyError(problems)
    return docs


def _who(request: web.Request) -> str:
    return request[CLAIMS].subject


# --- handlers: the mesh ---------------------------------------------------------------


def _ctx(request: web.Request) -> AdminContext:
    return request.app[CTX]


async def overview(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    services = ctx.registry.services()
    sidecars = ctx.registry.sidecars()
    policies: dict[str, int] = dict.fromkeys(KINDS, 0)
    for manifest in ctx.policies.list():
        policies[manifest["kind"]] = policies.get(manifest["kind"], 0) + 1
    push = getattr(ctx, "push", None)
    return _json(
        {
            "replica": ctx.replica_id,
            "leader": _leader(ctx),
            "policy_revision": ctx.policies.revision(),
            "store": {"healthy": ctx.cache.healthy, "revision": ctx.cache.revision},
            "counts": {
                "services": len(services),
                "instances": sum(s["instances"] for s in services),
                "healthy_instances": sum(s["healthy"] for s in services),
                "sidecars": len(sidecars),
                "sidecars_with_nack": sum(1 for s in sidecars if s.get("last_nack")),
                "policies": policies,
            },
            "connections": push.connections() if push is not None else None,
            "time": time.time(),
        }
    )


def _leader(ctx: AdminContext) -> dict[str, Any] | None:
    """The leader key as the cache has it, with `confirmed`: false while the
    cache's watch is down (etcd may have expired that leader since), and null
    when it names this replica but this replica knows it lost its lease."""
    raw = ctx.cache.items.get(LEADER_KEY)
    try:
        leader = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        leader = None
    if not isinstance(leader, dict):
        return None
    election = getattr(ctx, "election", None)
    if election is not None and leader.get("replica") == ctx.replica_id:
        if not election.is_leader:
            return None
        return leader | {"confirmed": True}  # its own lease is alive: it knows
    return leader | {"confirmed": bool(ctx.cache.healthy)}


def _namespace(request: web.Request) -> str | None:
    return request.query.get("namespace") or None


async def list_services(request: web.Request) -> web.StreamResponse:
    ns = _namespace(request)
    items = [s for s in _ctx(request).registry.services() if ns is None or s["namespace"] == ns]
    return _json({"items": items})


async def get_service(request: web.Request) -> web.StreamResponse:
    ctx, name, ns = _ctx(request), request.match_info["name"], _namespace(request)
    found = [
        s for s in ctx.registry.services() if s["name"] == name and ns in (None, s["namespace"])
    ]
    if not found:
        where = f" in namespace {ns!r}" if ns else ""
        raise ApiError(404, "not_found", f"no service {name!r}{where}")
    if len(found) > 1:
        spaces = ", ".join(sorted(s["namespace"] for s in found))
        raise _bad(f"service {name!r} exists in namespaces {spaces}: give ?namespace=")
    (svc,) = found
    instances = [i for i in ctx.registry.instances(name) if i.get("namespace") == svc["namespace"]]
    policies = [
        m
        for m in ctx.policies.list(namespace=svc["namespace"])
        if name in (m["spec"].get("destination"), m["spec"].get("service"))
    ]
    return _json(svc | {"instance_list": instances, "policies": policies})


async def list_instances(request: web.Request) -> web.StreamResponse:
    ns = _namespace(request)
    items = _ctx(request).registry.instances(request.query.get("service") or None)
    return _json({"items": [i for i in items if ns is None or i.get("namespace") == ns]})


async def list_sidecars(request: web.Request) -> web.StreamResponse:
    service, ns = request.query.get("service"), _namespace(request)
    items = [
        s
        for s in _ctx(request).registry.sidecars()
        if (not service or s.get("service") == service) and (ns is None or s.get("namespace") == ns)
    ]
    return _json({"items": items})


async def get_sidecar(request: web.Request) -> web.StreamResponse:
    node_id = request.match_info["node_id"]
    for s in _ctx(request).registry.sidecars():
        if s.get("node_id") == node_id:
            return _json(s)
    raise ApiError(404, "not_found", f"no connected sidecar {node_id!r}")


# --- handlers: policies -----------------------------------------------------------------


def _kind(request: web.Request) -> str:
    kind = request.match_info["kind"]
    if kind not in KINDS:
        raise ApiError(404, "not_found", f"unknown kind {kind!r}: the kinds are {', '.join(KINDS)}")
    return kind


async def list_policies(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    kind = request.query.get("kind") or None
    if kind is not None and kind not in KINDS:
        raise _bad(f"kind: unknown kind {kind!r}; the kinds are {', '.join(KINDS)}")
    items = ctx.policies.list(kind, _namespace(request))
    return _json({"items": items, "revision": ctx.policies.revision()})


async def get_policy(request: web.Request) -> web.StreamResponse:
    ctx, kind = _ctx(request), _kind(request)
    ns, name = request.match_info["namespace"], request.match_info["name"]
    manifest = ctx.policies.get(kind, ns, name)
    if manifest is None:
        raise ApiError(404, "not_found", f"no {kind} {ns}/{name}")
    return _json(manifest, headers={"X-Lepton-Policy-Revision": str(ctx.policies.revision())})


async def put_policy(request: web.Request) -> web.StreamResponse:
    ctx, kind = _ctx(request), _kind(request)
    ns, name = request.match_info["namespace"], request.match_info["name"]
    manifest = await _body(request)
    meta = manifest.get("metadata", {})
    if not isinstance(meta, dict):
        raise _bad("metadata: expected an object")
    for field, want, got in (
        ("kind", kind, manifest.get("kind", kind)),
        ("metadata.namespace", ns, meta.get("namespace", ns)),
        ("metadata.name", name, meta.get("name", name)),
    ):
        if got != want:
            raise _bad(f"{field}: the body says {got!r} but the path says {want!r}")
    manifest = manifest | {"kind": kind, "metadata": meta | {"name": name, "namespace": ns}}
    result = await ctx.policies.apply(
        [Document("request body", manifest, {})],
        who=_who(request),
        message=request.query.get("message", ""),
        base_revision=_text_int(request.query.get("base_revision"), "base_revision"),
    )
    return _json(result)


async def delete_policy(request: web.Request) -> web.StreamResponse:
    ctx, kind = _ctx(request), _kind(request)
    result = await ctx.policies.delete(
        kind,
        request.match_info["namespace"],
        request.match_info["name"],
        who=_who(request),
        message=request.query.get("message", ""),
        base_revision=_text_int(request.query.get("base_revision"), "base_revision"),
    )
    return _json(result)


async def apply_policies(request: web.Request) -> web.StreamResponse:
    body = await _body(request, _APPLY_FIELDS)
    result = await _ctx(request).policies.apply(
        _bundle(body),
        who=_who(request),
        message=_str(body.get("message"), "message"),
        base_revision=_int(body.get("base_revision"), "base_revision"),
        dry_run=_bool(body.get("dry_run"), "dry_run"),
        prune=_bool(body.get("prune"), "prune"),
    )
    return _json(result)


async def validate_policies(request: web.Request) -> web.StreamResponse:
    body = await _body(request, _DIFF_FIELDS)
    policies = _ctx(request).policies
    changes = policies.diff(_bundle(body), prune=_bool(body.get("prune"), "prune"))
    return _json({"valid": True, "revision": policies.revision(), "changes": len(changes)})


async def diff_policies(request: web.Request) -> web.StreamResponse:
    body = await _body(request, _DIFF_FIELDS)
    policies = _ctx(request).policies
    changes = policies.diff(_bundle(body), prune=_bool(body.get("prune"), "prune"))
    return _json({"revision": policies.revision(), "changes": changes})


# --- handlers: history --------------------------------------------------------------------


async def list_history(request: web.Request) -> web.StreamResponse:
    limit = _text_int(request.query.get("limit"), "limit", minimum=1) or 100
    name = request.query.get("name") or None
    records = await _ctx(request).policies.history(name, min(limit, MAX_HISTORY))
    return _json({"items": records})


async def get_history(request: web.Request) -> web.StreamResponse:
    revision = _text_int(request.match_info["revision"], "revision", minimum=1)
    assert revision is not None
    record = _ctx(request).policies.record(revision)
    if record is None:
        raise ApiError(404, "not_found", f"no history record for revision {revision}")
    return _json(record)


async def rollback(request: web.Request) -> web.StreamResponse:
    body = await _body(request, _ROLLBACK_FIELDS)
    revision = _int(body.get("revision"), "revision")
    if revision is None:
        raise _bad("revision: required (the policy revision to restore)")
    result = await _ctx(request).policies.rollback(
        revision, who=_who(request), message=_str(body.get("message"), "message")
    )
    return _json(result)


_OPENAPI = orjson.dumps(openapi_document())


async def openapi(request: web.Request) -> web.StreamResponse:
    return web.Response(body=_OPENAPI, content_type="application/json")


# --- the route table ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    role: Role | None  # None: public


ROUTES: tuple[Route, ...] = (
    Route("GET", f"{BASE}/openapi.json", openapi, None),
    Route("GET", f"{BASE}/overview", overview, "read"),
    Route("GET", f"{BASE}/services", list_services, "read"),
    Route("GET", f"{BASE}/services/{{name}}", get_service, "read"),
    Route("GET", f"{BASE}/instances", list_instances, "read"),
    Route("GET", f"{BASE}/sidecars", list_sidecars, "read"),
    Route("GET", f"{BASE}/sidecars/{{node_id}}", get_sidecar, "read"),
    Route("GET", f"{BASE}/policies", list_policies, "read"),
    Route("GET", f"{BASE}/policies/{{kind}}/{{namespace}}/{{name}}", get_policy, "read"),
    Route("PUT", f"{BASE}/policies/{{kind}}/{{namespace}}/{{name}}", put_policy, "admin"),
    Route("DELETE", f"{BASE}/policies/{{kind}}/{{namespace}}/{{name}}", delete_policy, "admin"),
    Route("POST", f"{BASE}/policies:apply", apply_policies, "admin"),
    # Validate and diff write nothing, but show what a write would do: read is enough.
    Route("POST", f"{BASE}/policies:validate", validate_policies, "read"),
    Route("POST", f"{BASE}/policies:diff", diff_policies, "read"),
    Route("GET", f"{BASE}/history", list_history, "read"),
    Route("GET", f"{BASE}/history/{{revision}}", get_history, "read"),
    Route("POST", f"{BASE}/rollback", rollback, "admin"),
)


class _JsonErrors(RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse (a header
    line too long, bad framing) with our JSON error instead of plain text and a
    logged traceback: they are the client's errors, not ours."""

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        self.logger.info("admin API: a request could not be parsed: %s", message or exc)
        if isinstance(exc, LineTooLong):  # a header (or the request line) too long
            status = 431
        reason = "too_large" if status in (413, 431) else "bad_request"
        text = (message or "the request could not be parsed")[:300]
        response = _error(status, reason, text)
        response.force_close()
        return response


class _JsonErrorServer(Server):
    def __call__(self) -> RequestHandler:
        try:
            return _JsonErrors(self, loop=self._loop, **self._kwargs)
        except (AttributeError, TypeError):
            # aiohttp's internals moved (`_loop`, `_kwargs` are not public): its
            # own handler still serves every request, with plain-text parse errors.
            return super().__call__()


class _Runner(web.AppRunner):
    # `_make_server` is aiohttp's, not public API: if it is gone or returns
    # another class, the runner is aiohttp's own (see _JsonErrorServer).
    async def _make_server(self) -> Server:
        server = await super()._make_server()
        if type(server) is Server:
            server.__class__ = _JsonErrorServer  # same state; only the handler it makes differs
        return server


def build_app(ctx: AdminContext) -> web.Application:
    app = web.Application(
        middlewares=[_errors],
        client_max_size=MAX_BODY,
        handler_args={"max_line_size": MAX_HEADER_LINE, "max_field_size": MAX_HEADER_LINE},
    )
    app[CTX] = ctx
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _guarded(route.role, route.handler))
    return app


class AdminServer:
    """A running admin API: `port` is the bound port (useful with port 0)."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        await self._runner.cleanup()


def add_metrics(app: web.Application, ctx: AdminContext) -> None:
    """GET /metrics: the replica's Prometheus metrics (control/metrics.py), without a token.

    Outside /api/v1 and `ROUTES` on purpose: it is Prometheus text for a
    scraper, not part of the JSON API that the OpenAPI document describes.
    """
    from lepton_mesh.control.metrics import ControlMetrics

    metrics = ControlMetrics(ctx)

    async def serve_metrics(request: web.Request) -> web.StreamResponse:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app.router.add_get("/metrics", serve_metrics)


def add_probes(app: web.Application, ctx: AdminContext) -> None:
    """GET /live and /ready, without a token, for orchestrators' probes.

    Ready once the replica's cache has done its first full read of etcd: from
    then on it can serve sidecars (from the cache even while etcd is away).
    Outside /api/v1 and the OpenAPI document, like /metrics.
    """

    async def live(request: web.Request) -> web.StreamResponse:
        return web.json_response({"live": True})

    async def ready(request: web.Request) -> web.StreamResponse:
        if ctx.cache.ready.is_set():
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reason": "cache_not_loaded"}, status=503)

    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready)


async def start_admin_api(ctx: AdminContext, host: str, port: int) -> AdminServer:
    """Serve the admin API, /metrics and the probes on host:port (0: any free port)."""
    app = build_app(ctx)
    add_metrics(app, ctx)
    add_probes(app, ctx)
    runner = _Runner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple):
            bound = address[1]
            break
    return AdminServer(runner, host, bound)

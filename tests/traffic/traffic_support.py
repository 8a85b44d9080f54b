"""Helpers for the end-to-end traffic-management tests.

The sidecar under test, its upstreams and its clients share one uvloop event
loop (the fixtures of tests/proxy, imported by this folder's conftest). What
this module adds:

- `Backend`: an upstream whose behavior the test sets and changes at run
  time (answer, answer with a status, reset, close, delay, hold until
  released); every answer names the backend and echoes what it received, and
  requests are counted as the upstream reads them;
- config builders for `SidecarConfig.traffic` (routes, destination policies,
  endpoints with labels);
- a load driver over a few keep-alive connections, the admin `/clusters`
  JSON, a parsed `/metrics` scrape, and an in-memory access log.

Nothing here sleeps to wait for state: `wait_for` polls a condition with a
deadline. The only sleeps are upstream behavior (a backend told to be slow).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families
from proxy_harness import (
    DEADLINE,
    Conn,
    Message,
    RawClient,
    Upstream,
    client,
    http,
    make_config,
    read_response,
    request_bytes,
    response_bytes,
)

from lepton_mesh.policy.sidecar_config import Address, Endpoint, ServiceConfig, SidecarConfig
from lepton_mesh.policy.traffic import (
    DestinationPolicy,
    Route,
    RouteRule,
    TrafficPolicies,
)
from lepton_mesh.proxy.observe.access_log import AccessLog

# How early a proxy timer may fire as the client measures it: the event loop
# arms timers from its cached time, taken when the current loop iteration
# began (libuv, millisecond resolution), so a busy iteration makes a timer
# armed late in it fire a little before `delay` has passed in real time.
TIMER_SLACK = 0.02

# --------------------------------------------------------------------------
# Upstreams that can be told to fail.

OK = "ok"  # 200 (or `status`) with a JSON echo naming the backend
STATUS = "status"  # answer `status` (a 5xx, a 409, ...) with the same echo
RESET = "reset"  # read the whole request, then RST
CLOSE = "close"  # read the whole request, then FIN without a response
DELAY = "delay"  # wait `delay` seconds, then answer 200
HOLD = "hold"  # answer 200 only when the test calls `release()`
MODES = (OK, STATUS, RESET, CLOSE, DELAY, HOLD)


@dataclass
class Backend:
    """One upstream server and the script it follows; change `mode` at any time."""

    name: str
    upstream: Upstream
    mode: str = OK
    status: int = 503
    delay: float = 0.0
    response_headers: tuple[tuple[str, str], ...] = ()
    in_flight: int = 0
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> Address:
        return self.upstream.address

    @property
    def hits(self) -> int:
        """Requests this backend has read (each try counts)."""
        return len(self.upstream.requests)

    @property
    def requests(self) -> list[Message]:
        return self.upstream.requests

    def release(self) -> None:
        """Let every held request (mode HOLD) answer, now and from now on."""
        self._released.set()

    async def app(self, req: Message, conn: Conn) -> bool | None:
        mode = self.mode
        if mode == RESET:
            conn.reset()
            return False
        if mode == CLOSE:
            return False
        self.in_flight += 1
        try:
            if mode == DELAY:
                await asyncio.sleep(self.delay)
            elif mode == HOLD:
                await self._released.wait()
            status = self.status if mode == STATUS else 200
            body = orjson.dumps(
                {
                    "backend": self.name,
                    "method": req.method,
                    "target": req.target,
                    "headers": req.headers,
                    "body": req.body.decode("latin-1"),
                }
            )
            headers = [("x-served-by", self.name), ("content-type", "application/json")]
            await conn.send(
                response_bytes(
                    status, body, [*headers, *self.response_headers], phrase=_phrase(status)
                )
            )
        finally:
            self.in_flight -= 1
        return None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


async def start_backend(
    upstreams: Callable[..., Any], name: str, mode: str = OK, **kw: Any
) -> Backend:
    """Start an upstream (stopped by the `upstreams` fixture) that follows a `Backend` script."""
    holder: list[Backend] = []

    async def app(req: Message, conn: Conn) -> bool | None:
        return await holder[0].app(req, conn)

    up = await upstreams(http(app))
    backend = Backend(name, up, mode, **kw)
    holder.append(backend)
    return backend


async def start_backends(upstreams: Callable[..., Any], *names: str, **kw: Any) -> list[Backend]:
    return [await start_backend(upstreams, n, **kw) for n in names]


# --------------------------------------------------------------------------
# Config.


def endpoint(address: Address, **labels: str) -> Endpoint:
    return Endpoint(address, labels=MappingProxyType(dict(labels)))


def destination(service: str, **kw: Any) -> DestinationPolicy:
    return DestinationPolicy(name=service, namespace="default", service=service, **kw)


def route(destination_service: str, *rules: RouteRule) -> Route:
    return Route(
        name=f"{destination_service}-route",
        namespace="default",
        destination=destination_service,
        rules=rules,
    )


def mesh_config(
    services: Mapping[str, Sequence[Address | Endpoint | Backend]],
    *,
    routes: Iterable[Route] = (),
    destinations: Iterable[DestinationPolicy] = (),
    **kw: Any,
) -> SidecarConfig:
    """A sidecar config calling `services` (their endpoints, labels kept) with traffic policies."""
    svcs: dict[str, ServiceConfig] = {}
    for name, eps in services.items():
        endpoints = []
        for e in eps:
            if isinstance(e, Backend):
                e = e.address
            endpoints.append(e if isinstance(e, Endpoint) else Endpoint(e))
        svcs[name] = ServiceConfig(name=name, endpoints=tuple(endpoints))
    cfg = make_config(services=svcs, **kw)
    traffic = TrafficPolicies(
        routes=MappingProxyType({r.destination: r for r in routes}),
        destinations=MappingProxyType({d.service: d for d in destinations}),
    )
    return replace(cfg, traffic=traffic)


# --------------------------------------------------------------------------
# Clients.


@dataclass
class Result:
    """One response the driver read, with its latency in seconds."""

    index: int
    response: Message
    latency: float

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def attempts(self) -> int:
        return int(self.response.get("x-lepton-attempts") or 0)

    @property
    def reason(self) -> str | None:
        return self.response.get("x-lepton-reason")

    @property
    def served_by(self) -> str | None:
        return self.response.get("x-served-by")


async def call(
    addr: Address,
    method: str = "GET",
    target: str = "/",
    *,
    host: str = "svc",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    timeout: float = DEADLINE,
) -> Result:
    """One request on a fresh connection."""
    c = await RawClient.connect(addr)
    try:
        start = time.perf_counter()
        await c.send(request_bytes(method, target, host=host, headers=headers, body=body))
        resp = await asyncio.wait_for(read_response(c.reader, method=method), timeout)
        return Result(0, resp, time.perf_counter() - start)
    finally:
        await c.close()


async def drive(
    addr: Address,
    count: int,
    *,
    concurrency: int = 8,
    make: Callable[[int], bytes] | None = None,
    method: str = "GET",
) -> list[Result]:
    """Send `count` requests over `concurrency` keep-alive connections; results in index order.

    `make(i)` renders request i (default: GET / to svc). A connection the
    proxy closes (a sidecar error with `Connection: close`) is reopened.
    """
    render = make or (lambda i: request_bytes(method, f"/r{i}", host="svc"))
    results: list[Result | None] = [None] * count
    next_index = iter(range(count))

    async def worker() -> None:
        c = await RawClient.connect(addr)
        try:
            for i in next_index:
                start = time.perf_counter()
                await c.send(render(i))
                resp = await asyncio.wait_for(read_response(c.reader, method=method), DEADLINE)
                results[i] = Result(i, resp, time.perf_counter() - start)
                if "close" in resp.connection_tokens():
                    await c.close()
                    c = await RawClient.connect(addr)
        finally:
            await c.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------
# Admin API, metrics, access log.


async def admin_get(sc: Any, path: str) -> Message:
    async with client(sc.addresses["admin"]) as c:
        return await c.request(request_bytes("GET", path, host="admin"))


async def clusters(sc: Any) -> dict[str, Any]:
    """`GET /clusters` on the sidecar's admin listener: the `clusters` mapping."""
    resp = await admin_get(sc, "/clusters")
    assert resp.status == 200, resp.body[:300]
    return resp.json()["clusters"]


def endpoint_view(view: Mapping[str, Any], backend: Backend) -> dict[str, Any]:
    """One endpoint's entry in a service's `/clusters` view."""
    want = str(backend.address)
    (entry,) = [e for e in view["endpoints"] if e["address"] == want]
    return entry


Sample = tuple[str, frozenset[tuple[str, str]]]


async def scrape(sc: Any) -> dict[Sample, float]:
    """`GET /metrics`, parsed by prometheus-client: {(sample name, labels): value}."""
    resp = await admin_get(sc, "/metrics")
    assert resp.status == 200
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: Mapping[Sample, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


class CapturedLog:
    """The sidecar's real `AccessLog`, writing to memory instead of stdout."""

    def __init__(self, sc: Any) -> None:
        self.stream = io.BytesIO()
        self.log = AccessLog(True, self.stream)
        sc.access_log = self.log  # listeners read it per record; sc.stop() closes it

    def records(self) -> list[dict[str, Any]]:
        self.log.flush()
        assert self.log.wait_written(DEADLINE), "access log not written in time"
        return [orjson.loads(line) for line in self.stream.getvalue().splitlines()]


def share(values: Iterable[str | None]) -> dict[str | None, float]:
    items = list(values)
    counts: dict[str | None, int] = {}
    for v in items:
        counts[v] = counts.get(v, 0) + 1
    return {k: n / len(items) for k, n in counts.items()}


class Unanswered:
    """An address where a TCP connect hangs: a listener whose accept queue is
    full, so the kernel drops further SYNs (no RST, no accept). `close()` it."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        self._fillers: list[socket.socket] = []
        host, port = self._listener.getsockname()
        self.address = Address(host, port)
        for _ in range(3):  # a backlog of 0 still admits one or two
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((host, port))
            self._fillers.append(s)

    def close(self) -> None:
        for s in self._fillers:
            s.close()
        self._listener.close()


def reset_on_close(c: RawClient) -> None:
    """Make `c.close()` send an RST (SO_LINGER 0) instead of a FIN."""
    sock = c.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

"""The local app's health, checked with a periodic HTTP GET and reported on change.

Rules:
- One probe every `interval`: a new connection to the app, `GET <path>
  HTTP/1.1` with `Connection: close`, and the response's status line and
  headers read through httptools. Any 2xx is a success; another status, a
  refused or reset connection, an unparseable response, a response head over
  64 KiB, or no response head within `timeout` is a failure. The body is not
  read. A new connection each time, so a hung or dead app is seen as such.
- Thresholds (`HealthState`): from unknown, the first probe decides; after
  that it takes `unhealthy_after` (default 2) consecutive failures to become
  unhealthy, so one slow probe does not pull the instance out of every
  caller's balancer, and `healthy_after` (default 1) success to recover,
  so a fixed app takes traffic again at once.
- `on_change(healthy, detail)` is called on the loop when the state changes,
  never for a repeat; `detail` says why (`"GET /healthz: status 503"`).
- Cadence is a loop timer at a fixed rate (each probe is due `interval`
  after the previous one was due, or at once if a probe ran longer). A probe
  is one short task (connecting is a coroutine), bounded by `timeout`, which
  never exceeds `interval`: at most one probe runs at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import httptools

from lepton_mesh.policy.sidecar_config import Address, HealthCheckConfig

__all__ = ["HealthChecker", "HealthState"]

MAX_HEAD = 64 * 1024


class HealthState:
    """Consecutive-result thresholds: `observe()` returns True when `healthy` changed."""

    __slots__ = ("_failures", "_successes", "detail", "healthy", "healthy_after", "unhealthy_after")

    def __init__(self, unhealthy_after: int = 2, healthy_after: int = 1) -> None:
        if unhealthy_after < 1 or healthy_after < 1:
            raise ValueError("thresholds must be at least 1")
        self.unhealthy_after = unhealthy_after
        self.healthy_after = healthy_after
        self.healthy: bool | None = None  # None: no probe finished yet
        self.detail = ""
        self._failures = 0
        self._successes = 0

    def observe(self, ok: bool, detail: str) -> bool:
        if ok:
            self._successes += 1
            self._failures = 0
        else:
            self._failures += 1
            self._successes = 0
        before = self.healthy
        if before is None:
            self.healthy = ok
        elif before and self._failures >= self.unhealthy_after:
            self.healthy = False
        elif not before and self._successes >= self.healthy_after:
            self.healthy = True
        if self.healthy != before:
            self.detail = detail
            return True
        return False


class HealthChecker:
    """Probes `app` at `cfg.path`; `start()` probes at once, `stop()` cancels everything."""

    __slots__ = (
        "_due",
        "_handle",
        "_loop",
        "_on_change",
        "_probe",
        "_request",
        "app",
        "cfg",
        "state",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app: Address,
        cfg: HealthCheckConfig,
        on_change: Callable[[bool, str], None],
        *,
        unhealthy_after: int = 2,
        healthy_after: int = 1,
    ) -> None:
        self._loop = loop
        self.app = app
        self.cfg = cfg
        self._on_change = on_change
        self.state = HealthState(unhealthy_after, healthy_after)
        self._request = (
            f"GET {cfg.path} HTTP/1.1\r\nHost: {app}\r\nUser-Agent: lepton-mesh-health\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        self._handle: asyncio.TimerHandle | None = None
        self._probe: asyncio.Task[None] | None = None
        self._due = 0.0

    @property
    def healthy(self) -> bool | None:
        return self.state.healthy

    @property
    def detail(self) -> str:
        return self.state.detail

    def start(self) -> None:
        if self._handle is None and self._probe is None:
            self._due = self._loop.time()
            self._tick()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None

    def _tick(self) -> None:
        self._handle = None
        self._probe = self._loop.create_task(self._run_probe())

    async def _run_probe(self) -> None:
        ok, detail = await self.probe()
        self._probe = None
        # The next probe is scheduled first, so a failing callback cannot stop the checks.
        self._due = max(self._due + self.cfg.interval, self._loop.time())
        self._handle = self._loop.call_at(self._due, self._tick)
        if self.state.observe(ok, detail):
            self._on_change(bool(self.state.healthy), detail)

    async def probe(self) -> tuple[bool, str]:
        """One GET: (success, what happened)."""
        what = f"GET {self.cfg.path}"
        done: asyncio.Future[tuple[bool, str]] = self._loop.create_future()
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(self.cfg.timeout):
                transport, _ = await self._loop.create_connection(
                    lambda: _Probe(self._request, done), self.app.host, self.app.port
                )
                ok, result = await done
        except TimeoutError:
            return False, f"{what}: no response within {self.cfg.timeout:g}s"
        except OSError as e:
            return False, f"{what}: cannot connect to {self.app}: {e.strerror or e}"
        finally:
            if transport is not None:
                transport.close()
        return ok, f"{what}: {result}"


class _Probe(asyncio.Protocol):
    """Writes the request, completes `done` once the response head is read (or not)."""

    __slots__ = ("_done", "_parser", "_read", "_request", "_transport")

    def __init__(self, request: bytes, done: asyncio.Future[tuple[bool, str]]) -> None:
        self._request = request
        self._done = done
        self._parser = httptools.HttpResponseParser(self)
        self._read = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            return
        self._read += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._finish(False, f"invalid HTTP response: {e}")
            return
        if not self._done.done() and self._read > MAX_HEAD:
            self._finish(False, f"response head over {MAX_HEAD} bytes")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._finish(200 <= status < 300, f"status {status}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            why = f"connection lost: {exc}" if exc else "connection closed before a response"
            self._finish(False, why)

    def _finish(self, ok: bool, detail: str) -> None:
        if not self._done.done():
            self._done.set_result((ok, detail))
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.close()

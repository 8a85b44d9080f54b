"""What every run gets (`Bench`), what every run returns (`RunResult`), and the registry.

A run is one small function `fn(bench) -> RunResult` registered under its name
with `@register("name")`; registration order is the order runs execute and
print in. A run starts what it needs beyond the shared upstream (sidecars, a
proxy) with `with bench.sidecar(...)` / `with bench.nginx_proxy()`, so it is
stopped when the run ends, failed or not.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench import control, nginx, sidecar, wrk
from bench.procs import (
    BenchError,
    CpuSample,
    Pinning,
    free_port,
    running,
    spawn,
    tail,
    tree_cpu_seconds,
    tree_rss_mb,
    wait_http,
)

# `bench` is not an installed package: its clients run from the directory holding it.
_PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Which comparisons make sense: rps ratios only between throughput runs.
Kind = Literal["throughput", "latency", "memory", "resilience", "control"]


@dataclass(frozen=True, slots=True)
class Settings:
    duration_s: float = 8.0
    warmup_s: float = 2.0
    connections: int = 50
    threads: int = 1
    rate: int = 1000
    rate_connections: int = 20
    hold_connections: int = 1000
    failover_rate: int = 3000  # open-loop rate of the failover run: ~40 % of the proxy core
    mtls_churn_s: float = 60.0  # seconds of new mTLS connections in mtls_churn
    ready_timeout_s: float = 20.0
    quiet_wait_s: float = 0.0  # before each run, wait up to this for others' load to drop


@dataclass(slots=True)
class RunResult:
    """One row of the table and one entry of `runs` in the JSON.

    The six named figures are the table's columns; `extra` holds whatever else
    the run measured (idle RSS, p90, error counts...) and is flattened into
    the JSON entry. `kind` says which comparisons make sense: ratios of rps
    only between throughput runs.
    """

    name: str
    kind: Kind
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_us_per_req: float | None = None
    rss_mb: float | None = None
    extra: dict[str, object] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        figures = {
            "rps": _round(self.rps, 1),
            "p50_ms": _round(self.p50_ms, 3),
            "p99_ms": _round(self.p99_ms, 3),
            "cpu_us_per_req": _round(self.cpu_us_per_req, 1),
            "rss_mb": _round(self.rss_mb, 1),
        }
        extra = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.extra.items()}
        out: dict[str, object] = {"name": self.name, "kind": self.kind, **figures, **extra}
        if self.error is not None:
            out["error"] = self.error
        return out


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


RunFn = Callable[["Bench"], RunResult]
REGISTRY: dict[str, RunFn] = {}


def register(name: str) -> Callable[[RunFn], RunFn]:
    def add(fn: RunFn) -> RunFn:
        if name in REGISTRY:
            raise ValueError(f"run {name!r} registered twice")
        REGISTRY[name] = fn
        return fn

    return add


@dataclass(frozen=True, slots=True)
class WrkRequest:
    """What wrk sends besides `Host`: the path, and whole header lines sent on every request."""

    path: str = "/"
    headers: tuple[str, ...] = ()


GET_ROOT = WrkRequest()


@dataclass(frozen=True, slots=True)
class Measured:
    """A closed-loop wrk run and what the proxies spent on it."""

    result: wrk.WrkResult
    cpu_us_per_req: float | None
    upstream_cpu_us_per_req: float | None
    background_cores: float


@dataclass(slots=True)
class Bench:
    settings: Settings
    pinning: Pinning
    workdir: Path
    upstream: nginx.Nginx
    wrk_script: Path

    @contextmanager
    def sidecar(self, spec: sidecar.SidecarSpec) -> Iterator[sidecar.Sidecar]:
        with sidecar.serve(
            spec, self.workdir, self.pinning.proxy(), self.settings.ready_timeout_s
        ) as running:
            yield running

    @contextmanager
    def nginx_proxy(self) -> Iterator[nginx.Nginx]:
        prefix, port = self.workdir / "nginx-proxy", free_port()
        conf = nginx.proxy_conf(prefix, port, self.upstream.port)
        with nginx.serve(
            "nginx proxy", prefix, conf, port, self.pinning.proxy(), self.settings.ready_timeout_s
        ) as running:
            yield running

    @contextmanager
    def bare_proxy(self) -> Iterator[tuple[int, int]]:
        """bench/bare_proxy.py in front of the upstream, pinned as the proxies are: (pid, port)."""
        port = free_port()
        argv = [*self.pinning.proxy(), sys.executable, "-m", "bench.bare_proxy"]
        argv += ["--port", str(port), "--upstream", str(self.upstream.port)]
        log = self.workdir / "bare-proxy.log"
        proc = spawn(argv, stdout=log, stderr=log, cwd=_PROJECT_ROOT)
        with running(proc, "bare proxy"):
            try:
                wait_http(
                    proc,
                    port,
                    "/",
                    want=200,
                    deadline_s=self.settings.ready_timeout_s,
                    what="bare proxy",
                )
            except BenchError as exc:
                raise BenchError(f"{exc}\n{tail(log)}") from exc
            yield proc.pid, port

    @contextmanager
    def control_plane(self, label: str) -> Iterator[control.ControlPlane]:
        """etcd (on the load core) and one control daemon (on the proxy core), new for each run."""
        with control.serve(
            self.workdir / label, self.pinning.proxy(), self.settings.ready_timeout_s
        ) as running:
            yield running

    @contextmanager
    def upstream_nginx(self, label: str) -> Iterator[nginx.Nginx]:
        """Another upstream like the shared one (pinned with the load), for runs that kill one."""
        prefix, port = self.workdir / label, free_port()
        conf = nginx.upstream_conf(prefix, port)
        with nginx.serve(
            label, prefix, conf, port, self.pinning.load(), self.settings.ready_timeout_s
        ) as running:
            yield running

    def wrk(
        self, port: int, host: str | None, duration_s: float, request: WrkRequest = GET_ROOT
    ) -> wrk.WrkResult:
        argv = wrk.command(
            url=f"http://127.0.0.1:{port}{request.path}",
            host=host,
            duration_s=duration_s,
            connections=self.settings.connections,
            threads=self.settings.threads,
            script=self.wrk_script,
            pin=self.pinning.load(),
            headers=request.headers,
        )
        return wrk.run(argv, duration_s)

    def closed_loop(
        self,
        port: int,
        host: str | None,
        proxies: Sequence[int],
        request: WrkRequest = GET_ROOT,
    ) -> Measured:
        """Warm up, then one measured wrk run; CPU of `proxies` is read around it."""
        if self.settings.warmup_s > 0:
            self.wrk(port, host, self.settings.warmup_s, request)
        live = [*proxies, self.upstream.pid]
        before = CpuSample.take(live)
        cpu0, up0 = tree_cpu_seconds(proxies), tree_cpu_seconds([self.upstream.pid])
        result = self.wrk(port, host, self.settings.duration_s, request)
        cpu1, up1 = tree_cpu_seconds(proxies), tree_cpu_seconds([self.upstream.pid])
        after = CpuSample.take(live)
        return Measured(
            result,
            per_request_us(cpu1 - cpu0, result.requests) if proxies else None,
            per_request_us(up1 - up0, result.requests),
            before.background_cores(after),
        )

    @contextmanager
    def tool(self, label: str, module: str, *args: str) -> Iterator[Tool]:
        """Run one of the bench's own clients (`python -m module`), pinned to the load core.

        It talks to the bench in lines on its stdout; it is stopped on exit if
        it has not ended by itself.
        """
        argv = [*self.pinning.load(), sys.executable, "-m", module, *args]
        stderr = self.workdir / f"{label}.stderr.log"
        proc = spawn(
            argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.PIPE, cwd=_PROJECT_ROOT
        )
        with running(proc, label):
            yield Tool(label, proc, stderr)


@dataclass(frozen=True, slots=True)
class Tool:
    label: str
    proc: subprocess.Popen[bytes]
    stderr: Path

    def expect(self, prefix: str) -> str:
        """The next line of its stdout, which must start with `prefix`."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith(prefix):
            code = self.proc.poll()
            raise BenchError(
                f"{self.label} said {line!r}, expected {prefix!r} (exit {code})\n{tail(self.stderr)}"
            )
        return line[len(prefix) :]

    def say(self, line: str) -> None:
        """One line to its stdin (clients that take commands, e.g. `openloop --phases`)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise BenchError(f"{self.label} exited early\n{tail(self.stderr)}") from exc

    def finish(self, timeout_s: float = 30.0) -> None:
        """Close its stdin (the signal to end) and wait for it to exit."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{self.label} did not exit within {timeout_s:.0f}s") from exc


def per_request_us(cpu_s: float, requests: int) -> float | None:
    return cpu_s * 1e6 / requests if requests else None


def rss_of(pids: Sequence[int]) -> list[float]:
    return [round(tree_rss_mb(p), 1) for p in pids]


def fail_if_not_all_ok(result: wrk.WrkResult, what: str) -> None:
    """For runs where any refusal means the thing measured was not what ran (a 401 from a
    bad token, a 403 from a rule, a 429): wrk's `status` errors, its count of answers
    with a status of 400 or more, must be 0."""
    refused = result.errors.get("status", 0)
    if refused:
        raise BenchError(
            f"{what}: {refused} of {result.requests} answers had a status >= 400; "
            "every answer must be 200 (--keep-workdir keeps the sidecar's access log, which says why)"
        )


def fail_if_errors(result: wrk.WrkResult, what: str) -> dict[str, object]:
    """Error counts for the JSON; a run whose answers are mostly errors is not a figure."""
    errors = {k: v for k, v in result.errors.items() if v}
    if result.requests == 0 or result.error_count > result.requests // 100:
        raise BenchError(
            f"{what}: {result.error_count} errors in {result.requests} requests {errors}"
        )
    return errors

"""The runs, one small function each. Add a run: write `@register("name") def ...(bench)`.

Every run reaches the same upstream (`bench.upstream`, nginx returning a small
body, pinned with the load generator). Proxies under test are pinned to the
other core. CPU is the proxy processes' utime+stime over the measured part
only, divided by the requests completed in it; RSS is read after the run and,
as `idle_rss_mb`, once the proxy is ready and before any traffic.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from bench.harness import Bench, RunResult, fail_if_errors, per_request_us, register, rss_of
from bench.holdconns import READY
from bench.openloop import MEASURE_END, MEASURE_START
from bench.procs import BenchError, CpuSample, open_fds, tree_cpu_seconds, tree_rss_mb
from bench.sidecar import SidecarSpec

UPSTREAM_SERVICE = "upstream"


def _throughput(
    bench: Bench, name: str, port: int, host: str | None, proxies: Sequence[int]
) -> RunResult:
    idle = rss_of(proxies)
    measured = bench.closed_loop(port, host, proxies)
    res = measured.result
    extra: dict[str, object] = {
        "requests": res.requests,
        "p90_ms": res.p90_ms,
        "p999_ms": res.p999_ms,
        "max_ms": res.max_ms,
        "errors": fail_if_errors(res, name),
        "upstream_cpu_us_per_req": measured.upstream_cpu_us_per_req,
        "background_cores": measured.background_cores,
    }
    rss = rss_of(proxies)
    if proxies:
        extra |= {"idle_rss_mb": max(idle), "rss_mb_each": rss, "idle_rss_mb_each": idle}
    if measured.cpu_us_per_req is not None:
        # Close to 1.0: the proxy core was the limit, as intended. Well below:
        # something else was (the load core, or other work on the machine).
        extra["proxy_cores_busy"] = measured.cpu_us_per_req * res.rps / 1e6
    return RunResult(
        name,
        "throughput",
        rps=res.rps,
        p50_ms=res.p50_ms,
        p99_ms=res.p99_ms,
        cpu_us_per_req=measured.cpu_us_per_req,
        rss_mb=max(rss) if rss else None,
        extra=extra,
    )


def _client_sidecar(bench: Bench, upstream_port: int) -> SidecarSpec:
    """The caller's sidecar: outbound routes `Host: upstream` to `upstream_port`."""
    return SidecarSpec(
        label="sidecar-a",
        service="bench-client",
        app_port=bench.upstream.port,  # unused: nothing calls A's inbound
        services={UPSTREAM_SERVICE: [upstream_port]},
    )


@register("direct")
def direct(bench: Bench) -> RunResult:
    return _throughput(bench, "direct", bench.upstream.port, None, [])


@register("one_hop")
def one_hop(bench: Bench) -> RunResult:
    with bench.sidecar(_client_sidecar(bench, bench.upstream.port)) as a:
        return _throughput(bench, "one_hop", a.ports.outbound, UPSTREAM_SERVICE, [a.pid])


@register("two_hop")
def two_hop(bench: Bench) -> RunResult:
    """wrk -> A outbound -> B inbound -> upstream. CPU is A's plus B's; RSS the larger."""
    b_spec = SidecarSpec("sidecar-b", UPSTREAM_SERVICE, bench.upstream.port, services={})
    with bench.sidecar(b_spec) as b, bench.sidecar(_client_sidecar(bench, b.ports.inbound)) as a:
        return _throughput(bench, "two_hop", a.ports.outbound, UPSTREAM_SERVICE, [a.pid, b.pid])


@register("nginx")
def nginx_proxy(bench: Bench) -> RunResult:
    with bench.nginx_proxy() as proxy:
        return _throughput(bench, "nginx", proxy.port, None, [proxy.pid])


# --- fixed-rate latency -----------------------------------------------------------


def _open_loop(
    bench: Bench, port: int, host: str, proxies: Sequence[int]
) -> tuple[dict[str, Any], float | None]:
    """One open-loop client run; returns its summary and the proxies' CPU us/request."""
    s = bench.settings
    args = (f"--port={port}", f"--host-header={host}", f"--rate={s.rate}")
    args += (f"--connections={s.rate_connections}", f"--duration={s.duration_s}")
    with bench.tool("openloop", "bench.openloop", *args, f"--warmup={s.warmup_s}") as client:
        live = [*proxies, bench.upstream.pid, client.proc.pid]
        client.expect(MEASURE_START)
        before, cpu0 = CpuSample.take(live), tree_cpu_seconds(proxies)
        client.expect(MEASURE_END)
        after, cpu1 = CpuSample.take(live), tree_cpu_seconds(proxies)
        summary: dict[str, Any] = json.loads(client.expect(""))
        client.finish()
    summary["background_cores"] = before.background_cores(after)
    cpu = per_request_us(cpu1 - cpu0, int(summary["requests"])) if proxies else None
    return summary, cpu


@register("latency_1000rps")
def latency_fixed_rate(bench: Bench) -> RunResult:
    """The same fixed rate direct and through one sidecar; the p99 difference is one hop's."""
    direct_summary, _ = _open_loop(bench, bench.upstream.port, UPSTREAM_SERVICE, [])
    with bench.sidecar(_client_sidecar(bench, bench.upstream.port)) as a:
        hop, cpu = _open_loop(bench, a.ports.outbound, UPSTREAM_SERVICE, [a.pid])
        rss = tree_rss_mb(a.pid)
    for label, summary in (("direct", direct_summary), ("one_hop", hop)):
        if summary["errors"]:
            raise BenchError(f"open-loop {label}: errors {summary['errors']}")
    return RunResult(
        "latency_1000rps",
        "latency",
        rps=hop["rps"],
        p50_ms=hop["p50_ms"],
        p99_ms=hop["p99_ms"],
        cpu_us_per_req=cpu,
        rss_mb=rss,
        extra={
            "rate": bench.settings.rate,
            "connections": bench.settings.rate_connections,
            "p999_ms": hop["p999_ms"],
            "direct_p50_ms": direct_summary["p50_ms"],
            "direct_p99_ms": direct_summary["p99_ms"],
            "direct_rps": direct_summary["rps"],
            "added_p50_ms_per_hop": round(hop["p50_ms"] - direct_summary["p50_ms"], 3),
            "added_p99_ms_per_hop": round(hop["p99_ms"] - direct_summary["p99_ms"], 3),
            "background_cores": max(hop["background_cores"], direct_summary["background_cores"]),
        },
    )


# --- memory -----------------------------------------------------------------------


@register("rss_1000_conns")
def rss_many_connections(bench: Bench) -> RunResult:
    """Sidecar RSS idle, then with N client keep-alive connections open through it."""
    n = bench.settings.hold_connections
    with bench.sidecar(_client_sidecar(bench, bench.upstream.port)) as a:
        idle = tree_rss_mb(a.pid)
        args = (f"--port={a.ports.outbound}", f"--host-header={UPSTREAM_SERVICE}")
        with bench.tool("holdconns", "bench.holdconns", *args, f"--connections={n}") as client:
            ready = json.loads(client.expect(READY))
            loaded, fds = tree_rss_mb(a.pid), open_fds(a.pid)
            client.finish()  # it closes its connections and exits
    if ready["outcomes"].get("ok", 0) != n:
        raise BenchError(f"holding {n} connections: {ready['outcomes']}")
    return RunResult(
        "rss_1000_conns",
        "memory",
        rss_mb=loaded,
        extra={"connections": n, "idle_rss_mb": idle, "open_fds": fds, "client": ready},
    )

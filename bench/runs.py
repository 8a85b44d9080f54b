"""The runs, one small function each. Add a run: write `@register("name") def ...(bench)`.

Every run reaches the same upstream (`bench.upstream`, nginx returning a small
body, pinned with the load generator). Proxies under test are pinned to the
other core. CPU is the proxy processes' utime+stime over the measured part
only, divided by the requests completed in it; RSS is read after the run and,
as `idle_rss_mb`, once the proxy is ready and before any traffic.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import itertools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from bench import certs, inbound
from bench.harness import (
    GET_ROOT,
    Bench,
    RunResult,
    WrkRequest,
    fail_if_errors,
    fail_if_not_all_ok,
    per_request_us,
    register,
    rss_of,
)
from bench.holdconns import READY
from bench.meshclients import APPLIED, CHURNED, CONNECTED, GO, RESULT
from bench.openloop import FIRST_PHASE, MEASURE_END, MEASURE_START, PHASE
from bench.procs import (
    BenchError,
    CpuSample,
    RssSampler,
    open_fds,
    peak_rss_mb,
    tree_cpu_seconds,
    tree_rss_mb,
)
from bench.sidecar import SidecarSpec

UPSTREAM_SERVICE = "upstream"
CLIENT_SERVICE = "bench-client"


def _throughput(
    bench: Bench,
    name: str,
    port: int,
    host: str | None,
    proxies: Sequence[int],
    request: WrkRequest = GET_ROOT,
    *,
    all_ok: bool = False,
) -> RunResult:
    """A closed-loop run; `all_ok`: fail on any answer with a status >= 400."""
    idle = rss_of(proxies)
    measured = bench.closed_loop(port, host, proxies, request)
    res = measured.result
    if all_ok:
        fail_if_not_all_ok(res, name)
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
        service=CLIENT_SERVICE,
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


@register("two_hop_mtls")
def two_hop_mtls(bench: Bench) -> RunResult:
    """As two_hop, with A -> B over mTLS (B STRICT); A's pool keeps the connections alive."""
    mesh = certs.issue(bench.workdir / "two_hop_mtls" / "certs", [CLIENT_SERVICE, UPSTREAM_SERVICE])
    b_spec = SidecarSpec(
        "sidecar-b-mtls",
        UPSTREAM_SERVICE,
        bench.upstream.port,
        services={},
        tls=mesh.sidecar_tls(UPSTREAM_SERVICE),
    )
    with bench.sidecar(b_spec) as b:
        a_spec = replace(
            _client_sidecar(bench, b.ports.inbound),
            label="sidecar-a-mtls",
            tls=mesh.sidecar_tls(CLIENT_SERVICE),
        )
        with bench.sidecar(a_spec) as a:
            pids = [a.pid, b.pid]
            return _throughput(bench, "two_hop_mtls", a.ports.outbound, UPSTREAM_SERVICE, pids)


@register("nginx")
def nginx_proxy(bench: Bench) -> RunResult:
    with bench.nginx_proxy() as proxy:
        return _throughput(bench, "nginx", proxy.port, None, [proxy.pid])


@register("bare_proxy")
def bare_proxy(bench: Bench) -> RunResult:
    """The floor for a Python proxy here (bench/bare_proxy.py): no feature, same pinning."""
    with bench.bare_proxy() as (pid, port):
        result = _throughput(bench, "bare_proxy", port, None, [pid])
    result.extra["what"] = "reference: ~150-line uvloop+httptools proxy, no features"
    return result


# --- inbound request security -----------------------------------------------------


@functools.cache
def _issuer() -> inbound.Issuer:
    """One key and token per bench process: both inbound runs send the same bytes."""
    return inbound.issue()


def _inbound(bench: Bench, name: str, policies: Sequence[Mapping[str, Any]]) -> RunResult:
    """wrk -> sidecar B's inbound listener -> upstream; then B's counters must show
    every request answered 200 and, with `policies`, decided as meant (bench/inbound.py)."""
    spec = SidecarSpec(
        f"sidecar-{name}", UPSTREAM_SERVICE, bench.upstream.port, services={}, policies=policies
    )
    request = inbound.request(_issuer().token)
    with bench.sidecar(spec) as b:
        port = b.ports.inbound
        result = _throughput(bench, name, port, UPSTREAM_SERVICE, [b.pid], request, all_ok=True)
        seen = inbound.counts(_get_text(b.ports.admin, "/metrics"))
    requests = result.extra["requests"]
    assert isinstance(requests, int)
    inbound.check_metrics(seen, policy=bool(policies), at_least=requests, what=name)
    result.extra["request"] = f"GET {inbound.PATH}, token {len(_issuer().token)} bytes"
    return result


@register("inbound_plain")
def inbound_plain(bench: Bench) -> RunResult:
    return _inbound(bench, "inbound_plain", [])


@register("inbound_policy")
def inbound_policy(bench: Bench) -> RunResult:
    """As inbound_plain, with a JWT provider, 50 authorization rules and a rate limit."""
    result = _inbound(bench, "inbound_policy", inbound.policies(UPSTREAM_SERVICE, _issuer()))
    result.extra |= {
        "authz_rules": inbound.RULES,
        "rate_limit_rps": inbound.RATE,
        "jwt": "ES256, inline JWKS",
    }
    return result


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


# --- failure recovery -------------------------------------------------------------

FAILOVER_ENDPOINTS = 3
# Phases of the measured part, as shares of it: all endpoints up, then the
# first seconds after one is killed (resets, retries, the ejection), then
# the rest (the dead endpoint ejected).
FAILOVER_KILL_AT = 0.25
FAILOVER_FAULT_S = 2.0


def failover_policy(service: str) -> dict[str, Any]:
    """Retries on the failures a killed endpoint causes, and a quick ejection."""
    return {
        "apiVersion": "lepton-mesh/v1",
        "kind": "DestinationPolicy",
        "metadata": {"name": service},
        "spec": {
            "service": service,
            "retry": {"attempts": 3, "retry_on": ["connect-failure", "reset", "gateway-error"]},
            "outlier": {"consecutive_gateway_errors": 2, "base_ejection_time": "30s"},
        },
    }


def failed_share(summary: Mapping[str, Any]) -> float:
    """Requests that got no 2xx (an error status, a lost connection, no answer) / all sent."""
    dispatched = int(summary["dispatched"])
    return int(summary["failed"]) / dispatched if dispatched else 1.0


def _get_text(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    except (OSError, http.client.HTTPException, UnicodeDecodeError) as exc:
        raise BenchError(f"GET {path} on port {port}: {exc}") from exc
    finally:
        conn.close()


def _get_json(port: int, path: str) -> Any:
    try:
        return json.loads(_get_text(port, path))
    except ValueError as exc:
        raise BenchError(f"GET {path} on port {port}: {exc}") from exc


@register("failover")
def failover(bench: Bench) -> RunResult:
    """Open-loop load through one sidecar to 3 endpoints; one is SIGKILLed a quarter in."""
    s = bench.settings
    with contextlib.ExitStack() as stack:
        ups = [
            stack.enter_context(bench.upstream_nginx(f"failover-upstream-{i}"))
            for i in range(FAILOVER_ENDPOINTS)
        ]
        spec = SidecarSpec(
            label="sidecar-failover",
            service=CLIENT_SERVICE,
            app_port=bench.upstream.port,
            services={UPSTREAM_SERVICE: [u.port for u in ups]},
            policies=[failover_policy(UPSTREAM_SERVICE)],
        )
        a = stack.enter_context(bench.sidecar(spec))
        args = (f"--port={a.ports.outbound}", f"--host-header={UPSTREAM_SERVICE}")
        args += (f"--rate={s.failover_rate}", f"--connections={s.connections}")
        args += (f"--duration={s.duration_s}", f"--warmup={s.warmup_s}", "--phases")
        with bench.tool("openloop-failover", "bench.openloop", *args) as client:
            client.expect(MEASURE_START)
            live = [a.pid, client.proc.pid, *(u.pid for u in ups)]
            before, cpu0 = CpuSample.take(live), tree_cpu_seconds([a.pid])
            time.sleep(s.duration_s * FAILOVER_KILL_AT)  # the schedule of the run
            client.say("phase fault")
            client.expect(PHASE + "fault")
            ups[0].proc.kill()  # a crash: requests in flight are reset, then connects refused
            ups[0].proc.wait()
            time.sleep(FAILOVER_FAULT_S)
            client.say("phase after")
            client.expect(PHASE + "after")
            client.expect(MEASURE_END)
            after = CpuSample.take([a.pid, client.proc.pid, *(u.pid for u in ups[1:])])
            cpu1 = tree_cpu_seconds([a.pid])
            summary: dict[str, Any] = json.loads(client.expect(""))
            client.finish()
        clusters = _get_json(a.ports.admin, "/clusters")
        rss = tree_rss_mb(a.pid)
    phases = summary["phases"]
    fault = phases["fault"]
    return RunResult(
        "failover",
        "resilience",
        rps=summary["rps"],
        p50_ms=fault["p50_ms"],
        p99_ms=fault["p99_ms"],
        cpu_us_per_req=per_request_us(cpu1 - cpu0, int(summary["requests"])),
        rss_mb=rss,
        extra={
            "failed_share": failed_share(summary),
            "failed": summary["failed"],
            "dispatched": summary["dispatched"],
            "errors": summary["errors"],
            "rate": s.failover_rate,
            "connections": s.connections,
            "fault_seconds": fault["seconds"],
            "fault_failed": fault["failed"],
            "fault_p999_ms": fault["p999_ms"],
            "fault_max_ms": fault["max_ms"],
            "before_p99_ms": phases[FIRST_PHASE]["p99_ms"],
            "after_p99_ms": phases["after"]["p99_ms"],
            "after_failed": phases["after"]["failed"],
            "clusters": _ejections(clusters, UPSTREAM_SERVICE),
            "background_cores": before.background_cores(after),
        },
    )


def _ejections(clusters: Mapping[str, Any], service: str) -> dict[str, Any]:
    """From the sidecar's /clusters: ejections, retry budget use, endpoints ejected now."""
    c = clusters.get("clusters", {}).get(service, {})
    budget = c.get("retry_budget", {})
    return {
        "ejections_total": c.get("ejections_total"),
        "ejected_now": sum(1 for e in c.get("endpoints", []) if e.get("ejected")),
        "retries_total": budget.get("retries_total"),
        "retry_budget_exhausted_total": budget.get("exhausted_total"),
    }


# --- the control plane ------------------------------------------------------------

PROPAGATION_ROUNDS = 5
CHURN_BATCH_MAX = 200


def _propagation(bench: Bench, name: str, clients: int) -> RunResult:
    """N simulated sidecars on one control daemon: apply -> every ACK, then registry churn."""
    services = max(1, clients // 10)  # 10 sidecars per service, as in a small real mesh
    churn = min(clients, CHURN_BATCH_MAX)
    with bench.control_plane(name) as cp:
        idle_rss = tree_rss_mb(cp.pid)
        args = (f"--port={cp.listen_port}", f"--admin-port={cp.admin_port}")
        args += (f"--token-file={cp.token_file}", f"--clients={clients}")
        args += (f"--services={services}", f"--rounds={PROPAGATION_ROUNDS}", f"--churn={churn}")
        with bench.tool(f"meshclients-{clients}", "bench.meshclients", *args) as tool:
            live = [cp.pid, tool.proc.pid, *([cp.etcd_pid] if cp.etcd_pid else [])]
            first = CpuSample.take(live)
            # The tool waits for GO after each phase: CPU and RSS are read between them.
            marks, rss_at = [tree_cpu_seconds([cp.pid])], []
            for prefix in (CONNECTED, APPLIED, CHURNED):
                tool.expect(prefix)
                marks.append(tree_cpu_seconds([cp.pid]))
                rss_at.append(round(tree_rss_mb(cp.pid), 1))
                tool.say(GO)
            last = CpuSample.take(live)
            result: dict[str, Any] = json.loads(tool.expect(RESULT))
            tool.finish()
        peak = peak_rss_mb(cp.pid)
    if result["errors"]:
        raise BenchError(f"{name}: {len(result['errors'])} stream errors: {result['errors'][:3]}")
    connect_cpu, apply_cpu, churn_cpu = (b - a for a, b in itertools.pairwise(marks))
    churned = result["churn"]
    churn_s = churned["register_s"] + churned["remove_s"]
    return RunResult(
        name,
        "control",
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
        rss_mb=max(rss_at),
        extra={
            "control_rss_mb": max(rss_at),
            "control_rss_mb_phases": rss_at,
            "control_idle_rss_mb": idle_rss,
            "control_peak_rss_mb": peak,
            "clients": clients,
            "services": services,
            "rounds": result["rounds"],
            "max_ms": result["max_ms"],
            "p90_ms": result["p90_ms"],
            "from_return_p50_ms": result["from_return_p50_ms"],
            "from_return_p99_ms": result["from_return_p99_ms"],
            "from_return_max_ms": result["from_return_max_ms"],
            "before_return": result["before_return"],
            "apply_ms": result["apply_ms"],
            "round_max_ms": result["round_max_ms"],
            "acks_recorded_ms": result["acks_recorded_ms"],
            "connect_s": result["connect_s"],
            "connected_per_s": result["connected_per_s"],
            "control_cpu_s_connect": connect_cpu,
            "control_cpu_ms_per_apply": apply_cpu * 1000 / result["rounds"],
            "churn_batch": churned["batch"],
            "registered_per_s": churned["registered_per_s"],
            "removed_per_s": churned["removed_per_s"],
            "control_cores_churn": churn_cpu / churn_s if churn_s else None,
            "background_cores": first.background_cores(last),
        },
    )


@register("propagation_100")
def propagation_100(bench: Bench) -> RunResult:
    return _propagation(bench, "propagation_100", 100)


@register("propagation_1000")
def propagation_1000(bench: Bench) -> RunResult:
    return _propagation(bench, "propagation_1000", 1000)


# --- mTLS: handshakes and memory under connection churn ----------------------------

AFTER_CHURN_S = 10.0  # RSS is read this long after the churn ends


def _tls_sidecar(bench: Bench, label: str) -> tuple[SidecarSpec, certs.MeshCerts]:
    """Sidecar B alone, inbound STRICT, its app the shared upstream; and the mesh's certs."""
    mesh = certs.issue(bench.workdir / label / "certs", [CLIENT_SERVICE, UPSTREAM_SERVICE])
    spec = SidecarSpec(
        f"sidecar-{label}",
        UPSTREAM_SERVICE,
        bench.upstream.port,
        services={},
        tls=mesh.sidecar_tls(UPSTREAM_SERVICE),
    )
    return spec, mesh


def _churn_args(port: int, mesh: certs.MeshCerts, concurrency: int) -> tuple[str, ...]:
    client = mesh.workloads[CLIENT_SERVICE]
    return (
        f"--port={port}",
        f"--host-header={UPSTREAM_SERVICE}",
        f"--cert={client.chain}",
        f"--key={client.key}",
        f"--concurrency={concurrency}",
    )


def _fail_if_churn_errors(summary: Mapping[str, Any], what: str) -> None:
    done, failed = int(summary["connections"]), int(summary["failed"])
    if done == 0 or failed > done // 100:
        raise BenchError(f"{what}: {failed} failed connections, {done} ok: {summary['errors']}")


@register("handshakes")
def handshakes(bench: Bench) -> RunResult:
    """New full mTLS handshakes per second one sidecar's inbound sustains (one request each)."""
    s = bench.settings
    spec, mesh = _tls_sidecar(bench, "handshakes")
    with bench.sidecar(spec) as b:
        args = _churn_args(b.ports.inbound, mesh, s.connections)
        args += (f"--duration={s.duration_s}", f"--warmup={s.warmup_s}")
        with bench.tool("tlschurn-handshakes", "bench.tlschurn", *args) as client:
            client.expect(MEASURE_START)
            live = [b.pid, client.proc.pid, bench.upstream.pid]
            before = CpuSample.take(live)
            cpu0, load0 = tree_cpu_seconds([b.pid]), tree_cpu_seconds(live[1:])
            client.expect(MEASURE_END)
            after = CpuSample.take(live)
            cpu1, load1 = tree_cpu_seconds([b.pid]), tree_cpu_seconds(live[1:])
            summary: dict[str, Any] = json.loads(client.expect(""))
            client.finish()
        rss = tree_rss_mb(b.pid)
    _fail_if_churn_errors(summary, "handshakes")
    cpu_us = per_request_us(cpu1 - cpu0, int(summary["connections"]))
    wall = max(after.wall - before.wall, 1e-9)
    return RunResult(
        "handshakes",
        "resilience",
        rps=summary["per_s"],  # one request per connection: requests/s = handshakes/s
        p50_ms=summary["p50_ms"],
        p99_ms=summary["p99_ms"],
        cpu_us_per_req=cpu_us,
        rss_mb=rss,
        extra={
            "per_s": summary["per_s"],
            # What its CPU per handshake allows on a whole core: the ceiling when the
            # client (on the load core, paying for its side of each handshake) was the limit.
            "per_s_full_core": 1e6 / cpu_us if cpu_us else None,
            "connections": summary["connections"],
            "concurrency": s.connections,
            "errors": summary["errors"],
            "proxy_cores_busy": (cpu1 - cpu0) / wall,
            "load_cores_busy": (load1 - load0) / wall,
            "background_cores": before.background_cores(after),
        },
    )


@register("mtls_churn")
def mtls_churn(bench: Bench) -> RunResult:
    """A minute of new mTLS connections against one sidecar; its RSS during and 10 s after."""
    s = bench.settings
    spec, mesh = _tls_sidecar(bench, "mtls_churn")
    with bench.sidecar(spec) as b:
        idle = tree_rss_mb(b.pid)
        sampler = RssSampler(b.pid)
        args = _churn_args(b.ports.inbound, mesh, s.connections)
        args += (f"--duration={s.mtls_churn_s}", "--warmup=0")
        with bench.tool("tlschurn-churn", "bench.tlschurn", *args) as client:
            client.expect(MEASURE_START)
            sampler.start()
            live = [b.pid, client.proc.pid, bench.upstream.pid]
            before = CpuSample.take(live)
            client.expect(MEASURE_END)
            ended = sampler.elapsed()
            after = CpuSample.take(live)
            summary: dict[str, Any] = json.loads(client.expect(""))
            client.finish()
        time.sleep(AFTER_CHURN_S)  # the schedule: RSS is read this long after the burst
        sampler.stop()
        rss_after = sampler.samples[-1][1]
        peak_life = peak_rss_mb(b.pid)
    _fail_if_churn_errors(summary, "mtls_churn")
    return RunResult(
        "mtls_churn",
        "memory",
        rps=summary["per_s"],
        p50_ms=summary["p50_ms"],
        p99_ms=summary["p99_ms"],
        rss_mb=rss_after,
        extra={
            "rss_idle_mb": idle,
            "rss_peak_mb": sampler.peak(),
            "rss_after_mb": rss_after,
            "rss_after_above_idle_mb": rss_after - idle,
            "rss_peak_after_churn_mb": sampler.peak(since_s=ended + 1.0),
            "vm_hwm_mb": peak_life,
            "per_s": summary["per_s"],
            "connections": summary["connections"],
            "seconds": s.mtls_churn_s,
            "concurrency": s.connections,
            "errors": summary["errors"],
            "rss_samples_mb": [round(mb, 1) for _, mb in sampler.samples[::4]],
            "background_cores": before.background_cores(after),
        },
    )

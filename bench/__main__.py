"""`python -m bench [--only one_hop,nginx] [--duration 5]`: run the benchmarks, print the table.

Order of work: check (and install) wrk and nginx, pin the bench itself to the
load core, start the upstream, run each selected run in registry order (a
failed run is reported and the others go on), then print the table with the
targets and write bench/results/latest.json. Every process started is stopped
on the way out, on failure and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bench import nginx, report, runs, tools, wrk
from bench.harness import REGISTRY, Bench, RunResult, Settings
from bench.procs import BenchError, Pinning, free_port, wait_quiet

ACCESS_LOGS = "access logs: sidecar stdout and nginx proxy's access_log, each to a file"
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"

assert runs  # importing it fills REGISTRY


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma-separated runs (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list the runs and exit")
    p.add_argument("--duration", type=float, default=d.duration_s, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=d.warmup_s, help="unmeasured seconds before")
    p.add_argument("--connections", type=int, default=d.connections, help="wrk -c")
    p.add_argument("--rate", type=int, default=d.rate, help="fixed rate of latency_1000rps")
    p.add_argument("--hold", type=int, default=d.hold_connections, help="rss_1000_conns count")
    p.add_argument(
        "--failover-rate", type=int, default=d.failover_rate, help="open-loop rate of failover"
    )
    p.add_argument(
        "--churn-seconds", type=float, default=d.mtls_churn_s, help="length of mtls_churn"
    )
    p.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    p.add_argument("--no-install", action="store_true", help="fail instead of apt-get install")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=d.quiet_wait_s,
        metavar="S",
        help="on a shared machine: before each run, wait up to S seconds for others' load to drop",
    )
    return p.parse_args(argv)


def selected(only: str | None) -> list[str]:
    if not only:
        return list(REGISTRY)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise BenchError(f"unknown run(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    return [n for n in REGISTRY if n in names]  # registry order, each once


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    # Unwinds every `with` like Ctrl-C does, which stops every process the bench started.
    raise KeyboardInterrupt


def _prepare_process(pinning: Pinning) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    # 1000 held connections through a sidecar need ~2000 descriptors in it
    # (client side and upstream side); children inherit this limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    if pinning.load_core is not None:
        # The bench's own bookkeeping must not steal time from the proxy core.
        os.sched_setaffinity(0, {pinning.load_core})


def run_one(bench: Bench, name: str) -> RunResult:
    print(f"== {name}", flush=True)
    if bench.settings.quiet_wait_s > 0:
        limit, deadline = report.NOISY_CORES, bench.settings.quiet_wait_s
        waited = wait_quiet([bench.upstream.pid], limit, deadline)
        if waited >= deadline:
            print(f"  machine still busy after {waited:.0f}s: running anyway", flush=True)
        elif waited > 2.5:
            print(f"  waited {waited:.0f}s for other load to drop below {limit} cores", flush=True)
    started = time.monotonic()
    try:
        result = REGISTRY[name](bench)
    except BenchError as exc:
        print(f"  FAILED: {exc}", flush=True)
        return RunResult(name, "throughput", error=str(exc))
    summary = ", ".join(
        f"{k}={v}"
        for k, v in result.to_json().items()
        if k not in ("name", "kind") and v is not None
    )
    print(f"  {summary[:300]}  ({time.monotonic() - started:.0f}s)", flush=True)
    return result


def run_all(
    settings: Settings, pinning: Pinning, names: list[str], workdir: Path
) -> list[RunResult]:
    script = workdir / "report.lua"
    script.write_text(wrk.LUA_REPORT)
    port = free_port()
    conf = nginx.upstream_conf(workdir / "upstream", port)
    with nginx.serve(
        "upstream nginx", workdir / "upstream", conf, port, pinning.load(), settings.ready_timeout_s
    ) as upstream:
        print(
            f"upstream: nginx on 127.0.0.1:{port} (pid {upstream.pid}), {ACCESS_LOGS}", flush=True
        )
        bench = Bench(settings, pinning, workdir, upstream, script)
        return [run_one(bench, name) for name in names]


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        duration_s=args.duration,
        warmup_s=args.warmup,
        connections=args.connections,
        rate=args.rate,
        hold_connections=args.hold,
        failover_rate=args.failover_rate,
        mtls_churn_s=args.churn_seconds,
        quiet_wait_s=args.quiet_wait,
    )


def _meta(settings: Settings, pinning: Pinning) -> dict[str, object]:
    """Taken before the runs: the commit measured is the one checked out when they start."""
    return {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {
            "duration_s": settings.duration_s,
            "warmup_s": settings.warmup_s,
            "wrk": f"-t{settings.threads} -c{settings.connections} keep-alive",
            "rate": settings.rate,
            "rate_connections": settings.rate_connections,
            "hold_connections": settings.hold_connections,
            "failover_rate": settings.failover_rate,
            "mtls_churn_s": settings.mtls_churn_s,
            "access_logs": ACCESS_LOGS,
        },
        "machine": report.machine(pinning, tools.versions()),
    }


def _report(results: list[RunResult], meta: dict[str, object], output: Path) -> None:
    by_name = {r.name: r for r in results}
    report.ratios(by_name)
    print()
    print(report.table(by_name))
    for note in report.noise_notes(by_name):
        print(note)
    report.write_json(output, results, meta, by_name)
    print(f"\nwritten: {output}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        print("\n".join(REGISTRY))
        return 0
    settings = _settings(args)
    workdir = Path(tempfile.mkdtemp(prefix="lepton-bench-"))
    try:
        names = selected(args.only)
        tools.ensure(install=not args.no_install)
        pinning = Pinning.detect()
        print(f"pinning: {pinning.describe()}", flush=True)
        meta = _meta(settings, pinning)
        _prepare_process(pinning)
        results = run_all(settings, pinning, names, workdir)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep_workdir:
            print(f"configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    _report(results, meta, args.output)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())

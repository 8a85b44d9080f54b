"""Closed-loop load with wrk, and the exact figures its Lua `done` hook reports.

wrk keeps every latency in a per-microsecond histogram, so `latency:percentile`
is exact to the microsecond (its text summary rounds to two digits). The hook
prints one line starting with `MARKER`, followed by JSON.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, running, spawn

MARKER = "BENCH_RESULT "

LUA_REPORT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f}}\\n',
    "MARKER", summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
""".replace("MARKER", MARKER)


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def parse(stdout: str) -> WrkResult:
    """Find the hook's line in wrk's stdout and read it."""
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            data = json.loads(line[len(MARKER) :])
            lat = data["latency_us"]
            return WrkResult(
                requests=int(data["requests"]),
                duration_s=data["duration_us"] / 1e6,
                errors={k: int(v) for k, v in data["errors"].items()},
                p50_ms=lat["p50"] / 1000,
                p90_ms=lat["p90"] / 1000,
                p99_ms=lat["p99"] / 1000,
                p999_ms=lat["p999"] / 1000,
                max_ms=lat["max"] / 1000,
            )
    raise BenchError(f"wrk printed no result line; its output was:\n{stdout[-1500:]}")


def command(
    *,
    url: str,
    host: str | None,
    duration_s: float,
    connections: int,
    threads: int,
    script: Path,
    pin: Sequence[str],
    headers: Sequence[str] = (),
) -> list[str]:
    """`headers` are whole header lines (`"Authorization: Bearer ..."`), sent on every request."""
    argv = [*pin, "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s"]
    argv += ["--timeout", "5s", "--latency", "-s", str(script)]
    if host is not None:
        argv += ["-H", f"Host: {host}"]
    for line in headers:
        argv += ["-H", line]
    return [*argv, url]


def run(argv: Sequence[str], duration_s: float) -> WrkResult:
    """Run wrk to completion (it exits by itself after its duration)."""
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with running(proc, "wrk"):
        try:
            out, err = proc.communicate(timeout=duration_s + 30)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"wrk did not finish within {duration_s + 30:.0f}s") from exc
    if proc.returncode != 0:
        raise BenchError(
            f"wrk exited {proc.returncode}: {err.decode(errors='replace').strip()[-500:]}"
        )
    return parse(out.decode(errors="replace"))

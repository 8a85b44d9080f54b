"""The table, the targets beside it, and the JSON document.

Targets are ratios and budgets from one run of the bench on one machine, read
next to the figures; nothing here asserts them (a timed assertion in a test
suite would fail on a busy machine and say nothing useful).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.harness import RunResult
from bench.procs import Pinning

Results = Mapping[str, RunResult]


def _figure(results: Results, run: str, attr: str) -> float | None:
    r = results.get(run)
    if r is None or r.error is not None:
        return None
    value = getattr(r, attr, None) if attr in RunResult.__slots__ else r.extra.get(attr)
    return value if isinstance(value, int | float) else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


@dataclass(frozen=True, slots=True)
class Target:
    run: str  # the row it is printed next to
    label: str
    limit: float
    at_most: bool  # True: value <= limit; False: value >= limit
    measure: Callable[[Results], float | None]

    def check(self, results: Results) -> tuple[float | None, str]:
        value = self.measure(results)
        if value is None:
            return None, "n/a"
        met = value <= self.limit if self.at_most else value >= self.limit
        return value, "met" if met else "MISSED"


def _idle_rss(results: Results) -> float | None:
    for run in ("rss_1000_conns", "one_hop", "latency_1000rps"):
        value = _figure(results, run, "idle_rss_mb")
        if value is not None:
            return value
    return None


TARGETS: tuple[Target, ...] = (
    Target(
        "one_hop",
        "one hop rps / nginx rps",
        0.5,
        False,
        lambda r: _ratio(_figure(r, "one_hop", "rps"), _figure(r, "nginx", "rps")),
    ),
    Target(
        "one_hop",
        "sidecar CPU us/request",
        60.0,
        True,
        lambda r: _figure(r, "one_hop", "cpu_us_per_req"),
    ),
    Target(
        "latency_1000rps",
        "added p99 ms per hop at 1000 rps",
        1.0,
        True,
        lambda r: _figure(r, "latency_1000rps", "added_p99_ms_per_hop"),
    ),
    Target("rss_1000_conns", "sidecar RSS MB idle", 40.0, True, _idle_rss),
    Target(
        "rss_1000_conns",
        "sidecar RSS MB with 1000 conns",
        60.0,
        True,
        lambda r: _figure(r, "rss_1000_conns", "rss_mb"),
    ),
    Target(
        "two_hop_mtls",
        "mTLS rps / plaintext two_hop rps",
        0.7,
        False,
        lambda r: _ratio(_figure(r, "two_hop_mtls", "rps"), _figure(r, "two_hop", "rps")),
    ),
    Target(
        "inbound_policy",
        "rps / inbound_plain rps",
        0.8,
        False,
        lambda r: _ratio(_figure(r, "inbound_policy", "rps"), _figure(r, "inbound_plain", "rps")),
    ),
    Target(
        "mtls_churn",
        "RSS MB above idle 10 s after",
        20.0,
        True,
        lambda r: _figure(r, "mtls_churn", "rss_after_above_idle_mb"),
    ),
    Target(
        "mtls_churn",
        "peak RSS MB",
        150.0,
        True,
        lambda r: _figure(r, "mtls_churn", "rss_peak_mb"),
    ),
    Target(
        "failover",
        "failed % with an endpoint killed",
        0.1,
        True,
        lambda r: _percent(_figure(r, "failover", "failed_share")),
    ),
    Target(
        "propagation_100",
        "slowest ACK ms after apply",
        1000.0,
        True,
        lambda r: _figure(r, "propagation_100", "max_ms"),
    ),
    Target(
        "propagation_1000",
        "slowest ACK ms after apply",
        1000.0,
        True,
        lambda r: _figure(r, "propagation_1000", "max_ms"),
    ),
)


def _percent(share: float | None) -> float | None:
    return None if share is None else share * 100


def ratios(results: Results) -> None:
    """Add x_direct and x_nginx (rps ratios) to every throughput run that has rps, and the
    ratios of the runs read in pairs (two_hop_mtls to two_hop, inbound_policy to inbound_plain)."""
    direct, ref = _figure(results, "direct", "rps"), _figure(results, "nginx", "rps")
    for r in results.values():
        if r.kind == "throughput" and r.error is None:
            r.extra["x_direct"] = _round(_ratio(r.rps, direct))
            r.extra["x_nginx"] = _round(_ratio(r.rps, ref))
    _paired(results, "two_hop_mtls", "two_hop", with_rps=False)
    _paired(results, "inbound_policy", "inbound_plain", with_rps=True)


def _paired(results: Results, run: str, base: str, *, with_rps: bool) -> None:
    """`run` against the `base` it is read next to: x_<base> (rps ratio) and
    cpu_ratio_vs_<base>, the same comparison from CPU per request: what the rps
    ratio would be if both had their core to themselves (read it when
    background_cores is high)."""
    r = results.get(run)
    if r is None or r.error is not None:
        return
    if with_rps:
        r.extra[f"x_{base}"] = _round(_ratio(r.rps, _figure(results, base, "rps")))
    cpu = _figure(results, base, "cpu_us_per_req")
    r.extra[f"cpu_ratio_vs_{base}"] = _round(_ratio(cpu, r.cpu_us_per_req))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _cell(value: object, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


_COLUMNS = (
    ("name", 16, ""),
    ("rps", 9, ".0f"),
    ("p50_ms", 8, ".3f"),
    ("p99_ms", 8, ".3f"),
    ("cpu_us/req", 10, ".1f"),
    ("rss_mb", 7, ".1f"),
    ("x_direct", 8, ".2f"),
    ("x_nginx", 7, ".2f"),
)


def _row(r: RunResult) -> list[str]:
    values = (r.rps, r.p50_ms, r.p99_ms, r.cpu_us_per_req, r.rss_mb)
    values += (r.extra.get("x_direct"), r.extra.get("x_nginx"))
    cells = [r.name] + [_cell(v, fmt) for v, (_, _, fmt) in zip(values, _COLUMNS[1:], strict=True)]
    return cells


def _target_notes(run: str, results: Results) -> str:
    notes = []
    for t in TARGETS:
        if t.run == run:
            value, verdict = t.check(results)
            bound = "<=" if t.at_most else ">="
            notes.append(f"{t.label} {_cell(value, '.2f')} ({bound} {t.limit:g}: {verdict})")
    return "; ".join(notes)


def table(results: Results) -> str:
    head = "  ".join(f"{name:>{width}}" for name, width, _ in _COLUMNS) + "  target"
    lines = [head, "-" * len(head)]
    for r in results.values():
        if r.error is not None:
            lines.append(f"{r.name:>16}  FAILED: {r.error.splitlines()[0]}")
            continue
        cells = _row(r)
        row = "  ".join(f"{c:>{w}}" for c, (_, w, _) in zip(cells, _COLUMNS, strict=True))
        lines.append(f"{row}  {_target_notes(r.name, results)}".rstrip())
    return "\n".join(lines)


NOISY_CORES = 0.1  # other work above this during a run makes its figures suspect
PROXY_BOUND = 0.9  # a proxied run below this was limited by something else


def noise_notes(results: Results) -> list[str]:
    """One line per run measured while other processes used the machine, or not proxy-bound."""
    notes = []
    for r in results.values():
        cores = r.extra.get("background_cores")
        if isinstance(cores, float) and cores > NOISY_CORES:
            notes.append(
                f"note: {r.name} ran while other processes used {cores:.2f} cores of the machine"
            )
        busy = r.extra.get("proxy_cores_busy")
        if isinstance(busy, float) and busy < PROXY_BOUND:
            notes.append(
                f"note: {r.name}'s proxy used {busy:.2f} of its core: "
                "something else limited its rps (load core or other work)"
            )
    return notes


def targets_json(results: Results) -> list[dict[str, object]]:
    out = []
    for t in TARGETS:
        value, verdict = t.check(results)
        bound = "<=" if t.at_most else ">="
        out.append(
            {"target": f"{t.label} {bound} {t.limit:g}", "value": _round(value), "verdict": verdict}
        )
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def _git_commit() -> str | None:
    """HEAD, with `+dirty` when tracked project code differs from it (work in progress)."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "lepton_mesh")
    return f"{head}+dirty" if dirty else head


def machine(pinning: Pinning, tool_versions: Mapping[str, str]) -> dict[str, object]:
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "usable_cpus": pinning.usable_cores,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "tools": dict(tool_versions),
        "pinning": pinning.describe(),
        "commit": _git_commit(),
    }


def write_json(
    path: Path, runs: Sequence[RunResult], meta: Mapping[str, object], results: Results
) -> None:
    doc = {**meta, "runs": [r.to_json() for r in runs], "targets": targets_json(results)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")

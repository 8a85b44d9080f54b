"""The demo's closing report: what the client measured, what the sidecars counted.

The two are printed side by side on purpose: the client's numbers include
everything (four proxy hops, two apps, the client itself), the sidecars'
numbers say where the time went.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import ClientError, ClientSession, ClientTimeout

from lepton_mesh.demo.errors import MetricsUnavailable
from lepton_mesh.demo.load import ClientStats, ShowcaseResult, StreamResult
from lepton_mesh.demo.summary import (
    Row,
    fmt_counts,
    fmt_ms,
    format_table,
    rows_from_metrics,
    sidecar_table,
)
from lepton_mesh.demo.topology import Mesh

Say = Callable[[str], None]


async def scrape_all(mesh: Mesh) -> list[Row]:
    """Every sidecar's summary rows, read from its admin /metrics."""
    rows: list[Row] = []
    async with ClientSession(timeout=ClientTimeout(total=5)) as session:
        for node in mesh.nodes:
            url = node.url("admin", "/metrics")
            try:
                async with session.get(url) as resp:
                    resp.raise_for_status()
                    text = await resp.text()
            except (ClientError, TimeoutError) as e:
                raise MetricsUnavailable(f"GET {url}: {e!r}") from e
            rows.extend(rows_from_metrics(node.service, text))
    return rows


def client_table(stats: ClientStats) -> str:
    rate = stats.sent / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    codes = tuple((str(c), n) for c, n in sorted(stats.codes.items()))
    errors = tuple(sorted(stats.errors.items()))
    cells = [
        (
            str(stats.sent),
            f"{rate:.0f}",
            fmt_counts(codes),
            fmt_counts(errors),
            fmt_ms(stats.quantile_ms(0.5)),
            fmt_ms(stats.quantile_ms(0.99)),
            fmt_ms(max(stats.latencies_ms, default=float("nan"))),
        )
    ]
    header = ("REQUESTS", "REQ/S", "CODES", "ERRORS", "P50 ms", "P99 ms", "MAX ms")
    return format_table(header, cells, numeric={0, 1, 4, 5, 6})


def showcase_table(results: Sequence[ShowcaseResult]) -> str:
    cells = [
        (
            r.request.title,
            f"{r.request.method} {_path_of(r.request.url)}, Host: {r.request.host}",
            str(r.status),
            r.reason,
            _one_line(r.body, 44),
        )
        for r in results
    ]
    return format_table(("CASE", "REQUEST", "STATUS", "X-LEPTON-REASON", "BODY"), cells, {2})


def print_report(
    say: Say,
    stats: ClientStats,
    rows: Sequence[Row],
    showcase: Sequence[ShowcaseResult],
    stream: StreamResult,
) -> None:
    say("\nWhat the client measured (load generator -> chat sidecar inbound):\n")
    say(_indent(client_table(stats)))
    say(
        "\nWhat the sidecar answers by itself (sent to chat's outbound listener "
        f"{_origin_of(showcase[0].request.url) if showcase else '-'}, as the chat app would):\n"
    )
    say(_indent(showcase_table(showcase)))
    tokens = " ".join(stream.tokens)
    end = "complete" if stream.done else "INCOMPLETE"
    say(
        f"\nStreaming (GET /v1/stream, server-sent events through the sidecar): status "
        f"{stream.status}, {len(stream.tokens)} tokens in {stream.elapsed_ms:.0f} ms, {end}:"
        f'\n  "{_one_line(tokens, 90)}"'
    )
    say("\nWhat the sidecars counted (each sidecar's own /metrics):\n")
    say(_indent(sidecar_table(rows)))
    say(
        "\n  reporter=destination: counted by the callee's sidecar on its inbound listener;"
        "\n  reporter=source: counted by the caller's sidecar on its outbound listener."
        "\n  P50/P99 are interpolated within histogram buckets (..., 1, 5, 10, 25, 50 ms), as"
        "\n  Prometheus's histogram_quantile does: estimates, where the client's are exact."
    )


def _path_of(url: str) -> str:
    return "/" + url.split("://", 1)[-1].partition("/")[2]


def _origin_of(url: str) -> str:
    return url.split("://", 1)[-1].partition("/")[0]


def _indent(block: str) -> str:
    return "\n".join("  " + line for line in block.splitlines())


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."

"""What the demo prints: per phase, at the end, and what to try with --keep.

Numbers come from the sidecars' metrics (summary.py) and, next to them, from
what the client saw: the client's latency includes everything (five proxy
passes, three apps, the client itself), the sidecars' numbers say where the
time went. Formatting only: nothing here does I/O but `say`.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lepton_mesh.control.etcd_local import etcdctl_binary
from lepton_mesh.demo.load import ClientStats
from lepton_mesh.demo.policies import fmt_weights
from lepton_mesh.demo.summary import (
    Scrape,
    ServiceStats,
    Split,
    fmt_counts,
    fmt_ms,
    fmt_pct,
    format_table,
    rows_from_scrape,
    service_table,
    sidecar_table,
    split_text,
)
from lepton_mesh.demo.topology import HOST, Mesh

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class PhaseResult:
    """One traffic phase: the policy it ran under and what was measured."""

    title: str
    revision: int  # the policy revision in force
    weights: dict[str, int]  # dialog's canary rule, subset -> weight
    services: tuple[ServiceStats, ...]
    sidecar_split: Split  # dialog calls counted by each dialog sidecar (inbound)
    reply_split: Split  # dialog_version in chat's 200 answers
    client: ClientStats


def print_phase(say: Say, phase: PhaseResult) -> None:
    say("")
    say(_indent(service_table(phase.services)))
    say(f"\n  client: {client_line(phase.client)}")
    w = phase.weights
    say(f"  dialog split, route weights {' / '.join(f'{k} {w[k]}' for k in sorted(w))}:")
    say(f"    counted by the dialog sidecars:  {split_text(phase.sidecar_split)}")
    say(f"    seen in chat's replies:          {split_text(phase.reply_split)}")


def client_line(stats: ClientStats) -> str:
    rate = stats.sent / stats.elapsed_s if stats.elapsed_s > 0 else 0.0
    codes = fmt_counts(tuple((str(c), n) for c, n in sorted(stats.codes.items())))
    errors = fmt_counts(tuple(sorted(stats.errors.items())))
    return (
        f"{stats.sent} sent ({rate:.0f}/s), codes {codes}, errors {errors}, "
        f"p50 {fmt_ms(stats.quantile_ms(0.5))} ms, p99 {fmt_ms(stats.quantile_ms(0.99))} ms"
    )


RECAP_HEADER = ("PHASE", "REVISION", "WEIGHTS", "DIALOG CALLS", "V1", "V2", "CHAT 200s")


def recap_table(phases: Sequence[PhaseResult]) -> str:
    cells = [
        (
            p.title,
            str(p.revision),
            fmt_weights(p.weights),
            str(p.sidecar_split.total),
            fmt_pct(p.sidecar_split.share("v1")),
            fmt_pct(p.sidecar_split.share("v2")),
            f"{p.client.ok}/{p.client.sent}",
        )
        for p in phases
    ]
    return format_table(RECAP_HEADER, cells, numeric={1, 3, 4, 5, 6})


def print_closing(say: Say, phases: Sequence[PhaseResult], totals: Mapping[str, Scrape]) -> None:
    say("\nThe dialog split, phase by phase (calls counted by the dialog sidecars):\n")
    say(_indent(recap_table(phases)))
    say("\nWhat each sidecar counted over the whole run (its own /metrics):\n")
    rows = [row for name, scrape in totals.items() for row in rows_from_scrape(name, scrape)]
    say(_indent(sidecar_table(rows)))
    say(
        "\n  reporter=destination: counted by the callee's sidecar on its inbound listener;"
        "\n  reporter=source: counted by the caller's sidecar on its outbound listener."
        "\n  SUCCESS is the share of responses below 500. P99s from the sidecars are"
        "\n  interpolated within histogram buckets (..., 1, 5, 10, 25, 50 ms), as"
        "\n  Prometheus's histogram_quantile does: estimates, where the client's are exact."
    )


def print_try_it(
    say: Say,
    mesh: Mesh,
    workdir: Path,
    *,
    lepton: str,
    cli_ready: bool,
    cli_config: Path,
    rollback_to: int,
    change_file: Path,
) -> None:
    chat = mesh.chat
    json_h = "-H 'content-type: application/json'"
    say("\nThe mesh keeps running. Try:\n")
    say("  # a chat message, through chat's sidecar; the reply says which dialog version wrote it")
    say(
        f'  curl -s {json_h} -d \'{{"message": "where is my order?"}}\' '
        f"{chat.url('inbound', '/v1/chat')}"
    )
    say("  # a beta user: the Route sends every turn to dialog v2")
    say(
        f"  curl -s {json_h} -H 'x-user-group: beta' -d '{{\"message\": \"refund please\"}}' "
        f"{chat.url('inbound', '/v1/chat')}"
    )
    say("  # a streamed reply (server-sent events) through the sidecar")
    say(f"  curl -sN '{chat.url('inbound', '/v1/stream?message=refund')}'")
    say("  # what the chat app does: call dialog via its sidecar's outbound listener")
    say(
        f"  curl -s -H 'Host: dialog' {json_h} -d '{{\"intent\": \"cancel\"}}' "
        f"{chat.url('outbound', '/v1/turn')}"
    )
    say("\n  # the control plane, with the CLI (admin token for you, valid 24 h)")
    if not cli_ready:
        say(f"  export LEPTON_CONFIG={shlex.quote(str(cli_config))}")
    for args in (
        "get services",
        "get instances",
        "get policies",
        "get sidecars",
        "history",
        f"apply {shlex.quote(str(change_file))} -m 'v2 to 50%'",
        f"rollback {rollback_to} -m 'back to the canary'",
    ):
        say(f"  {lepton} {args}")
    token = workdir / "admin.token"
    say("\n  # the admin API and etcd underneath")
    say(
        f'  curl -s -H "Authorization: Bearer $(cat {shlex.quote(str(token))})" '
        f"{mesh.admin_url}/api/v1/overview"
    )
    say(f"  curl -s {mesh.admin_url}/api/v1/openapi.json")
    say(
        f"  ETCDCTL_API=3 {shlex.quote(str(etcdctl_binary()))} --endpoints={mesh.etcd_url} "
        "get --prefix --keys-only /lepton/v1/"
    )
    say("\n  sidecar admin endpoints:")
    for node in mesh.nodes:
        base = node.url("admin")
        say(f"    {node.name:<10} {base}/metrics  {base}/config  {base}/ready  {base}/clusters")
    say(f"\n  configs, logs and etcd's data: {workdir}")
    say(f"  listening on {HOST} only. Press Ctrl-C to stop everything.")


def _indent(block: str) -> str:
    return "\n".join("  " + line for line in block.splitlines())

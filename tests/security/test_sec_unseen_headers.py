"""A policy may not read a header the sidecar takes out of the request before deciding:
a condition on it would never match (a DENY naming it would deny nothing, silently), and
a rate-limit key on it would put every caller in one bucket. Refused at load time, with
what to use instead."""

from __future__ import annotations

from typing import Any

import pytest

from lepton_mesh.policy.errors import ConfigError
from lepton_mesh.policy.traffic_loader import collect_policies
from lepton_mesh.policy.yaml_source import load_documents

HEAD = "apiVersion: lepton-mesh/v1\n"


def _load(text: str) -> list[tuple[str, str]]:
    """The problems loading `text` reports, as (path, message)."""
    problems: list[Any] = []
    collect_policies([(d, ()) for d in load_documents(text, "f.yaml")], problems)
    return [(p.path, p.message) for p in ConfigError(problems).problems] if problems else []


def deny_when(header: str) -> str:
    return (
        f"{HEAD}kind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec:\n  service: intent\n"
        "  action: DENY\n  rules:\n"
        f"    - when: [{{key: 'request.headers[{header}]', values: ['10.0.0.1']}}]\n"
    )


def keyed_by(header: str) -> str:
    return (
        f"{HEAD}kind: RateLimit\nmetadata: {{name: r}}\nspec:\n  service: intent\n"
        f"  limits: [{{key: {{header: {header}}}, requests_per_second: 1}}]\n"
    )


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ("X-Forwarded-For", "source.ip"),
        ("host", "owns it"),
        ("connection", "one hop"),
        ("transfer-encoding", "one hop"),
        ("te", "one hop"),
        ("proxy-authorization", "one hop"),
        ("x-lepton-peer", "mesh's own"),
        ("x-forwarded-client-cert", "source.principal"),
    ],
)
def test_a_header_policies_never_see_is_refused(header: str, says: str):
    [(path, message)] = _load(deny_when(header))
    assert path == "spec.rules[0].when[0].key" and says in message
    [(path, message)] = _load(keyed_by(header))
    assert path == "spec.limits[0].key.header" and says in message


@pytest.mark.parametrize("header", ["x-tenant", "X-Api-Key", "content-length", "user-agent"])
def test_headers_the_app_gets_as_sent_are_accepted(header: str):
    assert _load(deny_when(header)) == []
    assert _load(keyed_by(header)) == []

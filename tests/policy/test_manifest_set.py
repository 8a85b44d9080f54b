"""The set an apply would store: one precise problem per bad value, and nothing unstorable."""

from __future__ import annotations

import textwrap

import orjson
import pytest

from lepton_mesh.policy.errors import ConfigError
from lepton_mesh.policy.manifest_set import resulting_set
from lepton_mesh.policy.yaml_source import load_documents


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        resulting_set({}, load_documents(textwrap.dedent(text), "p.yaml"))
    return [str(p) for p in info.value.problems]


def dest(field: str) -> str:
    return f"""\
        apiVersion: lepton-mesh/v1
        kind: DestinationPolicy
        metadata: {{name: d}}
        spec:
          service: d
          {field}
        """


DURATION = "expected a duration like '250ms', '1s', '5m', '1m30s' or a number of seconds"


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        # The field's check says what is wrong; no second, vaguer line at line 1.
        ("timeout: .inf", f"spec.timeout: {DURATION}, found infinity"),
        ("timeout: 2024-01-01", f"spec.timeout: {DURATION}, found date 2024-01-01"),
        ("retry_budget: {min_per_second: .nan}",
         "spec.retry_budget.min_per_second: expected a finite number, found NaN"),
    ],
)  # fmt: skip
def test_one_precise_problem_per_value(field: str, problem: str) -> None:
    assert problems(dest(field)) == [f"p.yaml:6: {problem}"]


def test_what_no_field_check_refuses_is_still_never_stored() -> None:
    # Inline JWKS keys are free-form JSON; an integer past 64 bits would make
    # the control daemon's store fail (orjson) instead of answering 400.
    text = """\
        apiVersion: lepton-mesh/v1
        kind: RequestAuthentication
        metadata: {name: intent}
        spec:
          service: intent
          providers:
            - name: idp
              issuer: https://idp
              algorithms: [ES256]
              jwks:
                keys:
                  - {kty: EC, crv: P-256, kid: k,
                     x: Zw-xhFPFuAwLNv_kBKvZqendUR9Ukzqvegp0jSljJcY,
                     y: 6O3ppKnzrS6SyD-ncgFrL8UdnZQ6yrPF_-UX2emZQTs,
                     extra: 99999999999999999999999}
        """
    assert problems(text) == [
        "p.yaml:15: spec.providers[0].jwks.keys[0].extra: "
        "integer 99999999999999999999999 does not fit in 64 bits"
    ]
    with pytest.raises(TypeError):  # what the net keeps from the store
        orjson.dumps(99999999999999999999999)


def test_64_bit_values_are_stored() -> None:
    text = dest("limits: {max_connections: 1000000000}")
    (manifest,) = resulting_set({}, load_documents(textwrap.dedent(text), "p.yaml")).values()
    assert orjson.loads(orjson.dumps(manifest)) == manifest

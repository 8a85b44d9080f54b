"""The authorization decision cache answers exactly as an uncached evaluation would:
claim values that Python holds equal (`True == 1 == 1.0`, `0.0 == -0.0`) but that
conditions spell differently never share a cached decision."""

from __future__ import annotations

from typing import Any

import pytest

from lepton_mesh.policy.security import AuthorizationPolicy, AuthorizationRule, Condition
from lepton_mesh.policy.security_decisions import Authorizer, AuthzRequest


def _no_header(name: str) -> str | None:
    return None


def _claim_policy(*values: str) -> AuthorizationPolicy:
    cond = Condition("request.auth.claims[level]", "claim", claim_path=("level",), values=values)
    return AuthorizationPolicy(
        "levels",
        "default",
        "intent",
        "ALLOW",
        (AuthorizationRule("level", conditions=(cond,)),),
        False,
    )


def _request(level: Any) -> AuthzRequest:
    return AuthzRequest(
        method="GET",
        path="/",
        port=15006,
        header=_no_header,
        principal="https://idp.test/alice",
        claims={"iss": "https://idp.test", "sub": "alice", "level": level},
    )


# (allowed values, the claim seen first, the claim seen next, is the next one allowed)
CASES = [
    (("true",), True, 1, False),
    (("1",), 1, True, False),
    (("1",), 1, 1.0, False),
    (("1.0",), 1.0, 1, False),
    (("0",), 0, False, False),
    (("0.0",), 0.0, -0.0, False),
    (("true",), [True], [1], False),
    (("1",), {"a": 1}, {"a": True}, False),  # no scalar text: denied both ways
    (("1",), 1, 1, True),
]


@pytest.mark.parametrize(("values", "first", "then", "allowed"), CASES)
def test_a_cached_decision_never_answers_for_a_differently_spelled_claim(
    values: tuple[str, ...], first: Any, then: Any, allowed: bool
):
    cached = Authorizer((_claim_policy(*values),))
    cached.authorize(_request(first))
    fresh = Authorizer((_claim_policy(*values),))
    assert fresh.authorize(_request(then)).allowed is allowed
    assert cached.authorize(_request(then)) == fresh.authorize(_request(then))

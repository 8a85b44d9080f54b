"""What `lepton-mesh run` gives its app, as pure functions: the environment and the exit code."""

from __future__ import annotations

import pytest

from lepton_mesh.policy.sidecar_config import Address
from lepton_mesh.runner import app_environment, exit_code

OUT = Address("127.0.0.1", 15001)
ADMIN = Address("127.0.0.1", 15000)
LOOPBACK = "localhost,127.0.0.1,::1"

# (id, base env, outbound, proxy_env, expected subset, keys that must be absent)
ENV_CASES = [
    ("plain", {}, OUT, True,
     {"HTTP_PROXY": "http://127.0.0.1:15001", "http_proxy": "http://127.0.0.1:15001",
      "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK,
      "LEPTON_SIDECAR_ADMIN": "http://127.0.0.1:15000",
      "LEPTON_SIDECAR_OUTBOUND": "http://127.0.0.1:15001"}, ()),
    ("wildcard-v4", {}, Address("0.0.0.0", 15001), True,
     {"HTTP_PROXY": "http://127.0.0.1:15001"}, ()),
    ("wildcard-v6", {}, Address("::", 15001), True,
     {"HTTP_PROXY": "http://[::1]:15001"}, ()),
    ("no-proxy-kept-and-extended", {"NO_PROXY": "corp.internal, localhost"}, OUT, True,
     {"NO_PROXY": "corp.internal,localhost,127.0.0.1,::1"}, ()),
    ("lowercase-no-proxy-read", {"no_proxy": "db"}, OUT, True,
     {"NO_PROXY": "db," + LOOPBACK, "no_proxy": "db," + LOOPBACK}, ()),
    ("proxy-replaced", {"HTTP_PROXY": "http://corp:3128", "HTTPS_PROXY": "http://corp:3128"}, OUT, True,
     {"HTTP_PROXY": "http://127.0.0.1:15001", "HTTPS_PROXY": "http://corp:3128"}, ()),
    ("no-proxy-env", {"PATH": "/bin"}, OUT, False,
     {"PATH": "/bin", "LEPTON_SIDECAR_OUTBOUND": "http://127.0.0.1:15001"},
     ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")),
    ("no-proxy-env-keeps-users", {"HTTP_PROXY": "http://corp:3128"}, OUT, False,
     {"HTTP_PROXY": "http://corp:3128"}, ("NO_PROXY",)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("base", "outbound", "proxy_env", "expected", "absent"),
    [c[1:] for c in ENV_CASES],
    ids=[c[0] for c in ENV_CASES],
)
def test_app_environment(base, outbound, proxy_env, expected, absent) -> None:
    before = dict(base)
    env = app_environment(base, outbound, ADMIN, proxy_env=proxy_env)
    assert {k: env.get(k) for k in expected} == expected
    assert [k for k in absent if k in env] == []
    assert base == before  # ours is a copy


@pytest.mark.parametrize(
    ("returncode", "code"), [(0, 0), (3, 3), (255, 255), (-9, 137), (-15, 143), (-2, 130)]
)
def test_exit_code_as_a_shell_reports_it(returncode, code) -> None:
    assert exit_code(returncode) == code

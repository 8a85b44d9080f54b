"""Commands that need no daemon: validate and token."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lepton_mesh.control.auth import TokenVerifier
from tests.cli.cli_support import ROOT, run_cli
from tests.policy_store.policy_support import dest, route

EXAMPLES = sorted(
    str(p.relative_to(ROOT))
    for p in (ROOT / "examples").rglob("*")
    if p.suffix in (".yaml", ".yml")
)


@pytest.mark.parametrize("path", EXAMPLES)
async def test_validate_every_example_file(cli_env, path: str) -> None:
    result = await run_cli(cli_env, "validate", path)
    assert (result.code, result.out, result.err) == (0, f"{path}: ok\n", "")


async def test_validate_the_examples_folder_as_one_set(cli_env) -> None:
    result = await run_cli(cli_env, "validate", "examples")
    assert result.code == 0, result.err
    assert result.out.splitlines() == [f"{p}: ok" for p in EXAMPLES]


def write(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


async def test_invalid_manifest_names_file_line_field(cli_env, tmp_path: Path) -> None:
    bad = write(tmp_path, "p/dialog.yaml", dest().replace("timeout: 30s", "timeout: 3 parsecs"))
    good = write(tmp_path, "p/intent.yaml", dest("intent"))
    result = await run_cli(cli_env, "validate", str(tmp_path / "p"))
    assert result.code == 2
    assert result.out == f"{good}: ok\n"
    assert result.err.splitlines() == [
        f"{bad}:7: spec.timeout: expected a duration like '250ms', '1s', '5m', '1m30s' or a "
        "number of seconds, found string '3 parsecs'",
        "1 file(s) with problems",
    ]


async def test_cross_file_rules_hold_across_the_set(cli_env, tmp_path: Path) -> None:
    # Each file is valid alone; together they break two set-level rules.
    a = write(tmp_path, "a.yaml", dest() + "---\n" + route())
    b = write(tmp_path, "b.yaml", route(name="dialog-2") + "---\n" + dest())
    result = await run_cli(cli_env, "validate", a, b)
    assert result.code == 2
    lines = result.err.splitlines()
    assert lines[0].startswith(f"{b}:5: spec.destination: Route 'dialog-2' is a second Route")
    assert lines[1] == (
        f"{b}:12: metadata.name: DestinationPolicy/default/dialog is also given at {a}:1: "
        "each object is set once"
    )


async def test_sidecar_config_problems(cli_env, tmp_path: Path) -> None:
    path = write(tmp_path, "sidecar.yaml", "service: chat\napp: 127.0.0.1:99999\n")
    result = await run_cli(cli_env, "validate", path)
    assert result.code == 2
    assert result.err.splitlines()[0] == (
        f"{path}:2: app: invalid address '127.0.0.1:99999': port must be between 1 and 65535, "
        "found 99999"
    )


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("10.0.0.5:80", "'10.0.0.5:80' is not an IP address or host name (no port here)"),
        ("0.0.0.0", "'0.0.0.0' is a wildcard: give the address callers reach this instance at"),
        ("not a host!", "'not a host!' is not an IP address or host name (no port here)"),
    ],
)
@pytest.mark.parametrize("via", ["flag", "variable"])
async def test_a_bad_instance_address_is_refused_before_listening(
    cli_env, tmp_path: Path, address: str, problem: str, via: str
) -> None:
    path = write(tmp_path, "sidecar.yaml", "service: chat\napp: 127.0.0.1:8080\n")
    args = ["sidecar", "--config", path]
    env = dict(cli_env)
    if via == "flag":
        args += ["--instance-address", address]
    else:
        env["LEPTON_INSTANCE_ADDRESS"] = address
    result = await run_cli(env, *args)
    assert result.code == 2
    assert result.err.splitlines()[0] == (
        f"--instance-address / $LEPTON_INSTANCE_ADDRESS: instance.address: {problem}"
    )


async def test_yaml_syntax_and_missing_paths(cli_env, tmp_path: Path) -> None:
    path = write(tmp_path, "broken.yaml", "kind: Route\nmetadata: {name: x\n")
    result = await run_cli(cli_env, "validate", path)
    assert result.code == 2 and result.err.startswith(f"{path}:3: invalid YAML")
    result = await run_cli(cli_env, "validate", str(tmp_path / "nowhere"))
    assert result.code == 2
    assert "nowhere: no such file or folder" in result.err
    (tmp_path / "empty").mkdir()
    result = await run_cli(cli_env, "validate", str(tmp_path / "empty"))
    assert result.code == 2 and "no .yaml or .yml files" in result.err


async def test_token_init_key_and_create(cli_env, tmp_path: Path) -> None:
    key = str(tmp_path / "token.key")
    result = await run_cli(cli_env, "token", "init-key", key)
    assert result.code == 0 and result.out == ""
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    again = await run_cli(cli_env, "token", "init-key", key)
    assert again.code == 2 and "already exists" in again.err

    result = await run_cli(
        cli_env, "token", "create", "--role", "admin", "--token-key", key, "--subject", "ci",
        "--ttl", "30m",
    )  # fmt: skip
    assert result.code == 0
    claims = TokenVerifier.from_key_file(key).verify(result.out.strip())
    assert (claims.subject, claims.role) == ("ci", "admin")
    result = await run_cli(
        cli_env, "token", "create", "--role", "join", "--token-key", key,
        "--service", "chat", "--namespace", "prod",
    )  # fmt: skip
    claims = TokenVerifier.from_key_file(key).verify(result.out.strip())
    assert (claims.subject, claims.service, claims.namespace) == ("prod/chat", "chat", "prod")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "join"], "a join token needs --service"),
        (["--role", "read", "--ttl", "soon"], "use a duration"),
        (["--role", "root"], "invalid choice"),
        (["--role", "read", "--service", "x"], "only join tokens"),
    ],
)
async def test_token_create_refuses(cli_env, tmp_path: Path, args, message) -> None:
    key = str(tmp_path / "token.key")
    await run_cli(cli_env, "token", "init-key", key)
    result = await run_cli(cli_env, "token", "create", "--token-key", key, *args)
    assert result.code == 2 and message in result.err and result.out == ""


async def test_token_create_with_a_missing_key(cli_env, tmp_path: Path) -> None:
    result = await run_cli(
        cli_env, "token", "create", "--role", "read", "--token-key", str(tmp_path / "none")
    )
    assert result.code == 2 and "cannot read" in result.err


def test_examples_exist() -> None:
    assert any(p.startswith("examples/mesh/") for p in EXAMPLES)
    assert any(p.startswith("examples/sidecar/") for p in EXAMPLES)

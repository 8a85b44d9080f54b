"""Commands that need no daemon: validate and token."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from pathlib import Path

import pytest

from lepton_mesh.control.auth import TokenVerifier
from tests.cli.cli_support import ROOT, deny_listing, finish, run_cli, run_main, start_cli
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


# --- what validate reads, and what it finds ---------------------------------------------


def test_validate_refuses_a_folder_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "m/dialog.yaml", dest())
    write(tmp_path, "m/sub/route.yaml", route())
    deny_listing(monkeypatch, tmp_path / "m" / "sub")
    assert run_main("validate", str(tmp_path / "m")) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{tmp_path / 'm' / 'sub'}: cannot read this folder: Permission denied; nothing below "
        "it would be validated or applied (and --prune would delete what it defines)"
    ]


async def test_validate_reads_a_file_named_twice_once(cli_env, tmp_path: Path) -> None:
    write(tmp_path, "d1/x.yaml", dest() + "---\n" + route())
    result = await run_cli(cli_env, "validate", "d1/x.yaml", "./d1/x.yaml", "d1", cwd=tmp_path)
    assert (result.code, result.out, result.err) == (0, "d1/x.yaml: ok\n", "")


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "null\n", "---\n"])
async def test_validate_refuses_a_file_with_no_document(cli_env, tmp_path: Path, text) -> None:
    # `lepton-mesh sidecar --config` refuses it; neither is it a policy file.
    path = write(tmp_path, "x.yaml", text)
    result = await run_cli(cli_env, "validate", path)
    assert result.code == 2 and result.out == ""
    assert result.err.splitlines()[0] == (
        f"{path}: no YAML document in this file (it is empty, or only comments, null or ---): "
        "a policy file holds manifests, a sidecar config at least 'service' and 'app'"
    )


async def test_validate_reads_the_files_a_sidecar_reads_when_it_starts(
    cli_env, tmp_path: Path
) -> None:
    sidecar = "service: chat\napp: 127.0.0.1:8080\n"
    tls = write(tmp_path, "tls.yaml", sidecar + "tls: {cert: c.pem, key: k.pem, bundle: b.pem}\n")
    ca = write(
        tmp_path, "ca.yaml", sidecar + "control: {addresses: ['127.0.0.1:1'], ca_bundle: ca.pem}\n"
    )
    for path, field, missing in ((tls, "tls.cert", "c.pem"), (ca, "control.ca_bundle", "ca.pem")):
        validate = await run_cli(cli_env, "validate", path)
        started = await run_cli(cli_env, "sidecar", "--config", path)
        problem = f"{path}: {field}: cannot read {tmp_path / missing}: No such file or directory"
        assert (validate.code, validate.err.splitlines()[0]) == (2, problem)
        assert (started.code, started.err.splitlines()) == (2, [problem])
        config_only = await run_cli(cli_env, "validate", "--config-only", path)
        assert (config_only.code, config_only.out) == (0, f"{path}: ok\n")


async def test_validate_reports_keys_that_are_not_strings(cli_env, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "d.yaml",
        dest().replace("{name: dialog}", "{name: dialog, labels: {1: a, true: b}}"),
    )
    result = await run_cli(cli_env, "validate", path)
    hint = "(quote it to make it a string)"
    assert result.code == 2
    assert result.err.splitlines()[:2] == [
        f"{path}:3: metadata.labels: keys must be strings, found integer 1 {hint}",
        f"{path}:3: metadata.labels: keys must be strings, found boolean true {hint}",
    ]


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        ("limits: {max_connections: 99999999999999999999999999}",
         "spec.limits.max_connections: must be at most 1000000000, found "
         "99999999999999999999999999"),
        ("timeout: .inf", "spec.timeout: expected a duration like '250ms', '1s', '5m', '1m30s' "
         "or a number of seconds, found infinity"),
    ],
)  # fmt: skip
async def test_validate_one_precise_problem_per_number(
    cli_env, tmp_path: Path, field: str, problem: str
) -> None:
    path = write(tmp_path, "d.yaml", dest().replace("timeout: 30s", field))
    result = await run_cli(cli_env, "validate", path)
    assert result.code == 2
    assert result.err.splitlines() == [f"{path}:7: {problem}", "1 file(s) with problems"]


async def test_validate_refuses_a_fifo_instead_of_waiting(cli_env, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)  # nothing ever writes to it: reading it would block forever
    result = await run_cli(cli_env, "validate", str(fifo))
    assert result.code == 2
    assert result.err.splitlines()[0] == f"{fifo}: cannot read: not a regular file"


# --- connection flags: checked before anything is sent ----------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--server", "http://[::1"],
         "--server: invalid URL 'http://[::1': an IPv6 address goes in [brackets], both of them"),
        (["--server", "http://127.0.0.1:abc"],
         "--server: invalid URL 'http://127.0.0.1:abc': the port must be a number from 1 to 65535"),
        (["--server", "127.0.0.1:99999"],
         "--server: invalid URL '127.0.0.1:99999': the port must be a number from 1 to 65535"),
        (["--server", "not a url"],
         "--server: invalid URL 'not a url': it holds spaces or control characters"),
        (["--server", "ftp://host"],
         "--server: invalid URL 'ftp://host': the scheme must be http or https, not 'ftp'"),
    ],
)  # fmt: skip
async def test_a_bad_server_url_is_refused_naming_the_flag(cli_env, flags, message) -> None:
    result = await run_cli(cli_env, "get", "services", "--token", "t", *flags)
    assert result.code == 2
    assert result.err == f"lepton-mesh get: {message}; expected http://HOST:PORT\n"


async def test_a_bad_server_url_from_the_environment_names_the_variable(cli_env) -> None:
    env = cli_env | {"LEPTON_SERVER": "http://[::1", "LEPTON_TOKEN": "t"}
    result = await run_cli(env, "history")
    assert result.code == 2 and result.err.startswith("lepton-mesh history: LEPTON_SERVER: ")


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "99999999999999999999"])
async def test_a_bad_timeout_is_refused_naming_the_flag(cli_env, timeout: str) -> None:
    result = await run_cli(cli_env, "get", "services", "--token", "t", f"--timeout={timeout}")
    assert result.code == 2
    assert result.err.splitlines()[-1] == (
        f"lepton-mesh get: error: argument --timeout: {timeout!r}: use a duration like 500ms, "
        "60s or 2m, more than 0 and at most 24h"
    )


async def test_a_server_that_does_not_speak_http_is_not_the_admin_api(cli_env) -> None:
    done = asyncio.Event()

    async def ssh(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        writer.close()
        await writer.wait_closed()
        done.set()

    server = await asyncio.start_server(ssh, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await run_cli(
            cli_env, "get", "services", "--token", "t", "--server", f"127.0.0.1:{port}"
        )
        await asyncio.wait_for(done.wait(), 10)
    assert result.code == 3
    assert result.err == (
        f"lepton-mesh get: http://127.0.0.1:{port} is not a lepton-mesh admin API: it does not "
        "answer HTTP (is this the control daemon's admin address?)\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rollback", "99999999999999999999999999"],
         "argument REVISION: expected an integer from 0 to 9223372036854775807, found "
         "'99999999999999999999999999'"),
        (["apply", "x.yaml", "--base-revision", "-1"],
         "argument --base-revision: expected an integer from 0 to 9223372036854775807, found '-1'"),
        (["history", "--limit", "0"],
         "argument --limit: expected an integer from 1 to 9223372036854775807, found '0'"),
    ],
)  # fmt: skip
async def test_integer_arguments_are_checked_here(cli_env, args, message) -> None:
    result = await run_cli(cli_env, *args)
    assert result.code == 2 and result.err.splitlines()[-1].endswith(message)


# --- login: what it saves, and where it cannot --------------------------------------------


async def test_login_refuses_a_url_no_command_could_use(cli_env, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    env = cli_env | {"LEPTON_CONFIG": str(config)}
    result = await run_cli(env, "login", "--server", "not a url", "--token", "t", "--no-verify")
    assert result.code == 2 and "--server: invalid URL 'not a url'" in result.err
    assert not config.exists()


@pytest.mark.parametrize("where", ["folder", "below a file"])
async def test_login_where_the_config_cannot_be_written(cli_env, tmp_path: Path, where) -> None:
    if where == "folder":
        config = tmp_path / "config-dir"
        config.mkdir()
        why = "this is a folder, not a file"
    else:
        (tmp_path / "file").write_text("")
        config = tmp_path / "file" / "config.json"
        why = f"{tmp_path / 'file'} is not a folder"
    env = cli_env | {"LEPTON_CONFIG": str(config)}
    args = ("login", "--server", "http://127.0.0.1:15011", "--token", "t", "--no-verify")
    result = await run_cli(env, *args)
    assert (result.code, result.err) == (
        2,
        f"lepton-mesh login: {config}: cannot save the CLI config: {why}\n",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config-dir" if where == "folder" else "file"
    ]


async def test_control_refuses_a_bad_etcd_endpoint(cli_env) -> None:
    result = await run_cli(cli_env, "control", "--etcd", "127.0.0.1:2379,http://[::1")
    assert result.code == 2
    assert result.err == (
        "lepton-mesh control: --etcd: invalid URL 'http://[::1': an IPv6 address goes in "
        "[brackets], both of them; expected host:port or http[s]://host:port\n"
    )


async def test_diff_prune_with_no_manifests_is_refused_as_apply_prune_is(
    cli_env, tmp_path: Path
) -> None:
    write(tmp_path, "only/sidecar.yaml", "service: chat\napp: 127.0.0.1:8080\n")
    for command in ("diff", "apply"):
        result = await run_cli(cli_env, command, str(tmp_path / "only"), "--prune", "--token", "t")
        assert result.code == 2
        assert result.err.splitlines()[-1] == (
            f"lepton-mesh {command}: prune with no manifests would delete every policy: "
            "refusing (to clear them all, roll back to revision 0)"
        )


async def test_output_closed_early_is_no_traceback(cli_env, tmp_path: Path) -> None:
    write(tmp_path, "d.yaml", dest())
    read, written = os.pipe()
    os.close(read)  # `lepton-mesh validate ... | head -0`
    try:
        proc = await start_cli(cli_env, "validate", str(tmp_path / "d.yaml"), stdout=written)
    finally:
        os.close(written)
    result = await finish(proc)
    assert (result.code, result.err) == (141, "")


async def test_ctrl_c_during_an_apply_says_it_may_have_landed(
    cli_env, sigint_not_ignored, tmp_path: Path
) -> None:
    path = write(tmp_path, "d.yaml", dest())
    received, done = asyncio.Event(), asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the request is out: the daemon may be writing it
        received.set()
        await reader.read()  # never answers; the CLI's exit closes the connection
        writer.close()
        done.set()

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        proc = await start_cli(cli_env, "apply", path, "--server", url, "--token", "t")
        await asyncio.wait_for(received.wait(), 20)
        proc.send_signal(signal.SIGINT)
        result = await finish(proc)
        await asyncio.wait_for(done.wait(), 10)
    assert (result.code, result.err) == (
        130,
        "interrupted: the change may or may not have been written; "
        "check `lepton-mesh history` before you run this again\n",
    )

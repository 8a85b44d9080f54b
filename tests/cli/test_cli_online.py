"""The CLI end to end: `python -m lepton_mesh` against a real admin API on a real etcd."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from lepton_mesh.cli_client import (
    EXIT_AUTH,
    EXIT_CHANGES,
    EXIT_CONFLICT,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_SERVER,
)
from lepton_mesh.control.etcd_local import free_port
from tests.admin_api.admin_support import Api, instance, put_instance
from tests.cli.cli_support import deny_listing, run_cli, run_main
from tests.policy_store.policy_support import dest, route


def env_for(cli_env: dict[str, str], api: Api, token: str | None = "admin") -> dict[str, str]:
    env = cli_env | {"LEPTON_SERVER": api.url}
    if token is not None:
        env["LEPTON_TOKEN"] = api.tokens[token]
    return env


def write(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def columns(table: str) -> list[list[int]]:
    """Where each cell starts, per line: aligned tables start cells at equal offsets."""
    import re

    return [
        [m.start() for m in re.finditer(r"(?:^|(?<=\s{3}))\S", line)] for line in table.splitlines()
    ]


async def test_apply_diff_history_rollback(api: Api, cli_env, tmp_path: Path) -> None:
    env = env_for(cli_env, api)
    policies = write(tmp_path, "mesh/dialog.yaml", dest() + "---\n" + route())

    diff = await run_cli(env, "diff", policies)
    assert diff.code == EXIT_CHANGES
    assert "+++ new/Route/default/dialog" in diff.out and "--- /dev/null" in diff.out

    result = await run_cli(env, "apply", str(tmp_path / "mesh"), "-m", "canary 10%")
    assert result.code == EXIT_OK, result.err
    assert result.out.splitlines() == [
        "Route/default/dialog created",
        "DestinationPolicy/default/dialog created",
        "applied as policy revision 1",
    ]
    assert (await run_cli(env, "diff", policies)).code == EXIT_OK

    write(tmp_path, "mesh/dialog.yaml", dest(timeout="5s") + "---\n" + route())
    diff = await run_cli(env, "diff", policies)
    assert diff.code == EXIT_CHANGES
    assert diff.out.splitlines()[:2] == [
        "--- live/DestinationPolicy/default/dialog (revision 1)",
        "+++ new/DestinationPolicy/default/dialog",
    ]
    assert "-  timeout: 30s" in diff.out and "+  timeout: 5s" in diff.out

    dry = await run_cli(env, "apply", policies, "--dry-run")
    assert dry.code == EXIT_OK
    assert "dry run: 1 object(s) would change; nothing written (revision 1)" in dry.out
    result = await run_cli(env, "apply", policies, "-m", "faster timeout")
    assert result.out.splitlines() == [
        "DestinationPolicy/default/dialog configured",
        "Route/default/dialog unchanged",
        "applied as policy revision 2",
    ]
    again = await run_cli(env, "apply", policies)
    assert again.out.splitlines()[-1] == "no changes: still policy revision 2"

    history = await run_cli(env, "history")
    lines = history.out.splitlines()
    assert lines[0].split() == ["REVISION", "TIME", "WHO", "MESSAGE", "CHANGES"]
    assert lines[1].split()[0] == "2" and "alice" in lines[1] and "faster timeout" in lines[1]
    assert lines[2].split()[0] == "1" and "canary 10%" in lines[2]
    assert len({tuple(c[:3]) for c in columns(history.out)}) == 1

    rollback = await run_cli(env, "rollback", "1", "-m", "too fast")
    assert rollback.code == EXIT_OK, rollback.err
    assert rollback.out.splitlines() == [
        "DestinationPolicy/default/dialog configured",
        "rolled back to policy revision 1 as revision 3",
    ]
    got = await run_cli(
        env, "get", "policies", "dialog", "--kind", "DestinationPolicy", "-o", "yaml"
    )
    assert yaml.safe_load(got.out)[0]["spec"]["timeout"] == "30s"
    by_name = await run_cli(env, "history", "dialog", "-o", "json")
    records = json.loads(by_name.out)
    assert [r["revision"] for r in records] == [3, 2, 1]
    assert records[0]["rollback_of"] == 1 and records[0]["who"] == "alice"


async def test_invalid_apply_exits_2_naming_the_problem(api: Api, cli_env, tmp_path: Path) -> None:
    env = env_for(cli_env, api)
    path = write(tmp_path, "dialog.yaml", route(subset="v7"))
    result = await run_cli(env, "apply", path)
    assert result.code == EXIT_INVALID
    lines = result.err.splitlines()
    assert lines[0] == "lepton-mesh apply: invalid policy: 1 problem(s)"
    assert lines[1].startswith(f"{path}:8: spec.rules[0].backends[0].subset: subset 'v7'")
    assert (await run_cli(env, "get", "policies", "-o", "json")).out.strip() == "[]"
    broken = write(tmp_path, "broken.yaml", "kind: [\n")
    result = await run_cli(env, "apply", broken)  # YAML errors stop before the network
    assert result.code == EXIT_INVALID and f"{broken}:2: invalid YAML" in result.err


async def test_stale_base_revision_exits_5(api: Api, cli_env, tmp_path: Path) -> None:
    env = env_for(cli_env, api)
    path = write(tmp_path, "d.yaml", dest())
    assert (await run_cli(env, "apply", path, "--base-revision", "0")).code == EXIT_OK
    write(tmp_path, "d.yaml", dest(timeout="1s"))
    result = await run_cli(env, "apply", path, "--base-revision", "0")
    assert result.code == EXIT_CONFLICT
    assert "the policies are at revision 1, not 0" in result.err


async def test_auth_and_connection_exit_codes(api: Api, cli_env, tmp_path: Path) -> None:
    path = write(tmp_path, "d.yaml", dest())
    no_token = await run_cli(env_for(cli_env, api, token=None), "get", "services")
    assert no_token.code == EXIT_AUTH and "no token" in no_token.err
    reader = env_for(cli_env, api, token="read")
    assert (await run_cli(reader, "get", "policies")).code == EXIT_OK
    refused = await run_cli(reader, "apply", path)
    assert refused.code == EXIT_AUTH and "needs the 'admin' role" in refused.err
    bad = cli_env | {"LEPTON_SERVER": api.url, "LEPTON_TOKEN": "not.a.token"}
    assert (await run_cli(bad, "get", "services")).code == EXIT_AUTH
    closed = cli_env | {"LEPTON_SERVER": f"http://127.0.0.1:{free_port()}", "LEPTON_TOKEN": "x"}
    result = await run_cli(closed, "get", "services")
    assert result.code == EXIT_SERVER and "cannot reach the control daemon" in result.err


async def test_login_saves_server_and_token(api: Api, cli_env) -> None:
    login = await run_cli(cli_env, "login", "--server", api.url, "--token", api.tokens["read"])
    assert login.code == EXIT_OK, login.err
    config = Path(cli_env["XDG_CONFIG_HOME"]) / "lepton-mesh" / "config.json"
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    assert json.loads(config.read_text()) == {"server": api.url, "token": api.tokens["read"]}
    assert (await run_cli(cli_env, "get", "services")).code == EXIT_OK  # from the config file
    # The environment wins over the file, a flag over both.
    env = cli_env | {"LEPTON_TOKEN": "bad"}
    assert (await run_cli(env, "get", "services")).code == EXIT_AUTH
    flag = await run_cli(env, "get", "services", "--token", api.tokens["read"])
    assert flag.code == EXIT_OK
    wrong = await run_cli(cli_env, "login", "--server", api.url, "--token", "bad")
    assert wrong.code == EXIT_AUTH
    assert json.loads(config.read_text())["token"] == api.tokens["read"]  # not overwritten


async def test_get_tables_and_formats(api: Api, cli_env, tmp_path: Path) -> None:
    env = env_for(cli_env, api, token="read")
    await put_instance(api.ctl, instance("dialog", "dialog-1", version="v1", zone="a"))
    await put_instance(api.ctl, instance("dialog", "dialog-2", healthy=False, version="v2"))
    await put_instance(api.ctl, instance("chat", "chat-1"), nack=True)

    services = await run_cli(env, "get", "services")
    assert services.out.splitlines() == [
        "NAMESPACE   NAME     INSTANCES   HEALTHY",
        "default     chat     1           1",
        "default     dialog   2           1",
    ]
    instances = await run_cli(env, "get", "instances", "dialog")
    lines = instances.out.splitlines()
    assert lines[0].split() == [
        "NAMESPACE", "SERVICE", "ID", "ADDRESS", "PORTS", "LABELS", "WEIGHT", "STATUS",
    ]  # fmt: skip
    assert lines[1].split() == [
        "default", "dialog", "dialog-1", "127.0.0.1", "http=15006", "version=v1,zone=a", "1",
        "healthy",
    ]  # fmt: skip
    assert lines[2].split()[-1] == "unhealthy"
    assert len({tuple(c) for c in columns(instances.out)}) == 1

    sidecars = await run_cli(env, "get", "sidecars", "chat-1")
    assert sidecars.out.splitlines()[1].split()[:5] == [
        "chat-1", "default", "chat", "replica-test", "7",
    ]  # fmt: skip
    assert "v8: bad route" in sidecars.out

    detail = json.loads((await run_cli(env, "get", "services", "dialog", "-o", "json")).out)
    assert [i["id"] for i in detail["instance_list"]] == ["dialog-1", "dialog-2"]
    listed = yaml.safe_load((await run_cli(env, "get", "instances", "-o", "yaml")).out)
    assert sorted(i["id"] for i in listed) == ["chat-1", "dialog-1", "dialog-2"]

    missing = await run_cli(env, "get", "services", "nope")
    assert missing.code == EXIT_INVALID and "no service 'nope'" in missing.err
    missing = await run_cli(env, "get", "policies", "nope")
    assert missing.code == EXIT_INVALID
    empty = await run_cli(env, "get", "policies")
    assert (empty.code, empty.out, empty.err) == (EXIT_OK, "", "no resources found\n")


async def test_cli_against_the_control_daemon(mesh_etcd, cli_env, tmp_path: Path) -> None:
    """The same CLI against a whole control replica (its own context and token key)."""
    from lepton_mesh.control.daemon import ControlDaemon, ControlOptions

    key = str(tmp_path / "token.key")
    assert (await run_cli(cli_env, "token", "init-key", key)).code == EXIT_OK
    token = await run_cli(cli_env, "token", "create", "--role", "admin", "--token-key", key)
    daemon = ControlDaemon(
        ControlOptions(
            etcd=tuple(mesh_etcd.endpoints),
            listen=("127.0.0.1", 0),
            admin=("127.0.0.1", 0),
            token_key=key,
            replica_id="replica-cli",
        )
    )
    await daemon.start()
    try:
        env = cli_env | {
            "LEPTON_SERVER": f"http://127.0.0.1:{daemon.admin_port}",
            "LEPTON_TOKEN": token.out.strip(),
        }
        # --prune: the module's etcd may hold other tests' policies; the files are the set.
        result = await run_cli(env, "apply", "examples/mesh", "--prune", "-m", "examples")
        assert result.code == EXIT_OK, result.err
        got = await run_cli(env, "get", "policies", "-o", "json")
        names = sorted((m["kind"], m["metadata"]["name"]) for m in json.loads(got.out))
        assert names == [
            ("AuthorizationPolicy", "intent-admin"),
            ("AuthorizationPolicy", "intent-callers"),
            ("DestinationPolicy", "dialog"),
            ("DestinationPolicy", "intent"),
            ("RateLimit", "intent"),
            ("RequestAuthentication", "intent"),
            ("Route", "dialog"),
            ("Route", "intent"),
        ]
        assert (await run_cli(env, "diff", "examples/mesh")).code == EXIT_OK
        history = json.loads((await run_cli(env, "history", "-o", "json", "--limit", "1")).out)
        assert history[0]["message"] == "examples"
    finally:
        await daemon.stop()


async def test_apply_prune_refuses_a_folder_it_cannot_read(
    api: Api, cli_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    write(tmp_path, "m/dialog.yaml", dest())
    write(tmp_path, "m/sub/route.yaml", route())
    mesh = str(tmp_path / "m")
    flags = ("--server", api.url, "--token", api.tokens["admin"])
    assert await asyncio.to_thread(run_main, "apply", mesh, *flags) == EXIT_OK
    deny_listing(monkeypatch, tmp_path / "m" / "sub")
    capsys.readouterr()
    # Skipped, the folder's Route would have looked deleted: --prune would remove it.
    for command in (("diff", mesh, "--prune"), ("apply", mesh, "--prune")):
        assert await asyncio.to_thread(run_main, *command, *flags) == EXIT_INVALID
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"{tmp_path / 'm' / 'sub'}: cannot read this folder")
    got = await api.call("GET", "/api/v1/policies", token="read")
    assert sorted(m["kind"] for m in got.body["items"]) == ["DestinationPolicy", "Route"]


async def test_an_integer_past_64_bits_is_a_400_not_a_crash(
    api: Api, cli_env, tmp_path: Path
) -> None:
    env = env_for(cli_env, api)
    for field, path in (
        ("limits: {max_connections: 99999999999999999999999999}", "spec.limits.max_connections"),
        ("outlier: {consecutive_5xx: 18446744073709551616}", "spec.outlier.consecutive_5xx"),
    ):
        bad = write(tmp_path, "d.yaml", dest().replace("timeout: 30s", field))
        result = await run_cli(env, "apply", bad)
        assert result.code == EXIT_INVALID, result.err
        lines = result.err.splitlines()
        assert lines[0] == "lepton-mesh apply: invalid policy: 1 problem(s)"
        assert lines[1].startswith(f"{bad}:7: {path}: must be at most 1000000000, found ")
    # The daemon answered, and answers still.
    assert (await run_cli(env, "apply", write(tmp_path, "ok.yaml", dest()))).code == EXIT_OK


async def test_a_dry_run_refuses_what_the_apply_would(api: Api, cli_env, tmp_path: Path) -> None:
    env = env_for(cli_env, api)
    many = "---\n".join(dest(f"s{i}") for i in range(127))
    path = write(tmp_path, "many.yaml", many)
    real = await run_cli(env, "apply", path)
    assert real.code == EXIT_INVALID and "one apply may change at most 126" in real.err
    dry = await run_cli(env, "apply", path, "--dry-run")
    assert (dry.code, dry.err) == (real.code, real.err)


async def test_a_base_revision_past_the_current_one_does_not_exist(
    api: Api, cli_env, tmp_path: Path
) -> None:
    env = env_for(cli_env, api)
    path = write(tmp_path, "d.yaml", dest())
    for flags in ((), ("--dry-run",)):
        result = await run_cli(env, "apply", path, "--base-revision", "999", *flags)
        assert (result.code, result.err) == (
            EXIT_INVALID,
            "lepton-mesh apply: revision 999 does not exist: the current revision is 0\n",
        )


async def test_apply_reads_a_folder_named_twice_once(api: Api, cli_env, tmp_path: Path) -> None:
    env = env_for(cli_env, api)
    write(tmp_path, "m2/dialog.yaml", dest() + "---\n" + route())
    result = await run_cli(env, "apply", "m2", "./m2", "m2/dialog.yaml", cwd=tmp_path)
    assert result.code == EXIT_OK, result.err
    assert result.out.splitlines()[-1] == "applied as policy revision 1"


async def test_apply_and_diff_skip_a_sidecar_config_with_a_note(
    api: Api, cli_env, tmp_path: Path
) -> None:
    env = env_for(cli_env, api)
    policies = write(tmp_path, "mix/dialog.yaml", dest() + "---\n" + route())
    sidecar = write(
        tmp_path,
        "mix/sidecar.yaml",
        "service: chat\napp: 127.0.0.1:8080\npolicies: [dialog.yaml]\n",
    )
    validate = await run_cli(env, "validate", str(tmp_path / "mix"))
    assert validate.out.splitlines() == [f"{policies}: ok", f"{sidecar}: ok"]
    note = f"{sidecar}: skipped: a sidecar config, not policy manifests"
    diff = await run_cli(env, "diff", str(tmp_path / "mix"))
    assert diff.code == EXIT_CHANGES and diff.err.splitlines()[0] == note
    apply = await run_cli(env, "apply", str(tmp_path / "mix"), "--prune")
    assert apply.code == EXIT_OK and apply.err == note + "\n"
    assert apply.out.splitlines()[-1] == "applied as policy revision 1"


async def test_get_says_what_it_matched_names_against(api: Api, cli_env) -> None:
    env = env_for(cli_env, api, token="read")
    for args, message in (
        (("policies", "nosuch"), "no policy named 'nosuch'"),
        (("policies", "nosuch", "--kind", "Route", "-n", "prod"),
         "no Route named 'nosuch' in namespace 'prod'"),
        (("instances", "nosuch"), "no instances of service 'nosuch'"),
        (("sidecars", "nosuch"), "no sidecar with node id or service 'nosuch'"),
    ):  # fmt: skip
        result = await run_cli(env, "get", *args)
        assert (result.code, result.err) == (EXIT_INVALID, f"lepton-mesh get: {message}\n")


async def test_a_name_after_the_options(api: Api, cli_env, tmp_path: Path) -> None:
    env = env_for(cli_env, api)
    assert (
        await run_cli(env, "apply", write(tmp_path, "d.yaml", dest() + "---\n" + route()))
    ).code == 0
    got = await run_cli(env, "get", "policies", "-o", "yaml", "--kind", "Route", "dialog")
    assert got.code == EXIT_OK, got.err
    assert [m["metadata"]["name"] for m in yaml.safe_load(got.out)] == ["dialog"]
    history = await run_cli(env, "history", "-o", "json", "dialog")
    assert history.code == EXIT_OK and len(json.loads(history.out)) == 1
    extra = await run_cli(env, "get", "policies", "-o", "yaml", "dialog", "more")
    assert extra.code == EXIT_INVALID and "unrecognized arguments: dialog more" in extra.err


async def test_history_escapes_control_characters(api: Api, cli_env, tmp_path: Path) -> None:
    env = env_for(cli_env, api)
    path = write(tmp_path, "d.yaml", dest())
    message = "two\nlines \x1b[31mred\x1b[0m \u202egnp.exe"
    assert (await run_cli(env, "apply", path, "-m", message)).code == EXIT_OK
    history = await run_cli(env, "history")
    lines = history.out.splitlines()
    assert len(lines) == 2  # the header and one row: a newline no longer splits it
    assert "two\\nlines \\x1b[31mred\\x1b[0m \\u202egnp.exe" in lines[1]
    assert all(c.isprintable() for c in history.out.replace("\n", ""))
    # -o json keeps the message as it is.
    assert json.loads((await run_cli(env, "history", "-o", "json")).out)[0]["message"] == message

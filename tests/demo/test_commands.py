"""The CLI config the demo lends the user with --keep: written only where it harms
nothing, removed only if it is still the demo's; and the demo's own CLI runs."""

import json
import os
import sys
from pathlib import Path

import pytest

from lepton_mesh.cli_client import save_config
from lepton_mesh.demo.commands import Cli, UserConfig, command_name, shown_path
from lepton_mesh.demo.errors import CommandFailed

SERVER = "http://127.0.0.1:40001"


def _token_in(path: Path) -> str | None:
    return json.loads(path.read_text())["token"] if path.exists() else None


def test_no_user_config_is_lent_then_removed(tmp_path: Path) -> None:
    cfg = UserConfig(tmp_path / "lepton-mesh" / "config.json")
    assert cfg.install(SERVER, "demo-token")
    assert json.loads(cfg.path.read_text()) == {"server": SERVER, "token": "demo-token"}
    assert cfg.path.stat().st_mode & 0o777 == 0o600
    assert "demo-token" not in cfg.marker.read_text()  # a hash, not the secret
    cfg.restore()
    assert not cfg.path.exists() and not cfg.marker.exists()
    cfg.restore()  # idempotent


def test_the_folders_made_for_the_lent_config_are_removed_with_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    cfg = UserConfig(home / ".config" / "lepton-mesh" / "config.json")
    assert cfg.install(SERVER, "demo-token")
    cfg.restore()
    assert list(home.iterdir()) == []  # no empty ~/.config/lepton-mesh/ left behind


def test_folders_that_were_there_or_are_no_longer_empty_stay(tmp_path: Path) -> None:
    config = tmp_path / ".config"
    config.mkdir()
    cfg = UserConfig(config / "lepton-mesh" / "config.json")
    assert cfg.install(SERVER, "demo-token")
    (config / "lepton-mesh" / "notes.txt").write_text("mine")  # the user's, meanwhile
    cfg.restore()
    assert [p.name for p in (config / "lepton-mesh").iterdir()] == ["notes.txt"]
    cfg = UserConfig(config / "other" / "config.json")
    assert cfg.install(SERVER, "demo-token")
    cfg.restore()
    assert sorted(p.name for p in config.iterdir()) == ["lepton-mesh"]


def test_a_users_config_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    save_config(path, "http://control.internal:15011", "users-token")
    cfg = UserConfig(path)
    assert not cfg.install(SERVER, "demo-token")
    cfg.restore()
    assert _token_in(path) == "users-token"
    assert not cfg.marker.exists()


def test_a_config_left_by_a_killed_demo_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    old = UserConfig(path)
    assert old.install(SERVER, "old-demo-token")  # ... and that demo died without restore()
    cfg = UserConfig(path)
    assert cfg.install(SERVER, "new-demo-token")
    assert _token_in(path) == "new-demo-token"
    cfg.restore()
    assert not path.exists()


def test_a_config_the_user_replaced_meanwhile_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    cfg = UserConfig(path)
    assert cfg.install(SERVER, "demo-token")
    save_config(path, "http://control.internal:15011", "users-token")  # `lepton-mesh login`
    cfg.restore()
    assert _token_in(path) == "users-token"
    assert not cfg.marker.exists()


def test_shown_path_is_relative_below_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "examples" / "mesh") == "examples/mesh"
    assert shown_path(Path("/elsewhere/mesh")) == "/elsewhere/mesh"


async def test_cli_runs_with_the_demos_config_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user's settings must not redirect the demo's commands.
    monkeypatch.setenv("LEPTON_TOKEN", "users-token")
    monkeypatch.setenv("LEPTON_SERVER", "http://127.0.0.1:1")
    save_config(tmp_path / "cli.json", "http://127.0.0.1:9", "demo-token")
    lines: list[str] = []
    cli = Cli(tmp_path / "cli.json", lines.append)
    key = tmp_path / "token.key"
    done = await cli.run("token", "init-key", str(key))
    assert done.returncode == 0 and key.exists()
    assert lines[0] == f"$ lepton-mesh token init-key {key}"
    assert lines[1].startswith(f"  created {key}")
    # Nothing listens on port 9: a connection error (3) names the demo's server.
    with pytest.raises(CommandFailed, match=r"exited with 3:\n.*127\.0\.0\.1:9"):
        await cli.run("get", "services", show=False)
    assert "LEPTON_TOKEN" in os.environ  # ours is untouched


def test_the_command_to_try_works_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Path(sys.executable).with_name("lepton-mesh")
    if not script.exists():
        pytest.skip("no lepton-mesh script next to this interpreter")
    monkeypatch.chdir(script.parent.parent.parent)  # where `make demo` runs: the repo
    monkeypatch.setenv("PATH", str(tmp_path))  # not on PATH
    assert command_name() == str(script)

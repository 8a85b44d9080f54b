"""The `lepton-mesh` commands the demo runs, as a user would type them.

Tokens, login, apply, diff, rollback, history and get all go through the real
CLI in a child process (`run_once`), so the demo exercises the code path a
user's commands take and prints exactly what they print. The CLI finds the
demo's control daemon through a config file of the demo's own
(`LEPTON_CONFIG`); `LEPTON_SERVER` and `LEPTON_TOKEN` are removed from the
children's environment, so a user's settings cannot send the demo's writes
to another control daemon.

With `--keep`, `UserConfig` points the user's own CLI config at the demo,
so `lepton-mesh get services` works in another terminal: only when the user
has no config there yet (or only a config an earlier demo left), and it is
removed again when the demo stops, with the folders made for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lepton_mesh.cli_client import config_path, save_config
from lepton_mesh.demo.errors import CommandFailed
from lepton_mesh.demo.procs import Completed, run_once

COMMAND_TIMEOUT_S = 30.0
_USER_SETTINGS = ("LEPTON_SERVER", "LEPTON_TOKEN", "LEPTON_CONFIG")

Say = Callable[[str], None]


def command_name() -> str:
    """How the user runs `lepton-mesh`: plain when it is on PATH, else its absolute path
    (the --keep instructions are for another terminal, whose directory may differ)."""
    script = Path(sys.executable).with_name("lepton-mesh")
    if not script.exists():
        return f"{sys.executable} -m lepton_mesh"
    found = shutil.which("lepton-mesh")
    if found and Path(found).resolve() == script.resolve():
        return "lepton-mesh"
    return str(script)


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it is below it (shorter to read)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Cli:
    """Runs `lepton-mesh ARGS...` against the demo's control daemon."""

    def __init__(self, config: Path, say: Say) -> None:
        self.config = config
        self._say = say
        self._env = {k: v for k, v in os.environ.items() if k not in _USER_SETTINGS}
        self._env["LEPTON_CONFIG"] = str(config)

    async def run(self, *args: str, expect: Sequence[int] = (0,), show: bool = True) -> Completed:
        """Run the command; with `show`, print it and its output as a terminal would.

        An exit code outside `expect` raises CommandFailed with its stderr.
        """
        if show:
            self._say(f"$ lepton-mesh {shlex.join(args)}")
        done = await run_once(
            (sys.executable, "-m", "lepton_mesh", *args), env=self._env, timeout=COMMAND_TIMEOUT_S
        )
        if done.returncode not in expect:
            raise CommandFailed(
                f"`lepton-mesh {shlex.join(args)}` exited with {done.returncode}:\n"
                f"{(done.stderr or done.stdout).strip()}"
            )
        if show:
            for line in (done.stdout + done.stderr).splitlines():
                self._say(f"  {line}")
        return done


class UserConfig:
    """The user's own CLI config file, lent to the demo while it is kept running.

    A marker file next to it holds a hash of the demo's token: a config whose
    token matches it was written by a demo (maybe one killed before it could
    clean up), and is the only kind replaced or removed here.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_path()
        self.marker = self.path.with_name(self.path.name + ".demo")
        self._token: str | None = None
        self._made: list[Path] = []  # folders `install` created, deepest first

    def install(self, server: str, token: str) -> bool:
        """Point the CLI at the demo; False (nothing written) if the user has a config."""
        if self.path.exists() and not self._written_by_demo():
            return False
        self._made = [p for p in self.path.parents if not p.exists()]
        save_config(self.path, server, token)
        self.marker.write_text(_digest(token) + "\n")
        self._token = token
        return True

    def restore(self) -> None:
        """Remove what `install` wrote, unless the user replaced it since."""
        if self._token is None:
            return
        if self._current_token() == self._token:
            self.path.unlink(missing_ok=True)
        self.marker.unlink(missing_ok=True)
        self._token = None
        for folder in self._made:  # only if empty: the user may have put files there since
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []

    def _written_by_demo(self) -> bool:
        try:
            mark = self.marker.read_text().strip()
        except OSError:
            return False
        current = self._current_token()
        return current is not None and mark == _digest(current)

    def _current_token(self) -> str | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        token = data.get("token") if isinstance(data, dict) else None
        return token if isinstance(token, str) else None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()

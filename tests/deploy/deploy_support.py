"""Helpers for tests/deploy: where deploy/ is, its YAML, the CLI's parsers.

No Docker engine is needed by anything here: the files under deploy/ are
checked by reading them (and by the tools that lint or validate them), and
by running the parts that are plain lepton-mesh commands.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yaml"
KUBE_DIR = DEPLOY / "kubernetes"
DOCS = REPO / "docs" / "deployment.md"

# The commands whose every flag an operator may set (docs/deployment.md's table).
OPERATOR_COMMANDS = ("control", "sidecar", "run")

# Python snippets in probes and health checks are run with `python -c`.
_PY_C = "-c"


def tool(name: str) -> str:
    """A console script installed next to this interpreter (the dev extra's tools)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise AssertionError(f"{name} is not installed: pip install -e '.[dev]'")
    return str(path)


@functools.cache
def yaml_documents(path: Path) -> list[Any]:
    """The file's documents, read once: callers must not change them (copy first)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.load_all(f, Loader=loader) if doc is not None]


def subcommand_parser(name: str) -> argparse.ArgumentParser | None:
    """The `lepton-mesh NAME` parser, or None when this build has no such command."""
    from lepton_mesh.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every long flag the parser defines (not --help) -> its action."""
    return {
        flag: action
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for flag in action.option_strings
        if flag.startswith("--")
    }


def env_names(command: str) -> dict[str, str]:
    """`lepton-mesh COMMAND` flag -> its LEPTON_* variable, read from the help texts.

    For commands where every flag has one (control, sidecar)."""
    parser = subcommand_parser(command)
    assert parser is not None
    out = {}
    for flag, action in option_actions(parser).items():
        found = re.search(r"\[\$(LEPTON_[A-Z_]+)\]", action.help or "")
        assert found, f"{command} {flag}: its help names no LEPTON_* variable"
        out[flag] = found.group(1)
    return out


def control_env_names() -> dict[str, str]:
    return env_names("control")


def parse_cli(argv: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    """Parse as `lepton-mesh ARGV` would with ENV set (control reads defaults from it)."""
    from lepton_mesh.cli import build_parser

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return build_parser().parse_args(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def python_snippets(command: list[str]) -> Iterator[str]:
    """The code of each `python -c CODE` in an exec-form command."""
    for i, word in enumerate(command[:-1]):
        if word == _PY_C and i > 0 and Path(command[i - 1]).name.startswith("python"):
            yield command[i + 1]


def assert_shell_syntax(script: str, what: str) -> None:
    result = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, f"{what}: not valid sh: {result.stderr}"


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# --- deploy/compose/docker-compose.yaml -------------------------------------------------

IMAGE = "${LEPTON_IMAGE:-lepton-mesh:0.1.0}"


def compose() -> dict[str, Any]:
    (doc,) = yaml_documents(COMPOSE)
    return doc


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def lepton_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if s.get("image") == IMAGE}


def runs_cli(s: dict[str, Any]) -> bool:
    """The image's entrypoint (lepton-mesh) with the service's command as arguments."""
    return s.get("image") == IMAGE and "entrypoint" not in s


def sidecars() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if runs_cli(s) and s["command"][0] == "sidecar"}


def controls() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if runs_cli(s) and s["command"][0] == "control"}


def mounts(s: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a named volume, or a path relative to deploy/compose)."""
    out = {}
    for v in s.get("volumes", []):
        source, target = v.split(":")[:2]
        out[target] = source
    return out


def volume_at(s: dict[str, Any], path: str) -> tuple[str, str]:
    """(volume or host path, path inside it) that holds PATH in service S."""
    best = max(
        (t for t in mounts(s) if PurePosixPath(path).is_relative_to(t)),
        key=len,
        default=None,
    )
    assert best is not None, f"nothing is mounted where {path} is"
    return mounts(s)[best], str(PurePosixPath(path).relative_to(best))

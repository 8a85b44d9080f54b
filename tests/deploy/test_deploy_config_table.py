"""docs/deployment.md's configuration table against the code, both ways.

For `control`, `sidecar` and `run` (introspected from `build_parser()`):
every flag the parser defines has a row, and every row names a flag the
parser has; the environment variable column says exactly what the code
reads (a documented variable changes the parsed value, an undocumented one
does not); and a literal default (in backticks) parses to the flag's real
default. Rows without a flag are variables the code reads by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from deploy_support import (
    DOCS,
    OPERATOR_COMMANDS,
    REPO,
    option_actions,
    parse_cli,
    subcommand_parser,
)

HEADER = ["Command", "Flag", "Environment variable", "Default", "Meaning"]
NONE = "—"


@dataclass(frozen=True)
class Row:
    command: str
    flag: str | None
    env: str | None
    default: str
    meaning: str


def _cell(text: str) -> str | None:
    text = text.strip()
    return None if text == NONE else text.strip("`")


def table() -> list[Row]:
    lines = DOCS.read_text().splitlines()
    heads = [
        i
        for i, line in enumerate(lines)
        if [c.strip() for c in line.strip().strip("|").split("|")] == HEADER
    ]
    assert len(heads) == 1, f"want one table headed {HEADER} in {DOCS.name}"
    rows = []
    for line in lines[heads[0] + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(HEADER), line
        command, flag, env, default, meaning = cells
        rows.append(Row(_cell(command) or "", _cell(flag), _cell(env), default, meaning))
    return rows


def required_args(command: str, leaving_out: str | None = None) -> list[str]:
    """The smallest command line that parses (without the flag under test)."""
    parser = subcommand_parser(command)
    assert parser is not None
    argv = [command]
    for flag, action in option_actions(parser).items():
        if action.required and flag != leaving_out:
            argv += [flag, "x.yaml"]
    if command == "run":
        argv += ["--", "true"]
    return argv


def commands_here() -> list[str]:
    return [c for c in OPERATOR_COMMANDS if subcommand_parser(c) is not None]


def test_the_table_covers_every_operator_command():
    assert set(commands_here()) == set(OPERATOR_COMMANDS), "a command is missing from the CLI"
    assert {r.command for r in table()} == set(OPERATOR_COMMANDS)


@pytest.mark.parametrize("command", OPERATOR_COMMANDS)
def test_every_flag_has_a_row_and_every_row_a_flag(command):
    parser = subcommand_parser(command)
    assert parser is not None
    documented = [r.flag for r in table() if r.command == command and r.flag]
    assert len(documented) == len(set(documented)), "a flag documented twice"
    assert set(documented) == set(option_actions(parser))


def flag_rows() -> list[Row]:
    return [r for r in table() if r.flag]


def row_id(r: Row) -> str:
    return f"{r.command} {r.flag or r.env}"


@pytest.mark.parametrize("row", flag_rows(), ids=row_id)
def test_the_environment_column_is_what_the_code_reads(row):
    action = option_actions(subcommand_parser(row.command))[row.flag]
    if action.nargs == 0:  # a switch: no value a variable could give
        assert row.env is None
        return
    named = re.search(r"\$(LEPTON_[A-Z_]+)", action.help or "")
    in_help = named.group(1) if named else None
    assert row.env == in_help, f"{row.flag}: its help names {in_help or 'no variable'}"
    var = row.env or "LEPTON_" + row.flag.removeprefix("--").replace("-", "_").upper()
    value = "127.0.0.1:1" if "address" in action.metavar.lower() or ":" in action.metavar else "7"
    try:
        args = parse_cli(required_args(row.command, leaving_out=row.flag), {var: value})
        seen = getattr(args, action.dest)
    except SystemExit:  # still required: the variable was not read
        seen = None
    if row.env:
        assert seen == value, f"{var} is documented but does not set {row.flag}"
    else:
        assert seen != value, f"{var} sets {row.flag}: document it"


@pytest.mark.parametrize("row", flag_rows(), ids=row_id)
def test_literal_defaults_are_the_real_defaults(row):
    action = option_actions(subcommand_parser(row.command))[row.flag]
    if row.default == "required":
        assert action.required or _control_refuses_without(row)
        return
    assert not action.required
    if row.default in ("none", "off"):
        assert action.default in (None, False)
        return
    literal = re.fullmatch(r"`([^`]+)`", row.default)
    if literal is None:  # computed at run time (e.g. a host name): said in words
        return
    if row.command == "control":
        assert_control_default(row.flag, literal.group(1))
    else:
        convert = action.type or str
        assert convert(literal.group(1)) == action.default


def _control_refuses_without(row: Row) -> bool:
    """control, sidecar and run check some flags themselves (so that the variable
    may stand in for them)."""
    from lepton_mesh.control.daemon import OptionError, options_from_args

    if row.command in ("sidecar", "run"):
        from lepton_mesh.cli import _sidecar_config

        argv = [row.command] + (["--", "true"] if row.command == "run" else [])
        with pytest.raises(SystemExit) as stopped:
            _sidecar_config(parse_cli(argv, {row.env or "LEPTON_SIDECAR_CONFIG": ""}))
        assert stopped.value.code == 2
        return True
    assert row.command == "control"
    with pytest.raises(OptionError, match=re.escape(row.flag)):
        options_from_args(parse_cli(["control"], {row.env or "": ""}))
    return True


def assert_control_default(flag: str, text: str) -> None:
    """The documented value, given as the flag, makes the same options as no flag at all."""
    from lepton_mesh.control.daemon import options_from_args

    base = ["control", "--etcd", "127.0.0.1:2379"]
    given = options_from_args(parse_cli([*base, flag, text]))
    default = options_from_args(parse_cli(base))
    assert given == default.__class__(**{**_fields(default), "replica_id": given.replica_id})


def _fields(options: object) -> dict[str, object]:
    return {f: getattr(options, f) for f in options.__dataclass_fields__}  # type: ignore[attr-defined]


@pytest.mark.parametrize("row", [r for r in table() if not r.flag], ids=row_id)
def test_variables_without_a_flag_are_read_by_the_code(row):
    assert row.env and row.env.startswith("LEPTON_")
    sources = "\n".join(p.read_text() for p in (REPO / "lepton_mesh").rglob("*.py"))
    assert f'"{row.env}"' in sources, f"{row.env}: no code reads it"


def test_the_table_parser_sees_the_whole_table():
    rows = table()
    assert len(rows) >= sum(len(option_actions(subcommand_parser(c))) for c in OPERATOR_COMMANDS)
    assert all(r.meaning for r in rows)

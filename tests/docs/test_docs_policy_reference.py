"""docs/policy-reference.md against the policy model and the loader.

The field tables are generated (docs/generate_policy_reference.py): the file
must be what the generator makes of it now. Beyond that, every row is tried
on the real loader: its Example validates in place, a required field left out
is refused, and a default read from the model is the one the loader applies.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from docs_support import DOCS, REPO, generator

gen = generator()
DOC = DOCS / "policy-reference.md"
ROWS = [(t, fd, cell) for t, fd, cell in gen.examples(DOC.read_text(encoding="utf-8"))]


def _id(row: tuple[object, ...]) -> str:
    table, fd, _ = row
    return f"{table.id}:{'+'.join(fd.names)}"  # type: ignore[attr-defined]


def test_the_reference_is_what_the_generator_makes_of_it() -> None:
    current = DOC.read_text(encoding="utf-8")
    wanted = gen.render(current)
    assert wanted == current, gen.out_of_date_message(current, wanted)
    assert gen.todos(current) == [], (
        "rows without an Example or Meaning: write them in docs/policy-reference.md"
    )


def test_every_table_of_the_spec_is_in_the_reference() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert sorted(r.id for r in gen.regions(text.split("\n"))) == sorted(t.id for t in gen.TABLES)
    assert len(ROWS) == sum(len(t.fields) for t in gen.TABLES) > 100


@pytest.mark.parametrize("row", ROWS, ids=[_id(r) for r in ROWS])
def test_the_example_validates_in_place(row: tuple[object, ...]) -> None:
    table, fd, cell = row
    manifests = gen.example_manifests(table, fd, cell)
    _, problems = gen.load(manifests)
    assert problems == [], f"{_id(row)}: Example {cell} does not validate: {problems}"


REQUIRED = [r for r in ROWS if r[1].required]


@pytest.mark.parametrize("row", REQUIRED, ids=[_id(r) for r in REQUIRED])
def test_a_required_field_left_out_is_refused(row: tuple[object, ...]) -> None:
    table, fd, _ = row
    prefix, _, _ = fd.names[0].rpartition(".")
    under = tuple(prefix.split(".")) if prefix else ()
    leaves = [n.rpartition(".")[2] for n in fd.names]
    _, problems = gen.load(table.host.with_fields({}, drop=leaves, under=under))
    assert problems, f"{_id(row)} is documented as required, but the loader accepts it left out"


def _model_defaulted(row: tuple[object, ...]) -> bool:
    table, fd, _ = row
    base = table.host.base()
    return (
        table.model is not None
        and not fd.required
        and fd.default is None
        and not any(n in base for n in fd.names)
    )


DEFAULTED = [r for r in ROWS if _model_defaulted(r)]


@pytest.mark.parametrize("row", DEFAULTED, ids=[_id(r) for r in DEFAULTED])
def test_the_documented_default_is_the_one_the_loader_applies(row: tuple[object, ...]) -> None:
    table, fd, _ = row
    loaded, problems = gen.load(table.host.with_fields({}))
    assert problems == []
    obj = table.pick(loaded)
    for attr in fd.model_attrs():
        value = obj
        for part in attr.split("."):
            value = getattr(value, part)
        assert value == gen.model_default(table.model, attr), f"{_id(row)}: {attr}"


def test_the_default_checks_cover_most_rows() -> None:
    # Rows with a sentence for a default or with the field in the host's base
    # are covered by their examples only; most rows must be checked here.
    assert len(DEFAULTED) >= 50


# --- the generator catches drift ---------------------------------------------------


def _table(table_id: str) -> object:
    return next(t for t in gen.TABLES if t.id == table_id)


def test_a_field_the_loader_accepts_without_a_row_is_reported() -> None:
    table = _table("retry-budget")
    trimmed = dataclasses.replace(table, fields=table.fields[:-1])  # type: ignore[type-var]
    assert gen.check_table(trimmed) == [
        "retry-budget: the loader accepts 'window', which has no row",
        "retry-budget: RetryBudget.window is in no row: document it or name it internal",
    ]


def test_a_row_the_loader_does_not_accept_is_reported() -> None:
    table = _table("limits")
    extra = gen.f("max_streams", gen.integer(1), None, default="`1`")
    grown = dataclasses.replace(table, fields=(*table.fields, extra))  # type: ignore[type-var]
    assert gen.check_table(grown) == [
        "limits: 'max_streams' has a row, but the loader does not accept it"
    ]


def test_a_type_that_disagrees_with_the_model_is_reported() -> None:
    table = _table("retry-budget")
    fields = tuple(
        dataclasses.replace(fd, kind=gen.integer(1)) if fd.names == ("window",) else fd
        for fd in table.fields
    )
    wrong = dataclasses.replace(table, fields=fields)  # type: ignore[type-var]
    assert gen.check_table(wrong) == [
        "retry-budget.window: documented as 'integer ≥ 1', but the model holds 'float'"
    ]


def test_the_default_cell_follows_the_model() -> None:
    table = _table("retry")
    cells = {fd.names[0]: gen.default_cell(table, fd) for fd in table.fields}
    assert cells == {
        "attempts": "`2`",
        "retry_on": "`[connect-failure, refused, reset]`",
        "retriable_status_codes": "none",
        "retriable_methods": "none",
        "per_try_timeout": "`0`",
        "backoff": "`{base: 25ms, max: 250ms}`",
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0"),
        (0.025, "25ms"),
        (0.25, "250ms"),
        (1, "1s"),
        (60, "60s"),
        (90, "90s"),
        (300, "5m"),
        (7200, "2h"),
    ],
)
def test_durations_are_written_as_people_write_them(seconds: float, text: str) -> None:
    assert gen._duration_text(seconds) == text


def test_check_mode_fails_with_the_command_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "policy-reference.md"
    text = DOC.read_text(encoding="utf-8")
    stale.write_text(
        text.replace("| `attempts` | integer 1\u201310 | `2` |", "| `attempts` | integer | `3` |")
    )
    assert gen.main(["--check"], doc=stale) == 1
    err = capsys.readouterr().err
    assert "run `.venv/bin/python docs/generate_policy_reference.py`" in err
    assert "-| `attempts` | integer | `3` |" in err
    assert gen.main([], doc=stale) == 0  # rewrites it
    assert stale.read_text(encoding="utf-8") == text


def test_a_bad_example_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "policy-reference.md"
    doc.write_text(DOC.read_text(encoding="utf-8").replace("`timeout: 5s`", "`timeout: soon`"))
    assert gen.main(["--check"], doc=doc) == 1
    assert (
        "rule: `timeout`: Example `timeout: soon`: spec.rules[0].timeout: expected a duration"
        in (capsys.readouterr().err)
    )


def test_nothing_in_the_package_imports_the_generator() -> None:
    users = [
        str(path.relative_to(REPO))
        for path in (REPO / "lepton_mesh").rglob("*.py")
        if re.search(r"generate_policy_reference", path.read_text(encoding="utf-8"))
    ]
    assert users == []

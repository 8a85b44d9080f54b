"""YAML loading with line maps: multi-document files, duplicates, errors, bounds."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import yaml

from lepton_mesh.policy import yaml_source
from lepton_mesh.policy.errors import ConfigError, Problem, format_path
from lepton_mesh.policy.yaml_source import load_documents, load_file

LOADERS = [yaml.SafeLoader] + ([yaml.CSafeLoader] if hasattr(yaml, "CSafeLoader") else [])


@pytest.fixture(autouse=True, params=LOADERS, ids=lambda loader: loader.__name__)
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with libyaml and with the pure-Python parser: same results."""
    monkeypatch.setattr(yaml_source, "_Loader", request.param)


MANIFESTS = """\
apiVersion: lepton.dev/v1
kind: Route
metadata: {name: r1}
spec:
  rules:
    - match: {path: /a}
    - match:
        path: /b
---
# an empty document is skipped
---
kind: Authz
"""


def test_multi_document_lines() -> None:
    docs = load_documents(MANIFESTS, "policy.yaml")
    assert [d.data for d in docs] == [
        {
            "apiVersion": "lepton.dev/v1",
            "kind": "Route",
            "metadata": {"name": "r1"},
            "spec": {"rules": [{"match": {"path": "/a"}}, {"match": {"path": "/b"}}]},
        },
        {"kind": "Authz"},
    ]
    first, second = docs
    assert dict(first.lines) == {
        (): 1,
        ("apiVersion",): 1,
        ("kind",): 2,
        ("metadata",): 3,
        ("metadata", "name"): 3,
        ("spec",): 4,
        ("spec", "rules"): 5,
        ("spec", "rules", 0): 6,
        ("spec", "rules", 0, "match"): 6,
        ("spec", "rules", 0, "match", "path"): 6,
        ("spec", "rules", 1): 7,
        ("spec", "rules", 1, "match"): 7,
        ("spec", "rules", 1, "match", "path"): 8,
    }
    assert dict(second.lines) == {(): 12, ("kind",): 12}
    # A missing field points at its nearest ancestor.
    assert first.line(("spec", "rules", 1, "match", "headers", "x")) == 7
    assert second.source == "policy.yaml"


def test_merge_keys_and_aliases() -> None:
    text = "base: &b {a: 1, b: 2}\nx: &x {<<: *b, a: 3}\ny: *x\n"
    (doc,) = load_documents(text, "f")
    assert doc.data == {"base": {"a": 1, "b": 2}, "x": {"a": 3, "b": 2}, "y": {"a": 3, "b": 2}}
    # Aliased values keep the lines where they were written.
    assert doc.line(("y", "a")) == 2


ERRORS = [
    ("duplicate_keys", "a: 1\nb:\n  c: 1\n  c: 2\na: 3\n",
     ["f:4: b.c: duplicate key (first set at line 3)", "f:5: a: duplicate key (first set at line 1)"]),
    ("duplicate_in_sequence_item", "- {x: 1, x: 1}\n", ["f:1: [0].x: duplicate key (first set at line 1)"]),
    ("duplicates_in_each_document", "a: 1\na: 2\n---\nb: 1\nb: 2\n",
     ["f:2: a: duplicate key (first set at line 1)", "f:5: b: duplicate key (first set at line 4)"]),
    ("flow_syntax", "a: [1, 2\nb: 3\n",
     ["f:2: invalid YAML: ... (while parsing a flow sequence at line 1)"]),
    ("bad_indent", "a: 1\n b: 2\n", ["f:2: invalid YAML: mapping values are not allowed"]),
    ("syntax_in_second_document", "a: 1\n---\nb: [\n", ["f:4: invalid YAML: "]),
    ("unknown_tag", "a: !vault secret\n", ["f:1: a: invalid YAML: could not determine a constructor for the tag '!vault'"]),
    ("undefined_alias", "a: *nope\n", ["f:1: invalid YAML: found undefined alias"]),
    ("unhashable_key", "? [a, b]\n: 1\n", ["f:1: mapping keys must be scalars"]),
    ("recursive_alias", "a: &a [1, *a]\n", ["f:1: a[1]: recursive alias: a value may not contain itself"]),
    ("control_character", "a: 1\nb: \x07\n", ["f:2: invalid YAML: "]),
    # Keys equal in Python but not strings: what is wrong is that they are not strings.
    ("int_and_bool_keys", "labels: {1: a, true: b}\n",
     ["f:1: labels: keys must be strings, found integer 1 (quote it to make it a string)",
      "f:1: labels: keys must be strings, found boolean true (quote it to make it a string)"]),
    ("on_and_yes_keys", "s:\n  on: 1\n  yes: 2\n  no: 3\n",
     ["f:2: s: keys must be strings, found boolean true (quote it to make it a string)",
      "f:3: s: keys must be strings, found boolean true (quote it to make it a string)"]),
    ("repeated_int_key", "a: {1: x, 1: y}\n",
     ["f:1: a: keys must be strings, found integer 1 (quote it to make it a string)",
      "f:1: a: keys must be strings, found integer 1 (quote it to make it a string)"]),
    ("integer_past_the_digit_limit", "n: " + "9" * 5000 + "\n", ["f:1: n: integer too large: 5000 digits"]),
    ("impossible_date", "d: 2024-13-45\n", ["f:1: d: invalid value '2024-13-45': month must be in 1..12"]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(text: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_documents(text, "f")
    lines = str(info.value).splitlines()
    assert len(lines) == len(expected), lines
    # The two parsers word some messages differently: "..." skips the wording.
    for got, want in zip(lines, expected, strict=True):
        head, _, tail = want.partition("...")
        assert got.startswith(head) and got.endswith(tail), lines


def test_alias_expansion_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yaml_source, "MAX_NODES", 1000)
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    with pytest.raises(ConfigError) as info:
        load_documents("\n".join(levels) + "\n", "f")
    assert str(info.value) == "f: document too large: more than 1000 values"


@pytest.mark.parametrize("depth", [101, 500])
def test_deep_nesting_is_an_error_not_a_crash(depth: int) -> None:
    with pytest.raises(ConfigError) as info:
        load_documents("[" * depth + "]" * depth, "f")
    # PyYAML's pure-Python composer may run out of frames first: then no line.
    assert str(info.value) in (
        "f:1: invalid YAML: nesting too deep (more than 100 levels)",
        "f: invalid YAML: nesting too deep (more than 100 levels)",
    )


def test_nesting_past_the_parsers_own_limit_is_an_error_too() -> None:
    with pytest.raises(ConfigError) as info:
        load_documents("[" * 5000 + "]" * 5000, "f")
    assert "invalid YAML" in str(info.value) and "nesting" in str(info.value)


def test_nesting_up_to_the_limit_loads() -> None:
    (doc,) = load_documents("a: " + "[" * 99 + "]" * 99 + "\n", "f")  # 100 levels
    value = doc.data["a"]
    for _ in range(98):
        (value,) = value
    assert value == []


def test_too_deep_names_the_line() -> None:
    text = "a: 1\nb:\n" + "".join(f"{' ' * (2 * i + 2)}k{i}:\n" for i in range(120))
    text += " " * 242 + "leaf: 1\n"
    with pytest.raises(ConfigError) as info:
        load_documents(text, "f")
    assert str(info.value).startswith("f:101:")  # k98, whose value is the 101st level
    assert "nesting too deep" in str(info.value)


def test_empty_text_has_no_documents() -> None:
    assert load_documents("", "f") == []
    assert load_documents("# only a comment\n---\n", "f") == []


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\xef\xbb\xbfkey: value\n")  # a BOM is tolerated
    (doc,) = load_file(path)
    assert (doc.source, doc.data, doc.line(("key",))) == (str(path), {"key": "value"}, 1)


def test_load_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path / "missing.yaml")
    assert str(info.value) == f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"a: 1\nb: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_file(bad)
    assert str(info.value) == f"{bad}:2: not valid UTF-8"


def test_a_string_key_and_a_lone_non_string_key_are_data() -> None:
    # One non-string key is the consumer's to refuse, with its own words for what the keys are.
    (doc,) = load_documents("a: {1: x, '1': y}\n", "f")
    assert doc.data == {"a": {1: "x", "1": "y"}}


def test_files_that_are_not_regular_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    with pytest.raises(ConfigError) as info:
        load_file(fifo)
    assert str(info.value) == f"{fifo}: cannot read: not a regular file"
    with pytest.raises(ConfigError) as info:
        load_file(tmp_path)
    assert str(info.value) == f"{tmp_path}: cannot read: a folder"


def test_format_path() -> None:
    assert format_path(()) == ""
    assert format_path(("services", "intent", "endpoints", 1, "address")) == (
        "services.intent.endpoints[1].address"
    )
    assert format_path((0, "x")) == "[0].x"
    assert format_path(("a", 1.5)) == "a.1.5"


def test_config_error_shape() -> None:
    err = ConfigError([Problem("f.yaml", 3, "a.b", "bad"), Problem("f.yaml", None, "", "worse")])
    assert str(err) == "f.yaml:3: a.b: bad\nf.yaml: worse"
    assert (err.exit_code, err.reason) == (2, "invalid_config")
    copy = pickle.loads(pickle.dumps(err))
    assert copy.problems == err.problems
    with pytest.raises(ValueError):
        ConfigError([])

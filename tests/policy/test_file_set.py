"""Which files validate, diff and apply read: every one below a folder or an error, each once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lepton_mesh.policy.errors import ConfigError
from lepton_mesh.policy.file_set import EMPTY, is_sidecar_config, read_files, yaml_files
from lepton_mesh.policy.yaml_source import load_documents
from tests.cli.cli_support import deny_listing


def tree(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("kind: Route\n")


def problems(err: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [str(p) for p in err.value.problems]


def test_folders_are_walked_sorted_without_hidden_folders(tmp_path: Path) -> None:
    tree(tmp_path, "b.yaml", "a.yml", "sub/c.yaml", ".git/x.yaml", "notes.txt", ".d.yaml")
    assert yaml_files([str(tmp_path)]) == [
        str(tmp_path / ".d.yaml"),
        str(tmp_path / "a.yml"),
        str(tmp_path / "b.yaml"),
        str(tmp_path / "sub" / "c.yaml"),
    ]


def test_a_folder_that_cannot_be_listed_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Skipped, its objects would look deleted to `apply --prune`.
    tree(tmp_path, "a.yaml", "locked/b.yaml", "locked/deeper/c.yaml")
    deny_listing(monkeypatch, tmp_path / "locked")
    with pytest.raises(ConfigError) as info:
        yaml_files([str(tmp_path)])
    assert problems(info) == [
        f"{tmp_path / 'locked'}: cannot read this folder: Permission denied; nothing below it "
        "would be validated or applied (and --prune would delete what it defines)"
    ]
    deny_listing(monkeypatch, tmp_path)  # the folder given itself
    with pytest.raises(ConfigError) as info:
        yaml_files([str(tmp_path)])
    assert problems(info)[0].startswith(f"{tmp_path}: cannot read this folder: Permission denied")


def test_one_file_named_twice_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree(tmp_path, "d1/x.yaml")
    monkeypatch.chdir(tmp_path)
    assert yaml_files(["d1/x.yaml", "./d1/x.yaml", "d1", str(tmp_path / "d1")]) == ["d1/x.yaml"]
    os.symlink(tmp_path / "d1" / "x.yaml", tmp_path / "link.yaml")
    assert yaml_files(["link.yaml", "d1"]) == ["link.yaml"]


def test_linked_folders_are_followed_once(tmp_path: Path) -> None:
    tree(tmp_path, "shared/s.yaml", "mesh/m.yaml")
    os.symlink(tmp_path / "shared", tmp_path / "mesh" / "shared")
    os.symlink(tmp_path / "mesh", tmp_path / "mesh" / "shared" / "back")  # a loop
    assert yaml_files([str(tmp_path / "mesh")]) == [
        str(tmp_path / "mesh" / "m.yaml"),
        str(tmp_path / "mesh" / "shared" / "s.yaml"),
    ]


def test_missing_paths_and_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as info:
        yaml_files([str(tmp_path / "nowhere"), str(tmp_path / "empty")])
    assert problems(info) == [
        f"{tmp_path / 'nowhere'}: no such file or folder",
        f"{tmp_path / 'empty'}: no .yaml or .yml files in this folder",
    ]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "null\n", "---\n", "---\n---\n"])
def test_a_file_with_no_document_is_a_problem(tmp_path: Path, text: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    files, found = read_files([str(path)])
    assert (files, [str(p) for p in found]) == ([], [f"{path}: {EMPTY}"])


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.yaml")
    tree(tmp_path, "a.yaml")
    files, found = read_files([str(tmp_path)])
    assert [f.path for f in files] == [str(tmp_path / "a.yaml")]
    assert [str(p) for p in found] == [f"{tmp_path / 'pipe.yaml'}: cannot read: not a regular file"]


@pytest.mark.parametrize(
    ("text", "sidecar"),
    [
        ("service: chat\napp: 127.0.0.1:8080\n", True),
        ("service: chat\n---\nservice: two\n", True),  # the sidecar says: one document
        ("kind: Route\nmetadata: {name: r}\n", False),
        ("apiVersion: lepton-mesh/v1\nmetadata: {name: r}\nspec: {}\n", False),  # lost its kind
        ("kind: Route\n---\nservice: chat\n", False),
        ("[1, 2]\n", False),
    ],
)
def test_sidecar_configs_and_manifests(text: str, sidecar: bool) -> None:
    assert is_sidecar_config(load_documents(text, "f")) is sidecar

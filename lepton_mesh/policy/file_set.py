"""The files `validate`, `diff` and `apply` read for PATH..., and what each one holds.

One module, so that what `validate` passes is what `apply` sends:

- A folder stands for every .yaml/.yml file below it (sorted; hidden folders
  skipped; linked folders followed, each once). A folder that cannot be
  listed is a problem, never skipped: an `apply --prune` would delete every
  object defined below it.
- A file named by two paths (`d/x.yaml ./d/x.yaml`, a folder and a file in
  it) is read once, under the first path given.
- Only regular files are read (`yaml_source.read_text`): a FIFO would block.
- A file with no document (empty, only comments, `null` or `---`) is a
  problem: neither a policy file nor a sidecar config is empty.
- A file holds policy manifests, or it is a sidecar config: a mapping with
  none of the manifest envelope's fields (`apiVersion`, `kind`,
  `metadata`, `spec`). A manifest that lost its `kind` is still a manifest,
  and gets the manifest's problems.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lepton_mesh.policy.errors import ConfigError, Problem
from lepton_mesh.policy.manifest_fields import ENVELOPE_FIELDS
from lepton_mesh.policy.yaml_source import Document, load_documents, read_text

__all__ = ["YAML_SUFFIXES", "SourceFile", "is_sidecar_config", "read_files", "yaml_files"]

YAML_SUFFIXES = (".yaml", ".yml")

EMPTY = (
    "no YAML document in this file (it is empty, or only comments, null or ---): "
    "a policy file holds manifests, a sidecar config at least 'service' and 'app'"
)


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file read: its path as given, its text and its documents."""

    path: str
    text: str
    docs: tuple[Document, ...]

    @property
    def sidecar_config(self) -> bool:
        return is_sidecar_config(self.docs)


def is_sidecar_config(docs: Sequence[Document]) -> bool:
    """Mappings without a manifest's fields (one, if valid); anything else is manifests."""
    return bool(docs) and all(
        isinstance(d.data, Mapping) and not any(field in d.data for field in ENVELOPE_FIELDS)
        for d in docs
    )


def yaml_files(paths: Iterable[str]) -> list[str]:
    """Files as given, folders as the YAML files below them; each file once.

    Raises `ConfigError` naming every path that does not exist, every folder
    that cannot be listed, and every folder with no YAML file in it.
    """
    problems: list[Problem] = []
    out: dict[str, str] = {}  # real path -> the path as given (or found)
    for path in paths:
        if os.path.isdir(path):
            before = len(problems)
            found = _walk(path, problems)
            if not found and len(problems) == before:
                problems.append(Problem(path, None, "", "no .yaml or .yml files in this folder"))
            for file in found:
                out.setdefault(os.path.realpath(file), file)
        elif os.path.lexists(path):
            out.setdefault(os.path.realpath(path), path)
        else:
            problems.append(Problem(path, None, "", "no such file or folder"))
    if problems:
        raise ConfigError(problems)
    return list(out.values())


def _walk(folder: str, problems: list[Problem]) -> list[str]:
    def cannot_list(e: OSError) -> None:
        where = e.filename if e.filename is not None else folder
        problems.append(Problem(os.fspath(where), None, "", _cannot_list(e)))

    found: list[str] = []
    seen = {os.path.realpath(folder)}  # a link back up would loop
    for root, dirs, names in os.walk(folder, onerror=cannot_list, followlinks=True):
        kept = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(root, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(d)
        dirs[:] = kept
        found += [os.path.join(root, n) for n in names if n.endswith(YAML_SUFFIXES)]
    return sorted(found)


def _cannot_list(e: OSError) -> str:
    return (
        f"cannot read this folder: {e.strerror or e}; nothing below it would be "
        "validated or applied (and --prune would delete what it defines)"
    )


def read_files(paths: Iterable[str]) -> tuple[list[SourceFile], list[Problem]]:
    """Every file of `paths` read and parsed; the files that parsed, and the problems of the rest.

    Raises `ConfigError` as `yaml_files` does, before reading anything.
    """
    files: list[SourceFile] = []
    problems: list[Problem] = []
    for path in yaml_files(paths):
        try:
            text = read_text(path)
            docs = load_documents(text, path)
        except ConfigError as err:
            problems += err.problems
            continue
        if not docs:
            problems.append(Problem(path, None, "", EMPTY))
            continue
        files.append(SourceFile(path, text, tuple(docs)))
    return files, problems

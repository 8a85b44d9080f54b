"""A set of policy manifests as stored objects: identity, validation as a whole, changes.

The control daemon stores each manifest under its (kind, namespace, name);
`lepton-mesh validate` checks files before they get there. Both use
`resulting_set` so that what passes in CI passes on apply: the whole set is
validated by `traffic_loader.collect_traffic` (cross-object rules included),
each object is given once, and each is plain JSON data (what etcd will hold).

`changes_between` and `undo` are the arithmetic of the policy history: a
change is `{"op", "kind", "namespace", "name", "before", "after"}` with
`before`/`after` a manifest or None (docs/control-plane.md).

Pure: no I/O, standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lepton_mesh.policy.errors import ConfigError, Problem, describe, format_path
from lepton_mesh.policy.errors import Path as FieldPath
from lepton_mesh.policy.traffic_loader import KINDS, collect_traffic
from lepton_mesh.policy.yaml_source import Document

__all__ = [
    "Change",
    "Ident",
    "as_documents",
    "changes_between",
    "identity",
    "kind_order",
    "label",
    "resulting_set",
    "undo",
]

Ident = tuple[str, str, str]  # (kind, namespace, name)
Change = dict[str, Any]
Manifests = Mapping[Ident, dict[str, Any]]


def label(ident: Ident) -> str:
    return "/".join(ident)


def kind_order(ident: Ident) -> tuple[int, str, str]:
    """Routes, then DestinationPolicies, then ExternalServices; by namespace and name."""
    kind, namespace, name = ident
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), namespace, name)


def as_documents(manifests: Sequence[Mapping[str, Any] | Document]) -> list[Document]:
    """Documents keep their file and lines; plain manifests are named by index."""
    return [
        m if isinstance(m, Document) else Document(f"manifests[{i}]", m, {})
        for i, m in enumerate(manifests)
    ]


def identity(data: Any) -> Ident | None:
    """(kind, namespace, name) of a manifest, or None if it does not say (validation will)."""
    if not isinstance(data, Mapping):
        return None
    kind, meta = data.get("kind"), data.get("metadata")
    if kind not in KINDS or not isinstance(meta, Mapping):
        return None
    name, namespace = meta.get("name"), meta.get("namespace", "default")
    if not isinstance(name, str) or not isinstance(namespace, str):
        return None
    return (kind, namespace, name)


def _stored_form(data: Mapping[str, Any], ident: Ident) -> dict[str, Any]:
    """The manifest as stored: the envelope only, the namespace always written out."""
    return {
        "apiVersion": data.get("apiVersion"),
        "kind": ident[0],
        "metadata": dict(data["metadata"]) | {"namespace": ident[1]},
        "spec": data.get("spec"),
    }


# What a stored integer may be: orjson, which writes the manifests to etcd,
# takes signed and unsigned 64-bit integers only.
_JSON_INT_MIN, _JSON_INT_MAX = -(2**63), 2**64 - 1


def _not_plain(value: Any, path: FieldPath = ()) -> tuple[FieldPath, str] | None:
    """Where `value` is not plain JSON data (YAML can hold dates, sets, int keys), and why.

    The loaders' field checks refuse all of these with a message of their own;
    this is the net under them, so nothing reaches etcd that cannot be stored.
    """
    if value is None or isinstance(value, (str, bool)):
        return None
    if isinstance(value, int):
        ok = _JSON_INT_MIN <= value <= _JSON_INT_MAX
        return None if ok else (path, f"integer {value} does not fit in 64 bits")
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, f"{describe(value)} is not a JSON number")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return (path, f"keys must be strings, found {describe(key)}")
            if (found := _not_plain(item, (*path, key))) is not None:
                return found
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _not_plain(item, (*path, i))) is not None:
                return found
        return None
    return (path, f"{describe(value)} has no JSON form")


def _reported(problems: Sequence[Problem], source: str, path: str) -> bool:
    """Whether a problem of `source` is at `path` or around it (a field check said why)."""
    return any(
        p.file == source and (p.path == path or path.startswith((p.path + ".", p.path + "[")))
        for p in problems
    )


def resulting_set(
    current: Manifests,
    docs: Sequence[Document],
    *,
    prune: bool = False,
    delete: Iterable[Ident] = (),
    target: Manifests | None = None,
    origin: str = "live",
) -> dict[Ident, dict[str, Any]]:
    """The set after a write, validated as a whole; raises `ConfigError` naming every problem.

    The result is `current` with `docs` put (with `prune`, everything not in
    `docs` removed; `delete` removed), or `target` as given (a rollback).
    Stored objects are checked first, so a conflict between a stored object
    and one being written is reported on the one being written, at its
    file and line; stored ones are named `"<origin> Kind/namespace/name"`.
    """
    problems: list[Problem] = []
    given: dict[Ident, tuple[Document, dict[str, Any]]] = {}
    unnamed: list[Document] = []
    for doc in docs:
        ident = identity(doc.data)
        if ident is None:
            unnamed.append(doc)  # the loader says what is missing
        elif ident in given:
            first = given[ident][0]
            where = f"{first.source}:{first.line()}" if first.line() else first.source
            problems.append(
                Problem(
                    doc.source,
                    doc.line(("metadata", "name")),
                    "metadata.name",
                    f"{label(ident)} is also given at {where}: each object is set once",
                )
            )
        else:
            given[ident] = (doc, _stored_form(doc.data, ident))
    if target is None:
        result = {} if prune else dict(current)
        for ident in delete:
            result.pop(ident, None)
        result.update((ident, manifest) for ident, (_, manifest) in given.items())
    else:
        result = dict(target)
    entries = [
        (Document(f"{origin} {label(ident)}", manifest, {}), ())
        for ident, manifest in sorted(result.items(), key=lambda kv: kind_order(kv[0]))
        if ident not in given
    ]
    entries += [(doc, ()) for doc, _ in given.values()]
    entries += [(doc, ()) for doc in unnamed]
    collect_traffic(entries, problems)
    for doc, manifest in given.values():
        if (found := _not_plain(manifest)) is not None:
            path, message = found
            shown = format_path(path)
            if not _reported(problems, doc.source, shown):
                problems.append(Problem(doc.source, doc.line(path), shown, message))
    if problems:
        raise ConfigError.in_reading_order(problems)
    return result


def changes_between(before: Manifests, after: Manifests) -> list[Change]:
    """The changes that turn `before` into `after`, by kind, namespace, name."""
    changes = []
    for ident in sorted(set(before) | set(after), key=kind_order):
        old, new = before.get(ident), after.get(ident)
        if old == new:
            continue
        kind, namespace, name = ident
        changes.append(
            {
                "op": "delete" if new is None else "put",
                "kind": kind,
                "namespace": namespace,
                "name": name,
                "before": old,
                "after": new,
            }
        )
    return changes


def undo(state: Manifests, records: Iterable[Mapping[str, Any]]) -> dict[Ident, dict[str, Any]]:
    """`state` with `records` (newest first) undone: each change's `before` put back."""
    out = dict(state)
    for record in records:
        for ch in record["changes"]:
            ident = (ch["kind"], ch["namespace"], ch["name"])
            if ch["before"] is None:
                out.pop(ident, None)
            else:
                out[ident] = ch["before"]
    return out

"""YAML loading that remembers the line of every value.

`load_documents` turns YAML text into plain Python data (dicts, lists,
scalars: what `yaml.safe_load` gives) plus a line map from field path to the
1-based line where that field appears, so a validator can say "line 12"
instead of "somewhere in services". For a mapping entry the line is that of
its key; for a sequence item, where the item starts.

Stricter than `yaml.safe_load` on purpose:
- a key repeated in one mapping is an error (PyYAML keeps the last one, and
  the user silently loses the first); keys that are not strings but equal
  one another (`1` and `true`, `on` and `yes`) are reported as not strings,
  which is what is wrong with them: no field, label or name takes one;
- syntax errors, unknown tags and values PyYAML cannot build (a 5,000-digit
  integer, a 13th month) become a `ConfigError` with file and line;
- only regular files are read: a FIFO or a device would block or never end;
- alias expansion is bounded (`MAX_NODES`), so a "billion laughs" document
  fails fast instead of eating memory;
- nesting is bounded (`MAX_DEPTH`) by a count, not by Python's recursion
  limit: since 3.12 a level costs fewer frames, and 500 levels no longer hit it.

Files may hold several documents (`---`), as policy manifests do; empty
documents (a trailing `---`) are skipped, as kubectl does.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import yaml

from lepton_mesh.policy.errors import ConfigError, Path, Problem, describe, format_path

# libyaml's parser is several times faster; the pure-Python one gives the
# same nodes and marks, so behaviour does not depend on which is installed.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Upper bound on values built per document, counting every alias expansion.
# A sidecar config or policy file has a few thousand at most.
MAX_NODES = 100_000
# Upper bound on nesting; the configs and policies go about ten levels deep.
MAX_DEPTH = 100
_TOO_DEEP = f"invalid YAML: nesting too deep (more than {MAX_DEPTH} levels)"

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def line_of(lines: Mapping[Path, int], path: Path) -> int | None:
    """The line of `path`, or of its nearest ancestor that has one.

    A missing field has no line of its own; its parent's line is the best
    place to point at.
    """
    while True:
        line = lines.get(path)
        if line is not None or not path:
            return line
        path = path[:-1]


@dataclass(frozen=True, slots=True)
class Document:
    """One YAML document: its data and where each field of it came from."""

    source: str
    data: Any
    lines: Mapping[Path, int]

    def line(self, path: Path = ()) -> int | None:
        return line_of(self.lines, path)


class _TooLarge(Exception):
    pass


class _TooDeep(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


def load_documents(text: str, source: str) -> list[Document]:
    """Parse every document in `text`; `source` names it in errors."""
    problems: list[Problem] = []
    docs: list[Document] = []
    loader = None
    try:
        loader = _Loader(text)  # the pure-Python reader rejects bad characters here
        while loader.check_node():
            node = loader.get_node()
            builder = _Builder(loader, source, problems)
            data = builder.build(node, (), node.start_mark.line + 1)
            # Constructed objects are cached per node; documents never share nodes.
            loader.constructed_objects = {}
            if data is not None:
                docs.append(Document(source, data, MappingProxyType(builder.lines)))
    except yaml.MarkedYAMLError as e:
        problems.append(_yaml_problem(source, e, ()))
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        problems.append(Problem(source, line, "", f"invalid YAML: {e.reason}"))
    except _TooLarge:
        problems.append(
            Problem(source, None, "", f"document too large: more than {MAX_NODES} values")
        )
    except _TooDeep as e:
        problems.append(Problem(source, e.line, "", _TOO_DEEP))
    except RecursionError:  # in PyYAML's pure-Python composer, before we see a node
        problems.append(Problem(source, None, "", _TOO_DEEP))
    finally:
        if loader is not None:
            loader.dispose()
    if problems:
        # A mapping's duplicate keys are found before its children's: report by line.
        problems.sort(key=lambda p: (p.line is None, p.line or 0))
        raise ConfigError(problems)
    return docs


def load_file(path: str | os.PathLike[str]) -> list[Document]:
    """Read and parse a UTF-8 YAML file. Unreadable files are a ConfigError too."""
    return load_documents(read_text(path), os.fspath(path))


def read_text(path: str | os.PathLike[str]) -> str:
    """A regular file's UTF-8 text; ConfigError if it cannot be read or is not one."""
    source = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer; the
        # flag has no effect on the regular files read below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                with open(fd, "rb", closefd=False) as f:
                    raw = f.read()
        finally:
            os.close(fd)
    except OSError as e:
        raise ConfigError.single(source, None, "", f"cannot read: {e.strerror or e}") from e
    if not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise ConfigError.single(source, None, "", f"cannot read: {what}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError.single(source, line, "", "not valid UTF-8") from e


def _not_a_string(key: Any) -> str:
    return f"keys must be strings, found {describe(key)} (quote it to make it a string)"


def _yaml_problem(source: str, err: yaml.MarkedYAMLError, path: Path) -> Problem:
    mark = err.problem_mark or err.context_mark
    message = f"invalid YAML: {err.problem or err.context}"
    if err.problem and err.context:
        where = f" at line {err.context_mark.line + 1}" if err.context_mark else ""
        message += f" ({err.context}{where})"
    return Problem(source, mark.line + 1 if mark else None, format_path(path), message)


class _Builder:
    """Builds one document's data from its node graph, recording lines."""

    def __init__(self, loader: yaml.SafeLoader, source: str, problems: list[Problem]) -> None:
        self.loader = loader
        self.source = source
        self.problems = problems
        self.lines: dict[Path, int] = {}
        self.budget = MAX_NODES
        # Nodes on the path from the root: an alias to one of them is a cycle.
        self.open: set[int] = set()
        # Mappings already checked for duplicate keys. An alias revisits the
        # same node, already flattened by merge keys, so it must not be rechecked.
        self.checked: set[int] = set()

    def problem(self, line: int | None, path: Path, message: str) -> None:
        self.problems.append(Problem(self.source, line, format_path(path), message))

    def build(self, node: yaml.Node, path: Path, line: int) -> Any:
        self.lines[path] = line
        self.budget -= 1
        if self.budget < 0:
            raise _TooLarge
        if len(path) >= MAX_DEPTH:  # the root is level 1, at path ()
            raise _TooDeep(line)
        if id(node) in self.open:
            self.problem(line, path, "recursive alias: a value may not contain itself")
            return None
        if isinstance(node, yaml.MappingNode) and node.tag == _MAP_TAG:
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ_TAG:
            self.open.add(id(node))
            items = [
                self.build(item, (*path, i), item.start_mark.line + 1)
                for i, item in enumerate(node.value)
            ]
            self.open.discard(id(node))
            return items
        # Scalars and explicitly tagged collections (!!set, !!omap): PyYAML's own.
        return self._construct(node, path)

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[Any, Any]:
        if id(node) not in self.checked:
            self.checked.add(id(node))
            self._check_duplicates(node, path)
        try:
            self.loader.flatten_mapping(node)  # resolves `<<` merge keys in place
        except yaml.MarkedYAMLError as e:
            self.problems.append(_yaml_problem(self.source, e, path))
            return {}
        self.open.add(id(node))
        out: dict[Any, Any] = {}
        clashed: list[Any] = []  # keys not strings that a later key equals
        # After flattening, merged entries come first so explicit keys win.
        for key_node, value_node in node.value:
            key = self._construct(key_node, path)
            line = key_node.start_mark.line + 1
            try:
                taken = key in out
            except TypeError:
                self.problem(line, path, "mapping keys must be scalars")
                continue
            if taken and not isinstance(key, str):
                # `true` after `1` (equal in Python), or `yes` after `on`: both
                # are keys that are not strings, which is what is wrong with them.
                first = next(k for k in out if k == key)  # as first written
                if first not in clashed:
                    clashed.append(first)
                    self.problem(self.lines[(*path, first)], path, _not_a_string(first))
                self.problem(line, path, _not_a_string(key))
                continue
            out[key] = self.build(value_node, (*path, key), line)
        self.open.discard(id(node))
        return out

    def _check_duplicates(self, node: yaml.MappingNode, path: Path) -> None:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self._construct(key_node, path)
            if not isinstance(key, str):
                continue  # not a string, repeated or not: reported as such when building
            line = key_node.start_mark.line + 1
            seen = first.get(key)
            if seen is None:
                first[key] = line
            else:
                self.problem(line, (*path, key), f"duplicate key (first set at line {seen})")

    def _construct(self, node: yaml.Node, path: Path) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as e:
            self.problems.append(_yaml_problem(self.source, e, path))
            return None
        except ValueError as e:  # int() past its digit limit, date(2024, 13, 1)
            line = node.start_mark.line + 1
            if node.tag.endswith(":int"):
                self.problem(line, path, f"integer too large: {len(node.value)} digits")
            else:
                shown = node.value if len(node.value) <= 40 else node.value[:37] + "..."
                self.problem(line, path, f"invalid value {shown!r}: {e}")
            return None

"""What a PromQL expression asks of the metrics, checked against what the code exports.

`Exported` is read from real scrapes (sidecar and control /metrics): every series name
PromQL can select (`# TYPE` lines, histograms expanded to _bucket/_sum/_count) and, from
the samples, the label names each has. `check_expr` parses an expression with a real
PromQL parser (promql-parser, the Rust parser's bindings) and reports, as strings:
- a syntax error;
- a selector naming a series nobody exports (Prometheus' own `up` aside);
- a label matcher on a label that series does not have;
- a by/without/on/ignoring/group_left label that no series beneath it has;
and `output_labels` says which labels an expression's result keeps, so that alert
annotations can only use labels that are there.

Target labels (job, instance: the ones both scrape configs attach) count as every
series' labels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import promql_parser as pq
from prometheus_client.parser import text_string_to_metric_families

# Series Prometheus makes itself for every target (not exported by our code).
PROMETHEUS_SERIES = {"up": frozenset()}

_TYPE_LINE = re.compile(r"^# TYPE (\S+) (counter|gauge|histogram|summary|untyped)$", re.M)
_SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "counter": ("",),
    "gauge": ("",),
    "untyped": ("",),
}


@dataclass(frozen=True)
class Series:
    """A name PromQL can select: `family` and `kind` from its TYPE line, `labels` from
    the samples seen (None: the family was declared but had no samples)."""

    name: str
    family: str
    kind: str
    labels: frozenset[str] | None


Exported = dict[str, Series]


def exported_from_text(text: str) -> Exported:
    """Every series name of one scrape, with the label names its samples carry."""
    seen: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            seen.setdefault(sample.name, set()).update(sample.labels)
    out: Exported = {}
    for family, kind in _TYPE_LINE.findall(text):
        for suffix in _SUFFIXES[kind]:
            name = family + suffix
            labels = seen.get(name)
            out[name] = Series(name, family, kind, None if labels is None else frozenset(labels))
    return out


def merge(*scrapes: Exported) -> Exported:
    """Several scrapes of the same code: a series' labels are what any of them showed."""
    out: Exported = {}
    for scrape in scrapes:
        for name, s in scrape.items():
            old = out.get(name)
            if old is None or old.labels is None:
                out[name] = s
            elif s.labels is not None:
                out[name] = Series(name, s.family, s.kind, old.labels | s.labels)
    return out


# --- walking the AST -----------------------------------------------------------------


def _children(node: object) -> list[object]:
    if isinstance(node, pq.AggregateExpr):
        return [node.expr] + ([node.param] if isinstance(node.param, pq.Expr) else [])
    if isinstance(node, pq.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, pq.ParenExpr | pq.UnaryExpr | pq.SubqueryExpr):
        return [node.expr]
    if isinstance(node, pq.MatrixSelector):
        return [node.vector_selector]
    if isinstance(node, pq.Call):
        return list(node.args)
    return []


def _nodes(node: object) -> Iterator[object]:
    yield node
    for child in _children(node):
        yield from _nodes(child)


def selectors(node: object) -> list[pq.VectorSelector]:
    return [n for n in _nodes(node) if isinstance(n, pq.VectorSelector)]


def selector_name(sel: pq.VectorSelector) -> str | None:
    if sel.name:
        return sel.name
    for m in sel.matchers.matchers:
        if m.name == "__name__" and m.op == pq.MatchOp.Equal:
            return m.value
    return None


def matcher_labels(sel: pq.VectorSelector) -> set[str]:
    groups = [sel.matchers.matchers, *sel.matchers.or_matchers]
    return {m.name for group in groups for m in group if m.name != "__name__"}


def metric_names(expr: str) -> set[str]:
    """Every series name an expression selects."""
    return {n for s in selectors(pq.parse(expr)) if (n := selector_name(s)) is not None}


# --- checks --------------------------------------------------------------------------


def series_labels(name: str, exported: Exported, target: frozenset[str]) -> frozenset[str] | None:
    if name in PROMETHEUS_SERIES:
        return PROMETHEUS_SERIES[name] | target
    s = exported.get(name)
    if s is None or s.labels is None:
        return None
    return s.labels | target


def check_expr(expr: str, exported: Exported, target: frozenset[str]) -> list[str]:
    """Problems with one expression, each a sentence naming what is wrong."""
    try:
        ast = pq.parse(expr)
    except Exception as e:  # the binding raises ValueError with the parser's message
        return [f"does not parse: {e}"]
    problems: list[str] = []
    for sel in selectors(ast):
        name = selector_name(sel)
        if name is None:
            problems.append(f"{sel}: selects by no metric name")
            continue
        if name not in exported and name not in PROMETHEUS_SERIES:
            problems.append(f"{name}: no such series in what the code exports")
            continue
        labels = series_labels(name, exported, target)
        if labels is None:
            problems.append(f"{name}: no samples in the scrapes, so its labels are unknown")
            continue
        for label in sorted(matcher_labels(sel) - labels):
            problems.append(f"{name}: no label {label!r} (it has {sorted(labels)})")
    for node in _nodes(ast):
        for label, scope in _grouping(node):
            available = _labels_beneath(scope, exported, target)
            if available is not None and label not in available:
                problems.append(f"grouping label {label!r}: no series beneath {node} has it")
    return problems


def _grouping(node: object) -> list[tuple[str, list[object]]]:
    """(label, subtrees that must provide it) for each grouping label of `node`."""
    if isinstance(node, pq.AggregateExpr) and node.modifier is not None:
        return [(label, [node.expr]) for label in node.modifier.labels]
    if isinstance(node, pq.BinaryExpr) and node.modifier is not None:
        out = []
        matching = node.modifier.matching
        if matching is not None:
            out += [(label, [node.lhs, node.rhs]) for label in matching.labels]
        out += [(label, [node.lhs, node.rhs]) for label in node.modifier.group_labels or ()]
        return out
    return []


def _labels_beneath(
    scope: Iterable[object], exported: Exported, target: frozenset[str]
) -> set[str] | None:
    out: set[str] = set()
    for subtree in scope:
        for sel in selectors(subtree):
            name = selector_name(sel)
            labels = series_labels(name, exported, target) if name else None
            if labels is None:
                return None  # reported by the selector check
            out |= labels
    return out


# --- result labels -------------------------------------------------------------------

_KEEP_LABELS_FUNCS = {
    "rate", "irate", "increase", "delta", "idelta", "deriv", "abs", "ceil", "floor",
    "round", "clamp", "clamp_min", "clamp_max", "exp", "ln", "log2", "log10", "sqrt",
    "avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
    "last_over_time", "quantile_over_time", "stddev_over_time", "changes", "resets",
    "predict_linear", "sort", "sort_desc", "timestamp",
}  # fmt: skip


def output_labels(expr: str, exported: Exported, target: frozenset[str]) -> frozenset[str]:
    """The labels every series of the expression's result is sure to have."""
    out = _out(pq.parse(expr), exported, target)
    return frozenset(out or ())


def _out(node: object, exported: Exported, target: frozenset[str]) -> frozenset[str] | None:
    """None: a scalar (no labels, and a binary operation keeps the other side's)."""
    if isinstance(node, pq.NumberLiteral | pq.StringLiteral):
        return None
    if isinstance(node, pq.VectorSelector):
        name = selector_name(node)
        labels = series_labels(name, exported, target) if name else None
        return labels or frozenset()
    if isinstance(node, pq.MatrixSelector):
        return _out(node.vector_selector, exported, target)
    if isinstance(node, pq.ParenExpr | pq.UnaryExpr | pq.SubqueryExpr):
        return _out(node.expr, exported, target)
    if isinstance(node, pq.AggregateExpr):
        return _aggregate_out(node, exported, target)
    if isinstance(node, pq.BinaryExpr):
        return _binary_out(node, exported, target)
    if isinstance(node, pq.Call):
        return _call_out(node, exported, target)
    raise AssertionError(f"unexpected node {node!r}")


def _aggregate_out(
    node: pq.AggregateExpr, exported: Exported, target: frozenset[str]
) -> frozenset[str]:
    inner = _out(node.expr, exported, target) or frozenset()
    if str(node.op) in ("topk", "bottomk"):
        return inner
    if node.modifier is None:
        return frozenset()
    labels = frozenset(node.modifier.labels)
    if node.modifier.type == pq.AggModifierType.By:
        return labels
    return inner - labels


def _binary_out(
    node: pq.BinaryExpr, exported: Exported, target: frozenset[str]
) -> frozenset[str] | None:
    lhs, rhs = _out(node.lhs, exported, target), _out(node.rhs, exported, target)
    if lhs is None or rhs is None:
        return rhs if lhs is None else lhs
    op = str(node.op)
    if op == "or":
        return lhs & rhs  # a series comes from either side
    if op in ("and", "unless"):
        return lhs
    mod = node.modifier
    matching = mod.matching if mod is not None else None
    if mod is not None and mod.card in (pq.VectorMatchCardinality.ManyToOne,):
        return lhs | frozenset(mod.group_labels or ())
    if matching is None:
        return lhs
    labels = frozenset(matching.labels)
    if matching.type == pq.LabelModifierType.Include:  # on(...)
        return lhs & labels
    return lhs - labels  # ignoring(...)


def _call_out(node: pq.Call, exported: Exported, target: frozenset[str]) -> frozenset[str] | None:
    name = node.func.name
    args = list(node.args)
    if name == "histogram_quantile":
        inner = _out(args[1], exported, target) or frozenset()
        return inner - {"le"}
    if name in ("time", "vector", "scalar", "pi"):
        return None if name != "vector" else frozenset()
    if name == "absent" or name == "absent_over_time":
        return frozenset()  # absent() keeps only equality matchers' labels: assume none
    if name in _KEEP_LABELS_FUNCS:
        for arg in args:
            out = _out(arg, exported, target)
            if out is not None:
                return out
        return frozenset()
    raise AssertionError(f"output_labels: add {name}() to the table")


_TEMPLATE_LABEL = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")


def template_labels(text: str) -> set[str]:
    """Labels an annotation template reads (`{{ $labels.x }}`)."""
    return set(_TEMPLATE_LABEL.findall(text))

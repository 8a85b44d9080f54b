"""docs/monitoring.md against what the code exports: every metric it names and every
PromQL example in its runbooks selects series and labels a real scrape has."""

from __future__ import annotations

import re

import pytest
from obsdeploy_files import MONITORING_DOC
from obsdeploy_promql import PROMETHEUS_SERIES, Exported, check_expr

DOC = MONITORING_DOC.read_text()
# Backticked text that is a query over our metrics (it calls a function or aggregates).
EXAMPLES = sorted({m for m in re.findall(r"`([^`\n]+)`", DOC) if "lepton_" in m and "(" in m})
# Metric names as the doc spells them (a family, or a histogram's series).
NAMES = sorted(set(re.findall(r"\blepton_[a-z_]+[a-z]\b(?!/)", DOC)))


def test_the_doc_has_examples_to_check() -> None:
    assert len(EXAMPLES) >= 5 and len(NAMES) >= 30


@pytest.mark.parametrize("name", NAMES)
def test_every_metric_the_doc_names_is_exported(name: str, exported: Exported) -> None:
    families = {s.family for s in exported.values()}
    assert name in exported or name in families or name in PROMETHEUS_SERIES, (
        f"docs/monitoring.md names {name}; no scrape has it"
    )


@pytest.mark.parametrize("expr", EXAMPLES)
def test_every_example_query_uses_exported_series_and_labels(
    expr: str, exported: Exported, target_labels: frozenset[str]
) -> None:
    query = expr.replace('"SVC"', '"ratings"').replace('"..."', '"x"')
    assert check_expr(query, exported, target_labels) == []

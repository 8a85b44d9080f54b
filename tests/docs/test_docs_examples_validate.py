"""`lepton-mesh validate` on every policy manifest and sidecar config in the docs and examples/.

A YAML block in docs/*.md is checked when it is a whole file's worth: policy
manifests (documents with a lepton-mesh `apiVersion` or a policy `kind`) or a
sidecar config (one mapping with a `service` and no `kind`). Fragments (`tls:`
alone, a `match:` list) and other tools' YAML (Kubernetes, Compose,
Prometheus) are left alone. A block preceded by `<!-- invalid -->` shows an
error on purpose: validate must refuse it, so a stale marker is caught too.

Each block runs as a file of its own in a copy of the docs' surroundings
(`examples/` next to it), so a config naming `../examples/mesh/dialog.yaml`
resolves as it would from docs/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from docs_support import REPO, Block, blocks, doc_pages

from lepton_mesh.policy.traffic_loader import API_VERSION, KINDS

# The installed command; `python -m lepton_mesh` where it is not next to the interpreter.
_SCRIPT = Path(sys.executable).with_name("lepton-mesh")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "lepton_mesh"]
YAML_BLOCKS = [b for page in doc_pages() for b in blocks(page) if b.lang in ("yaml", "yml")]


def kind_of(block: Block) -> str | None:
    """'manifests', 'sidecar' or None (not a file lepton-mesh reads)."""
    try:
        docs = [d for d in yaml.safe_load_all(block.text) if d is not None]
    except yaml.YAMLError:
        return None
    maps = [d for d in docs if isinstance(d, dict)]
    if any(d.get("apiVersion") == API_VERSION or d.get("kind") in KINDS for d in maps):
        return "manifests"
    if len(docs) == 1 and maps and "service" in maps[0] and "kind" not in maps[0]:
        return "sidecar"
    return None


CHECKED = [b for b in YAML_BLOCKS if kind_of(b) is not None]


def validate(*paths: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    # --config-only: the blocks name certificate files that exist only where a
    # sidecar runs; what is checked is the config itself.
    return subprocess.run(
        [*CLI, "validate", "--config-only", *map(str, paths)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shaped like the repo: docs/ for the blocks, examples/ beside it."""
    root = tmp_path_factory.mktemp("docs-blocks")
    shutil.copytree(REPO / "examples", root / "examples")
    (root / "docs").mkdir()
    return root


def test_every_yaml_block_parses() -> None:
    broken = []
    for b in YAML_BLOCKS:
        try:
            list(yaml.safe_load_all(b.text))
        except yaml.YAMLError as e:
            if not b.marked_invalid:
                broken.append(f"{b.where}: {e}")
    assert broken == [], "YAML blocks that are not YAML (mark them <!-- invalid --> if meant):"


def test_the_docs_have_blocks_to_check() -> None:
    # The classification above must not quietly skip everything.
    assert len(CHECKED) >= 10, [b.where for b in CHECKED]
    assert {kind_of(b) for b in CHECKED} == {"manifests", "sidecar"}


@pytest.mark.parametrize("block", CHECKED, ids=[b.where for b in CHECKED])
def test_the_block_validates(block: Block, sandbox: Path) -> None:
    path = sandbox / "docs" / f"{block.page.stem}-line{block.line}.yaml"
    path.write_text(block.text, encoding="utf-8")
    result = validate(path, cwd=sandbox)
    if block.marked_invalid:
        assert result.returncode == 2, (
            f"{block.where} is marked <!-- invalid --> but validates: remove the marker\n"
            f"{result.stdout}{result.stderr}"
        )
    else:
        assert result.returncode == 0, (
            f"{block.where}: `lepton-mesh validate` refuses this {kind_of(block)} block "
            f"(fix it, or mark it <!-- invalid --> if the error is the point):\n{result.stderr}"
        )
        assert result.stdout == f"{path}: ok\n"


def test_every_file_in_examples_validates() -> None:
    files = sorted(p for p in (REPO / "examples").rglob("*") if p.is_file())
    result = validate("examples")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == sorted(
        f"{p.relative_to(REPO)}: ok" for p in files
    ), "every file in examples/ is a policy manifest or a sidecar config, and validates"

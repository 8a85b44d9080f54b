"""deploy/Dockerfile: hadolint passes, and the image is what docs/deployment.md says.

Docker itself is not available where these tests run, so the image is not
built here: what is checked is the file (hadolint, every rule, style
included), its shape (two stages on one base, no compilers or package
manager runs in the final stage, a numeric non-root user, `lepton-mesh` as
the entrypoint) and the build context that .dockerignore lets in.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import pytest
from deploy_support import DEPLOY, REPO, tool

DOCKERFILE = DEPLOY / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        keyword, _, args = whole.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(text):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def test_hadolint_finds_nothing_at_any_level(tmp_path):
    # Run from an empty folder with an empty home so no user config relaxes the rules.
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", "-f", "json", DOCKERFILE],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=30,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [] and result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_report_a_bad_dockerfile(tmp_path):
    """The lint above would catch something: an unpinned base and a cached pip install."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install uvloop\n")
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "-f", "json", bad],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
    )
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3006", "DL3013", "DL3042"} <= codes
    assert result.returncode != 0


def test_two_stages_on_one_base():
    text = DOCKERFILE.read_text()
    builder, final = stages(text)
    assert builder[0][1].split() == ["${PYTHON_IMAGE}", "AS", "builder"]
    # The venv's python is a symlink into the base image: same base in both stages.
    assert final[0][1] == "${PYTHON_IMAGE}"
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert default and re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", default.group(1))


def test_the_final_stage_installs_nothing_and_compiles_nothing():
    _, final = stages(DOCKERFILE.read_text())
    runs = " ".join(args for keyword, args in final if keyword == "RUN")
    for forbidden in ("apt-get", "apk ", "pip ", "gcc", "build-essential", "make "):
        assert forbidden not in runs, forbidden
    copies = [args for keyword, args in final if keyword == "COPY"]
    assert copies == ["--from=builder /opt/lepton /opt/lepton"]


def test_runs_lepton_mesh_as_a_numeric_non_root_user():
    _, final = stages(DOCKERFILE.read_text())
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit())
    entrypoints = [args for keyword, args in final if keyword == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoints] == [["lepton-mesh"]]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "lepton-mesh" in project["scripts"]
    keywords = {keyword for keyword, _ in final}
    assert {"LABEL", "HEALTHCHECK", "STOPSIGNAL"} <= keywords


# .dockerignore: Docker's rules, for the patterns it uses. The last matching
# pattern wins; a pattern matches a path or any of its parent folders.
def _pattern(p: str) -> re.Pattern[str]:
    p = p.strip("/")
    regex = re.escape(p).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
    return re.compile(regex + "$")


def _in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for exclude, pattern in rules:
        if any(pattern.match(p) for p in prefixes):
            included = not exclude
    return included


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            exclude = not line.startswith("!")
            rules.append((exclude, _pattern(line.lstrip("!"))))
    return rules


@pytest.mark.parametrize(
    ("path", "included"),
    [
        ("pyproject.toml", True),
        ("README.md", True),
        ("lepton_mesh/cli.py", True),
        ("lepton_mesh/proxy/sidecar.py", True),
        ("lepton_mesh/__pycache__/cli.cpython-311.pyc", False),
        (".venv/bin/python", False),
        (".git/config", False),
        ("certs/ca-key.pem", False),
        ("token.key", False),
        ("tests/deploy/test_deploy_dockerfile.py", False),
        ("deploy/compose/docker-compose.yaml", False),
    ],
)
def test_the_build_context_is_the_package_alone(path, included):
    assert _in_context(path, _dockerignore()) is included


def test_everything_the_dockerfile_copies_is_in_the_context():
    builder, _ = stages(DOCKERFILE.read_text())
    sources = [
        src
        for keyword, args in builder
        if keyword == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    ]
    assert sources == ["pyproject.toml", "README.md", "lepton_mesh"]
    for src in sources:
        assert (REPO / src).exists()
        assert _in_context(src, _dockerignore())

"""`lepton-mesh demo`: a mesh on a control plane on this machine, a canary, a
change and a rollback, and what the sidecars saw.

`run_demo` is the CLI's entry point. The demo's apps and load generator use
aiohttp (never imported by the proxy), so it is imported only when the demo
runs. docs/demo.md describes what it does and prints.
"""

from __future__ import annotations

import sys


def run_demo(keep: bool = False) -> int:
    """Run the demo; with `keep`, leave the mesh up until Ctrl-C. Returns the exit code."""
    try:
        from lepton_mesh.demo.runner import run_demo as _run
    except ImportError as e:
        if e.name != "aiohttp":
            raise
        print(
            "missing_dependency: the demo needs aiohttp: pip install -e '.[dev]' (or `make demo`)",
            file=sys.stderr,
        )
        return 1
    return _run(keep)

"""The `lepton-mesh` command: argument parsing and output only.

Each subcommand parses its flags, calls into the package, and turns typed
errors into a message on stderr and an exit code. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lepton_mesh import __version__
from lepton_mesh.policy.errors import ConfigError


def _cmd_sidecar(args: argparse.Namespace) -> int:
    from lepton_mesh.policy.sidecar_loader import load_sidecar_config

    cfg = load_sidecar_config(args.config)
    from lepton_mesh.proxy.sidecar import run

    try:
        return run(cfg)
    except OSError as exc:  # a listener could not bind: say which, exit before serving
        print(f"lepton-mesh sidecar: cannot listen: {exc}", file=sys.stderr)
        return 1


def _cmd_validate(args: argparse.Namespace) -> int:
    from lepton_mesh.policy.sidecar_loader import load_sidecar_config

    failed = 0
    for path in args.paths:
        try:
            load_sidecar_config(path)
        except ConfigError as err:
            print(err, file=sys.stderr)
            failed += 1
        else:
            print(f"{path}: ok")
    return 2 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lepton_mesh.demo import run_demo

    return run_demo(keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton-mesh", description="A service mesh you can run.")
    parser.add_argument("--version", action="version", version=f"lepton-mesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sidecar", help="run a sidecar proxy next to one service instance")
    p.add_argument("--config", required=True, metavar="FILE", help="static sidecar config (YAML)")
    p.set_defaults(func=_cmd_sidecar)

    p = sub.add_parser(
        "validate", help="check config files offline; errors name file, line and field"
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("demo", help="run the example mesh end to end and print a summary")
    p.add_argument("--keep", action="store_true", help="leave the mesh running for exploration")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

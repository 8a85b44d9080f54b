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


def _cmd_control(args: argparse.Namespace) -> int:
    import asyncio

    from lepton_mesh.control.auth import KeyFileError
    from lepton_mesh.control.daemon import OptionError, run_control
    from lepton_mesh.control.store import StoreError

    try:
        return asyncio.run(run_control(args))
    except (OptionError, KeyFileError) as exc:
        print(f"lepton-mesh control: {exc}", file=sys.stderr)
        return 2
    except (StoreError, OSError) as exc:  # etcd refused us (auth, TLS) or a port is taken
        print(f"lepton-mesh control: {exc}", file=sys.stderr)
        return 1


# --- certs: the mesh CA's files (lepton_mesh.identity) ---------------------------

_CERTS_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _certs_duration(text: str) -> int:
    """`90m`, `24h`, `7d`, `3600s` -> seconds (argparse type)."""
    unit = _CERTS_DURATION_UNITS.get(text[-1:])
    if unit is None or not text[:-1].isdigit() or int(text[:-1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: use a positive number with s, m, h or d")
    return int(text[:-1]) * unit


def _certs_run(args: argparse.Namespace) -> int:
    from lepton_mesh.identity.errors import IdentityError

    try:
        return args.certs_func(args)
    except IdentityError as err:
        print(f"lepton-mesh certs: {err}", file=sys.stderr)
        return err.exit_code


def _certs_init(args: argparse.Namespace) -> int:
    from lepton_mesh.identity.store import init_ca

    files = init_ca(args.dir, args.trust_domain, force=args.force)
    print(f"created the root and intermediate CA for {args.trust_domain} in {files.directory}/")
    print(f"  bundle (give to sidecars):         {files.bundle}")
    print(f"  issuer (control daemon's secret):  {files.ca_cert}, {files.ca_key}")
    print(f"  root key (move it offline now):    {files.root_key}")
    return 0


def _certs_issue(args: argparse.Namespace) -> int:
    import datetime as dt

    from lepton_mesh.identity.spiffe import SpiffeId
    from lepton_mesh.identity.store import CaFiles, issue_to_files

    files = CaFiles(args.dir)
    trust_domain = files.load_authority().trust_domain
    identity = SpiffeId(trust_domain, args.namespace, args.service)
    chain, key, issued = issue_to_files(
        files,
        identity,
        args.out,
        lifetime=None if args.lifetime is None else dt.timedelta(seconds=args.lifetime),
        force=args.force,
    )
    print(f"issued {identity} until {issued.not_after:%Y-%m-%d %H:%M:%SZ}")
    print(f"  chain: {chain}\n  key:   {key}")
    return 0


def _certs_rotate(args: argparse.Namespace) -> int:
    from lepton_mesh.identity import store

    if args.step == "prepare":
        nxt = store.rotate_prepare(args.dir, force=args.force)
        print(f"new root and intermediate in {nxt.directory}/; {args.dir}/bundle.pem now holds")
        print("both roots. Next: distribute the bundle to every sidecar, then run `activate`.")
    elif args.step == "activate":
        store.rotate_activate(args.dir)
        print("the new intermediate is active; reload the control daemon so it issues from it.")
        print("Next: once every sidecar holds a new certificate, run `finish`.")
    else:
        bundle = store.rotate_finish(args.dir)
        print(f"old root removed; the bundle holds {len(bundle.roots)} root(s). Distribute it.")
    return 0


def _certs_show(args: argparse.Namespace) -> int:
    import datetime as dt
    from pathlib import Path

    from lepton_mesh.identity.bundle import describe, load_certificates

    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        print(f"lepton-mesh certs show: {args.file}: {exc.strerror}", file=sys.stderr)
        return 1
    if b"PRIVATE KEY-----" in data:
        print(f"{args.file} holds a private key: keys are never shown", file=sys.stderr)
        if b"-----BEGIN CERTIFICATE-----" not in data:
            return 1
    certs = load_certificates(data, what=args.file)
    now = dt.datetime.now(dt.UTC)
    for i, cert in enumerate(certs, 1):
        print(f"certificate {i} of {len(certs)}")
        for label, value in describe(cert, now):
            print(f"  {label + ':':<10} {value}")
    return 0


def _add_certs_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("certs", help="the mesh CA: create it, issue, rotate the root, inspect")
    p.set_defaults(func=_certs_run)
    certs = p.add_subparsers(dest="certs_command", required=True, metavar="STEP")
    default_dir = "certs"

    c = certs.add_parser("init", help="create a root CA, an intermediate and a trust bundle")
    c.add_argument("--dir", default=default_dir, help="CA directory (default: certs/)")
    c.add_argument("--trust-domain", default="cluster.local", help="default: cluster.local")
    c.add_argument("--force", action="store_true", help="overwrite an existing CA")
    c.set_defaults(certs_func=_certs_init)

    c = certs.add_parser("issue", help="issue a workload key and certificate (tests, ops)")
    c.add_argument("--dir", default=default_dir, help="CA directory (default: certs/)")
    c.add_argument("--namespace", default="default")
    c.add_argument("--service", required=True)
    c.add_argument("--out", default=".", help="where to write <ns>.<svc>-{key,chain}.pem")
    c.add_argument("--lifetime", type=_certs_duration, default=None, help="e.g. 24h (default)")
    c.add_argument("--force", action="store_true", help="overwrite existing files")
    c.set_defaults(certs_func=_certs_issue)

    c = certs.add_parser("rotate-root", help="root rotation: prepare, activate, finish")
    c.add_argument("step", choices=("prepare", "activate", "finish"))
    c.add_argument("--dir", default=default_dir, help="CA directory (default: certs/)")
    c.add_argument("--force", action="store_true", help="prepare: replace an unfinished next/")
    c.set_defaults(certs_func=_certs_rotate)

    c = certs.add_parser("show", help="print the certificates in a PEM file (never keys)")
    c.add_argument("file", metavar="FILE")
    c.set_defaults(certs_func=_certs_show)


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

    from lepton_mesh.control.daemon import add_control_arguments

    p = sub.add_parser("control", help="run a control daemon replica (etcd-backed)")
    add_control_arguments(p)
    p.set_defaults(func=_cmd_control)

    _add_certs_parser(sub)
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

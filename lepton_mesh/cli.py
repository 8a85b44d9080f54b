"""The `lepton-mesh` command: argument parsing and output only.

Each subcommand parses its flags, calls into the package, and turns typed
errors into a message on stderr and an exit code. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lepton_mesh import __version__
from lepton_mesh.cli_client import ClientError
from lepton_mesh.policy.errors import ConfigError
from lepton_mesh.policy.traffic_loader import KINDS


def _sidecar_config(args: argparse.Namespace) -> Any:
    """The sidecar's config file, with the overrides its flags give."""
    import dataclasses

    from lepton_mesh.policy.sidecar_loader import check_instance_address, load_sidecar_config

    if not args.config:
        print("lepton-mesh: --config (or LEPTON_SIDECAR_CONFIG) is required", file=sys.stderr)
        raise SystemExit(2)
    cfg = load_sidecar_config(args.config)
    if args.instance_address:
        # A pod learns its IP only at start: the flag saves rewriting the file.
        address = check_instance_address(
            args.instance_address, "--instance-address / $LEPTON_INSTANCE_ADDRESS"
        )
        cfg = dataclasses.replace(cfg, instance=dataclasses.replace(cfg.instance, address=address))
    return cfg


def _add_sidecar_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=os.environ.get("LEPTON_SIDECAR_CONFIG"),
        metavar="FILE",
        help="the sidecar's config (YAML) [$LEPTON_SIDECAR_CONFIG]",
    )
    p.add_argument(
        "--instance-address",
        default=os.environ.get("LEPTON_INSTANCE_ADDRESS"),
        metavar="ADDRESS",
        help="the address registered for this instance, overriding instance.address "
        "(Kubernetes: the pod IP) [$LEPTON_INSTANCE_ADDRESS]",
    )


def _cmd_sidecar(args: argparse.Namespace) -> int:
    cfg = _sidecar_config(args)
    from lepton_mesh.proxy.sidecar import run

    try:
        return run(cfg)
    except OSError as exc:  # a listener could not bind: say which, exit before serving
        print(f"lepton-mesh sidecar: cannot listen: {exc}", file=sys.stderr)
        return 1


def _cmd_run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("lepton-mesh run: give the app's command after `--`", file=sys.stderr)
        return 2
    cfg = _sidecar_config(args)
    from lepton_mesh.runner import run

    return run(cfg, command, ready_timeout=args.ready_timeout, proxy_env=not args.no_proxy_env)


def _seconds(text: str) -> float:
    """`60`, `500ms`, `2m` -> seconds (argparse type): more than 0, at most a day."""
    from lepton_mesh.policy.fields import to_seconds

    seconds = to_seconds(text)
    if seconds is None or not 0 < seconds <= 86400:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use a duration like 500ms, 60s or 2m, more than 0 and at most 24h"
        )
    return seconds


_MAX_INTEGER = 2**63 - 1  # what the admin API (JSON, orjson) takes as an integer


def _integer(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer from `lo` to 2**63 - 1."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if not lo <= value <= _MAX_INTEGER:
            raise argparse.ArgumentTypeError(
                f"expected an integer from {lo} to {_MAX_INTEGER}, found {text!r}"
            )
        return value

    return parse


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


# --- policy as code: validate, diff, apply, get, history, rollback, login, token ----------
#
# Exit codes (docs/cli.md): 0 ok; 1 diff found changes; 2 invalid input (files,
# flags, or the server's 400/404/410/413); 3 server or connection error; 4
# authentication (no token, 401, 403); 5 conflict (409: someone applied first).


def _cmd_validate(args: argparse.Namespace) -> int:
    from lepton_mesh.policy.file_set import read_files
    from lepton_mesh.policy.manifest_set import resulting_set

    files, problems = read_files(args.paths)
    bad = {p.file for p in problems}
    manifests: list[Any] = []
    for file in files:
        if not file.sidecar_config:
            manifests += file.docs
        elif found := _sidecar_problems(file.path, start_files=not args.config_only):
            problems += found  # some may be in the policy files it names
            bad.add(file.path)
    if manifests:
        # All manifests as one set, as an apply of these files would store them.
        try:
            resulting_set({}, manifests)
        except ConfigError as err:
            problems += err.problems
            bad.update(p.file for p in err.problems)
    for problem in problems:
        print(problem, file=sys.stderr)
    for file in files:
        if file.path not in bad:
            print(f"{file.path}: ok")
    if bad:
        print(f"{len(bad)} file(s) with problems", file=sys.stderr)
    return 2 if bad else 0


def _sidecar_problems(path: str, *, start_files: bool) -> list[Any]:
    """What `lepton-mesh sidecar --config PATH` would refuse before serving: the
    config, the policy files it names, and (`start_files`) the files it reads
    when it is made (tls.cert, tls.key, tls.bundle, control.ca_bundle), by the
    sidecar's own code."""
    from lepton_mesh.policy.sidecar_loader import load_sidecar_config

    try:
        cfg = load_sidecar_config(path)
        if start_files:
            from lepton_mesh.proxy.sidecar import Sidecar

            Sidecar(cfg)
    except ConfigError as err:
        return list(err.problems)
    return []


_PRUNE_NOTHING = (
    "prune with no manifests would delete every policy: refusing "
    "(to clear them all, roll back to revision 0)"
)


def _read_bundle(
    paths: Sequence[str], *, prune: bool
) -> tuple[list[dict[str, str]], list[tuple[str, str, str]]]:
    """The files to send (YAML text, so the server's problems name file and line)
    and the objects they hold. Problems `validate` finds without the live state
    (YAML syntax, unreadable folders, empty files) stop here, offline; sidecar
    configs are left out, with a note."""
    from lepton_mesh.cli_client import EXIT_INVALID
    from lepton_mesh.policy.file_set import read_files
    from lepton_mesh.policy.manifest_set import identity

    files, problems = read_files(paths)
    if problems:
        raise ConfigError(problems)
    bundle: list[dict[str, str]] = []
    idents: list[tuple[str, str, str]] = []
    for file in files:
        if file.sidecar_config:
            print(f"{file.path}: skipped: a sidecar config, not policy manifests", file=sys.stderr)
            continue
        bundle.append({"name": file.path, "content": file.text})
        idents += [i for d in file.docs if (i := identity(d.data)) is not None]
    if prune and not bundle:
        # As the server refuses an apply: an empty folder is more likely a wrong path.
        raise ClientError(_PRUNE_NOTHING, EXIT_INVALID)
    return bundle, idents


def _client(args: argparse.Namespace) -> Any:
    from lepton_mesh.cli_client import AdminClient, resolve

    return AdminClient(resolve(args.server, args.token), timeout=args.timeout)


def _write(client: Any, path: str, body: dict[str, Any], *, dry_run: bool = False) -> Any:
    """POST a write; interrupted once sent, it may still land, and the user must know."""
    try:
        return client.request("POST", path, body=body)
    except KeyboardInterrupt:
        if not dry_run:
            print(
                "interrupted: the change may or may not have been written; "
                "check `lepton-mesh history` before you run this again",
                file=sys.stderr,
            )
        raise


def _label(change: dict[str, Any]) -> str:
    return f"{change['kind']}/{change['namespace']}/{change['name']}"


def _verb(change: dict[str, Any]) -> str:
    if change["op"] == "delete":
        return "deleted"
    return "created" if change["before"] is None else "configured"


def _yaml_text(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _print_diff(change: dict[str, Any], revision: int) -> None:
    import difflib

    before = _yaml_text(change["before"]).splitlines(keepends=True) if change["before"] else []
    after = _yaml_text(change["after"]).splitlines(keepends=True) if change["after"] else []
    label = _label(change)
    old = f"live/{label} (revision {revision})" if change["before"] else "/dev/null"
    new = f"new/{label}" if change["after"] else "/dev/null"
    sys.stdout.writelines(difflib.unified_diff(before, after, old, new))


def _cmd_diff(args: argparse.Namespace) -> int:
    from lepton_mesh.cli_client import EXIT_CHANGES

    client = _client(args)
    files, _ = _read_bundle(args.paths, prune=args.prune)
    result = client.request("POST", "/policies:diff", body={"files": files, "prune": args.prune})
    for change in result["changes"]:
        _print_diff(change, result["revision"])
    if not result["changes"]:
        print(f"no changes (policy revision {result['revision']})", file=sys.stderr)
        return 0
    print(f"{len(result['changes'])} object(s) would change", file=sys.stderr)
    return EXIT_CHANGES


def _print_changes(changes: list[dict[str, Any]], unchanged: Sequence[str] = ()) -> None:
    for change in changes:
        print(f"{_label(change)} {_verb(change)}")
    for label in unchanged:
        print(f"{label} unchanged")


def _cmd_apply(args: argparse.Namespace) -> int:
    client = _client(args)
    files, idents = _read_bundle(args.paths, prune=args.prune)
    body = {
        "files": files,
        "message": args.message,
        "dry_run": args.dry_run,
        "prune": args.prune,
    }
    if args.base_revision is not None:
        body["base_revision"] = args.base_revision
    result = _write(client, "/policies:apply", body, dry_run=args.dry_run)
    changed = {_label(c) for c in result["changes"]}
    _print_changes(result["changes"], [x for x in map("/".join, idents) if x not in changed])
    rev = result["revision"]
    if args.dry_run:
        print(f"dry run: {len(changed)} object(s) would change; nothing written (revision {rev})")
    elif changed:
        print(f"applied as policy revision {rev}")
    else:
        print(f"no changes: still policy revision {rev}")
    return 0


# Tables: what `get` prints per resource, as (header, how to get the cell).
def _ago(when: Any) -> str:
    import time

    if not isinstance(when, (int, float)):
        return "-"
    seconds = max(0, int(time.time() - when))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _in(when: Any) -> str:
    """How long until `when` (a Unix time): `in 17h`, or `expired 3m ago`."""
    import time

    if not isinstance(when, (int, float)):
        return "-"
    delta = when - time.time()
    return f"in {_ago(time.time() - delta)}" if delta >= 0 else f"expired {_ago(when)} ago"


def _labels(value: Any) -> str:
    if not isinstance(value, dict) or not value:
        return "-"
    return ",".join(f"{k}={v}" for k, v in sorted(value.items()))


def _instance_status(i: dict[str, Any]) -> str:
    if i.get("draining"):
        return "draining"
    return "healthy" if i.get("healthy", True) else "unhealthy"


def _policy_target(m: dict[str, Any]) -> str:
    spec = m.get("spec") or {}
    return str(spec.get("destination") or spec.get("service") or "-")


def _nack(s: dict[str, Any]) -> str:
    nack = s.get("last_nack")
    return f"v{nack.get('version')}: {nack.get('error')}" if isinstance(nack, dict) else "-"


_COLUMNS: dict[str, list[tuple[str, Callable[[dict[str, Any]], Any]]]] = {
    "services": [
        ("NAMESPACE", lambda s: s["namespace"]),
        ("NAME", lambda s: s["name"]),
        ("INSTANCES", lambda s: s["instances"]),
        ("HEALTHY", lambda s: s["healthy"]),
    ],
    "instances": [
        ("NAMESPACE", lambda i: i.get("namespace")),
        ("SERVICE", lambda i: i.get("service")),
        ("ID", lambda i: i.get("id")),
        ("ADDRESS", lambda i: i.get("address")),
        ("PORTS", lambda i: _labels(i.get("ports"))),
        ("LABELS", lambda i: _labels(i.get("labels"))),
        ("WEIGHT", lambda i: i.get("weight")),
        ("STATUS", _instance_status),
    ],
    "policies": [
        ("KIND", lambda m: m["kind"]),
        ("NAMESPACE", lambda m: m["metadata"].get("namespace", "default")),
        ("NAME", lambda m: m["metadata"]["name"]),
        ("FOR", _policy_target),
    ],
    "sidecars": [
        ("NODE", lambda s: s.get("node_id")),
        ("NAMESPACE", lambda s: s.get("namespace")),
        ("SERVICE", lambda s: s.get("service")),
        ("CONTROL", lambda s: s.get("control")),
        ("APPLIED", lambda s: s.get("applied_version")),
        ("LAST-SEEN", lambda s: _ago(s.get("last_seen"))),
        ("LAST-NACK", _nack),
        ("IDENTITY", lambda s: s.get("identity") or "-"),
        ("CERT-EXPIRES", lambda s: _in((s.get("certificate") or {}).get("not_after"))),
    ],
}


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns left-aligned, padded to the widest cell, three spaces apart (as kubectl)."""
    cells = [list(headers)] + [
        ["-" if c is None else _printable(str(c)) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _printable(text: str) -> str:
    """`text` with control and format characters escaped (`\\n`, `\\x1b`, `\\u202e`):
    a newline would split a row, an escape sequence would reach the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _output(data: Any, fmt: str, kind: str) -> None:
    import json

    if fmt == "json":
        print(json.dumps(data, indent=2))
    elif fmt == "yaml":
        print(_yaml_text(data), end="")
    else:
        items = data if isinstance(data, list) else [data]
        if not items:
            print("no resources found", file=sys.stderr)
            return
        columns = _COLUMNS[kind]
        print(_table([h for h, _ in columns], [[f(x) for _, f in columns] for x in items]))


def _cmd_get(args: argparse.Namespace) -> int:
    from lepton_mesh.cli_client import EXIT_INVALID, ClientError

    client, name, ns = _client(args), args.name, args.namespace
    query = {"namespace": ns}
    if args.resource == "services":
        if name:
            detail = client.request("GET", f"/services/{_quote(name)}", query=query)
            if args.output != "table":
                _output(detail, args.output, "services")
                return 0
            _output(detail, "table", "services")
            if detail.get("instance_list"):
                print()
                _output(detail["instance_list"], "table", "instances")
            return 0
        data = client.request("GET", "/services", query=query)["items"]
    elif args.resource == "instances":
        data = client.request("GET", "/instances", query=query | {"service": name})["items"]
    elif args.resource == "policies":
        data = client.request("GET", "/policies", query=query | {"kind": args.kind})["items"]
        if name:
            data = [m for m in data if m["metadata"]["name"] == name]
    else:
        data = client.request("GET", "/sidecars", query=query)["items"]
        if name:
            data = [s for s in data if name in (s.get("node_id"), s.get("service"))]
    if name and not data:
        raise ClientError(_nothing_named(args), EXIT_INVALID)
    _output(data, args.output, args.resource)
    return 0


def _nothing_named(args: argparse.Namespace) -> str:
    """What `get RESOURCE NAME` found nothing for, as the NAME is matched."""
    what = {
        "instances": f"no instances of service {args.name!r}",
        "policies": f"no {args.kind or 'policy'} named {args.name!r}",
        "sidecars": f"no sidecar with node id or service {args.name!r}",
    }[args.resource]
    return what + (f" in namespace {args.namespace!r}" if args.namespace else "")


def _quote(name: str) -> str:
    import urllib.parse

    return urllib.parse.quote(name, safe="")


def _when(t: Any) -> str:
    import datetime as dt

    if not isinstance(t, (int, float)):
        return "-"
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _summary(record: dict[str, Any], width: int = 60) -> str:
    parts = [f"{c['op']} {_label(c)}" for c in record.get("changes", [])]
    text = ", ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


def _cmd_history(args: argparse.Namespace) -> int:
    query = {"name": args.name, "limit": args.limit}
    records = _client(args).request("GET", "/history", query=query)["items"]
    if args.output != "table":
        _output(records, args.output, "history")
        return 0
    if not records:
        print("no history", file=sys.stderr)
        return 0
    rows = []
    for r in records:
        message = r.get("message") or ""
        if r.get("rollback_of") is not None and f"rollback to {r['rollback_of']}" not in message:
            message = f"{message} (rollback to {r['rollback_of']})".strip()
        rows.append(
            [r["revision"], _when(r.get("time")), r.get("who"), message or "-", _summary(r)]
        )
    print(_table(["REVISION", "TIME", "WHO", "MESSAGE", "CHANGES"], rows))
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    body = {"revision": args.revision, "message": args.message}
    result = _write(_client(args), "/rollback", body)
    _print_changes(result["changes"])
    if result["changes"]:
        print(f"rolled back to policy revision {args.revision} as revision {result['revision']}")
    else:
        print(f"no changes: policy revision {result['revision']} is already that state")
    return 0


def _cmd_login(args: argparse.Namespace) -> int:
    from lepton_mesh.cli_client import AdminClient, Settings, check_url, config_path, save_config

    server = check_url(args.server, "--server")  # before saving what no command could use
    if not args.no_verify:
        settings = Settings(server, args.token, "--token")
        overview = AdminClient(settings, timeout=args.timeout).request("GET", "/overview")
        print(
            f"{server}: replica {overview.get('replica')}, policy revision "
            f"{overview.get('policy_revision')}"
        )
    path = config_path()
    save_config(path, server, args.token)
    print(f"saved the server and token to {path}")
    return 0


def _ttl(text: str) -> float:
    from lepton_mesh.policy.fields import to_seconds

    seconds = to_seconds(text)
    if seconds is None or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: use a duration like 30m, 24h or 3600")
    return seconds


def _cmd_token(args: argparse.Namespace) -> int:
    from lepton_mesh.control.auth import KeyFileError, TokenIssuer, init_key, load_key

    try:
        if args.token_command == "init-key":
            init_key(args.file)
            print(f"created {args.file} (EC P-256, mode 0600): keep it secret", file=sys.stderr)
            return 0
        if args.role == "join" and not args.service:
            raise ValueError("a join token needs --service (and --namespace, default 'default')")
        subject = args.subject or _default_subject(args)
        token = TokenIssuer(load_key(args.token_key)).create(
            subject=subject,
            role=args.role,
            ttl=args.ttl,
            service=args.service,
            namespace=args.namespace if args.role == "join" else None,
        )
    except KeyFileError as err:
        print(f"lepton-mesh token: {err}", file=sys.stderr)
        return err.exit_code
    except ValueError as err:
        print(f"lepton-mesh token: {err}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _default_subject(args: argparse.Namespace) -> str:
    if args.role == "join":
        return f"{args.namespace}/{args.service}"
    import getpass

    return getpass.getuser()


def _connection_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--server", metavar="URL", help="admin API (env LEPTON_SERVER, login)")
    g.add_argument("--token", metavar="TOKEN", help="bearer token (env LEPTON_TOKEN, login)")
    g.add_argument("--timeout", type=_seconds, default=30.0, metavar="S", help="default 30")
    return p


def _add_policy_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    conn = _connection_flags()

    p = sub.add_parser(
        "validate",
        help="check files offline: sidecar configs and policy manifests (files or folders)",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument(
        "--config-only",
        action="store_true",
        help="sidecar configs without the certificate and CA files they name (CI, where "
        "those exist only where the sidecar runs)",
    )
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("diff", parents=[conn], help="show what applying PATH... would change")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--prune", action="store_true", help="also show deletes of other objects")
    p.set_defaults(func=_cmd_diff)

    p = sub.add_parser("apply", parents=[conn], help="apply policy files: all of them or nothing")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--dry-run", action="store_true", help="validate and show, write nothing")
    p.add_argument("-m", "--message", default="", help="why: kept in history")
    p.add_argument(
        "--base-revision", type=_integer(0), metavar="N", help="fail (exit 5) unless at N"
    )
    p.add_argument("--prune", action="store_true", help="delete stored objects not in PATH...")
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("get", parents=[conn], help="list services, instances, policies, sidecars")
    p.add_argument("resource", choices=("services", "instances", "policies", "sidecars"))
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.add_argument("-n", "--namespace", help="only this namespace")
    p.add_argument("--kind", choices=KINDS)
    p.set_defaults(func=_cmd_get)

    p = sub.add_parser("history", parents=[conn], help="policy changes, newest first")
    p.add_argument("name", nargs="?", metavar="NAME", help="only changes to objects so named")
    p.add_argument("--limit", type=_integer(1), default=50, metavar="N", help="default 50")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.set_defaults(func=_cmd_history)

    p = sub.add_parser("rollback", parents=[conn], help="restore the policies of a revision")
    p.add_argument("revision", type=_integer(0), metavar="REVISION")
    p.add_argument("-m", "--message", default="", help="why: kept in history")
    p.set_defaults(func=_cmd_rollback)

    p = sub.add_parser("login", help="save the admin API's URL and a token for later commands")
    p.add_argument("--server", required=True, metavar="URL")
    p.add_argument("--token", required=True, metavar="TOKEN")
    p.add_argument("--no-verify", action="store_true", help="save without asking the server")
    p.add_argument("--timeout", type=_seconds, default=10.0, metavar="S")
    p.set_defaults(func=_cmd_login)

    p = sub.add_parser("token", help="the admin token key, and tokens signed with it")
    tokens = p.add_subparsers(dest="token_command", required=True, metavar="STEP")
    t = tokens.add_parser("init-key", help="create the EC P-256 token key (mode 0600)")
    t.add_argument("file", metavar="FILE")
    t.set_defaults(func=_cmd_token)
    t = tokens.add_parser("create", help="print a token signed with --token-key")
    t.add_argument("--role", required=True, choices=("read", "admin", "join"))
    t.add_argument("--token-key", required=True, metavar="FILE")
    t.add_argument("--subject", help="who (default: your user name; join: NAMESPACE/SERVICE)")
    t.add_argument("--service", help="join tokens: the service the sidecar registers as")
    t.add_argument("--namespace", default="default", help="join tokens (default: default)")
    t.add_argument("--ttl", type=_ttl, default=_ttl("24h"), help="e.g. 30m, 24h (default 24h)")
    t.set_defaults(func=_cmd_token)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton-mesh", description="A service mesh you can run.")
    parser.add_argument("--version", action="version", version=f"lepton-mesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("sidecar", help="run a sidecar proxy next to one service instance")
    _add_sidecar_arguments(p)
    p.set_defaults(func=_cmd_sidecar)

    p = sub.add_parser(
        "run",
        help="start a sidecar, then the app once it is ready; exit with the app's exit code",
        usage="%(prog)s --config FILE [options] -- CMD [ARG...]",
    )
    _add_sidecar_arguments(p)
    p.add_argument(
        "--ready-timeout",
        type=_seconds,
        default=60.0,
        metavar="DURATION",
        help="exit 1 if the sidecar is not ready by then (default 60s)",
    )
    p.add_argument(
        "--no-proxy-env",
        action="store_true",
        help="do not set HTTP_PROXY/NO_PROXY for the app",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="run the example mesh end to end and print a summary")
    p.add_argument("--keep", action="store_true", help="leave the mesh running for exploration")
    p.set_defaults(func=_cmd_demo)

    from lepton_mesh.control.daemon import add_control_arguments

    p = sub.add_parser("control", help="run a control daemon replica (etcd-backed)")
    add_control_arguments(p)
    p.set_defaults(func=_cmd_control)

    _add_certs_parser(sub)
    _add_policy_parsers(sub)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills an optional positional (`get policies [NAME]`) with nothing as
    # soon as an option follows the first one, so a NAME after the options is left over.
    if len(extra) == 1 and not extra[0].startswith("-") and getattr(args, "name", "") is None:
        args.name = extra.pop()
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe is reported here, not as Python exits
        return code
    except ConfigError as err:
        print(err, file=sys.stderr)
        return err.exit_code
    except ClientError as err:
        print(f"lepton-mesh {args.command}: {err}", file=sys.stderr)
        for problem in err.problems:
            print(problem.get("text") or problem, file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lepton-mesh diff | head`: stdout closed early
        # Python would report the pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a command killed by SIGPIPE


if __name__ == "__main__":
    raise SystemExit(main())

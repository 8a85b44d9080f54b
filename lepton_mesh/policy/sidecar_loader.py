"""Turn a sidecar's YAML config (or the same shape as plain data) into a `SidecarConfig`.

Loading is kept apart from the model: `load_sidecar_config` reads a file,
`sidecar_config_from_mapping` validates plain data from any source (later the
control daemon's snapshots), and `sidecar_config_to_json` goes the other way
for the admin `/config` endpoint. The YAML shape is documented in
docs/sidecar-config.md.

`policies:` names Route and DestinationPolicy manifest files (relative to
the config file's folder) or holds manifests inline; they are validated
together by `traffic_loader` into `SidecarConfig.traffic`, and checked
against `services` (a route may only send to services this sidecar knows).
The request-security kinds among them for this sidecar's own service and
namespace become `SidecarConfig.security`; those for other services are
validated and ignored, as routes for services it does not call are.

`tls` turns on mTLS between sidecars (docs/security.md): its certificate,
key and bundle paths are resolved against the config file's folder and read
by the sidecar when it starts, not here. With `source: control` there are no
such files: the certificate comes over the control stream, which then needs
`control.ca_bundle` (so that the bootstrap is server-authenticated).

`dependencies`, `instance`, `control` and `health_check` are for a sidecar
fed by the control daemon (docs/control-plane.md): with `control` set, the
file's `services` and `policies` are the starting point and each snapshot
replaces them (`proxy/mesh/control_client.py` builds the new config through
`sidecar_config_from_mapping`, so a snapshot is validated exactly as a file).

Validation never stops at the first problem: every parser below records what
is wrong and returns None, the caller keeps the model's default, and one
`ConfigError` lists everything at the end. A config with any problem is never
returned, so the defaults substituted along the way are never seen.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from lepton_mesh.policy.endpoint_fields import (
    address_parser,
    endpoint_address,
    parse_endpoints,
    parse_protocol,
    valid_host,
)
from lepton_mesh.policy.errors import ConfigError, Path, Problem, format_path
from lepton_mesh.policy.fields import (
    Checker,
    Parser,
    check_mapping,
    choice,
    describe,
    duration,
    expected,
    integer,
    parse_boolean,
    parse_fields,
    parse_labels,
    parse_name,
    parse_string,
    section,
    size,
    string_entries,
)
from lepton_mesh.policy.security import SecurityPolicies
from lepton_mesh.policy.security_loader import security_to_manifests
from lepton_mesh.policy.sidecar_config import (
    TLS_MODES,
    TLS_SOURCES,
    AccessLogConfig,
    Address,
    ControlConfig,
    HealthCheckConfig,
    InstanceConfig,
    Limits,
    Listeners,
    PoolConfig,
    ServiceConfig,
    SidecarConfig,
    Timeouts,
    TlsConfig,
)
from lepton_mesh.policy.traffic import Route, TrafficPolicies
from lepton_mesh.policy.traffic_loader import collect_policies, traffic_to_manifests
from lepton_mesh.policy.yaml_source import Document, load_file

__all__ = ["load_sidecar_config", "sidecar_config_from_mapping", "sidecar_config_to_json"]


def load_sidecar_config(path: str | os.PathLike[str]) -> SidecarConfig:
    """Read and validate one sidecar config file. Raises `ConfigError`."""
    source = os.fspath(path)
    docs = load_file(path)
    if not docs:
        raise ConfigError.single(
            source,
            None,
            "",
            "the file is empty: expected a mapping with at least 'service' and 'app'",
        )
    extra: list[Problem] = []
    if len(docs) > 1:
        message = f"expected one YAML document, found {len(docs)}"
        extra.append(Problem(source, docs[1].line(), "", message))
    base_dir = os.path.dirname(os.path.abspath(source))
    return _build(docs[0].data, source, docs[0].lines, extra, base_dir)


def check_instance_address(text: str, source: str) -> str:
    """`text` as `instance.address` would accept it, from `source` (a flag, a variable);
    raises `ConfigError` naming `source` and the field."""
    problems: list[Problem] = []
    host = _host(Checker(source, {}, problems), text, ("instance", "address"))
    if host is None:
        raise ConfigError(problems)
    return host


def sidecar_config_from_mapping(
    data: Any,
    source: str,
    *,
    lines: Mapping[Path, int] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> SidecarConfig:
    """Validate plain data (dicts, lists, scalars) in the YAML shape.

    `source` names the origin in errors and in `SidecarConfig.source`;
    `lines`, when the data came from YAML, maps field paths to lines.
    Relative paths under `policies` resolve against `base_dir` (default:
    the current directory).
    """
    return _build(data, source, lines or {}, [], os.fspath(base_dir or os.curdir))


def _build(
    data: Any, source: str, lines: Mapping[Path, int], problems: list[Problem], base_dir: str
) -> SidecarConfig:
    c = Checker(source, lines, problems)
    cfg = _sidecar(c, data, base_dir)
    if problems or cfg is None:
        # This file first, then policy files in the order first seen.
        raise ConfigError.in_reading_order(problems, (source,))
    return cfg


# --- sections ---------------------------------------------------------------

_access_log_section = section(AccessLogConfig, {"enabled": parse_boolean})


def _access_log(c: Checker, value: Any, path: Path) -> AccessLogConfig | None:
    if isinstance(value, bool):  # short form: `access_log: false`
        return AccessLogConfig(enabled=value)
    if not isinstance(value, Mapping):
        expected(c, path, "true, false or a mapping", value)
        return None
    return _access_log_section(c, value, path)


# --- services and endpoints -------------------------------------------------

_SERVICE_FIELDS = ("protocol", "listen", "endpoints")
_listen_address = address_parser(port_zero_ok=True)
_weight = integer(1, 10_000)


def _services(c: Checker, value: Any, path: Path) -> Mapping[str, ServiceConfig] | None:
    if not isinstance(value, Mapping):
        expected(c, path, "a mapping of service name to service", value)
        return None
    out: dict[str, ServiceConfig] = {}
    for key, item in string_entries(c, value, path, "service names"):
        name = parse_name(c, key, (*path, key))
        svc = _service(c, name or "", item, (*path, key))
        if name is not None and svc is not None:
            out[name] = svc
    return MappingProxyType(out)


def _service(c: Checker, name: str, value: Any, path: Path) -> ServiceConfig | None:
    m = check_mapping(c, value, path, _SERVICE_FIELDS)
    if m is None:
        return None
    protocol = parse_protocol(c, m.get("protocol", "http"), (*path, "protocol")) or "http"
    listen = None
    if "listen" in m:
        listen = _listen_address(c, m["listen"], (*path, "listen"))
        if protocol == "http":
            c.error(
                (*path, "listen"),
                "only tcp services have 'listen'; http services are reached "
                "through listeners.outbound",
            )
    elif protocol == "tcp":
        c.error((*path, "listen"), "required for protocol tcp (the local address the app dials)")
    endpoints = parse_endpoints(c, m["endpoints"], (*path, "endpoints")) if "endpoints" in m else ()
    return ServiceConfig(name=name, protocol=protocol, endpoints=endpoints, listen=listen)


# --- a sidecar fed by control: dependencies, instance, control, health_check --

_WILDCARD = "*"


def _dependencies(c: Checker, value: Any, path: Path) -> tuple[str, ...] | None:
    """Service names, or `["*"]` alone: every service, as an explicit opt-in."""
    if not isinstance(value, (list, tuple)):
        expected(c, path, "a list of service names, or ['*'] for all", value)
        return None
    out: list[str] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        if item == _WILDCARD:
            if len(value) > 1:
                c.error((*path, i), "'*' means every service: list it alone")
                return None
            return (_WILDCARD,)
        name = parse_name(c, item, (*path, i))
        if name is None:
            continue
        if name in seen:
            c.error((*path, i), f"{name!r} is already listed at [{seen[name]}]")
            continue
        seen[name] = i
        out.append(name)
    return tuple(out)


# A DNS subdomain (as Kubernetes pod names are): it becomes part of etcd keys.
_INSTANCE_ID = re.compile(r"[a-z0-9]([-.a-z0-9]*[a-z0-9])?")


def _instance_id(c: Checker, value: Any, path: Path) -> str | None:
    text = parse_string(c, value, path)
    if text is None:
        return None
    if len(text) > 253 or not _INSTANCE_ID.fullmatch(text):
        c.error(
            path,
            f"invalid instance id {text!r}: use lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters",
        )
        return None
    return text


def _host(c: Checker, value: Any, path: Path) -> str | None:
    """A host callers can dial: an IP literal (IPv6 without brackets) or a DNS name."""
    text = parse_string(c, value, path)
    if text is None:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        if not valid_host(text):
            c.error(path, f"{text!r} is not an IP address or host name (no port here)")
            return None
        return text
    if ip.is_unspecified:
        c.error(path, f"{text!r} is a wildcard: give the address callers reach this instance at")
        return None
    return text


def _frozen_labels(c: Checker, value: Any, path: Path) -> Mapping[str, str] | None:
    labels = parse_labels(c, value, path)
    return None if labels is None else MappingProxyType(labels)


_instance_section = section(
    InstanceConfig,
    {"id": _instance_id, "address": _host, "labels": _frozen_labels, "weight": _weight},
)


def _file_path(c: Checker, value: Any, path: Path, base_dir: str, why: str = "") -> str | None:
    """A file's path, relative to the config file's folder (`base_dir`), made whole.

    Never empty: '' would name the folder itself. `why` follows the problem.
    """
    text = parse_string(c, value, path)
    if text == "":
        c.error(path, f"must not be empty{why}")
        return None
    return None if text is None else _resolve(base_dir, text)


def _resolve(base_dir: str, relative: str) -> str:
    return os.path.normpath(os.path.join(base_dir, relative))


_CONTROL_PATHS = {
    "state_dir": "leave it out to keep no state",
    "ca_bundle": "leave it out for a plaintext stream",
    "token_file": "leave it out to use $LEPTON_JOIN_TOKEN",
}


def _control(c: Checker, value: Any, base_dir: str) -> ControlConfig | None:
    """`addresses` (one at least, no repeats); `state_dir`, `ca_bundle` and
    `token_file` (paths relative to the file's folder)."""
    path: Path = ("control",)
    m = check_mapping(c, value, path, ("addresses", *_CONTROL_PATHS))
    if m is None:
        return None
    addresses = _control_addresses(c, m.get("addresses"), (*path, "addresses"))
    paths: dict[str, str] = {}
    for key, if_empty in _CONTROL_PATHS.items():
        if key in m:
            found = _file_path(c, m[key], (*path, key), base_dir, f" ({if_empty})")
            if found is not None:
                paths[key] = found
    if addresses is None:
        return None
    return ControlConfig(addresses=addresses, **paths)


def _control_addresses(c: Checker, value: Any, path: Path) -> tuple[Address, ...] | None:
    if value is None:
        c.error(path, "required field is missing: the control daemon's 'host:port' addresses")
        return None
    if not isinstance(value, (list, tuple)):
        expected(c, path, "a list of 'host:port' addresses", value)
        return None
    if not value:
        c.error(path, "must list at least one address")
        return None
    out: list[Address] = []
    seen: dict[Address, int] = {}
    for i, item in enumerate(value):
        address = endpoint_address(c, item, (*path, i))
        if address is None:
            continue
        if address in seen:
            c.error((*path, i), f"{address} is already listed at [{seen[address]}]")
            continue
        seen[address] = i
        out.append(address)
    return tuple(out) if len(out) == len(value) else None


_HEALTH_PATH = re.compile(r"/[!-~]*")  # printable ASCII, no spaces: goes on a request line


def _health_path(c: Checker, value: Any, path: Path) -> str | None:
    text = parse_string(c, value, path)
    if text is None:
        return None
    if not _HEALTH_PATH.fullmatch(text):
        c.error(path, f"expected a request path like '/healthz', found {text!r}")
        return None
    return text


_health_check_fields: dict[str, Parser] = {
    "path": _health_path,
    "interval": duration(zero_ok=False),
    "timeout": duration(zero_ok=False),
}


def _health_check(c: Checker, value: Any, path: Path) -> HealthCheckConfig | None:
    m = check_mapping(c, value, path, _health_check_fields)
    if m is None:
        return None
    hc = HealthCheckConfig(**parse_fields(c, m, path, _health_check_fields))
    if hc.timeout > hc.interval:
        c.error(
            (*path, "timeout"),
            f"must not exceed interval ({hc.interval:g}s), found {hc.timeout:g}s",
        )
    return hc


# --- tls: mTLS between sidecars ---------------------------------------------

_TLS_FILES = ("cert", "key", "bundle")
# The SPIFFE rule for trust domains (identity.spiffe, which this package may
# not import: it needs `cryptography`).
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")


def _trust_domain(c: Checker, value: Any, path: Path) -> str | None:
    td = parse_string(c, value, path)
    if td is not None and (not _TRUST_DOMAIN.fullmatch(td) or td.strip(".") != td):
        c.error(
            path,
            f"invalid trust domain {td!r}: use lowercase letters, digits, '.', '-' and '_', "
            "not starting or ending with '.'",
        )
        return None
    return td


_TLS_SETTINGS: dict[str, Parser] = {
    "source": choice(TLS_SOURCES, "files or control"),
    "mode": choice(TLS_MODES, "STRICT, PERMISSIVE or DISABLE"),
    "trust_domain": _trust_domain,
    "tcp_app": address_parser(port_zero_ok=False),
    "max_handshakes": integer(1, 65_536),
}


def _tls(c: Checker, value: Any, base_dir: str) -> TlsConfig | None:
    """The `tls` section: three files (relative to the file's folder) and settings.

    The files are not read here (loading is the sidecar's step, and a config
    rebuilt from a snapshot must not depend on the disk); the sidecar refuses
    to start when they cannot be read or do not belong together.
    """
    path: Path = ("tls",)
    m = check_mapping(c, value, path, (*_TLS_SETTINGS, *_TLS_FILES))
    if m is None:
        return None
    before = len(c.problems)
    from_control = m.get("source") == "control"
    files: dict[str, str] = {}
    for key in _TLS_FILES:
        if from_control:
            if key in m:
                m.pop(key)
                c.error(
                    (*path, key),
                    "not with source: control (the certificate and bundle come from control)",
                )
            continue
        if key not in m:
            c.error((*path, key), "required field is missing")
            continue
        found = _file_path(c, m.pop(key), (*path, key), base_dir)
        if found is not None:
            files[key] = found
    settings = parse_fields(c, m, path, _TLS_SETTINGS)
    return TlsConfig(**files, **settings) if len(c.problems) == before else None


# --- the top level ---------------------------------------------------------

_TOP_FIELDS: dict[str, Parser] = {
    "service": parse_name,
    "namespace": parse_name,
    "app": address_parser(port_zero_ok=False),
    "listeners": section(
        Listeners,
        {
            "outbound": _listen_address,
            "inbound": _listen_address,
            "admin": _listen_address,
        },
    ),
    "timeouts": section(
        Timeouts,
        {
            "connect": duration(zero_ok=False),
            "request": duration(zero_ok=True),  # 0: no overall timeout (long inference calls)
            "header_read": duration(zero_ok=False),
            "idle": duration(zero_ok=False),
            "drain": duration(zero_ok=False),
            "tcp_idle": duration(zero_ok=True),  # 0: L4 connections never time out idle
        },
    ),
    "limits": section(
        Limits,
        {
            "max_header_bytes": size(1024),
            "max_body_bytes": size(0),  # 0: no limit
            "max_connections": integer(1),
        },
    ),
    "pool": section(
        PoolConfig,
        {"max_per_endpoint": integer(1), "idle_timeout": duration(zero_ok=False)},
    ),
    "access_log": _access_log,
    "services": _services,
    "dependencies": _dependencies,
    "instance": _instance_section,
    "health_check": _health_check,
}
_REQUIRED = ("service", "app")
_ABSENT = object()
# `policies` reads files and `control` resolves a path against the file's
# folder, so both are parsed apart from the plain fields.
_ALLOWED = (
    *(k for k in _TOP_FIELDS if k not in ("dependencies", "instance", "health_check")),
    "policies",
    "dependencies",
    "instance",
    "control",
    "health_check",
    "tls",
)


def _sidecar(c: Checker, data: Any, base_dir: str) -> SidecarConfig | None:
    if not isinstance(data, Mapping):
        c.error((), f"expected a mapping at the top level, found {describe(data)}")
        return None
    m = check_mapping(c, data, (), _ALLOWED)
    assert m is not None
    for key in _REQUIRED:
        if key not in m:
            c.error((key,), "required field is missing")
    policies = m.pop("policies", None)
    control = m.pop("control", _ABSENT)  # `control:` with nothing under it is an error
    tls = m.pop("tls", _ABSENT)
    fields = parse_fields(c, m, (), _TOP_FIELDS)
    if control is not _ABSENT:
        fields["control"] = _control(c, control, base_dir)
    if tls is not _ABSENT:
        fields["tls"] = _tls(c, tls, base_dir)
    services = fields.get("services", {})
    listeners = fields.get("listeners", Listeners())
    _check_binds(c, fields.get("app"), listeners, services)
    if fields.get("tls") is not None and fields["tls"].tcp_app is not None:
        _check_not_ours(c, ("tls", "tcp_app"), fields["tls"].tcp_app, listeners, services)
    _check_tls_source(c, fields.get("tls"), fields.get("control"), control is not _ABSENT)
    if policies is not None:
        traffic, security = _policies(c, policies, base_dir)
        _check_routes_reach_services(c, traffic, services)
        fields["traffic"] = traffic
        # Only this sidecar's own service's: it enforces them on its inbound side.
        own = (fields.get("namespace", "default"), fields.get("service"))
        fields["security"] = security.get(own, SecurityPolicies())
    if c.problems:
        return None
    return SidecarConfig(**fields, source=c.source)


def _check_tls_source(
    c: Checker, tls: TlsConfig | None, control: ControlConfig | None, has_control: bool
) -> None:
    """A certificate from control needs a control stream that authenticates the
    control daemon (its bundle), or the bootstrap could be answered by anyone."""
    if tls is None or tls.source != "control" or (has_control and control is None):
        return  # no such source, or `control` is wrong already (reported)
    if control is None:
        c.error(("tls", "source"), "source: control needs a 'control' section")
    elif control.ca_bundle is None:
        c.error(
            ("control", "ca_bundle"),
            "required with tls.source: control: the roots to verify the control daemon with",
        )


# --- policies: Route and DestinationPolicy manifests -------------------------


def _policies(
    c: Checker, value: Any, base_dir: str
) -> tuple[TrafficPolicies, Mapping[tuple[str, str], SecurityPolicies]]:
    """Files (paths relative to `base_dir`) and inline manifests, validated as one set."""
    path: Path = ("policies",)
    if not isinstance(value, list):
        expected(c, path, "a list of policy file paths or manifests", value)
        return TrafficPolicies(), {}
    entries: list[tuple[Document, Path]] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        if isinstance(item, Mapping):
            entries.append((Document(c.source, item, c.lines), (*path, i)))
            continue
        if not isinstance(item, str) or not item:
            expected(c, (*path, i), "a policy file path or a manifest", item)
            continue
        full = _resolve(base_dir, item)
        if full in seen:
            c.error((*path, i), f"{item!r} is already listed at [{seen[full]}]")
            continue
        seen[full] = i
        if os.path.isdir(full):
            c.error((*path, i), f"{item!r} is a folder ({full}): list the policy files in it")
            continue
        if not os.path.exists(full):
            c.error((*path, i), f"policy file {item!r} not found (looked for {full})")
            continue
        try:
            entries.extend((doc, ()) for doc in load_file(full))
        except ConfigError as e:
            c.problems.extend(e.problems)
    return collect_policies(entries, c.problems)


def _check_routes_reach_services(
    c: Checker, traffic: TrafficPolicies, services: Mapping[str, ServiceConfig]
) -> None:
    """Routes for services this sidecar calls may only send to services it knows.

    Routes for other destinations are allowed (one policy set can serve
    every sidecar) and unused.
    """
    for dest, route in traffic.routes.items():
        svc = services.get(dest)
        if svc is None:
            continue
        if svc.protocol != "http":
            c.error(
                ("services", dest, "protocol"),
                f"Route {route.name!r} ({route.source}) routes {dest!r}, but routes apply "
                f"to HTTP calls and {dest!r} is {svc.protocol}",
            )
            continue
        for target in _route_targets(route):
            known = services.get(target)
            if known is None or known.protocol != "http":
                why = "not in services" if known is None else f"a {known.protocol} service"
                c.error(
                    ("policies",),
                    f"Route {route.name!r} ({route.source}) sends {dest!r} calls to "
                    f"{target!r}, which is {why}",
                )


def _route_targets(route: Route) -> list[str]:
    """Every service a route's backends and mirrors name, each once, in order."""
    out: dict[str, None] = {}
    for rule in route.rules:
        for b in rule.backends:
            out[b.service] = None
        if rule.mirror is not None:
            out[rule.mirror.backend.service] = None
    return list(out)


# --- cross-field rules ------------------------------------------------------

_WILDCARDS = ("0.0.0.0", "::")


def _overlap(a: Address, b: Address) -> bool:
    """Would binding both fail? Same port, and same host or one is a wildcard."""
    if a.port != b.port or a.port == 0:
        return False
    return a.host == b.host or a.host in _WILDCARDS or b.host in _WILDCARDS


def _binds(
    listeners: Listeners, services: Mapping[str, ServiceConfig]
) -> list[tuple[Path, Address]]:
    """Every address the sidecar listens on, with the field that names it."""
    binds: list[tuple[Path, Address]] = [
        (("listeners", "outbound"), listeners.outbound),
        (("listeners", "inbound"), listeners.inbound),
        (("listeners", "admin"), listeners.admin),
    ]
    binds += [
        (("services", name, "listen"), svc.listen)
        for name, svc in services.items()
        if svc.protocol == "tcp" and svc.listen is not None
    ]
    return binds


def _check_binds(
    c: Checker,
    app: Address | None,
    listeners: Listeners,
    services: Mapping[str, ServiceConfig],
) -> None:
    """Every address the sidecar listens on is distinct; the app is none of them."""
    binds = _binds(listeners, services)
    for i, (path, address) in enumerate(binds):
        for other_path, other in binds[:i]:
            if _overlap(address, other):
                c.error(
                    path,
                    f"{address} conflicts with {format_path(other_path)} ({other}): "
                    "two listeners cannot bind the same port",
                )
                break
    if app is not None:
        _check_not_ours(c, ("app",), app, listeners, services)


def _check_not_ours(
    c: Checker,
    path: Path,
    target: Address,
    listeners: Listeners,
    services: Mapping[str, ServiceConfig],
) -> None:
    """A local address the sidecar forwards to is not one it listens on."""
    for bind_path, address in _binds(listeners, services):
        if _overlap(target, address):
            c.error(
                path,
                f"{target} is also {format_path(bind_path)}: the sidecar would forward to itself",
            )
            break


# --- back to data, for the admin /config endpoint --------------------------


def sidecar_config_to_json(cfg: SidecarConfig) -> dict[str, Any]:
    """The active config as JSON-able data: addresses as 'host:port', durations in seconds.

    Written field by field on purpose: a secret added to the model later (a
    key path, a token) must not appear here unless someone decides it should.
    The result, minus `source`, is accepted by `sidecar_config_from_mapping`
    (routes and destination policies come back with their own `source`
    naming the new origin).
    """
    out = {
        "source": cfg.source,
        "service": cfg.service,
        "namespace": cfg.namespace,
        "app": str(cfg.app),
        "listeners": {
            "outbound": str(cfg.listeners.outbound),
            "inbound": str(cfg.listeners.inbound),
            "admin": str(cfg.listeners.admin),
        },
        "timeouts": {
            "connect": cfg.timeouts.connect,
            "request": cfg.timeouts.request,
            "header_read": cfg.timeouts.header_read,
            "idle": cfg.timeouts.idle,
            "drain": cfg.timeouts.drain,
            "tcp_idle": cfg.timeouts.tcp_idle,
        },
        "limits": {
            "max_header_bytes": cfg.limits.max_header_bytes,
            "max_body_bytes": cfg.limits.max_body_bytes,
            "max_connections": cfg.limits.max_connections,
        },
        "pool": {
            "max_per_endpoint": cfg.pool.max_per_endpoint,
            "idle_timeout": cfg.pool.idle_timeout,
        },
        "access_log": {"enabled": cfg.access_log.enabled},
        "services": {name: _service_json(svc) for name, svc in cfg.services.items()},
    } | _policies_json(cfg.traffic, cfg.security)
    return out | _control_json(cfg)


def _control_json(cfg: SidecarConfig) -> dict[str, Any]:
    """The keys of a sidecar fed by control; each absent while it has its default."""
    out: dict[str, Any] = {}
    if cfg.dependencies:
        out["dependencies"] = list(cfg.dependencies)
    inst = cfg.instance
    if inst != InstanceConfig():
        out["instance"] = {
            k: v
            for k, v in (
                ("id", inst.id),
                ("address", inst.address),
                ("labels", dict(inst.labels)),
                ("weight", inst.weight),
            )
            if v is not None
        }
    if cfg.control is not None:
        out["control"] = {"addresses": [str(a) for a in cfg.control.addresses]}
        for key in _CONTROL_PATHS:
            value = getattr(cfg.control, key)
            if value is not None:
                out["control"][key] = value
    if cfg.health_check is not None:
        hc = cfg.health_check
        out["health_check"] = {"path": hc.path, "interval": hc.interval, "timeout": hc.timeout}
    if cfg.tls is not None:
        out["tls"] = _tls_json(cfg.tls)
    return out


def _tls_json(tls: TlsConfig) -> dict[str, Any]:
    """File paths, never file contents: the key's path is config, its bytes are not."""
    out: dict[str, Any] = {
        "source": tls.source,
        "mode": tls.mode,
        "trust_domain": tls.trust_domain,
        **{key: getattr(tls, key) for key in _TLS_FILES if getattr(tls, key) is not None},
        "max_handshakes": tls.max_handshakes,
    }
    if tls.tcp_app is not None:
        out["tcp_app"] = str(tls.tcp_app)
    return out


def _policies_json(traffic: TrafficPolicies, security: SecurityPolicies) -> dict[str, Any]:
    """The traffic and security policies as inline manifests; absent when there are none."""
    manifests = traffic_to_manifests(traffic) + security_to_manifests(security)
    return {"policies": manifests} if manifests else {}


def _service_json(svc: ServiceConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"protocol": svc.protocol}
    if svc.listen is not None:
        out["listen"] = str(svc.listen)
    out["endpoints"] = [
        {
            "address": str(ep.address),
            "weight": ep.weight,
            "labels": dict(ep.labels),
            "healthy": ep.healthy,
        }
        for ep in svc.endpoints
    ]
    return out

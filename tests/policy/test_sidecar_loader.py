"""Sidecar config loading: the YAML contract, every validation rule, the JSON view."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest

from lepton_mesh.policy.errors import ConfigError
from lepton_mesh.policy.sidecar_config import (
    AccessLogConfig,
    Address,
    Endpoint,
    Limits,
    Listeners,
    PoolConfig,
    ServiceConfig,
    SidecarConfig,
    Timeouts,
)
from lepton_mesh.policy.sidecar_loader import (
    load_sidecar_config,
    sidecar_config_from_mapping,
    sidecar_config_to_json,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "sidecar"


def load_text(tmp_path: Path, text: str) -> SidecarConfig:
    path = tmp_path / "sidecar.yaml"
    path.write_text(textwrap.dedent(text))
    return load_sidecar_config(path)


def problems_of(tmp_path: Path, text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert all(p.file == str(tmp_path / "sidecar.yaml") for p in info.value.problems)
    return [(p.path, p.line, p.message) for p in info.value.problems]


FULL = """\
service: chat
namespace: team-a
app: 127.0.0.1:8080
listeners:
  outbound: 127.0.0.1:25001
  inbound: "[::]:25006"
  admin: localhost:0
timeouts: {connect: 250ms, request: 0, header_read: 1m30s, idle: 1h, drain: 2.5}
limits: {max_header_bytes: 32KiB, max_body_bytes: 500KB, max_connections: 100}
pool: {max_per_endpoint: 8, idle_timeout: 90}
access_log: false
services:
  intent:
    endpoints:
      - 127.0.0.1:15106
      - {address: "[::1]:15206", weight: 2, labels: {version: v2, zone: z1}, healthy: false}
  chat:
    endpoints: []
  redis:
    protocol: tcp
    listen: 127.0.0.1:16379
    endpoints: [redis.internal:6379]
"""

FULL_CONFIG = SidecarConfig(
    service="chat",
    namespace="team-a",
    app=Address("127.0.0.1", 8080),
    listeners=Listeners(
        outbound=Address("127.0.0.1", 25001),
        inbound=Address("::", 25006),
        admin=Address("localhost", 0),
    ),
    timeouts=Timeouts(connect=0.25, request=0.0, header_read=90.0, idle=3600.0, drain=2.5),
    limits=Limits(max_header_bytes=32768, max_body_bytes=500_000, max_connections=100),
    pool=PoolConfig(max_per_endpoint=8, idle_timeout=90.0),
    access_log=AccessLogConfig(enabled=False),
    services=MappingProxyType(
        {
            "intent": ServiceConfig(
                name="intent",
                endpoints=(
                    Endpoint(Address("127.0.0.1", 15106)),
                    Endpoint(
                        Address("::1", 15206),
                        weight=2,
                        labels=MappingProxyType({"version": "v2", "zone": "z1"}),
                        healthy=False,
                    ),
                ),
            ),
            "chat": ServiceConfig(name="chat"),
            "redis": ServiceConfig(
                name="redis",
                protocol="tcp",
                listen=Address("127.0.0.1", 16379),
                endpoints=(Endpoint(Address("redis.internal", 6379)),),
            ),
        }
    ),
)


def test_full_config_loads_into_the_exact_model(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, FULL)
    assert cfg == dataclasses.replace(FULL_CONFIG, source=str(tmp_path / "sidecar.yaml"))
    assert list(cfg.services) == ["intent", "chat", "redis"]  # file order is kept


def test_loaded_config_is_immutable(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, FULL)
    with pytest.raises(TypeError):
        cfg.services["x"] = ServiceConfig(name="x")  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.services["intent"].endpoints[1].labels["zone"] = "z2"  # type: ignore[index]


def test_minimal_config_takes_the_model_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "service: chat\napp: localhost:8080\n")
    assert cfg == SidecarConfig(
        service="chat", app=Address("localhost", 8080), source=str(tmp_path / "sidecar.yaml")
    )


VALID = [
    ("duration_units", "timeouts: {connect: 1s, idle: 5m, drain: 1h, header_read: 100ms}",
     lambda c: c.timeouts == Timeouts(connect=1.0, idle=300.0, drain=3600.0, header_read=0.1)),
    ("duration_bare_and_string_numbers", "timeouts: {connect: 0.5, idle: '30'}",
     lambda c: (c.timeouts.connect, c.timeouts.idle) == (0.5, 30.0)),
    ("request_timeout_zero", "timeouts: {request: 0s}", lambda c: c.timeouts.request == 0.0),
    ("size_units", "limits: {max_header_bytes: 1KiB, max_body_bytes: 1GiB}",
     lambda c: (c.limits.max_header_bytes, c.limits.max_body_bytes) == (1024, 1 << 30)),
    ("size_decimal_units", "limits: {max_header_bytes: 2 MB, max_body_bytes: 1000}",
     lambda c: (c.limits.max_header_bytes, c.limits.max_body_bytes) == (2_000_000, 1000)),
    ("access_log_short_form_true", "access_log: true", lambda c: c.access_log.enabled),
    ("access_log_mapping", "access_log: {enabled: false}", lambda c: not c.access_log.enabled),
    ("ipv6_app", "listeners: {outbound: '[::1]:0'}",
     lambda c: c.listeners.outbound == Address("::1", 0)),
    ("listener_port_zero_twice", "listeners: {outbound: 127.0.0.1:0, admin: 127.0.0.1:0}",
     lambda c: c.listeners.admin.port == 0),
    ("tcp_listen_port_zero", "services: {db: {protocol: tcp, listen: 127.0.0.1:0}}",
     lambda c: c.services["db"].listen == Address("127.0.0.1", 0)),
    ("service_without_endpoints", "services: {intent: {}}",
     lambda c: c.services["intent"] == ServiceConfig(name="intent")),
    ("service_named_like_self", "services: {chat: {endpoints: [10.0.0.1:80]}}",
     lambda c: c.services["chat"].endpoints[0].address == Address("10.0.0.1", 80)),
    ("weight_bounds", "services: {a: {endpoints: [{address: a:1, weight: 1}, {address: a:2, weight: 10000}]}}",
     lambda c: [e.weight for e in c.services["a"].endpoints] == [1, 10000]),
]  # fmt: skip


@pytest.mark.parametrize(("snippet", "check"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_variants(tmp_path: Path, snippet: str, check) -> None:
    cfg = load_text(tmp_path, "service: chat\napp: 127.0.0.1:8080\n" + snippet + "\n")
    assert check(cfg)


# Every rule, one row each: (id, yaml, [(path, line, message substring), ...]).
# Rows list *all* expected problems, so a rule that fires twice or drags a
# spurious second problem along fails too.
BASE = "service: chat\napp: 127.0.0.1:8080\n"  # lines 1-2 of most rows

INVALID = [
    # --- the file as a whole
    ("empty_file", "", [("", None, "the file is empty")]),
    ("comments_only", "# nothing here\n", [("", None, "the file is empty")]),
    ("top_level_list", "- service: chat\n", [("", 1, "expected a mapping at the top level, found a list")]),
    ("top_level_scalar", "chat\n", [("", 1, "found string 'chat'")]),
    ("two_documents", BASE + "---\nservice: other\n", [("", 4, "expected one YAML document, found 2")]),
    ("syntax_error", BASE + "listeners: {outbound: 1.2.3.4:5\nnext: 1\n",
     [("", 4, "invalid YAML: did not find expected ',' or '}'")]),
    ("bad_indentation", "service: chat\n  app: x:1\n", [("", 2, "mapping values are not allowed")]),
    ("unquoted_ipv6", "service: chat\napp: [::1]:80\n", [("", 2, "invalid YAML")]),
    ("duplicate_top_key", BASE + "service: other\n", [("service", 3, "duplicate key (first set at line 1)")]),
    ("duplicate_nested_key", BASE + "timeouts:\n  connect: 1s\n  connect: 2s\n",
     [("timeouts.connect", 5, "duplicate key (first set at line 4)")]),
    # --- required fields, names, unknown fields
    ("missing_service_and_app", "namespace: default\n",
     [("service", 1, "required field is missing"), ("app", 1, "required field is missing")]),
    ("service_uppercase", "service: Chat\napp: 127.0.0.1:8080\n", [("service", 1, "invalid name 'Chat'")]),
    ("service_leading_dash", "service: -chat\napp: 127.0.0.1:8080\n", [("service", 1, "invalid name '-chat'")]),
    ("service_too_long", f"service: {'a' * 64}\napp: 127.0.0.1:8080\n", [("service", 1, "at most 63 characters")]),
    ("service_integer", "service: 123\napp: 127.0.0.1:8080\n",
     [("service", 1, "expected a string, found integer 123 (quote it")]),
    ("namespace_bad", BASE + "namespace: team_a\n", [("namespace", 3, "invalid name 'team_a'")]),
    ("unknown_top_key_close", BASE + "timeout: {connect: 1s}\n",
     [("timeout", 3, "unknown field 'timeout' (did you mean 'timeouts'?)")]),
    ("unknown_top_key_far", BASE + "zzz: 1\n", [("zzz", 3, "unknown field 'zzz'; expected one of: service, ")]),
    ("non_string_key", BASE + "1: one\n", [("", 3, "field names must be strings, found integer 1")]),
    # --- addresses
    ("app_missing_port", "service: chat\napp: 127.0.0.1\n", [("app", 2, "missing ':port'")]),
    ("app_port_zero", "service: chat\napp: 127.0.0.1:0\n", [("app", 2, "port must be between 1 and 65535, found 0")]),
    ("app_port_too_big", "service: chat\napp: 127.0.0.1:65536\n", [("app", 2, "between 1 and 65535, found 65536")]),
    ("app_port_not_number", "service: chat\napp: localhost:http\n", [("app", 2, "port 'http' is not a number")]),
    ("app_integer", "service: chat\napp: 8080\n", [("app", 2, "expected an address 'host:port', found integer 8080")]),
    ("app_bare_ipv6", "service: chat\napp: '::1:8080'\n", [("app", 2, "put IPv6 addresses in brackets")]),
    ("app_bad_ipv6", "service: chat\napp: '[fe::zz]:80'\n", [("app", 2, "'fe::zz' is not an IPv6 address")]),
    ("app_bad_ipv4", "service: chat\napp: 127.0.0.300:80\n", [("app", 2, "'127.0.0.300' is not an IPv4 address or host name")]),
    ("app_bad_host", "service: chat\napp: my_host:80\n", [("app", 2, "'my_host' is not an IPv4")]),
    ("app_list", "service: chat\napp: [127.0.0.1, 80]\n", [("app", 2, "expected an address 'host:port', found a list")]),
    # --- listeners
    ("listeners_not_mapping", BASE + "listeners: [127.0.0.1:1]\n", [("listeners", 3, "expected a mapping, found a list")]),
    ("listeners_null", BASE + "listeners:\n", [("listeners", 3, "expected a mapping, found null")]),
    ("listener_typo", BASE + "listeners:\n  outbund: 127.0.0.1:1\n",
     [("listeners.outbund", 4, "did you mean 'outbound'?")]),
    ("listener_port_too_big", BASE + "listeners: {admin: 127.0.0.1:99999}\n",
     [("listeners.admin", 3, "port must be between 0 and 65535")]),
    ("listeners_same_address", BASE + "listeners:\n  outbound: 127.0.0.1:7000\n  admin: 127.0.0.1:7000\n",
     [("listeners.admin", 5, "127.0.0.1:7000 conflicts with listeners.outbound (127.0.0.1:7000)")]),
    ("listener_vs_wildcard", BASE + "listeners:\n  inbound: 0.0.0.0:7000\n  admin: 127.0.0.1:7000\n",
     [("listeners.admin", 5, "conflicts with listeners.inbound (0.0.0.0:7000)")]),
    ("tcp_listen_vs_listener", BASE + "services:\n  db:\n    protocol: tcp\n    listen: 127.0.0.1:15000\n",
     [("services.db.listen", 6, "conflicts with listeners.admin (127.0.0.1:15000)")]),
    ("app_is_a_listener", "service: chat\napp: 127.0.0.1:15001\n",
     [("app", 2, "is also listeners.outbound: the sidecar would forward to itself")]),
    # --- timeouts
    ("connect_zero", BASE + "timeouts: {connect: 0}\n", [("timeouts.connect", 3, "must be greater than 0, found 0")]),
    ("idle_zero_string", BASE + "timeouts: {idle: 0s}\n", [("timeouts.idle", 3, "must be greater than 0, found 0s")]),
    ("request_negative", BASE + "timeouts: {request: -1}\n", [("timeouts.request", 3, "must be 0 or more, found -1")]),
    ("duration_bad_unit", BASE + "timeouts: {drain: 5 min}\n",
     [("timeouts.drain", 3, "expected a duration like '250ms', '1s', '5m', '1m30s' or a number of seconds, found string '5 min'")]),
    ("duration_boolean", BASE + "timeouts: {drain: true}\n", [("timeouts.drain", 3, "found boolean true")]),
    ("duration_infinite", BASE + "timeouts: {idle: .inf}\n", [("timeouts.idle", 3, "found infinity")]),
    ("timeouts_typo", BASE + "timeouts: {header_reads: 1s}\n", [("timeouts.header_reads", 3, "did you mean 'header_read'?")]),
    # --- limits and pool
    ("header_limit_too_small", BASE + "limits: {max_header_bytes: 512}\n",
     [("limits.max_header_bytes", 3, "must be at least 1024 bytes, found 512")]),
    ("size_bad_unit", BASE + "limits: {max_body_bytes: 64k}\n",
     [("limits.max_body_bytes", 3, "expected a size in bytes like 65536, '64KiB', '10MiB' or '500KB', found string '64k'")]),
    ("size_negative", BASE + "limits: {max_body_bytes: -1}\n", [("limits.max_body_bytes", 3, "at least 0 bytes, found -1")]),
    ("max_connections_zero", BASE + "limits: {max_connections: 0}\n", [("limits.max_connections", 3, "must be at least 1, found 0")]),
    ("max_connections_string", BASE + "limits: {max_connections: '10'}\n",
     [("limits.max_connections", 3, "expected an integer, found string '10'")]),
    ("pool_zero", BASE + "pool: {max_per_endpoint: 0, idle_timeout: 0}\n",
     [("pool.max_per_endpoint", 3, "at least 1"), ("pool.idle_timeout", 3, "greater than 0")]),
    # --- access log
    ("access_log_string", BASE + "access_log: verbose\n",
     [("access_log", 3, "expected true, false or a mapping, found string 'verbose'")]),
    ("access_log_enabled_int", BASE + "access_log: {enabled: 1}\n",
     [("access_log.enabled", 3, "expected true or false, found integer 1")]),
    ("access_log_typo", BASE + "access_log: {enable: true}\n", [("access_log.enable", 3, "did you mean 'enabled'?")]),
    # --- services
    ("services_list", BASE + "services: [intent]\n", [("services", 3, "expected a mapping of service name to service, found a list")]),
    ("service_name_bad", BASE + "services:\n  Intent: {}\n", [("services.Intent", 4, "invalid name 'Intent'")]),
    ("service_name_number", BASE + "services:\n  42: {}\n", [("services", 4, "service names must be strings, found integer 42")]),
    ("service_null", BASE + "services:\n  intent:\n", [("services.intent", 4, "expected a mapping, found null")]),
    ("service_typo", BASE + "services:\n  intent:\n    endpoint: []\n",
     [("services.intent.endpoint", 5, "unknown field 'endpoint' (did you mean 'endpoints'?)")]),
    ("protocol_unknown", BASE + "services:\n  intent: {protocol: grpc}\n",
     [("services.intent.protocol", 4, "expected 'http' or 'tcp', found string 'grpc'")]),
    ("protocol_case", BASE + "services:\n  intent: {protocol: HTTP}\n",
     [("services.intent.protocol", 4, "(did you mean 'http'?)")]),
    ("tcp_without_listen", BASE + "services:\n  redis:\n    protocol: tcp\n",
     [("services.redis.listen", 4, "required for protocol tcp")]),
    ("http_with_listen", BASE + "services:\n  intent:\n    listen: 127.0.0.1:7000\n",
     [("services.intent.listen", 5, "only tcp services have 'listen'")]),
    ("endpoints_string", BASE + "services:\n  intent:\n    endpoints: 127.0.0.1:80\n",
     [("services.intent.endpoints", 5, "expected a list of endpoints, found string '127.0.0.1:80'")]),
    ("endpoints_null", BASE + "services:\n  intent:\n    endpoints:\n",
     [("services.intent.endpoints", 5, "expected a list of endpoints, found null")]),
    ("endpoint_integer", BASE + "services:\n  intent:\n    endpoints:\n      - 8080\n",
     [("services.intent.endpoints[0]", 6, "expected 'host:port' or a mapping with 'address', found integer 8080")]),
    ("endpoint_port_zero", BASE + "services:\n  intent:\n    endpoints:\n      - 127.0.0.1:1\n      - 127.0.0.1:0\n",
     [("services.intent.endpoints[1]", 7, "port must be between 1 and 65535, found 0")]),
    ("endpoint_missing_address", BASE + "services:\n  intent:\n    endpoints:\n      - {weight: 2}\n",
     [("services.intent.endpoints[0].address", 6, "required field is missing")]),
    ("endpoint_mapping_port_zero", BASE + "services:\n  intent:\n    endpoints:\n      - a:1\n      - address: 127.0.0.1:0\n",
     [("services.intent.endpoints[1].address", 7, "port must be between 1 and 65535")]),
    ("weight_zero", BASE + "services:\n  a:\n    endpoints:\n      - {address: a:1, weight: 0}\n",
     [("services.a.endpoints[0].weight", 6, "must be between 1 and 10000, found 0")]),
    ("weight_too_big", BASE + "services:\n  a:\n    endpoints:\n      - {address: a:1, weight: 10001}\n",
     [("services.a.endpoints[0].weight", 6, "found 10001")]),
    ("weight_string", BASE + "services:\n  a:\n    endpoints:\n      - {address: a:1, weight: '2'}\n",
     [("services.a.endpoints[0].weight", 6, "expected an integer, found string '2'")]),
    ("weight_boolean", BASE + "services:\n  a:\n    endpoints:\n      - {address: a:1, weight: true}\n",
     [("services.a.endpoints[0].weight", 6, "expected an integer, found boolean true")]),
    ("labels_list", BASE + "services:\n  a:\n    endpoints:\n      - {address: a:1, labels: [v2]}\n",
     [("services.a.endpoints[0].labels", 6, "expected a mapping of label to value, found a list")]),
    ("label_value_number", BASE + "services:\n  a:\n    endpoints:\n      - address: a:1\n        labels:\n          version: 2\n",
     [("services.a.endpoints[0].labels.version", 8, "expected a string, found integer 2 (quote it")]),
    ("label_key_number", BASE + "services:\n  a:\n    endpoints:\n      - address: a:1\n        labels: {1: x}\n",
     [("services.a.endpoints[0].labels", 7, "label names must be strings, found integer 1")]),
    ("healthy_string", BASE + "services:\n  a:\n    endpoints:\n      - {address: a:1, healthy: 'true'}\n",
     [("services.a.endpoints[0].healthy", 6, "expected true or false, found string 'true'")]),
    ("endpoint_typo", BASE + "services:\n  a:\n    endpoints:\n      - {address: a:1, wieght: 2}\n",
     [("services.a.endpoints[0].wieght", 6, "did you mean 'weight'?")]),
    ("endpoint_duplicate", BASE + "services:\n  a:\n    endpoints:\n      - 10.0.0.1:80\n      - {address: 10.0.0.1:80}\n",
     [("services.a.endpoints[1]", 7, "duplicate endpoint 10.0.0.1:80 (also at [0])")]),
    # --- several problems at once, reported in line order
    ("many_at_once",
     "service: Chat\n"
     "app: 127.0.0.1\n"
     "timeouts: {connect: 0}\n"
     "limits: {max_header_bytes: 10}\n"
     "services:\n"
     "  intent:\n"
     "    endpoints:\n"
     "      - 127.0.0.1:15106\n"
     "      - {address: 127.0.0.1:0, weight: 2}\n"
     "  redis: {protocol: tcp}\n"
     "acess_log: false\n",
     [("service", 1, "invalid name"),
      ("app", 2, "missing ':port'"),
      ("timeouts.connect", 3, "greater than 0"),
      ("limits.max_header_bytes", 4, "at least 1024"),
      ("services.intent.endpoints[1].address", 9, "port must be between 1 and 65535"),
      ("services.redis.listen", 10, "required for protocol tcp"),
      ("acess_log", 11, "did you mean 'access_log'?")]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_configs(
    tmp_path: Path, text: str, expected: list[tuple[str, int | None, str]]
) -> None:
    found = problems_of(tmp_path, text)
    assert len(found) == len(expected), found
    for (path, line, message), (want_path, want_line, want_text) in zip(
        found, expected, strict=True
    ):
        assert (path, line) == (want_path, want_line), found
        assert want_text in message, found


def test_error_text_names_file_line_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "service: chat\napp: x:0\nbogus: 1\n")
    f = tmp_path / "sidecar.yaml"
    assert str(info.value) == (
        f"{f}:2: app: invalid address 'x:0': port must be between 1 and 65535, found 0\n"
        f"{f}:3: bogus: unknown field 'bogus'; expected one of: service, namespace, app, "
        "listeners, timeouts, limits, pool, access_log, services, policies, dependencies, instance, control, health_check, tls"
    )
    assert info.value.exit_code == 2


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_sidecar_config(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory"


def test_from_mapping_without_lines() -> None:
    with pytest.raises(ConfigError) as info:
        sidecar_config_from_mapping({"service": "chat", "app": "a:1", "pool": []}, "snapshot 7")
    assert str(info.value) == "snapshot 7: pool: expected a mapping, found a list"
    # Any Mapping will do, not only dict: snapshots may arrive read-only.
    data = MappingProxyType(
        {"service": "chat", "app": "a:1", "services": {"x": {"endpoints": ("b:2",)}}}
    )
    cfg = sidecar_config_from_mapping(data, "snapshot 8")
    assert cfg == SidecarConfig(
        service="chat",
        app=Address("a", 1),
        services=MappingProxyType(
            {"x": ServiceConfig("x", endpoints=(Endpoint(Address("b", 2)),))}
        ),
        source="snapshot 8",
    )


def test_to_json_is_literal() -> None:
    assert sidecar_config_to_json(FULL_CONFIG) == {
        "source": "<memory>",
        "service": "chat",
        "namespace": "team-a",
        "app": "127.0.0.1:8080",
        "listeners": {"outbound": "127.0.0.1:25001", "inbound": "[::]:25006", "admin": "localhost:0"},
        "timeouts": {"connect": 0.25, "request": 0.0, "header_read": 90.0, "idle": 3600.0, "drain": 2.5, "tcp_idle": 3600.0},
        "limits": {"max_header_bytes": 32768, "max_body_bytes": 500000, "max_connections": 100},
        "pool": {"max_per_endpoint": 8, "idle_timeout": 90.0},
        "access_log": {"enabled": False},
        "services": {
            "intent": {
                "protocol": "http",
                "endpoints": [
                    {"address": "127.0.0.1:15106", "weight": 1, "labels": {}, "healthy": True},
                    {"address": "[::1]:15206", "weight": 2, "labels": {"version": "v2", "zone": "z1"}, "healthy": False},
                ],
            },
            "chat": {"protocol": "http", "endpoints": []},
            "redis": {
                "protocol": "tcp",
                "listen": "127.0.0.1:16379",
                "endpoints": [{"address": "redis.internal:6379", "weight": 1, "labels": {}, "healthy": True}],
            },
        },
    }  # fmt: skip


def test_to_json_round_trips_through_from_mapping() -> None:
    data = sidecar_config_to_json(FULL_CONFIG)
    source = data.pop("source")
    assert sidecar_config_from_mapping(data, source) == FULL_CONFIG


@pytest.mark.parametrize("name", ["chat", "intent"])
def test_examples_load(name: str) -> None:
    cfg = load_sidecar_config(EXAMPLES / f"{name}.yaml")
    assert cfg.service == name


def test_chat_example_calls_the_intent_example() -> None:
    chat = load_sidecar_config(EXAMPLES / "chat.yaml")
    intent = load_sidecar_config(EXAMPLES / "intent.yaml")
    addresses = [ep.address for ep in chat.services["intent"].endpoints]
    assert intent.listeners.inbound in addresses
    assert chat.services["redis"].protocol == "tcp"


def test_reference_doc_example_loads(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "sidecar-config.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = load_text(tmp_path, example)
    assert (cfg.service, list(cfg.services)) == ("chat", ["intent", "redis"])

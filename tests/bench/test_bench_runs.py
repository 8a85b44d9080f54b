"""The helpers of the failover and propagation runs: policies, shares, the simulated sidecars.

Nothing here times anything: the figures come from `python -m bench`.
"""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
import yaml

from bench import control, meshclients, report, runs, sidecar
from bench.harness import RunResult
from bench.procs import peak_rss_mb, rss_mb
from lepton_mesh import meshproto as mp
from lepton_mesh.control.auth import TokenVerifier
from lepton_mesh.policy.sidecar_loader import sidecar_config_from_mapping
from lepton_mesh.policy.traffic_loader import traffic_from_documents
from lepton_mesh.policy.yaml_source import load_documents


def test_the_failover_sidecar_config_is_what_the_loader_accepts():
    spec = sidecar.SidecarSpec(
        "sidecar-failover",
        "bench-client",
        8001,
        {"upstream": [8001, 8002, 8003]},
        sidecar.SidecarPorts(9001, 9002, 9003),
        policies=[runs.failover_policy("upstream")],
    )
    cfg = sidecar_config_from_mapping(sidecar.config(spec), "bench")
    policy = cfg.traffic.destinations["upstream"]
    assert policy.retry.attempts == 3
    assert set(policy.retry.retry_on) == {"connect-failure", "reset", "gateway-error"}
    assert policy.outlier.consecutive_gateway_errors == 2


@pytest.mark.parametrize(
    ("summary", "expected"),
    [
        ({"dispatched": 40000, "failed": 0}, 0.0),
        ({"dispatched": 40000, "failed": 40}, 0.001),
        ({"dispatched": 0, "failed": 0}, 1.0),  # nothing sent is no evidence of success
    ],
)
def test_failed_share(summary, expected):
    assert runs.failed_share(summary) == expected


def test_ejections_read_from_clusters():
    clusters = {
        "clusters": {
            "upstream": {
                "ejections_total": 1,
                "retry_budget": {"retries_total": 7, "exhausted_total": 0},
                "endpoints": [{"ejected": True}, {"ejected": False}, {"ejected": False}],
            }
        }
    }
    assert runs._ejections(clusters, "upstream") == {
        "ejections_total": 1,
        "ejected_now": 1,
        "retries_total": 7,
        "retry_budget_exhausted_total": 0,
    }
    assert runs._ejections({}, "upstream")["ejected_now"] == 0


# --- the simulated sidecars ---------------------------------------------------------


def test_the_bench_route_is_valid_and_its_marker_reads_back():
    manifest = meshclients.route("round-3")
    traffic = traffic_from_documents(load_documents(yaml.safe_dump(manifest), "bench.yaml"))
    assert list(traffic.routes) == ["svc-x"]
    assert meshclients.route_marker([manifest]) == "round-3"


@pytest.mark.parametrize(
    "policies",
    [
        [],
        [{"kind": "DestinationPolicy", "spec": {"service": "svc-x"}}],
        [{"kind": "Route", "spec": {"destination": "other", "rules": []}}],
        [{"kind": "Route", "spec": {"destination": "svc-x", "rules": [{"name": "r"}]}}],
    ],
)
def test_no_marker_without_the_route(policies):
    assert meshclients.route_marker(policies) is None


@pytest.mark.parametrize(
    ("services", "expected"),
    [
        ({}, 0),
        ({"churn": {"endpoints": []}}, 0),
        ({"churn": {"endpoints": [{"address": "a:1"}, {"address": "b:1"}]}}, 2),
    ],
)
def test_endpoint_count(services, expected):
    assert meshclients.endpoint_count(services, "churn") == expected


def test_latency_summary_in_ms():
    assert meshclients.latency_summary([0.003, 0.001, 0.002], "x_") == {
        "x_p50_ms": 2.0,
        "x_p90_ms": 3.0,
        "x_p99_ms": 3.0,
        "x_max_ms": 3.0,
    }
    assert meshclients.latency_summary([])["max_ms"] == 0.0


def test_hello_frame_decodes_as_a_hello():
    decoder = mp.FrameDecoder()
    decoder.feed(meshclients.hello("bench-7", "bench-c7", 1032, ("svc-x",)))
    msg = decoder.next_message()
    assert isinstance(msg, mp.Hello)
    assert (msg.node_id, msg.service, msg.dependencies, dict(msg.instance.ports)) == (
        "bench-7",
        "bench-c7",
        ("svc-x",),
        {"http": 1032},
    )


class _FakeControl(asyncio.Protocol):
    """Answers a hello with welcome and a snapshot carrying the bench route; records acks."""

    acks: list[int]

    def connection_made(self, transport):
        self.transport = transport
        self.decoder = mp.FrameDecoder()

    def data_received(self, data):
        self.decoder.feed(data)
        while (msg := self.decoder.next_message()) is not None:
            if isinstance(msg, mp.Hello):
                self.transport.write(mp.encode(mp.Welcome("fake")))
                snap = mp.Snapshot(
                    7,
                    {"churn": {"protocol": "http", "endpoints": [{"address": "127.0.0.1:1"}]}},
                    (meshclients.route("round-1"),),
                )
                self.transport.write(mp.encode(snap))
            elif isinstance(msg, mp.Ack):
                type(self).acks.append(msg.version)


async def test_a_client_acks_its_snapshot_and_the_fleet_counts_it():
    _FakeControl.acks = []
    server = await asyncio.get_running_loop().create_server(_FakeControl, "127.0.0.1", 0)
    try:
        fleet = meshclients.Fleet("127.0.0.1", server.sockets[0].getsockname()[1])
        fleet.awaited = "round-1"
        frame = meshclients.hello("bench-0", "bench-c0", 1025, ("svc-x",))
        fleet.members = await fleet.connect_many([("bench-0", frame)], fleet.on_member_snapshot)
        observer, _ = await fleet.connect("obs", frame, fleet.on_observer_snapshot)
        client = fleet.members[0]
        assert (client.version, client.marker, fleet.marked, fleet.observed) == (
            7,
            "round-1",
            1,
            1,
        )
        async with asyncio.timeout(5):
            while len(_FakeControl.acks) < 2:
                await asyncio.sleep(0.01)
        assert _FakeControl.acks == [7, 7]
        assert fleet.errors() == []
        for c in (client, observer):
            c.transport.close()
    finally:
        server.close()
        await server.wait_closed()


# --- the control plane and the report ---------------------------------------------------


def test_admin_token_is_private_and_verifies(tmp_path):
    key_file, token_file = control.make_admin_token(tmp_path / "control")
    for f in (key_file, token_file):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    claims = TokenVerifier.from_key_file(key_file).verify(token_file.read_text())
    assert (claims.subject, claims.role) == ("bench", "admin")


def test_peak_rss_is_at_least_the_current_rss():
    assert peak_rss_mb(os.getpid()) >= rss_mb(os.getpid()) > 1


@pytest.mark.parametrize(
    ("extra", "run", "verdict"),
    [
        ({"failed_share": 0.0004}, "failover", "met"),
        ({"failed_share": 0.002}, "failover", "MISSED"),
        ({"max_ms": 80.0}, "propagation_1000", "met"),
        ({"max_ms": 1200.0}, "propagation_1000", "MISSED"),
        ({"max_ms": 999.0}, "propagation_100", "met"),
    ],
)
def test_control_and_failover_targets(extra, run, verdict):
    results = {run: RunResult(run, "control", extra=extra)}
    (target,) = [t for t in report.TARGETS if t.run == run]
    assert target.check(results)[1] == verdict

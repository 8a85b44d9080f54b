"""The control daemon's /metrics (lepton_mesh/control/metrics.py): a real daemon on a real
etcd, sidecars as meshproto peers, scraped over HTTP without a token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from obsdeploy_mesh import Peer, admin_address, http_get, scrape, start_control, wait_for
from prometheus_client.parser import text_string_to_metric_families

from lepton_mesh.control.daemon import ControlDaemon
from lepton_mesh.control.etcd_local import LocalEtcd
from lepton_mesh.control.metrics import AckRow, ControlMetrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
async def daemon(etcd_private: LocalEtcd) -> AsyncIterator[ControlDaemon]:
    d = await start_control(list(etcd_private.endpoints))
    yield d
    await d.stop()


async def test_metrics_need_no_token_while_the_api_still_does(daemon: ControlDaemon) -> None:
    address = admin_address(daemon)
    reply = await http_get(address, "/metrics")
    assert reply.status == 200
    text = reply.body.decode()
    assert value(text, "lepton_control_info", replica="obs-1") == 1
    assert value(text, "lepton_control_etcd_up") == 1
    assert value(text, "lepton_control_connected_sidecars") == 0
    assert value(text, "lepton_control_sidecars_not_acked") == 0
    assert value(text, "lepton_control_policy_revision") == daemon.ctx.policies.revision()
    # No --token-key: the API refuses everything, /metrics aside.
    assert (await http_get(address, "/api/v1/overview")).status == 503


async def test_a_sidecar_that_does_not_ack_is_counted_until_it_acks(daemon: ControlDaemon) -> None:
    address = admin_address(daemon)
    quiet = await Peer.join(daemon.listen_port, "ratings-1", "ratings")
    prompt = await Peer.join(daemon.listen_port, "reviews-1", "reviews")
    prompt.ack()
    try:
        text = ""

        async def one_behind() -> bool:
            nonlocal text
            text = await scrape(address)
            return value(text, "lepton_control_sidecars_not_acked") == 1

        await wait_for(one_behind, "exactly the quiet peer behind")
        assert value(text, "lepton_control_connected_sidecars") == 2
        lag = samples(text)
        lagging = [k for k in lag if k[0] == "lepton_control_sidecar_ack_lag_seconds"]
        assert lagging == [
            (
                "lepton_control_sidecar_ack_lag_seconds",
                (("namespace", "default"), ("node_id", "ratings-1"), ("service", "ratings")),
            )
        ]
        quiet.ack()

        async def none_behind() -> bool:
            nonlocal text
            text = await scrape(address)
            return value(text, "lepton_control_sidecars_not_acked") == 0

        await wait_for(none_behind, "the ack to count")
        assert "lepton_control_sidecar_ack_lag_seconds{" not in text
    finally:
        await quiet.close()
        await prompt.close()
    await wait_for(
        lambda: daemon.ctx.registry.local() == [], "both peers to leave the replica's registry"
    )
    assert value(await scrape(address), "lepton_control_connected_sidecars") == 0


async def test_a_single_replica_leads(daemon: ControlDaemon) -> None:
    async def leads() -> bool:
        return value(await scrape(admin_address(daemon)), "lepton_control_is_leader") == 1

    await wait_for(leads, "the only replica to lead")


async def test_etcd_up_follows_etcd(etcd_private: LocalEtcd, daemon: ControlDaemon) -> None:
    address = admin_address(daemon)

    async def etcd_up(expected: int) -> bool:
        return value(await scrape(address), "lepton_control_etcd_up") == expected

    assert await etcd_up(1)
    etcd_private.stop()
    await wait_for(lambda: etcd_up(0), "etcd_up 0 after etcd stopped", timeout=20)
    etcd_private.start()
    await wait_for(lambda: etcd_up(1), "etcd_up 1 after etcd came back", timeout=20)


# --- ack lag over time, with a clock the test moves -------------------------------------


@dataclass
class FakePush:
    rows: list[AckRow] = field(default_factory=list)

    def ack_rows(self) -> list[AckRow]:
        return self.rows


@dataclass
class FakeCtx:
    push: FakePush
    replica_id: str = "fake"


def _lag(metrics: ControlMetrics) -> dict[str, float]:
    text = metrics.render()[0].decode()
    return {
        s.labels["node_id"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "lepton_control_sidecar_ack_lag_seconds"
    }


def test_ack_lag_is_how_long_a_sidecar_has_been_behind_without_a_break() -> None:
    now = [100.0]
    push = FakePush()
    metrics = ControlMetrics(FakeCtx(push), clock=lambda: now[0])
    behind, caught_up = AckRow("a", "s", "ns", 7, 6), AckRow("a", "s", "ns", 7, 7)
    steps = [
        # (time, rows, lag by node after the scrape)
        (100.0, [behind], {"a": 0.0}),
        (130.0, [behind], {"a": 30.0}),
        (160.0, [AckRow("a", "s", "ns", 9, 6)], {"a": 60.0}),  # a newer version: still behind
        (170.0, [caught_up], {}),
        (200.0, [behind], {"a": 0.0}),  # behind again: counted from now
        (210.0, [], {}),  # gone
        (220.0, [AckRow("a", "s", "ns", 3, 5)], {}),  # ahead (acked a newer replica's): not behind
    ]
    for t, rows, expected in steps:
        now[0], push.rows = t, rows
        assert _lag(metrics) == expected, t


def test_a_context_without_components_still_scrapes() -> None:
    """A daemon still starting (or a test's fake) leaves out what it lacks, never fails."""
    text = ControlMetrics(object()).render()[0].decode()
    assert value(text, "lepton_control_info", replica="") == 1
    assert "# TYPE lepton_control_etcd_up gauge" in text
    assert value(text, "lepton_control_etcd_up") is None

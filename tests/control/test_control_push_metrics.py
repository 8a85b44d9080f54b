"""The push counters in the control daemon's /metrics (control/metrics.py): a real
daemon on a real etcd, sidecars as meshproto peers, /metrics scraped over HTTP from
the admin API and read with prometheus_client's parser."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from lepton_mesh import meshproto as mp
from lepton_mesh.control.daemon import ControlDaemon
from tests.control.conftest import Peer, Replicas, eventually, hello

COUNTERS = (
    "lepton_control_pushes_total",
    "lepton_control_push_builds_total",
    "lepton_control_nacks_total",
)

ROUTE = {
    "apiVersion": "lepton-mesh/v1",
    "kind": "Route",
    "metadata": {"name": "dialog", "namespace": "default"},
    "spec": {"destination": "dialog", "rules": [{"backends": [{"service": "dialog"}]}]},
}


async def counters(daemon: ControlDaemon) -> dict[str, float]:
    """The push counters, from one scrape of the admin API's /metrics."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{daemon.admin_port}/metrics") as reply,
    ):
        assert reply.status == 200
        text = await reply.text()
    found = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        if family.type == "counter"
        for s in family.samples
        if not s.labels  # no per-sidecar (or any) labels
    }
    return {name: found[name] for name in COUNTERS if name in found}


async def test_pushes_builds_and_nacks_are_counted(replicas: Replicas) -> None:
    daemon = await replicas(admin=("127.0.0.1", 0))
    push = daemon.ctx.push  # type: ignore[union-attr]
    # Two groups read `dialog`: three chat sidecars (one scope) and one intent
    # sidecar. The billing sidecar reads only `ledger`.
    chats = [
        await Peer.join(daemon.listen_port, hello("chat", f"chat-{i}", deps=("dialog",)))
        for i in range(3)
    ]
    intent = await Peer.join(daemon.listen_port, hello("intent", deps=("dialog",)))
    billing = await Peer.join(daemon.listen_port, hello("billing", deps=("ledger",)))
    subscribed = [*chats, intent]
    for peer in (*subscribed, billing):
        await peer.ping()
    await eventually(lambda: not push._dirty, what="no group left to build")

    before = await counters(daemon)
    assert set(before) == set(COUNTERS), before
    assert before["lepton_control_pushes_total"] >= 5  # every first snapshot
    assert before["lepton_control_nacks_total"] == 0

    await daemon.ctx.policies.apply([ROUTE], who="test", message="route dialog")  # type: ignore[union-attr]
    for peer in subscribed:
        await peer.next_snapshot(lambda s: len(s.policies) == 1)
    after = await counters(daemon)
    # One snapshot per subscribed sidecar; one build per group: coalescing shows as
    # builds rising by groups, pushes by sidecars.
    assert {name: after[name] - before[name] for name in COUNTERS} == {
        "lepton_control_pushes_total": 4,
        "lepton_control_push_builds_total": 2,
        "lepton_control_nacks_total": 0,
    }
    await billing.ping()
    assert len(billing.snapshots) == 1  # the route concerned none of its services

    snap = chats[0].snapshot
    assert snap is not None
    chats[0].send(mp.Nack(snap.version, "route dialog: unknown subset"))
    await chats[0].ping()  # answered after the NACK was handled
    nacked = await counters(daemon)
    assert nacked["lepton_control_nacks_total"] == 1
    assert nacked["lepton_control_pushes_total"] == after["lepton_control_pushes_total"]

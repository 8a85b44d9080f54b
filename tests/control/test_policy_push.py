"""Policies applied through the policy store reach exactly the sidecars they concern."""

from __future__ import annotations

import time

from lepton_mesh import meshproto as mp
from tests.control.conftest import Peer, Replicas, endpoints, eventually, hello


def route(split: int) -> dict:
    return {
        "apiVersion": "lepton-mesh/v1",
        "kind": "Route",
        "metadata": {"name": "dialog", "namespace": "default"},
        "spec": {
            "destination": "dialog",
            "rules": [
                {
                    "backends": [
                        {"service": "dialog", "subset": "v1", "weight": 100 - split},
                        {"service": "dialog", "subset": "v2", "weight": split},
                    ]
                }
            ],
        },
    }


SUBSETS = {
    "apiVersion": "lepton-mesh/v1",
    "kind": "DestinationPolicy",
    "metadata": {"name": "dialog", "namespace": "default"},
    "spec": {
        "service": "dialog",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    },
}


async def test_apply_reaches_callers_who_ack_and_others_get_nothing(replicas: Replicas) -> None:
    one, two = await replicas(), await replicas()
    assert one.ctx is not None
    callers = [
        await Peer.join(r.listen_port, hello("chat", f"chat-{i}", deps=("dialog",)))
        for i, r in enumerate((one, two, one))
    ]
    other = await Peer.join(one.listen_port, hello("intent", deps=("billing",)))
    for port, v in ((15006, "v1"), (15007, "v2")):  # two instances: two addresses
        peer = hello("dialog", f"dialog-{v}", port=port, labels={"version": v})
        await Peer.join(two.listen_port, peer)
    for peer in callers:
        await peer.next_snapshot(lambda s: len(endpoints(s, "dialog")) == 2)

    started = time.monotonic()
    result = await one.ctx.policies.apply([SUBSETS, route(10)], who="test", message="canary")
    for peer in callers:
        snap = await peer.next_snapshot(lambda s: len(s.policies) == 2)
        assert [p["kind"] for p in snap.policies] == ["DestinationPolicy", "Route"]
        assert snap.policies[1]["spec"] == route(10)["spec"]
        peer.send(mp.Ack(snap.version))
    print(f"apply -> 3 callers on 2 replicas have it: {(time.monotonic() - started) * 1000:.1f} ms")

    def acked() -> bool:
        rows = {s["node_id"]: s for s in one.ctx.registry.sidecars()}  # type: ignore[union-attr]
        return all(rows.get(f"chat-{i}", {}).get("applied_version", 0) > 0 for i in range(3))

    await eventually(acked, what="every caller's ack recorded")
    assert result["revision"] >= 1
    await other.ping()
    assert other.snapshot is not None and other.snapshot.policies == ()
    assert len(other.snapshots) == 1  # the policy concerned none of its services

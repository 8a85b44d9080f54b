"""etcd stops while sidecars are connected: they keep their streams and snapshots;
new registrations fail cleanly; when etcd is back, changes flow again."""

from __future__ import annotations

import time

from lepton_mesh import meshproto as mp
from lepton_mesh.control.etcd_local import LocalEtcd
from tests.control.conftest import Peer, Replicas, endpoints, eventually, hello


async def test_etcd_down_streams_stay_up_and_changes_flow_when_it_is_back(
    replicas: Replicas, control_etcd: LocalEtcd
) -> None:
    replica = await replicas(lease_ttl=10)
    assert replica.ctx is not None
    chat = await Peer.join(replica.listen_port, hello("chat", deps=("intent", "dialog")))
    intent = await Peer.join(replica.listen_port, hello("intent", "intent-1"))
    before = await chat.next_snapshot(lambda s: bool(endpoints(s, "intent")))

    control_etcd.stop()
    await eventually(lambda: not replica.ctx.cache.healthy, what="cache sees etcd down")  # type: ignore[union-attr]
    # Connected sidecars are still served: pings answered, snapshot unchanged.
    await chat.ping()
    await intent.ping()
    assert chat.snapshot == before
    # A change that cannot be written (health) stays pending, the stream stays up.
    intent.send(mp.Health(False))
    await intent.ping()
    # A new sidecar is refused with a reason it can retry on.
    newcomer = await Peer.connect(replica.listen_port, hello("dialog", "dialog-1"))
    msg = await newcomer.recv(timeout=15)
    assert isinstance(msg, mp.Error) and msg.reason == "store_unavailable", msg
    assert await newcomer.recv() is None

    restarted = time.monotonic()
    control_etcd.start()
    # The pending health change is written and pushed once etcd is back...
    snap = await chat.next_snapshot(
        lambda s: [ep["healthy"] for ep in endpoints(s, "intent")] == [False], timeout=15
    )
    print(f"etcd back -> pending change pushed: {time.monotonic() - restarted:.2f} s")
    assert snap.version > before.version
    # ... and new registrations work again.
    await Peer.join(replica.listen_port, hello("dialog", "dialog-1"))
    snap = await chat.next_snapshot(lambda s: bool(endpoints(s, "dialog")))
    assert len(endpoints(snap, "dialog")) == 1
    assert replica.ctx.cache.healthy


async def test_an_outage_longer_than_the_lease_ttl_re_registers_connected_sidecars(
    replicas: Replicas, control_etcd: LocalEtcd
) -> None:
    replica = await replicas(lease_ttl=2)
    assert replica.ctx is not None
    registry = replica.ctx.registry
    chat = await Peer.join(replica.listen_port, hello("chat", deps=("intent",)))
    await Peer.join(replica.listen_port, hello("intent", "intent-1"))
    await chat.next_snapshot(lambda s: bool(endpoints(s, "intent")))
    (reg,) = [r for r in registry.local() if r.node_id == "intent-1"]
    old_lease = reg.lease
    assert old_lease is not None

    control_etcd.stop()
    await eventually(lambda: not old_lease.alive, timeout=8, what="lease given up")
    control_etcd.start()

    async def registered_again() -> bool:
        kv = await replica.ctx.store.get("/lepton/v1/instances/default/intent/intent-1")  # type: ignore[union-attr]
        lease = reg.lease
        return kv is not None and lease is not old_lease and kv.lease == lease.id  # type: ignore[union-attr]

    # etcd may have kept the old lease across its restart; ours was given up
    # locally all the same, so the keys move to a new one, kept alive.
    await eventually(registered_again, timeout=15, what="re-registered under a new lease")
    assert reg.lease is not None and reg.lease.alive
    assert await replica.ctx.store.lease_ttl(old_lease.id) == -1  # the old one was revoked
    await chat.ping()
    if not endpoints(chat.snapshot, "intent"):  # type: ignore[arg-type]
        await chat.next_snapshot(lambda s: bool(endpoints(s, "intent")), timeout=10)

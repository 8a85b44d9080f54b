"""Store KV and transaction semantics against a real etcd."""

from __future__ import annotations

import pytest

from lepton_mesh.control.store import KV, Compare, Delete, Put, Store, StoreUnavailable
from tests.support.etcd import EtcdTarget


async def test_put_get_delete(etcd: EtcdTarget, etcd_store: Store) -> None:
    key = etcd.key("a")
    assert await etcd_store.get(key) is None
    rev1 = await etcd_store.put(key, b"one")
    rev2 = await etcd_store.put(key, b"two")
    assert rev2 == rev1 + 1
    kv = await etcd_store.get(key)
    assert kv == KV(key, b"two", mod_revision=rev2, create_revision=rev1, version=2, lease=0)
    assert await etcd_store.delete(key) == 1
    assert await etcd_store.delete(key) == 0
    assert await etcd_store.get(key) is None


async def test_get_prefix_is_one_revision_and_pages(etcd: EtcdTarget, etcd_store: Store) -> None:
    # 2,500 keys: three pages of 1,000, read at the first page's revision.
    for chunk in range(0, 2500, 100):
        await etcd_store.txn(
            [], [Put(etcd.key(f"k{i:05d}"), b"%d" % i) for i in range(chunk, chunk + 100)]
        )
    await etcd_store.put(etcd.prefix[:-1] + "x", b"outside")  # shares the prefix minus "/"
    kvs, revision = await etcd_store.get_prefix(etcd.prefix)
    assert [kv.key for kv in kvs] == [etcd.key(f"k{i:05d}") for i in range(2500)]
    assert revision == await etcd_store.revision() - 0
    assert await etcd_store.delete(etcd.prefix, prefix=True) == 2500


CASES = [
    # (compare on the existing key "a" = b"1" at revision R, expected succeeded)
    ("absent on missing key", lambda k, r: Compare.absent(k("missing")), True),
    ("absent on existing key", lambda k, r: Compare.absent(k("a")), False),
    ("mod at its revision", lambda k, r: Compare.mod(k("a"), r), True),
    ("mod at another revision", lambda k, r: Compare.mod(k("a"), r - 1), False),
    ("mod 0 on missing key", lambda k, r: Compare.mod(k("missing"), 0), True),
    ("value equal", lambda k, r: Compare.value_is(k("a"), b"1"), True),
    ("value differs", lambda k, r: Compare.value_is(k("a"), b"2"), False),
    ("value !=", lambda k, r: Compare(k("a"), "value", "!=", b"2"), True),
    ("version >", lambda k, r: Compare(k("a"), "version", ">", 0), True),
    ("version <", lambda k, r: Compare(k("a"), "version", "<", 1), False),
    ("create_revision <", lambda k, r: Compare(k("a"), "create_revision", "<", r + 1), True),
    ("mod_revision >", lambda k, r: Compare(k("a"), "mod_revision", ">", r), False),
]


@pytest.mark.parametrize(("name", "make", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_txn_compares(etcd: EtcdTarget, etcd_store: Store, name, make, expected) -> None:
    rev = await etcd_store.put(etcd.key("a"), b"1")
    result = await etcd_store.txn(
        [make(etcd.key, rev)], [Put(etcd.key("ok"), b"s")], [Put(etcd.key("ok"), b"f")]
    )
    assert result.succeeded is expected
    assert result.revision == rev + 1  # either branch wrote one key
    assert (await etcd_store.get(etcd.key("ok"))).value == (b"s" if expected else b"f")


async def test_txn_is_all_or_nothing_in_one_revision(etcd: EtcdTarget, etcd_store: Store) -> None:
    await etcd_store.put(etcd.key("old", "1"), b"x")
    await etcd_store.put(etcd.key("old", "2"), b"x")
    result = await etcd_store.txn(
        [Compare.absent(etcd.key("lock"))],
        [
            Put(etcd.key("lock"), b"me"),
            Put(etcd.key("n"), b"1"),
            Delete(etcd.key("old/"), prefix=True),
        ],
    )
    assert result.succeeded
    kvs, _ = await etcd_store.get_prefix(etcd.prefix)
    assert {kv.key: kv.mod_revision for kv in kvs} == {
        etcd.key("lock"): result.revision,
        etcd.key("n"): result.revision,
    }
    again = await etcd_store.txn([Compare.absent(etcd.key("lock"))], [Put(etcd.key("n"), b"2")])
    assert not again.succeeded
    assert (await etcd_store.get(etcd.key("n"))).value == b"1"


async def test_compare_operand_type_is_checked(etcd: EtcdTarget, etcd_store: Store) -> None:
    with pytest.raises(TypeError):
        await etcd_store.txn([Compare(etcd.key("a"), "value", "==", 1)], [])
    with pytest.raises(TypeError):
        await etcd_store.txn([Compare(etcd.key("a"), "version", "==", b"1")], [])


async def test_unreachable_etcd_is_store_unavailable_within_timeout(
    etcd_private,
) -> None:
    etcd_private.kill()
    store = await Store.connect(etcd_private.endpoints, timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.get("/x")
        assert info.value.status == 503 and info.value.reason == "store_unavailable"
        assert await store.ping() is False
        # A txn that never left (no connection at all) is unavailable, not unknown.
        with pytest.raises(StoreUnavailable):
            await store.txn([], [Put("/x", b"1")])
    finally:
        await store.close()

"""The change log: one record per write, the row as written, batching, acknowledgement and pruning."""

from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import localstore as ls

FIELDS: dict[str, ls.Field | type[ls.Field]] = {
    "k": ls.Text(),
    "n": ls.Integer(),
    "tags": ls.Json(),
    "flag": ls.Boolean(),
    "arr": ls.Array(),
    "vec": ls.Vector(3),
    "blob": ls.Blob(),
}


def _items(store: ls.Store) -> ls.Collection:
    return store.collection("items", key="k", fields=FIELDS)


def _all(store: ls.Store) -> list[ls.Change]:
    return store.changelog.changes(limit=1_000_000, max_bytes=1 << 40)


def _plain(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """A row with numpy arrays turned into (dtype, shape, list) so rows compare with ==."""
    if row is None:
        return None
    return {k: ((v.dtype.str, v.shape, v.tolist()) if isinstance(v, np.ndarray) else v) for k, v in row.items()}


def _assert_seq_and_hlc_strictly_increase(changes: list[ls.Change]) -> None:
    seqs = [c.seq for c in changes]
    hlcs = [c.hlc for c in changes]
    assert seqs == sorted(set(seqs))
    assert all(b > a for a, b in itertools.pairwise(hlcs)), hlcs


# -- one record per write ------------------------------------------------------------------------


def test_every_put_and_delete_appends_exactly_one_record(store: ls.Store) -> None:
    coll = _items(store)
    log = store.changelog
    assert (log.last_seq(), log.pending(), _all(store)) == (0, 0, [])
    coll.put({"k": "a", "n": 1})
    coll.put({"k": "a", "n": 2})
    assert coll.put_many([{"k": "b"}, {"k": "c"}, {"k": "b", "n": 3}]) == 3
    assert coll.delete("a") is True
    assert coll.delete("a") is False  # nothing deleted: nothing logged
    assert coll.delete_many(["b", "zz", "c"]) == 2
    with store.transaction():
        coll.put({"k": "d"})
        coll.delete("d")
    changes = _all(store)
    assert [(c.seq, c.op, c.key) for c in changes] == [
        (1, "put", "a"), (2, "put", "a"), (3, "put", "b"), (4, "put", "c"), (5, "put", "b"),
        (6, "delete", "a"), (7, "delete", "b"), (8, "delete", "c"), (9, "put", "d"), (10, "delete", "d"),
    ]
    assert all(c.collection == "items" for c in changes)
    _assert_seq_and_hlc_strictly_increase(changes)
    assert log.last_seq() == 10
    assert log.pending() == 10
    assert store.verify().ok


def test_hlc_is_close_to_wall_clock(store: ls.Store) -> None:
    wall_before = time.time_ns() // 1_000_000
    _items(store).put({"k": "a"})
    wall_after = time.time_ns() // 1_000_000
    (change,) = _all(store)
    # The HLC's millisecond part is the wall clock at write time, not a counter from zero
    # (a minute of slack either side: this checks the clock's meaning, not a duration).
    window = range(wall_before - 60_000, wall_after + 60_001)
    assert (change.hlc >> 16) in window


def test_hlc_strictly_increases_across_many_writes_and_reopen(store_path: Path) -> None:
    with ls.open(store_path) as s:
        coll = _items(s)
        coll.put_many([{"k": f"k{i}"} for i in range(300)])
        for i in range(50):
            coll.put({"k": f"k{i}", "n": i})
        coll.delete_many([f"k{i}" for i in range(0, 300, 7)])
    with ls.open(store_path) as s:
        s.collection("items").put({"k": "after-reopen"})
        changes = _all(s)
    assert len(changes) == 300 + 50 + len(range(0, 300, 7)) + 1
    assert [c.seq for c in changes] == list(range(1, len(changes) + 1))
    _assert_seq_and_hlc_strictly_increase(changes)


def test_integer_key_changes_carry_int_keys(store: ls.Store) -> None:
    coll = store.collection("nums", key="id", fields={"id": ls.Integer(), "v": ls.Text()})
    coll.put({"id": 2**63 - 1, "v": "x"})
    coll.delete(2**63 - 1)
    assert [(c.key, c.op) for c in _all(store)] == [(2**63 - 1, "put"), (2**63 - 1, "delete")]


# -- the payload is the row as written -------------------------------------------------------------


def test_payload_is_row_as_stored_at_that_time(store: ls.Store) -> None:
    coll = _items(store)
    first = {"k": "a", "n": 1, "tags": {"x": [1, 2]}, "flag": True, "arr": np.arange(6, dtype="<i4").reshape(2, 3),
             "vec": [1.0, 2.0, 3.0], "blob": b"\x00first"}
    coll.put(first)
    coll.put({"k": "a", "n": 2, "blob": b"second"})  # overwrite: record 1 must keep the first row
    coll.put({"k": "b", "n": 3})
    coll.delete("b")  # delete: record 3 must keep the row
    coll.put({"k": "a", "n": 4})
    changes = _all(store)
    assert [(c.seq, c.op, c.key) for c in changes] == [
        (1, "put", "a"), (2, "put", "a"), (3, "put", "b"), (4, "delete", "b"), (5, "put", "a"),
    ]
    decoded = [None if c.payload is None else _plain(coll.decode_payload(c.payload)) for c in changes]
    assert decoded[0] == _plain({**first, "vec": np.array([1.0, 2.0, 3.0], dtype="<f4")})
    assert decoded[1] == {"k": "a", "n": 2, "tags": None, "flag": None, "arr": None, "vec": None, "blob": b"second"}
    assert decoded[2] == {"k": "b", "n": 3, "tags": None, "flag": None, "arr": None, "vec": None, "blob": None}
    assert decoded[3] is None
    assert decoded[4] == {"k": "a", "n": 4, "tags": None, "flag": None, "arr": None, "vec": None, "blob": None}


def test_raw_payload_holds_stored_values(store: ls.Store) -> None:
    coll = _items(store)
    coll.put({"k": "a", "n": 7, "tags": [1], "flag": False, "vec": [0, 0, 1]})
    (change,) = _all(store)
    assert change.payload is not None
    assert change.payload["tags"] == "[1]"  # Json as its stored text
    assert change.payload["flag"] == 0  # Boolean as stored
    assert change.payload["vec"] == np.array([0, 0, 1], dtype="<f4").tobytes()
    assert change.size > 0


def test_payload_survives_overwrite_in_a_later_session(store_path: Path) -> None:
    with ls.open(store_path) as s:
        _items(s).put({"k": "a", "n": 1, "tags": ["v1"]})
    with ls.open(store_path) as s:
        coll = s.collection("items")
        coll.put({"k": "a", "n": 2})
        coll.put({"k": "a", "n": 3})
    with ls.open(store_path) as s:
        coll = s.collection("items")
        payloads = [coll.decode_payload(c.payload) for c in _all(s) if c.payload is not None]
        assert [(p["n"], p["tags"]) for p in payloads] == [(1, ["v1"]), (2, None), (3, None)]
        assert s.verify().ok


def test_payload_survives_overwrite_by_another_store_object(store_path: Path) -> None:
    with ls.open(store_path) as a, ls.open(store_path) as b:
        ca = _items(a)
        ca.put({"k": "a", "n": 1})
        b.collection("items").put({"k": "a", "n": 2})
        b.collection("items").delete("a")
        assert [(c.op, c.payload and c.payload["n"]) for c in _all(a)] == [("put", 1), ("put", 2), ("delete", None)]


def test_decode_payload_accepts_packed_bytes(store: ls.Store) -> None:
    coll = _items(store)
    coll.put({"k": "a", "tags": {"deep": {"x": 1}}, "arr": np.eye(2), "flag": True})
    (change,) = _all(store)
    assert change.payload is not None
    packed = msgpack.packb(change.payload, use_bin_type=True)
    row = coll.decode_payload(packed)
    assert row["tags"] == {"deep": {"x": 1}}
    assert row["flag"] is True
    assert isinstance(row["arr"], np.ndarray) and np.array_equal(row["arr"], np.eye(2))
    assert _plain(row) == _plain(coll.get("a"))


def test_payload_kept_after_collection_first_opened_in_rolled_back_transaction(store_path: Path) -> None:
    with ls.open(store_path) as s:
        _items(s).put({"k": "seed"})
    with ls.open(store_path) as s:
        with contextlib.suppress(RuntimeError), s.transaction():
            s.collection("items")
            raise RuntimeError
        coll = s.collection("items")
        coll.put({"k": "a", "n": 1})
        coll.put({"k": "a", "n": 2})
        assert [c.payload and c.payload["n"] for c in _all(s)] == [None, 1, 2]
        assert s.verify().ok


def test_payload_keeps_field_added_by_another_connection(store_path: Path) -> None:
    with ls.open(store_path) as a, ls.open(store_path) as b:
        a.collection("c", key="k", fields={"k": ls.Text(), "v": ls.Integer()})
        cb = b.collection("c")
        cb.put({"k": "x", "v": 0})
        ca = a.collection("c", key="k", fields={"k": ls.Text(), "v": ls.Integer(), "w": ls.Text()})
        ca.put({"k": "a", "v": 1, "w": "hello"})
        with pytest.raises(ls.ValidationError):
            cb.put({"k": "bad", "v": "not an int"})
        cb.put({"k": "a", "v": 2, "w": "bye"})
        payloads = [c.payload for c in _all(a)]
        assert payloads[1] == {"k": "a", "v": 1, "w": "hello"}


def test_payload_read_by_another_store_object_includes_added_field(store_path: Path) -> None:
    with ls.open(store_path) as a, ls.open(store_path) as b:
        a.collection("c", key="k", fields={"k": ls.Text()}).put({"k": "a"})
        assert [c.payload for c in b.changelog.changes()] == [{"k": "a"}]
        a.collection("c", key="k", fields={"k": ls.Text(), "x": ls.Integer()}).put({"k": "new", "x": 5})
        assert [c.payload for c in b.changelog.changes()][-1] == {"k": "new", "x": 5}


# -- sync=False ------------------------------------------------------------------------------------


def test_sync_false_collection_writes_no_records(store: ls.Store) -> None:
    logged = _items(store)
    scratch = store.collection("scratch", key="k", fields={"k": ls.Text(), "v": ls.Integer()}, sync=False)
    scratch.put({"k": "a", "v": 1})
    scratch.put_many([{"k": "b"}, {"k": "a", "v": 2}])
    scratch.delete("b")
    assert (store.changelog.last_seq(), store.changelog.pending(), _all(store)) == (0, 0, [])
    with store.transaction():
        scratch.put({"k": "c"})
        logged.put({"k": "x"})
        scratch.delete("a")
    assert [(c.seq, c.collection, c.key) for c in _all(store)] == [(1, "items", "x")]
    assert scratch.keys() == ["c"]
    assert store.verify().ok


# -- batching ----------------------------------------------------------------------------------------


def test_changes_after_and_limit(store: ls.Store) -> None:
    coll = _items(store)
    coll.put_many([{"k": f"k{i:02d}", "n": i} for i in range(25)])
    log = store.changelog
    assert [c.seq for c in log.changes(after=20)] == [21, 22, 23, 24, 25]
    assert log.changes(after=25) == []
    assert log.changes(after=1000) == []
    assert [c.seq for c in log.changes(limit=3)] == [1, 2, 3]
    assert [c.seq for c in log.changes(after=10, limit=2)] == [11, 12]
    # Paging with `after` walks the whole log exactly once.
    seen: list[int] = []
    after = 0
    while batch := log.changes(after=after, limit=7):
        seen += [c.seq for c in batch]
        after = batch[-1].seq
    assert seen == list(range(1, 26))


def test_changes_max_bytes_bounds_a_batch(store: ls.Store) -> None:
    coll = _items(store)
    coll.put_many([{"k": f"k{i}", "blob": bytes([i]) * 1000} for i in range(10)])
    coll.delete("k0")
    log = store.changelog
    sizes = [c.size for c in _all(store)]
    assert all(1000 < s < 1200 for s in sizes[:10]) and sizes[10] == 0
    two = log.changes(max_bytes=2 * sizes[0] + 10)
    assert [c.seq for c in two] == [1, 2]
    assert [c.seq for c in log.changes(max_bytes=1)] == [1]  # always at least one change
    assert [c.seq for c in log.changes(max_bytes=0)] == [1]
    assert len(log.changes(max_bytes=10**9)) == 11
    # Byte-bounded paging still returns everything, in order, once.
    seen: list[int] = []
    after = 0
    while batch := log.changes(after=after, max_bytes=3500):
        assert len(batch) == 1 or sum(c.size for c in batch) <= 3500
        seen += [c.seq for c in batch]
        after = batch[-1].seq
    assert seen == list(range(1, 12))


@pytest.mark.parametrize(("after", "limit"), [(-1, 10), (0, 0), (0, -5), ("0", 10), (0, 1.5)])
def test_changes_bad_arguments(store: ls.Store, after: Any, limit: Any) -> None:
    with pytest.raises(ls.ChangeLogError):
        store.changelog.changes(after=after, limit=limit)


# -- ack, pending, prune ------------------------------------------------------------------------------


def test_ack_moves_watermark_forward_only(store: ls.Store) -> None:
    coll = _items(store)
    coll.put_many([{"k": f"k{i}"} for i in range(5)])
    log = store.changelog
    assert log.watermark() == 0 and log.pending() == 5
    assert log.ack(3) == 3
    assert log.watermark() == 3 and log.pending() == 2
    assert log.ack(1) == 3  # older seq: no-op
    assert log.ack(3) == 3
    assert log.watermark() == 3
    assert log.ack(5) == 5
    assert log.pending() == 0
    coll.put({"k": "more"})
    assert log.pending() == 1
    assert [c.seq for c in log.changes(after=log.watermark())] == [6]


def test_ack_refuses_seq_beyond_last(store: ls.Store) -> None:
    _items(store).put_many([{"k": "a"}, {"k": "b"}])
    log = store.changelog
    log.ack(1)
    with pytest.raises(ls.ChangeLogError, match="3"):
        log.ack(3)
    assert log.watermark() == 1
    for bad in (-1, 1.0, "2", True, None):
        with pytest.raises(ls.ChangeLogError):
            log.ack(bad)  # type: ignore[arg-type]
    assert log.watermark() == 1


def test_ack_on_an_empty_log(store: ls.Store) -> None:
    assert store.changelog.ack(0) == 0
    with pytest.raises(ls.ChangeLogError):
        store.changelog.ack(1)


def test_prune_deletes_only_acknowledged_and_keeps_history(store: ls.Store) -> None:
    coll = _items(store)
    coll.put_many([{"k": f"k{i}", "n": i} for i in range(10)])
    log = store.changelog
    assert log.prune(keep=0) == 0  # nothing acknowledged yet
    log.ack(8)
    assert log.prune(keep=3) == 5
    assert [c.seq for c in _all(store)] == [6, 7, 8, 9, 10]
    assert log.pending() == 2
    assert log.prune(keep=3) == 0  # idempotent
    assert log.prune(keep=100) == 0
    assert log.prune(keep=0) == 3
    assert [c.seq for c in _all(store)] == [9, 10]
    assert log.last_seq() == 10
    assert store.verify().ok
    with pytest.raises(ls.ChangeLogError):
        log.prune(keep=-1)


def test_prune_then_reopen_never_reuses_seq_or_goes_back_in_time(store_path: Path) -> None:
    with ls.open(store_path) as s:
        coll = _items(s)
        coll.put_many([{"k": f"k{i}"} for i in range(6)])
        coll.delete("k0")
        old = _all(s)
        s.changelog.ack(7)
        assert s.changelog.prune(keep=0) == 7
        assert _all(s) == []
        assert s.changelog.last_seq() == 7
    with ls.open(store_path) as s:
        log = s.changelog
        assert log.last_seq() == 7
        assert log.watermark() == 7
        s.collection("items").put({"k": "new"})
        (new,) = _all(s)
        assert new.seq == 8
        assert new.hlc > max(c.hlc for c in old)
        assert log.last_seq() == 8
        assert s.verify().ok


def test_rolled_back_transaction_leaves_no_record(store: ls.Store) -> None:
    coll = _items(store)
    coll.put({"k": "a", "n": 1})
    with pytest.raises(ZeroDivisionError), store.transaction():
        coll.put({"k": "a", "n": 2})
        coll.put({"k": "b"})
        coll.delete("a")
        _ = 1 / 0
    changes = _all(store)
    assert [(c.seq, c.op, c.key) for c in changes] == [(1, "put", "a")]
    assert changes[0].payload is not None and changes[0].payload["n"] == 1
    assert store.changelog.last_seq() == 1
    coll.put({"k": "c"})
    assert [c.seq for c in _all(store)] == [1, 2]


def test_failed_write_leaves_no_record(store: ls.Store) -> None:
    coll = _items(store)
    coll.put({"k": "a"})
    with pytest.raises(ls.ValidationError):
        coll.put_many([{"k": "b"}, {"k": "c", "n": "x"}])
    assert [c.key for c in _all(store)] == ["a"]
    assert store.changelog.last_seq() == 1


def test_changelog_store_id(store: ls.Store) -> None:
    assert store.changelog.store_id == store.id
    assert store.changelog is store.changelog


def test_iter_changes_reads_everything_in_batches(store: ls.Store) -> None:
    coll = store.collection("it", key="k", fields={"k": ls.Text(), "n": ls.Integer()})
    coll.put_many([{"k": f"k{i}", "n": i} for i in range(25)])
    coll.delete("k3")
    seen = list(store.changelog.iter_changes(batch=4))
    assert [c.seq for c in seen] == list(range(1, 27))
    assert seen[-1].op == "delete" and seen[-1].key == "k3"
    assert [c.seq for c in store.changelog.iter_changes(after=20, batch=4)] == list(range(21, 27))

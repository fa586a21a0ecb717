"""put_many writes a batch with plain INSERTs until a key exists, then upserts the rest: same rows, same change log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import localstore as ls


def declare(store: ls.Store, sync: bool, key: Any = ls.Text) -> ls.Collection:
    return store.collection("docs", key="id", sync=sync, fields={
        "id": key(), "n": ls.Integer(), "kind": ls.Text(filter=True), "body": ls.Text(fulltext=True, nullable=True),
        "v": ls.Vector(4, metric="l2", nullable=True),
    })


def row(key: Any, n: int) -> dict[str, Any]:
    return {"id": key, "n": n, "kind": "ab"[n % 2], "body": f"word{n}", "v": np.full(4, n + 1, dtype=np.float32)}


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("key", [ls.Text, ls.Integer])
def test_a_batch_mixing_new_existing_and_repeated_keys(tmp_path: Path, sync: bool, key: Any) -> None:
    store = ls.open(tmp_path / "s.db")
    coll = declare(store, sync, key)
    name = (lambda i: f"k{i}") if key is ls.Text else (lambda i: i)
    coll.put_many([row(name(i), i) for i in (3, 30, 60)])
    # New keys first (the plain INSERTs), then an existing one mid-batch, a key repeated
    # within the batch, and existing keys at the end.
    batch = [row(name(i), 100 + i) for i in range(20)]
    batch.insert(17, row(name(30), 1))
    batch += [row(name(5), 7), row(name(40), 2), row(name(60), 3)]
    assert coll.put_many(batch) == len(batch)
    expected = {name(i): 100 + i for i in range(20)} | {name(30): 1, name(5): 7, name(40): 2, name(60): 3}
    assert {r["id"]: r["n"] for r in coll.find()} == expected
    assert coll.count() == len(expected)
    hits = coll.search(text="word7", k=5)
    assert [h.key for h in hits] == [name(5)]
    for engine in ("cache", "vec0"):
        assert coll.nearest("v", np.full(4, 8, dtype=np.float32), k=1, engine=engine)[0].key == name(5)
    report = store.verify()
    assert report.ok, report.problems
    if sync:
        changes = [c for c in store.changelog.changes() if c.op == "put"]
        assert len(changes) == 3 + len(batch)  # one record per written row, repeats included
        by_seq = [(c.key, coll.decode_payload(c.payload)["n"]) for c in changes]
        assert (name(5), 105) in by_seq and (name(5), 7) in by_seq  # both versions of the repeated key
        assert by_seq[-3:] == [(name(5), 7), (name(40), 2), (name(60), 3)]
    store.close()


def test_a_failed_batch_writes_nothing(tmp_path: Path) -> None:
    store = ls.open(tmp_path / "s.db")
    coll = declare(store, True)
    coll.put_many([row(f"k{i}", i) for i in range(5)])
    before = ([(r["id"], r["n"]) for r in coll.find()], store.changelog.last_seq())
    bad = [row(f"n{i}", i) for i in range(30)]
    bad.insert(12, row("k1", 9))  # switches to the upsert
    bad[25]["body"] = "lone \ud800 surrogate"
    with pytest.raises(ls.ValidationError, match="surrogate"):
        coll.put_many(bad)
    assert ([(r["id"], r["n"]) for r in coll.find()], store.changelog.last_seq()) == before
    assert store.verify().ok
    store.close()


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("key", [ls.Text, ls.Integer])
def test_single_puts_new_replacing_and_reusing_the_top_rowid(tmp_path: Path, sync: bool, key: Any) -> None:
    """A put of one row into a collection with indexes (one probe, then an INSERT or the upsert): a new key,
    an existing key whose old index entries must go, and a new key taking a deleted top row's rowid."""
    store = ls.open(tmp_path / "s.db")
    coll = declare(store, sync, key)
    name = (lambda i: f"k{i}") if key is ls.Text else (lambda i: i)
    for i in range(5):
        coll.put(row(name(i), i))
    assert coll.nearest("v", np.full(4, 1, dtype=np.float32), k=1, engine="vec0")[0].key == name(0)  # indexes all 5
    coll.put(row(name(2), 50))  # replaces an indexed row: its old vec0 and FTS entries must go
    coll.delete(name(4))  # the top rowid; the next new Text key is given it again
    coll.put(row(name(9), 9))
    coll.put(row(name(10), 10))
    expected = {name(0): 0, name(1): 1, name(2): 50, name(3): 3, name(9): 9, name(10): 10}
    assert {r["id"]: r["n"] for r in coll.find()} == expected
    for engine in ("cache", "vec0"):
        assert [h.key for h in coll.nearest("v", np.full(4, 51, dtype=np.float32), k=2, engine=engine)] == [name(2), name(10)]
        # name(2)'s old vector (3, 3, 3, 3) would be nearest here if its entry had stayed behind.
        assert coll.nearest("v", np.full(4, 3.1, dtype=np.float32), k=1, engine=engine)[0].key == name(3)
    assert [h.key for h in coll.search(text="word50", k=3)] == [name(2)]
    assert coll.search(text="word2", k=3) == []  # the replaced row's old text is gone from FTS
    assert [h.key for h in coll.search(text="word9", k=3)] == [name(9)]
    report = store.verify()
    assert report.ok, report.problems
    if sync:
        puts = [(c.key, coll.decode_payload(c.payload)["n"]) for c in store.changelog.changes() if c.op == "put"]
        assert puts == [(name(i), i) for i in range(5)] + [(name(2), 50), (name(9), 9), (name(10), 10)]
    store.close()
    again = ls.open(tmp_path / "s.db")
    assert {r["id"]: r["n"] for r in again.collection("docs").find()} == expected
    again.close()

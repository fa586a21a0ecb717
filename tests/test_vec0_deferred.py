"""Deferred vec0 maintenance: fresh inserts skip vec0, a bulk catch-up indexes them before vec0 is read.

Every test compares what sqlite-vec answers with what the in-memory matrix answers
(both exact), across several store handles, child processes, rollbacks, deletes,
rowid reuse, updates, replicas and old stores, and checks that ``verify()`` agrees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import apsw
import numpy as np
import pytest
import sqlite_vec

import localstore as ls
import localstore.nearest as nearest_module

ROOT = Path(__file__).resolve().parent.parent
DIM = 8


@pytest.fixture(autouse=True, params=["catch-up", "scan"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How a vec0 query outside a transaction meets waiting rows: it catches up, or it scans them beside the index."""
    monkeypatch.setattr(nearest_module, "DEFAULT_PENDING_SCAN", 0 if request.param == "catch-up" else 10**9)
    return str(request.param)


def scanning() -> bool:
    return nearest_module.DEFAULT_PENDING_SCAN > 0


def settled(path: Path | str, collection: str = "docs") -> None:
    """After vec0 queries: every row indexed (catch-up), or the index a consistent subset (scan).

    Either way each entry holds its row's current vector (and filter values, for ``docs``).
    """
    if scanning():
        assert indexed(path, collection) <= live_rowids(path, collection)
    else:
        assert indexed(path, collection) == live_rowids(path, collection)
    conn = raw(path)
    try:
        rows = {int(r[0]): tuple(r[1:]) for r in conn.execute(f'SELECT rowid, * FROM "{collection}"')}
        meta = ", m_kind, m_n" if collection == "docs" else ""
        for rowid, vector, *filters in conn.execute(f'SELECT rowid, embedding{meta} FROM "_ls_vec.{collection}.v"'):
            row = rows[int(rowid)]
            stored = row[3] if collection == "docs" else row[-3]  # docs: id, kind, n, v, _ls_seq, _ls_hlc
            if len(vector) == len(stored):  # an int8 index holds codes, not comparable bytes
                got, want = np.frombuffer(vector, dtype="<f4"), np.frombuffer(stored, dtype="<f4")
                assert np.array_equal(got, want) or np.allclose(got, np.sqrt(want), rtol=1e-6)  # Fisher-Rao: sqrt(p)
            if collection == "docs":
                assert filters == [row[1], row[2] if row[2] is not None else -(2**63)]
    finally:
        conn.close()


def catch_up(store: ls.Store, coll: ls.Collection) -> None:
    """Catch the index up whatever the mode: a vec0 query inside a transaction always does."""
    with store.transaction():
        coll.nearest("v", np.ones(DIM, dtype=np.float32), k=1, engine="vec0")


def raw(path: Path | str) -> apsw.Connection:
    """A plain apsw connection with sqlite-vec loaded, to look under the hood."""
    conn = apsw.Connection(os.fspath(path))
    conn.enable_load_extension(True)
    conn.load_extension(sqlite_vec.loadable_path())
    return conn


def high_water(path: Path | str, collection: str = "docs", field: str = "v") -> int | None:
    """The stored high-water rowid of a vec0 index (None when the store keeps none)."""
    conn = raw(path)
    try:
        if conn.execute("SELECT 1 FROM sqlite_schema WHERE name = '_ls_vec_state'").fetchone() is None:
            return None
        row = conn.execute("SELECT high_water FROM _ls_vec_state WHERE tbl = ?", (f"_ls_vec.{collection}.{field}",)).fetchone()
        return None if row is None else int(row[0])
    finally:
        conn.close()


def indexed(path: Path | str, collection: str = "docs", field: str = "v") -> set[int]:
    """The rowids that hold a vec0 entry."""
    conn = raw(path)
    try:
        return {int(r[0]) for r in conn.execute(f'SELECT rowid FROM "_ls_vec.{collection}.{field}"')}
    finally:
        conn.close()


def declare(store: ls.Store, key: Any = ls.Text, metric: str = "cosine", **options: Any) -> ls.Collection:
    """``docs``: a key, a Text and an Integer filter field, and a nullable vector ``v``."""
    return store.collection("docs", key="id", fields={
        "id": key(), "kind": ls.Text(filter=True), "n": ls.Integer(filter=True, nullable=True),
        "v": ls.Vector(DIM, metric=metric, nullable=True, **options),
    })


def vectors(rng: np.random.Generator, n: int, metric: str = "cosine") -> np.ndarray:
    if metric == "fisher_rao":
        return rng.dirichlet(np.ones(DIM), size=n).astype(np.float32)
    return rng.normal(size=(n, DIM)).astype(np.float32)


def rows(rng: np.random.Generator, keys: list[Any], metric: str = "cosine") -> list[dict[str, Any]]:
    vs = vectors(rng, len(keys), metric)
    return [{"id": k, "kind": "ab"[i % 2], "n": i % 5 or None, "v": vs[i]} for i, k in enumerate(keys)]


WHERES: list[dict[str, Any] | None] = [None, {"kind": "a"}, {"n": {">=": 3}}, {"n": None}]


def answers(coll: ls.Collection, engine: str, queries: np.ndarray, k: int = 7) -> list[list[tuple[Any, float]]]:
    out = []
    for where in WHERES:
        for q in queries:
            out.append([(h.key, h.distance) for h in coll.nearest("v", q, k=k, where=where, engine=engine)])
    return out


def assert_same(coll_vec0: ls.Collection, coll_cache: ls.Collection, queries: np.ndarray) -> None:
    """vec0 (with its catch-up) and the cache give the same hits, and distances to float64 rounding."""
    got, want = answers(coll_vec0, "vec0", queries), answers(coll_cache, "cache", queries)
    assert [[key for key, _ in hits] for hits in got] == [[key for key, _ in hits] for hits in want]
    for g, w in zip(got, want):
        assert np.allclose([d for _, d in g], [d for _, d in w], rtol=0, atol=1e-6)


def live_rowids(path: Path | str, collection: str = "docs") -> set[int]:
    conn = raw(path)
    try:
        return {int(r[0]) for r in conn.execute(f'SELECT rowid FROM "{collection}" WHERE v IS NOT NULL')}
    finally:
        conn.close()


def test_put_many_skips_vec0_and_the_first_vec0_query_catches_up(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    store = ls.open(tmp_path / "s.db")
    coll = declare(store)
    coll.put_many(rows(rng, [f"k{i}" for i in range(300)]))
    assert indexed(store.path) == set()  # nothing written to vec0 by the insert
    assert store.verify().ok  # pending rows are not damage
    queries = vectors(rng, 3)
    assert_same(coll, coll, queries)
    settled(store.path)
    catch_up(store, coll)
    assert indexed(store.path) == live_rowids(store.path)
    assert high_water(store.path) == 300
    coll.put_many(rows(rng, [f"j{i}" for i in range(50)]))
    assert len(indexed(store.path)) == 300 and high_water(store.path) == 300
    assert_same(coll, coll, queries)
    settled(store.path)
    assert high_water(store.path) == (300 if scanning() else 350)
    assert store.verify().ok
    store.close()


def test_several_handles_and_a_child_process_agree(tmp_path: Path) -> None:
    """Writes from one handle and a child process; another handle (no cache) answers through vec0."""
    rng = np.random.default_rng(2)
    path = tmp_path / "s.db"
    a = ls.open(path)
    b = ls.open(path, vector_cache=False)
    ca = declare(a)
    cb = b.collection("docs")
    queries = vectors(rng, 3)
    ca.put_many(rows(rng, [f"a{i}" for i in range(200)]))
    assert_same(cb, ca, queries)  # b catches up the rows a wrote
    ca.put_many(rows(rng, [f"a{i}" for i in range(150, 260)]))  # 50 replaced (indexed) and 60 fresh
    cb.put_many(rows(rng, [f"b{i}" for i in range(40)]))
    ca.delete_many([f"a{i}" for i in range(0, 260, 7)])
    ca.update_many({"a1": {"v": vectors(rng, 1)[0]}, "a255": {"kind": "b", "n": 4}, "b3": {"v": None}})
    script = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        import localstore as ls
        rng = np.random.default_rng(3)
        s = ls.open({str(path)!r})
        c = s.collection("docs")
        vs = rng.normal(size=(80, {DIM})).astype(np.float32)
        c.put_many([{{"id": f"c{{i}}", "kind": "a", "n": 3, "v": vs[i]}} for i in range(80)])
        c.delete("a2")
        c.update("b5", {{"v": vs[0]}})
        s.close()
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert_same(cb, ca, queries)
    assert_same(ca, ca, queries)  # a's vec0 path reads the index b caught up
    settled(path)
    for s in (a, b):
        report = s.verify()
        assert report.ok, report.problems
    a.close()
    b.close()


def test_rolled_back_inserts_and_catch_ups_leave_the_index_consistent(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    store = ls.open(tmp_path / "s.db")
    coll = declare(store)
    queries = vectors(rng, 2)
    coll.put_many(rows(rng, [f"k{i}" for i in range(100)]))
    assert_same(coll, coll, queries)
    catch_up(store, coll)
    w = high_water(store.path)
    with pytest.raises(RuntimeError), store.transaction():
        coll.put_many(rows(rng, [f"x{i}" for i in range(60)]))
        coll.nearest("v", queries[0], k=3, engine="vec0")  # catches up inside the transaction
        assert high_water(store.path) == w  # another connection sees nothing yet
        raise RuntimeError("roll back")
    assert high_water(store.path) == w == 100 and indexed(store.path) == live_rowids(store.path)
    coll.put_many(rows(rng, [f"y{i}" for i in range(30)]))
    with store.transaction():
        coll.put({"id": "z", "kind": "a", "n": 1, "v": vectors(rng, 1)[0]})
        with pytest.raises(RuntimeError), store.transaction():  # a savepoint: the catch-up is undone with it
            coll.nearest("v", queries[0], k=3, engine="vec0")
            raise RuntimeError("roll back the savepoint")
    assert high_water(store.path) == w
    assert_same(coll, coll, queries)
    settled(store.path)
    assert store.verify().ok
    store.close()


def test_in_transaction_vec0_reads_see_uncommitted_fresh_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    store = ls.open(tmp_path / "s.db")
    coll = declare(store)
    coll.put_many(rows(rng, [f"k{i}" for i in range(50)]))
    target = vectors(rng, 1)[0]
    with store.transaction():
        coll.put({"id": "new", "kind": "b", "n": 2, "v": target})
        assert coll.nearest("v", target, k=1)[0].key == "new"  # auto uses vec0 inside a transaction
        coll.update("new", {"kind": "a"})
        assert [h.key for h in coll.nearest("v", target, k=1, where={"kind": "a"})] == ["new"]
        coll.delete("new")
        assert coll.nearest("v", target, k=1)[0].key != "new"
    assert store.verify().ok
    store.close()


def test_deletes_and_rowid_reuse(tmp_path: Path) -> None:
    """Text keys reuse the top rowid after a delete: below W it is indexed at once, above it waits."""
    rng = np.random.default_rng(6)
    store = ls.open(tmp_path / "s.db")
    coll = declare(store)
    queries = vectors(rng, 2)
    coll.put_many(rows(rng, [f"k{i}" for i in range(100)]))
    assert_same(coll, coll, queries)
    catch_up(store, coll)  # W = 100
    coll.delete_many([f"k{i}" for i in range(95, 100)])  # rowids 96..100 gone
    coll.put_many(rows(rng, ["r1", "r2"]))  # rowids 96, 97: at or below W, indexed now
    assert {96, 97} <= indexed(store.path)
    assert high_water(store.path) == 100
    coll.put_many(rows(rng, [f"p{i}" for i in range(10)]))  # 98..107: 98..100 now, 101..107 wait
    assert indexed(store.path) == set(range(1, 96)) | set(range(96, 101))
    coll.delete_many(["p9", "p8", "p0"])  # two pending rows and one indexed
    coll.put_many(rows(rng, ["q1"]))  # reuses rowid 106, above W
    assert store.verify().ok
    assert_same(coll, coll, queries)
    settled(store.path)
    coll.delete_many(coll.keys())
    coll.put_many(rows(rng, ["again"]))  # rowid 1 <= W: indexed at once
    assert indexed(store.path) == {1}
    assert_same(coll, coll, queries)
    assert store.verify().ok
    store.close()


def test_integer_keys_zero_negative_and_below_w(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    store = ls.open(tmp_path / "s.db")
    coll = declare(store, key=ls.Integer)
    queries = vectors(rng, 2)
    coll.put_many(rows(rng, [-(2**63), -5, 0, 3, 10]))
    assert_same(coll, coll, queries)
    catch_up(store, coll)
    assert high_water(store.path) == 10 and indexed(store.path) == live_rowids(store.path)
    coll.put_many(rows(rng, [-7, 4, 11, 2**40]))  # -7 and 4 below W: indexed at once
    assert {-7, 4} <= indexed(store.path) and 11 not in indexed(store.path)
    assert store.verify().ok
    assert_same(coll, coll, queries)
    settled(store.path)
    coll.put_many(rows(rng, [2**63 - 1]))
    assert_same(coll, coll, queries)
    assert store.reindex()["docs"]["vec:v"] == 10
    assert_same(coll, coll, queries)
    store.close()


@pytest.mark.parametrize("options", [{"metric": "fisher_rao"}, {"quantize": "int8"}, {"metric": "l1"}])
def test_catch_up_builds_the_same_index_as_reindex(tmp_path: Path, options: dict[str, Any]) -> None:
    """Fisher-Rao roots and int8 codes: the lazily built index answers exactly as a rebuilt one."""
    rng = np.random.default_rng(8)
    metric = options.get("metric", "cosine")
    store = ls.open(tmp_path / "s.db", vector_cache=False)
    coll = declare(store, **options)
    coll.put_many(rows(rng, [f"k{i}" for i in range(120)], metric))
    queries = vectors(rng, 3, metric)
    catch_up(store, coll)  # the first 120
    coll.put_many(rows(rng, [f"j{i}" for i in range(80)], metric))
    coll.update_many({"k3": {"kind": "b"}, "j5": {"kind": "b"}, "k4": {"v": vectors(rng, 1, metric)[0]}})
    lazy = answers(coll, "vec0", queries)
    settled(store.path)
    store.reindex()
    assert answers(coll, "vec0", queries) == lazy
    assert store.verify().ok
    store.close()
    cached = ls.open(tmp_path / "s.db")
    assert_same(cached.collection("docs"), cached.collection("docs"), queries)
    cached.close()


def test_updates_of_pending_and_indexed_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    store = ls.open(tmp_path / "s.db")
    coll = declare(store)
    queries = vectors(rng, 3)
    coll.put_many(rows(rng, [f"k{i}" for i in range(60)]))
    assert_same(coll, coll, queries)
    catch_up(store, coll)  # k0..k59 indexed
    coll.put_many(rows(rng, [f"p{i}" for i in range(40)]))  # pending
    vs = vectors(rng, 6)
    coll.update_many({
        "k1": {"v": vs[0]}, "p1": {"v": vs[1]},  # vector: indexed and pending
        "k2": {"kind": "b", "n": None}, "p2": {"kind": "b", "n": 4},  # filters only
        "k3": {"v": None}, "p3": {"v": None},  # vector removed
    })
    coll.put({"id": "p4", "kind": "a", "n": 1, "v": vs[2]})  # upsert over a pending row
    coll.put({"id": "k5", "kind": "a", "n": 1, "v": vs[3]})  # upsert over an indexed row
    assert 4 not in indexed(store.path)  # k3 (rowid 4) lost its vector
    assert store.verify().ok
    assert_same(coll, coll, queries)
    settled(store.path)
    catch_up(store, coll)
    coll.update("p3", {"v": vs[4]})  # back from None, now below W
    coll.update("k2", {"kind": "a"})
    assert_same(coll, coll, queries)
    assert store.verify().ok
    store.close()


def test_an_old_store_without_a_high_water_mark(tmp_path: Path) -> None:
    """A store whose vec0 was kept row by row (no W stored) is taken as complete; the first put sets W."""
    rng = np.random.default_rng(10)
    path = tmp_path / "old.db"
    store = ls.open(path)
    coll = declare(store)
    queries = vectors(rng, 2)
    coll.put_many(rows(rng, [f"k{i}" for i in range(80)]))
    catch_up(store, coll)  # complete, as an old store's index is
    store.close()
    conn = raw(path)
    conn.execute("DROP TABLE _ls_vec_state")  # what a store written before W looks like
    conn.close()
    store = ls.open(path, vector_cache=False)
    coll = store.collection("docs")
    assert store.verify().ok
    coll.update("k1", {"v": vectors(rng, 1)[0]})  # no W: maintained at once
    coll.delete("k2")
    assert high_water(path) is None
    assert indexed(path) == live_rowids(path)
    coll.put_many(rows(rng, [f"n{i}" for i in range(30)]))
    assert high_water(path) == 80 and len(indexed(path)) == 79  # the fresh rows wait
    assert store.verify().ok
    cached = ls.open(path)
    assert_same(coll, cached.collection("docs"), queries)
    settled(path)
    cached.close()
    store.close()


def test_verify_flags_a_missing_entry_below_w_and_reindex_repairs_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    store = ls.open(tmp_path / "s.db")
    coll = declare(store)
    coll.put_many(rows(rng, [f"k{i}" for i in range(50)]))
    catch_up(store, coll)
    coll.put_many(rows(rng, [f"p{i}" for i in range(20)]))  # pending: fine
    conn = raw(store.path)
    conn.execute('DELETE FROM "_ls_vec.docs.v" WHERE rowid = 7')  # damage below W
    conn.close()
    report = store.verify()
    assert not report.ok and any("vector index" in p for p in report.problems)
    store.reindex()
    assert store.verify().ok and indexed(store.path) == live_rowids(store.path)
    assert high_water(store.path) == 70


def test_entries_above_w_left_by_a_writer_unaware_of_w_are_replaced(tmp_path: Path) -> None:
    """An older localstore indexes fresh rows at once; the catch-up must not collide with them."""
    rng = np.random.default_rng(12)
    store = ls.open(tmp_path / "s.db")
    coll = declare(store)
    queries = vectors(rng, 2)
    coll.put_many(rows(rng, [f"k{i}" for i in range(40)]))
    catch_up(store, coll)  # W = 40
    coll.put_many(rows(rng, [f"p{i}" for i in range(10)]))  # 41..50 pending
    conn = raw(store.path)
    blob = vectors(rng, 1)[0].tobytes()
    conn.execute('INSERT INTO "_ls_vec.docs.v"(rowid, embedding, m_kind, m_n) VALUES(45, ?, \'z\', 0)', (blob,))
    conn.close()
    assert_same(coll, coll, queries)
    catch_up(store, coll)
    assert indexed(store.path) == live_rowids(store.path)
    assert store.verify().ok
    store.close()


def test_backup_and_optimize_with_pending_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    store = ls.open(tmp_path / "s.db")
    coll = declare(store)
    queries = vectors(rng, 2)
    coll.put_many(rows(rng, [f"k{i}" for i in range(100)]))
    catch_up(store, coll)
    coll.put_many(rows(rng, [f"p{i}" for i in range(40)]))
    copy = ls.open(store.backup(tmp_path / "copy.db"))
    assert high_water(copy.path) == 100 and copy.verify().ok
    assert_same(copy.collection("docs"), coll, queries)
    assert high_water(copy.path) == (100 if scanning() else 140)
    copy.close()
    coll.put_many(rows(rng, [f"q{i}" for i in range(20)]))
    store.optimize()
    assert high_water(store.path) == 160 and indexed(store.path) == live_rowids(store.path)
    assert store.verify().ok
    store.close()


def test_search_through_vec0_sees_fresh_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    store = ls.open(tmp_path / "s.db", vector_cache=False)
    docs = store.collection("notes", key="id", fields={"id": ls.Text(), "body": ls.Text(fulltext=True), "v": ls.Vector(DIM)})
    vs = vectors(rng, 30)
    docs.put_many([{"id": f"n{i}", "body": f"drift {i}" if i % 3 == 0 else "calm", "v": vs[i]} for i in range(30)])
    assert docs.search(vector=vs[4], k=1)[0].key == "n4"
    assert {h.key for h in docs.search(text="drift", vector=vs[4], k=30)} == {f"n{i}" for i in range(30)}
    settled(store.path, "notes")
    assert store.verify().ok
    store.close()


def test_a_child_crashing_during_a_catch_up_changes_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(15)
    path = tmp_path / "s.db"
    store = ls.open(path)
    coll = declare(store)
    queries = vectors(rng, 2)
    coll.put_many(rows(rng, [f"k{i}" for i in range(100)]))
    script = textwrap.dedent(f"""
        import os, sys, numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        import localstore as ls
        s = ls.open({str(path)!r})
        c = s.collection("docs")
        with s.transaction():
            c.put({{"id": "crash", "kind": "a", "n": 1, "v": np.ones({DIM}, dtype=np.float32)}})
            c.nearest("v", np.ones({DIM}, dtype=np.float32), k=1, engine="vec0")
            os._exit(3)  # dies holding the write transaction, catch-up done but not committed
    """)
    assert subprocess.run([sys.executable, "-c", script], check=False, timeout=120).returncode == 3
    assert high_water(path) == -(2**63) and indexed(path) == set()
    assert coll.get("crash") is None and store.verify().ok
    assert_same(coll, coll, queries)
    settled(path)
    store.close()


def test_a_reader_blocked_by_a_long_writer_scans_the_waiting_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Too many rows wait to scan, but another handle holds the write lock: the query scans them, without waiting.

    The reader keeps the default busy timeout (5 s) and retry deadline (60 s): a query
    that waited for the lock would still be waiting when the join below gives up.
    """
    monkeypatch.setattr(nearest_module, "DEFAULT_PENDING_SCAN", 10)
    rng = np.random.default_rng(16)
    path = tmp_path / "s.db"
    writer = ls.open(path)
    coll = declare(writer)
    coll.put_many(rows(rng, [f"k{i}" for i in range(200)]))
    reader = ls.open(path, vector_cache=False)
    queries = vectors(rng, 2)
    got: list[list[str]] = []
    query = threading.Thread(target=lambda: got.extend(
        [h.key for h in reader.collection("docs").nearest("v", q, k=5, engine="vec0")] for q in queries
    ))
    with writer.transaction():
        writer._db.execute("UPDATE _ls_meta SET value = value WHERE key = 'format'")  # holds the write lock
        query.start()
        query.join(timeout=30)
        answered = not query.is_alive()
    query.join()
    assert answered, "the query waited for the write lock instead of scanning the waiting rows"
    assert indexed(path) == set()  # nothing was written by the reader
    assert got == [[h.key for h in coll.nearest("v", q, k=5, engine="cache")] for q in queries]
    # With the lock free, the next query catches the index up instead.
    reader.collection("docs").nearest("v", queries[0], k=5, engine="vec0")
    assert indexed(path) == live_rowids(path)
    reader.close()
    writer.close()


def test_pulled_rows_over_indexed_and_waiting_rows(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    """The replica path: pulled puts and deletes land on rows below W (indexed now) and above it (waiting)."""
    from localstore.sync import SyncEngine, subscribe

    rng = np.random.default_rng(17)
    ws = ls.Workspace(tmp_path / "ws")
    a, b = ws.open("a"), ws.open("b")
    ca, cb = declare(a), declare(b)
    queries = vectors(rng, 3)
    cb.put_many(rows(rng, [f"k{i}" for i in range(100)]))
    catch_up(b, cb)  # W = 100 in b
    cb.put_many(rows(rng, [f"w{i}" for i in range(20)]))  # waiting in b
    ca.put_many(rows(rng, ["k1", "k2", "w1", "w2", "new1", "new2"]))  # over b's indexed and waiting rows
    subscribe(b, "docs")
    engine = SyncEngine(ws, pg_url, schema=pg_schema, watch=False)
    try:
        engine.sync_now()
        engine.sync_now()
        assert cb.get("new1") is not None
        assert_same(cb, cb, queries)
        ca.delete_many(["k1", "w1"])
        ca.put_many(rows(rng, ["k2", "w2", "new3"]))
        engine.sync_now()
        engine.sync_now()
        assert cb.get("k1") is None and cb.get("w1") is None and cb.get("new3") is not None
        assert_same(cb, cb, queries)
        settled(b.path)
        catch_up(b, cb)
        assert indexed(b.path) == live_rowids(b.path)
        report = b.verify()
        assert report.ok, report.problems
    finally:
        engine.close()
        ws.close()


def test_catch_ups_racing_two_writer_processes(tmp_path: Path) -> None:
    """Two processes put, update and delete while this one queries through vec0; in the end vec0 equals the cache."""
    rng = np.random.default_rng(18)
    path = tmp_path / "s.db"
    store = ls.open(path, vector_cache=False)
    coll = declare(store)
    coll.put_many(rows(rng, [f"seed{i}" for i in range(50)]))
    script = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        import localstore as ls
        me = sys.argv[1]
        rng = np.random.default_rng(int(me == "b"))
        s = ls.open({str(path)!r})
        c = s.collection("docs")
        for step in range(60):
            vs = rng.normal(size=(5, {DIM})).astype(np.float32)
            c.put_many([{{"id": f"{{me}}{{step}}-{{i}}", "kind": "ab"[i % 2], "n": i, "v": vs[i]}} for i in range(5)])
            if step % 3 == 0:
                c.update(f"{{me}}{{step}}-0", {{"v": vs[4], "kind": "b"}})
            if step % 4 == 1:
                c.delete_many([f"{{me}}{{step - 1}}-1", f"seed{{step}}"])
        s.close()
    """)
    children = [subprocess.Popen([sys.executable, "-c", script, who]) for who in ("a", "b")]
    queries = vectors(rng, 2)
    try:
        while any(child.poll() is None for child in children):
            for q in queries:
                coll.nearest("v", q, k=5, engine="vec0")
    finally:
        for child in children:
            assert child.wait(timeout=120) == 0
    cached = ls.open(path)
    assert_same(coll, cached.collection("docs"), queries)
    settled(path)
    report = store.verify()
    assert report.ok, report.problems
    cached.close()
    store.close()


def test_stats_counts_the_rows_waiting_for_each_vector_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(19)
    store = ls.open(tmp_path / "s.db")
    coll = declare(store)
    coll.put_many(rows(rng, [f"k{i}" for i in range(30)]) + [{"id": "none", "kind": "a", "n": 1, "v": None}])
    assert store.stats().collections["docs"]["vector_index_waiting"] == {"v": 30}
    catch_up(store, coll)
    assert store.stats().collections["docs"]["vector_index_waiting"] == {"v": 0}
    store.close()


def test_one_pulled_batch_that_puts_then_deletes_a_key(tmp_path: Path) -> None:
    """apply_remote sees a put and a delete of one key (and a rowid reused) in one batch; indexes and cache end right."""
    from localstore.replica import RemoteRow, apply_remote

    rng = np.random.default_rng(20)
    store = ls.open(tmp_path / "s.db")
    coll = declare(store)
    queries = vectors(rng, 2)
    coll.put_many(rows(rng, [f"k{i}" for i in range(20)]))
    catch_up(store, coll)  # W = 20
    coll.nearest("v", queries[0], k=3, engine="cache")  # a warm cache, to be patched
    coll.delete_many(["k18", "k19"])  # rowids 19, 20 free again, below W

    def remote(key: str, n: int | None, hlc: int) -> RemoteRow:
        values = None if n is None else {"kind": "a", "n": n, "v": vectors(rng, 1)[0].tobytes()}
        return RemoteRow(key, values, "other-store", hlc)

    base = 2**60
    apply_remote(store, "docs", [
        remote("r1", 1, base + 1),  # rowid 19 (below W)
        remote("r1", None, base + 2),  # and gone again
        remote("r2", 2, base + 3),  # reuses rowid 19
        remote("r3", 3, base + 4),  # rowid 20
        remote("r4", 4, base + 5),  # rowid 21 (above W)
        remote("r4", None, base + 6),
        remote("k3", None, base + 7),
        remote("r3", None, base + 8),  # rowid 20 (below W) written, then gone for good
    ])
    assert {r["id"] for r in coll.find()} == {f"k{i}" for i in range(18) if i != 3} | {"r2"}
    report = store.verify()
    assert report.ok, report.problems
    assert_same(coll, coll, queries)
    catch_up(store, coll)
    assert indexed(store.path) == live_rowids(store.path)
    settled(store.path)
    store.close()


def test_another_handle_adds_a_filter_field_while_rows_wait(tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    path = tmp_path / "s.db"
    a = ls.open(path, vector_cache=False)
    ca = declare(a)
    ca.put_many(rows(rng, [f"k{i}" for i in range(40)]))
    b = ls.open(path)
    cb = b.collection("docs", key="id", fields={**ca.fields, "extra": ls.Text(filter=True, nullable=True)})
    cb.put_many([{**r, "extra": "x"} for r in rows(rng, [f"e{i}" for i in range(10)])])  # waiting again
    queries = vectors(rng, 2)
    for where in (None, {"extra": "x"}, {"extra": None}):
        for q in queries:
            got = [h.key for h in ca.nearest("v", q, k=6, where=where, engine="vec0")]
            assert got == [h.key for h in cb.nearest("v", q, k=6, where=where, engine="cache")]
    settled(path)
    assert a.verify().ok
    a.close()
    b.close()

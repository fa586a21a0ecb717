"""Vector search: exact KNN against numpy brute force, freshness, reindex/optimize, Fisher-Rao, quantized indexes, bad input."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import apsw
import numpy as np
import pytest
import sqlite_vec

import localstore as ls

METRICS = ("cosine", "l2", "l1", "fisher_rao")
ENGINES = ("cache", "vec0")


@pytest.fixture(autouse=True, params=["catch-up", "scan"])
def vec0_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every vec0 query both ways: after catching the index up, and scanning fresh rows beside it."""
    import localstore.nearest

    monkeypatch.setattr(localstore.nearest, "DEFAULT_PENDING_SCAN", 0 if request.param == "catch-up" else 10**9)
    return str(request.param)


# -- helpers ---------------------------------------------------------------------------------


def raw_connection(path: Path | str) -> apsw.Connection:
    """A plain apsw connection to a store file, with sqlite-vec loaded (to look under the hood)."""
    conn = apsw.Connection(os.fspath(path))
    conn.enable_load_extension(True)
    conn.load_extension(sqlite_vec.loadable_path())
    return conn


def vec0_count(path: Path | str, collection: str, field: str) -> int:
    """The number of entries in the vec0 index of ``collection.field``."""
    conn = raw_connection(path)
    try:
        return int(conn.execute(f'SELECT count(*) FROM "_ls_vec.{collection}.{field}"').fetchone()[0])
    finally:
        conn.close()


def random_vectors(rng: np.random.Generator, n: int, dim: int, metric: str) -> np.ndarray:
    """Continuous random data (no ties): Dirichlet rows for Fisher-Rao, Gaussian otherwise."""
    if metric == "fisher_rao":
        return rng.dirichlet(np.ones(dim), size=n).astype(np.float32)
    return rng.normal(size=(n, dim)).astype(np.float32)


def brute_force(rows: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    """Float64 distances from ``query`` to every row of ``rows`` by the metric's textbook formula."""
    x = np.asarray(rows, dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    if metric == "cosine":
        return 1.0 - (x @ q) / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
    if metric == "l2":
        return np.sqrt(((x - q) ** 2).sum(axis=1))
    if metric == "l1":
        return np.abs(x - q).sum(axis=1)
    assert metric == "fisher_rao"
    p = x / x.sum(axis=1, keepdims=True)
    qq = q / q.sum()
    return 2.0 * np.arccos(np.clip(np.sqrt(p * qq).sum(axis=1), -1.0, 1.0))


def tolerance(metric: str, engine: str) -> float:
    """Absolute distance tolerance: float64 rescoring for the cache, float32 arithmetic inside sqlite-vec."""
    if engine == "cache":
        return 1e-6
    return {"cosine": 2e-5, "l2": 1e-4, "l1": 1e-4, "fisher_rao": 2e-4}[metric]


def assert_knn(
    hits: Sequence[Any], truth: dict[Any, float], k: int, atol: float, label: str = ""
) -> None:
    """Check ``hits`` are the k nearest of ``truth`` (key -> exact distance), tolerant only of near-ties.

    Every hit's distance must equal its exact distance; hits are nearest first; the hit
    set holds every key strictly nearer than the k-th distance and nothing beyond it.
    """
    want = min(k, len(truth))
    assert len(hits) == want, f"{label}: {len(hits)} hits, expected {want}"
    keys = [h.key for h in hits]
    assert len(set(keys)) == len(keys), f"{label}: duplicate keys {keys}"
    for h in hits:
        assert h.key in truth, f"{label}: hit {h.key!r} is not a candidate"
        assert h.distance == pytest.approx(truth[h.key], abs=atol, rel=1e-5), f"{label}: distance of {h.key!r}"
    dists = [h.distance for h in hits]
    assert all(b >= a - atol for a, b in itertools.pairwise(dists)), f"{label}: not nearest first: {dists}"
    if not want:
        return
    ordered = sorted(truth.values())
    kth = ordered[want - 1]
    margin = atol + 1e-5 * abs(kth)
    must = {key for key, d in truth.items() if d < kth - margin}
    assert must <= set(keys), f"{label}: missing {sorted(must - set(keys))[:5]}"
    assert all(truth[key] <= kth + margin for key in keys), f"{label}: a hit lies beyond the k-th distance"


def stored_truth(coll: ls.Collection, field: str, query: np.ndarray, metric: str) -> dict[Any, float]:
    """Exact distances from ``query`` to every row that currently has a vector (read back from the store)."""
    rows = [r for r in coll.find() if r[field] is not None]
    if not rows:
        return {}
    matrix = np.stack([r[field] for r in rows])
    dists = brute_force(matrix, query, metric)
    return {r[coll.key]: float(d) for r, d in zip(rows, dists)}


def snapshot(store: ls.Store, coll: ls.Collection, field: str = "v") -> tuple[Any, ...]:
    """Everything a failed write must leave unchanged: rows, vectors, index size and change log."""
    rows = sorted(
        (json.dumps(r[coll.key]), None if r[field] is None else r[field].tobytes().hex()) for r in coll.find()
    )
    return (rows, coll.count(), vec0_count(store.path, coll.name, field), store.changelog.last_seq())


def declare(store: ls.Store, metric: str = "l2", dim: int = 8, **vector_options: Any) -> ls.Collection:
    """A collection ``docs`` with an Integer key, one filter field and a nullable vector field ``v``."""
    return store.collection(
        "docs",
        key="id",
        fields={"id": ls.Integer(), "tag": ls.Text(filter=True), "v": ls.Vector(dim, metric=metric, **vector_options)},
    )


@pytest.fixture
def nocache(tmp_path: Path) -> Iterator[ls.Store]:
    """A store answering nearest through sqlite-vec alone."""
    s = ls.open(tmp_path / "nocache.db", vector_cache=False)
    try:
        yield s
    finally:
        s.close()


# -- exact KNN against brute force ----------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n", [1, 7, 100, 2000])
@pytest.mark.parametrize("dim", [8, 64, 384])
def test_knn_matches_brute_force(store: ls.Store, metric: str, n: int, dim: int) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{metric}-{n}-{dim}".encode()))
    coll = declare(store, metric, dim)
    data = random_vectors(rng, n, dim, metric)
    coll.put_many([{"id": i, "tag": "t", "v": data[i]} for i in range(n)])
    queries = random_vectors(rng, 4, dim, metric)
    truths = [stored_truth(coll, "v", q, metric) for q in queries]
    for engine in ENGINES:
        atol = tolerance(metric, engine)
        for k in (1, 10):
            for qi, q in enumerate(queries):
                hits = coll.nearest("v", q, k=k, engine=engine)
                assert_knn(hits, truths[qi], k, atol, f"{metric} n={n} dim={dim} {engine} k={k} q{qi}")
            batch = coll.nearest("v", queries, k=k, engine=engine)
            assert isinstance(batch, list) and len(batch) == len(queries)
            for qi, hits in enumerate(batch):
                assert_knn(hits, truths[qi], k, atol, f"batch {metric} n={n} dim={dim} {engine} k={k} q{qi}")


@pytest.mark.parametrize("metric", METRICS)
def test_engines_agree_and_auto_uses_exact_answer(store: ls.Store, nocache: ls.Store, metric: str) -> None:
    rng = np.random.default_rng(7)
    data = random_vectors(rng, 500, 32, metric)
    rows = [{"id": i, "tag": "t", "v": data[i]} for i in range(500)]
    cached, plain = declare(store, metric, 32), declare(nocache, metric, 32)
    cached.put_many(rows)
    plain.put_many(rows)
    q = random_vectors(rng, 1, 32, metric)[0]
    truth = stored_truth(cached, "v", q, metric)
    assert_knn(cached.nearest("v", q, k=25), truth, 25, tolerance(metric, "cache"), "auto with cache")
    assert_knn(plain.nearest("v", q, k=25), truth, 25, tolerance(metric, "vec0"), "auto without cache")
    a = [h.key for h in cached.nearest("v", q, k=25, engine="cache")]
    b = [h.key for h in cached.nearest("v", q, k=25, engine="auto")]
    assert a == b
    with pytest.raises(ls.QueryError, match="vector_cache"):
        plain.nearest("v", q, k=3, engine="cache")


def test_batch_form_returns_list_of_lists(store: ls.Store) -> None:
    rng = np.random.default_rng(3)
    coll = declare(store, "cosine", 16)
    data = random_vectors(rng, 50, 16, "cosine")
    coll.put_many([{"id": i, "tag": "t", "v": data[i]} for i in range(50)])
    one = coll.nearest("v", data[:1], k=3)
    assert len(one) == 1 and one[0][0].key == 0
    single = coll.nearest("v", data[0], k=3)
    assert [h.key for h in single] == [h.key for h in one[0]]
    for engine in ENGINES:
        batch = coll.nearest("v", data[:5], k=4, engine=engine)
        assert [hits[0].key for hits in batch] == [0, 1, 2, 3, 4]
        assert all(len(hits) == 4 for hits in batch)
        assert batch[2][0].row["v"] == pytest.approx(data[2])


def test_k_larger_than_rows_and_empty_collection(store: ls.Store) -> None:
    coll = declare(store, "l2", 4)
    for engine in ENGINES:
        assert coll.nearest("v", [0, 0, 0, 0], k=5, engine=engine) == []
    coll.put_many([{"id": i, "tag": "t", "v": [i, 0, 0, 0]} for i in range(3)])
    for engine in ENGINES:
        hits = coll.nearest("v", [0, 0, 0, 0], k=4096, engine=engine)
        assert [h.key for h in hits] == [0, 1, 2]
        assert [h.distance for h in hits] == pytest.approx([0.0, 1.0, 2.0], abs=1e-6)
        assert hits[1].row == {"id": 1, "tag": "t", "v": pytest.approx(np.array([1, 0, 0, 0], dtype=np.float32))}


def test_l2_cache_exact_with_large_common_offset(store: ls.Store) -> None:
    rng = np.random.default_rng(11)
    coll = declare(store, "l2", 64)
    data = (1000.0 + rng.normal(size=(2000, 64))).astype(np.float32)
    coll.put_many([{"id": i, "tag": "t", "v": data[i]} for i in range(2000)])
    for q in (1000.0 + rng.normal(size=(5, 64))).astype(np.float32):
        truth = stored_truth(coll, "v", q, "l2")
        assert_knn(coll.nearest("v", q, k=10, engine="vec0"), truth, 10, tolerance("l2", "vec0"), "vec0")
        assert_knn(coll.nearest("v", q, k=10, engine="cache"), truth, 10, tolerance("l2", "cache"), "cache")


# -- freshness: updates, deletes, rollbacks, other processes -------------------------------------


def assert_state(store: ls.Store, coll: ls.Collection, metric: str, queries: np.ndarray, k: int = 10) -> None:
    """Both engines of this store, and a fresh store object, answer exactly from the committed rows."""
    truths = [stored_truth(coll, "v", q, metric) for q in queries]
    for engine in ENGINES:
        for q, truth in zip(queries, truths):
            assert_knn(coll.nearest("v", q, k=k, engine=engine), truth, k, tolerance(metric, engine), engine)
    with ls.open(store.path) as fresh:
        other = fresh.collection(coll.name)
        for engine in ENGINES:
            for q, truth in zip(queries, truths):
                assert_knn(other.nearest("v", q, k=k, engine=engine), truth, k, tolerance(metric, engine), f"fresh {engine}")
    assert store.verify().ok
    # A few fresh rows may still wait for the index's catch-up (a query scans them beside it);
    # a vec0 query inside a transaction always catches up, and then every row is indexed.
    with store.transaction():
        coll.nearest("v", queries[0], k=1, engine="vec0")
    assert vec0_count(store.path, coll.name, "v") == len(truths[0])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_search_sees_updates_overwrites_and_deletes(store: ls.Store, metric: str) -> None:
    rng = np.random.default_rng(21)
    coll = declare(store, metric, 16)
    data = random_vectors(rng, 300, 16, metric)
    coll.put_many([{"id": i, "tag": "t", "v": data[i]} for i in range(300)])
    queries = random_vectors(rng, 3, 16, metric)
    assert_state(store, coll, metric, queries)  # the cache is warm from here on

    # Overwrite: the query itself becomes row 5's vector, so row 5 must now be first.
    coll.put({"id": 5, "tag": "t", "v": queries[0]})
    hits = coll.nearest("v", queries[0], k=3)
    assert hits[0].key == 5 and hits[0].distance == pytest.approx(0.0, abs=1e-6)
    coll.put_many([{"id": i, "tag": "u", "v": random_vectors(rng, 1, 16, metric)[0]} for i in range(100, 200)])
    assert_state(store, coll, metric, queries)

    # Deletes, including the row that was nearest.
    assert coll.delete(5)
    coll.delete_many(range(0, 300, 3))
    assert 5 not in {h.key for h in coll.nearest("v", queries[0], k=50)}
    assert_state(store, coll, metric, queries)

    # A row whose vector becomes None leaves the index; a new row with no vector never enters it.
    coll.put({"id": 1, "tag": "t", "v": None})
    coll.put({"id": 1000, "tag": "t"})
    for engine in ENGINES:
        keys = {h.key for h in coll.nearest("v", queries[1], k=4096, engine=engine)}
        assert 1 not in keys and 1000 not in keys
    assert_state(store, coll, metric, queries)

    # The vector comes back.
    coll.put({"id": 1, "tag": "t", "v": queries[1]})
    assert coll.nearest("v", queries[1], k=1)[0].key == 1
    assert_state(store, coll, metric, queries)

    # Delete everything, then write again.
    coll.delete_many([r["id"] for r in coll.find()])
    for engine in ENGINES:
        assert coll.nearest("v", queries[0], k=10, engine=engine) == []
    assert vec0_count(store.path, "docs", "v") == 0
    coll.put({"id": 7, "tag": "t", "v": queries[2]})
    for engine in ENGINES:
        assert [h.key for h in coll.nearest("v", queries[0], k=10, engine=engine)] == [7]
    assert_state(store, coll, metric, queries)


def test_many_deletes_compact_the_cache_correctly(store: ls.Store) -> None:
    """Enough deletes to make the in-memory matrix compact itself; answers stay exact."""
    rng = np.random.default_rng(5)
    coll = declare(store, "l2", 8)
    data = random_vectors(rng, 5000, 8, "l2")
    coll.put_many([{"id": i, "tag": f"t{i % 3}", "v": data[i]} for i in range(5000)])
    queries = random_vectors(rng, 2, 8, "l2")
    coll.nearest("v", queries[0], k=1)
    coll.delete_many(range(4000))
    coll.put_many([{"id": i, "tag": "t0", "v": data[i]} for i in range(10, 20)])
    assert_state(store, coll, "l2", queries)
    for engine in ENGINES:
        hits = coll.nearest("v", queries[0], k=4096, where={"tag": "t0"}, engine=engine)
        assert len(hits) == coll.count({"tag": "t0"})


def test_rolled_back_transaction_leaves_no_trace(store: ls.Store) -> None:
    rng = np.random.default_rng(31)
    coll = declare(store, "l2", 8)
    data = random_vectors(rng, 50, 8, "l2")
    coll.put_many([{"id": i, "tag": "t", "v": data[i] + 5} for i in range(50)])
    q = np.zeros(8, dtype=np.float32)
    before = [(h.key, h.distance) for h in coll.nearest("v", q, k=10)]  # warm cache
    with pytest.raises(RuntimeError), store.transaction():
        coll.put({"id": 1000, "tag": "t", "v": q})  # new row right on the query
        coll.put({"id": 3, "tag": "t", "v": q + 0.001})  # overwrite
        coll.delete(before[0][0])
        inside = coll.nearest("v", q, k=3)  # sees the uncommitted state
        assert [h.key for h in inside][:2] == [1000, 3]
        raise RuntimeError("roll back")
    for engine in ENGINES:
        assert [(h.key, h.distance) for h in coll.nearest("v", q, k=10, engine=engine)] == [
            (key, pytest.approx(d, abs=1e-4)) for key, d in before
        ]
    assert_state(store, coll, "l2", np.stack([q, data[0]]))


def test_rollback_when_cache_is_first_used_inside_the_transaction(store_path: Path) -> None:
    """The first nearest() of a store object runs inside a transaction that then rolls back."""
    rng = np.random.default_rng(32)
    with ls.open(store_path) as s:
        coll = declare(s, "l2", 8)
        coll.put_many([{"id": i, "tag": "t", "v": rng.normal(size=8) + 5} for i in range(20)])
    q = np.zeros(8, dtype=np.float32)
    with ls.open(store_path) as s:
        coll = s.collection("docs")
        with pytest.raises(RuntimeError), s.transaction():
            coll.put({"id": 1000, "tag": "t", "v": q})
            coll.put({"id": 2, "tag": "t", "v": q + 0.01})
            assert [h.key for h in coll.nearest("v", q, k=2)] == [1000, 2]
            raise RuntimeError("roll back")
        assert_state(s, coll, "l2", np.stack([q]), k=5)
        assert 1000 not in {h.key for h in coll.nearest("v", q, k=4096, engine="cache")}


def test_nested_savepoint_rollback(store: ls.Store) -> None:
    rng = np.random.default_rng(33)
    coll = declare(store, "l2", 8)
    coll.put_many([{"id": i, "tag": "t", "v": rng.normal(size=8) + 5} for i in range(30)])
    q = np.zeros(8, dtype=np.float32)
    coll.nearest("v", q, k=1)  # warm cache
    with store.transaction():
        coll.put({"id": 500, "tag": "t", "v": q + 0.1})  # kept
        with pytest.raises(RuntimeError), store.transaction():
            coll.put({"id": 501, "tag": "t", "v": q})  # rolled back
            coll.put({"id": 500, "tag": "t", "v": q + 0.05})  # overwrite rolled back
            coll.delete(0)  # delete rolled back
            coll.nearest("v", q, k=1)
            raise RuntimeError("inner")
        with store.transaction():
            coll.put({"id": 502, "tag": "t", "v": q + 0.2})  # kept
    for engine in ENGINES:
        hits = coll.nearest("v", q, k=2, engine=engine)
        assert [h.key for h in hits] == [500, 502]
        assert hits[0].distance == pytest.approx(float(np.linalg.norm(np.full(8, 0.1))), abs=1e-5)
        assert 501 not in {h.key for h in coll.nearest("v", q, k=4096, engine=engine)}
        assert 0 in {h.key for h in coll.nearest("v", q, k=4096, engine=engine)}
    assert_state(store, coll, "l2", np.stack([q]))


def test_write_failing_validation_mid_batch_leaves_cache_untouched(store: ls.Store) -> None:
    coll = declare(store, "l2", 4)
    coll.put_many([{"id": i, "tag": "t", "v": [i + 1, 0, 0, 0]} for i in range(5)])
    coll.nearest("v", [0, 0, 0, 0], k=1)
    with pytest.raises(ls.ValidationError):
        coll.put_many([{"id": 100, "tag": "t", "v": [0, 0, 0, 0]}, {"id": 101, "tag": "t", "v": [1, 2]}])
    for engine in ENGINES:
        assert [h.key for h in coll.nearest("v", [0, 0, 0, 0], k=10, engine=engine)] == [0, 1, 2, 3, 4]


def test_writes_from_another_process_reach_a_warm_cache(store: ls.Store, subprocess_env: dict[str, str]) -> None:
    rng = np.random.default_rng(41)
    coll = declare(store, "cosine", 8)
    data = random_vectors(rng, 100, 8, "cosine")
    coll.put_many([{"id": i, "tag": "t", "v": data[i]} for i in range(100)])
    q = random_vectors(rng, 1, 8, "cosine")[0]
    first = coll.nearest("v", q, k=3)  # warm cache
    code = (
        "import sys, numpy as np, localstore as ls\n"
        "q = np.array([float(x) for x in sys.argv[2].split(',')], dtype=np.float32)\n"
        "with ls.open(sys.argv[1]) as s:\n"
        "    c = s.collection('docs')\n"
        f"    c.delete({first[0].key})\n"
        f"    c.put({{'id': {first[1].key}, 'tag': 'moved', 'v': -q}})\n"
        "    c.put({'id': 900, 'tag': 'remote', 'v': q * 2})\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, store.path, ",".join(repr(float(x)) for x in q)],
        env=subprocess_env, check=True, timeout=60,
    )
    for engine in ENGINES:
        hits = coll.nearest("v", q, k=3, engine=engine)
        assert hits[0].key == 900 and hits[0].distance == pytest.approx(0.0, abs=1e-5)
        keys = {h.key for h in coll.nearest("v", q, k=4096, engine=engine)}
        assert first[0].key not in keys and 900 in keys
        assert coll.nearest("v", -q, k=1, engine=engine)[0].key == first[1].key
        assert [h.key for h in coll.nearest("v", q, k=5, where={"tag": "remote"}, engine=engine)] == [900]
    assert_state(store, coll, "cosine", np.stack([q, -q]))


# -- reindex and optimize ------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_reindex_gives_identical_results(store: ls.Store, metric: str) -> None:
    rng = np.random.default_rng(51)
    coll = declare(store, metric, 16)
    data = random_vectors(rng, 400, 16, metric)
    coll.put_many([{"id": i, "tag": f"t{i % 4}", "v": data[i]} for i in range(400)])
    coll.delete_many(range(0, 400, 7))
    queries = random_vectors(rng, 3, 16, metric)

    def answers() -> list[Any]:
        return [
            [(h.key, round(h.distance, 9)) for h in coll.nearest("v", q, k=10, where=w, engine=e)]
            for q in queries for e in ENGINES for w in (None, {"tag": "t1"})
        ]

    before = answers()
    counts = store.reindex()
    assert counts["docs"]["vec:v"] == coll.count()
    assert answers() == before
    assert store.verify().ok


def test_dropped_vec0_table_is_restored_by_reindex(store: ls.Store) -> None:
    rng = np.random.default_rng(52)
    coll = declare(store, "l2", 8)
    coll.put_many([{"id": i, "tag": "t", "v": rng.normal(size=8)} for i in range(100)])
    q = rng.normal(size=8)
    before = [(h.key, h.distance) for h in coll.nearest("v", q, k=10, engine="vec0")]
    raw = raw_connection(store.path)
    raw.execute('DROP TABLE "_ls_vec.docs.v"')
    raw.close()
    assert not store.verify().ok
    with pytest.raises(ls.LocalStoreError):
        coll.nearest("v", q, k=10, engine="vec0")
    store.reindex()
    assert [(h.key, h.distance) for h in coll.nearest("v", q, k=10, engine="vec0")] == before
    assert vec0_count(store.path, "docs", "v") == 100
    assert store.verify().ok
    coll.put({"id": 1000, "tag": "t", "v": q})
    assert coll.nearest("v", q, k=1, engine="vec0")[0].key == 1000


def test_optimize_gives_back_space_of_deleted_vectors(store_path: Path) -> None:
    rng = np.random.default_rng(61)
    with ls.open(store_path) as s:
        coll = s.collection(
            "docs", key="id", fields={"id": ls.Integer(), "tag": ls.Text(filter=True), "v": ls.Vector(384, metric="l2")},
            sync=False,
        )
        data = random_vectors(rng, 6000, 384, "l2")
        coll.put_many([{"id": i, "tag": "t", "v": data[i]} for i in range(6000)])
        s.optimize(vacuum=True)
        full = os.path.getsize(store_path)
        # Scattered deletes: every vec0 chunk keeps a few live rows, so sqlite-vec frees none by itself.
        coll.delete_many([i for i in range(6000) if i % 20])
        q = rng.normal(size=384)
        before = [(h.key, h.distance) for h in coll.nearest("v", q, k=10, engine="vec0")]
        s.optimize(vacuum=True)
        after_size = os.path.getsize(store_path)
        assert after_size < 0.3 * full, f"{after_size} bytes after optimize, {full} before the deletes"
        assert [(h.key, h.distance) for h in coll.nearest("v", q, k=10, engine="vec0")] == before
        assert_state(s, coll, "l2", np.stack([q]))
        assert s.verify().ok


# -- Fisher-Rao -----------------------------------------------------------------------------------------


def test_fisher_rao_closed_form_and_normalisation(store: ls.Store) -> None:
    rng = np.random.default_rng(71)
    coll = declare(store, "fisher_rao", 16)
    p = rng.dirichlet(np.ones(16), size=200)
    scale = rng.uniform(0.1, 50.0, size=(200, 1))
    coll.put_many([{"id": i, "tag": "t", "v": p[i] * scale[i]} for i in range(200)])
    stored = coll.get(3)["v"]
    assert stored.dtype == np.float32
    assert float(stored.sum(dtype=np.float64)) == pytest.approx(1.0, abs=1e-6)
    assert stored == pytest.approx(p[3], abs=1e-6)
    q = rng.dirichlet(np.ones(16))
    closed = {i: float(2.0 * np.arccos(np.clip(np.sqrt(p[i] * q).sum(), -1, 1))) for i in range(200)}
    for engine in ENGINES:
        hits = coll.nearest("v", q * 7.5, k=20, engine=engine)  # an unnormalised query is normalised too
        assert_knn(hits, closed, 20, 1e-5 if engine == "cache" else 2e-4, engine)
        assert all(0.0 <= h.distance <= np.pi for h in hits)
    # Identical distributions are at distance 0; disjoint supports at distance pi.
    coll.put({"id": 500, "tag": "t", "v": [1.0] + [0.0] * 15})
    coll.put({"id": 501, "tag": "t", "v": [0.0] * 15 + [3.0]})
    e0 = [1.0] + [0.0] * 15
    for engine in ENGINES:
        by_key = {h.key: h.distance for h in coll.nearest("v", e0, k=4096, engine=engine)}
        assert by_key[500] == pytest.approx(0.0, abs=1e-3)
        assert by_key[501] == pytest.approx(np.pi, abs=1e-4)


def test_fisher_rao_distance_exact_for_near_identical(store: ls.Store) -> None:
    rng = np.random.default_rng(72)
    coll = declare(store, "fisher_rao", 16)
    p = rng.dirichlet(np.ones(16), size=50)
    coll.put_many([{"id": i, "tag": "t", "v": p[i]} for i in range(50)])
    for i in range(10):
        own = coll.get(i)["v"]
        for engine in ENGINES:
            hit = coll.nearest("v", own, k=1, engine=engine)[0]
            assert hit.key == i
            assert hit.distance == pytest.approx(0.0, abs=1e-5), engine


@pytest.mark.parametrize(
    "bad, message",
    [
        ([0.5, -0.1, 0.3, 0.3], "non-negative"),
        ([-1e-9, 0.5, 0.25, 0.25], "non-negative"),
        ([0.0, 0.0, 0.0, 0.0], "positive sum"),
        ([-0.5, -0.5, -0.5, -0.5], "non-negative"),
    ],
)
def test_fisher_rao_refuses_invalid_distributions(store: ls.Store, bad: list[float], message: str) -> None:
    coll = declare(store, "fisher_rao", 4)
    coll.put({"id": 1, "tag": "t", "v": [0.25, 0.25, 0.25, 0.25]})
    before = snapshot(store, coll)
    with pytest.raises(ls.ValidationError, match=message) as info:
        coll.put({"id": 2, "tag": "t", "v": bad})
    assert "docs.v" in str(info.value)
    with pytest.raises(ls.ValidationError, match=message):
        coll.put_many([{"id": 3, "tag": "t", "v": [0.1, 0.2, 0.3, 0.4]}, {"id": 1, "tag": "t", "v": bad}])
    assert snapshot(store, coll) == before
    for engine in ENGINES:
        with pytest.raises(ls.ValidationError, match=message):
            coll.nearest("v", bad, k=1, engine=engine)


# -- quantized indexes ------------------------------------------------------------------------------------


def _recall_and_distance_error(store: ls.Store, metric: str, quantize: str) -> tuple[float, float]:
    rng = np.random.default_rng(81)
    coll = declare(store, metric, 64, quantize=quantize)
    data = random_vectors(rng, 2000, 64, metric)
    coll.put_many([{"id": i, "tag": "t", "v": data[i]} for i in range(2000)])
    recalls, worst = [], 0.0
    for q in random_vectors(rng, 40, 64, metric):
        truth = stored_truth(coll, "v", q, metric)
        top = set(sorted(truth, key=truth.__getitem__)[:10])
        hits = coll.nearest("v", q, k=10, engine="vec0")
        assert len(hits) == 10
        recalls.append(len(top & {h.key for h in hits}) / 10)
        worst = max(worst, max(abs(h.distance - truth[h.key]) for h in hits))
        # The cache engine stays exact on quantized fields.
        assert_knn(coll.nearest("v", q, k=10, engine="cache"), truth, 10, 1e-6, "cache")
    return float(np.mean(recalls)), worst


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_int8_quantized_vec0_rescored_and_recall(store: ls.Store, metric: str) -> None:
    recall, worst = _recall_and_distance_error(store, metric, "int8")
    print(f"int8 {metric}: recall@10 = {recall:.3f}")
    assert worst < 1e-6, "quantized hits must carry exact float distances"
    assert recall >= 0.9


def test_bit_quantization_is_refused() -> None:
    """Binary quantization cannot keep recall@10 >= 0.95 on isotropic data, so it is not offered."""
    with pytest.raises(ls.SchemaError, match="None or 'int8'"):
        ls.Vector(64, quantize="bit")


@pytest.mark.parametrize("quantize", ["int8"])
def test_quantized_index_survives_reindex_and_updates(store: ls.Store, quantize: str) -> None:
    rng = np.random.default_rng(82)
    coll = declare(store, "cosine", 64, quantize=quantize)
    data = random_vectors(rng, 300, 64, "cosine")
    coll.put_many([{"id": i, "tag": "t", "v": data[i]} for i in range(300)])
    q = random_vectors(rng, 1, 64, "cosine")[0]
    coll.put({"id": 7, "tag": "t", "v": q})
    coll.delete(8)
    for engine in ENGINES:
        hits = coll.nearest("v", q, k=5, engine=engine)
        assert hits[0].key == 7 and hits[0].distance == pytest.approx(0.0, abs=1e-6)
        assert 8 not in {h.key for h in coll.nearest("v", data[8], k=50, engine=engine)}
    before = [h.key for h in coll.nearest("v", q, k=10, engine="vec0")]
    store.reindex()
    assert [h.key for h in coll.nearest("v", q, k=10, engine="vec0")] == before


def test_quantized_vec0_accepts_large_k(store: ls.Store) -> None:
    rng = np.random.default_rng(83)
    coll = declare(store, "l2", 8, quantize="int8")
    coll.put_many([{"id": i, "tag": "t", "v": rng.normal(size=8)} for i in range(100)])
    hits = coll.nearest("v", rng.normal(size=8), k=1000, engine="vec0")
    assert len(hits) == 100


# -- bad input ----------------------------------------------------------------------------------------------


BAD_VECTORS = [
    pytest.param([1.0, 2.0, 3.0], "dimension", id="too-short"),
    pytest.param([1.0, 2.0, 3.0, 4.0, 5.0], "dimension", id="too-long"),
    pytest.param([], "dimension", id="empty"),
    pytest.param([float("nan"), 0.0, 0.0, 0.0], "finite", id="nan"),
    pytest.param(np.array([0.0, np.inf, 0.0, 0.0]), "finite", id="inf"),
    # float32 arrays of the right shape take the encoder's fast path, checked per batch.
    pytest.param(np.array([0.0, np.nan, 0.0, 0.0], dtype="<f4"), "finite", id="float32-nan"),
    pytest.param(np.array([0.0, 0.0, 0.0, -np.inf], dtype="<f4"), "finite", id="float32-minus-inf"),
    pytest.param(np.array([0.0, np.inf, 0.0, 0.0], dtype=">f4"), "finite", id="big-endian-inf"),
    pytest.param([0.0, 0.0, -np.inf, 0.0], "finite", id="minus-inf"),
    pytest.param([1e39, 0.0, 0.0, 0.0], "finite", id="float32-overflow"),
    pytest.param(np.array([1e300, 1.0, 1.0, 1.0]), "finite", id="float64-beyond-float32"),
    pytest.param(["a", 1, 2, 3], "cannot be cast", id="non-numeric"),
    pytest.param([1, 2, None, 3], "cannot be cast", id="none-inside"),
    pytest.param("abcd", "sequence", id="string"),
    pytest.param(b"\x00\x00\x80?" * 4, "sequence", id="bytes"),
    pytest.param(np.ones((2, 4)), "1-D", id="2d-array"),
    pytest.param(np.ones((1, 4)), "1-D", id="2d-single-row"),
    pytest.param([[1, 2], [3, 4]], "1-D", id="nested-list"),
    pytest.param([True, False, True, True], "cannot be cast", id="booleans"),
    pytest.param(np.ones(4, dtype=bool), "cannot be cast", id="bool-array"),
    pytest.param(np.ones(4, dtype=complex), "cannot be cast", id="complex"),
    pytest.param(np.ones(4, dtype=object), "cannot be cast", id="object-array"),
    pytest.param([2**70, 0, 0, 0], "cannot be cast", id="huge-int"),
    pytest.param(5, "1-D", id="scalar"),
    pytest.param({"a": 1}, "cannot be cast", id="dict"),
]


@pytest.mark.parametrize("bad, message", BAD_VECTORS)
def test_bad_vector_is_refused_and_nothing_written(store: ls.Store, bad: Any, message: str) -> None:
    coll = declare(store, "l2", 4)
    coll.put_many([{"id": i, "tag": "t", "v": [i, 1.0, 2.0, 3.0]} for i in range(3)])
    coll.nearest("v", [0, 0, 0, 0], k=1)  # warm cache
    before = snapshot(store, coll)
    with pytest.raises(ls.ValidationError, match=message) as info:
        coll.put({"id": 10, "tag": "t", "v": bad})
    assert "docs.v" in str(info.value)
    with pytest.raises(ls.ValidationError, match=message):
        coll.put({"id": 1, "tag": "t", "v": bad})  # overwrite of an existing row
    with pytest.raises(ls.ValidationError, match=message):
        coll.put_many([{"id": 11, "tag": "t", "v": [0, 0, 0, 0]}, {"id": 2, "tag": "t", "v": bad}])
    with pytest.raises(ls.ValidationError), store.transaction():
        coll.put({"id": 12, "tag": "t", "v": [0, 0, 0, 0]})
        coll.put({"id": 13, "tag": "t", "v": bad})
    assert snapshot(store, coll) == before
    for engine in ENGINES:
        assert [h.key for h in coll.nearest("v", [0, 0, 0, 0], k=10, engine=engine)] == [0, 1, 2]
    if not (isinstance(bad, np.ndarray) and bad.ndim == 2 and bad.shape[1] == 4):
        for engine in ENGINES:
            with pytest.raises(ls.ValidationError, match=message) as info:
                coll.nearest("v", bad, k=1, engine=engine)
            assert "docs.v" in str(info.value)


def test_safe_numeric_dtypes_are_accepted(store: ls.Store) -> None:
    coll = declare(store, "l2", 4)
    for i, value in enumerate([
        np.array([1, 2, 3, 4], dtype=np.int8),
        np.array([1, 2, 3, 4], dtype=np.uint64),
        np.array([1, 2, 3, 4], dtype=np.float16),
        np.array([1, 2, 3, 4], dtype=np.float64),
        (1, 2, 3, 4),
        [1.0, 2, 3.0, 4],
    ]):
        coll.put({"id": i, "tag": "t", "v": value})
        assert coll.get(i)["v"] == pytest.approx(np.array([1, 2, 3, 4], dtype=np.float32))


def test_bad_query_batch(store: ls.Store) -> None:
    coll = declare(store, "l2", 4)
    coll.put({"id": 1, "tag": "t", "v": [1, 2, 3, 4]})
    with pytest.raises(ls.ValidationError, match="docs.v"):
        coll.nearest("v", np.ones((3, 5)), k=1)
    with pytest.raises(ls.ValidationError, match="docs.v"):
        coll.nearest("v", np.array([[1, 2, 3, 4], [np.nan, 0, 0, 0]]), k=1)
    with pytest.raises(ls.ValidationError, match="docs.v"):
        coll.nearest("v", np.zeros((0, 4)), k=1)


NEAREST_ARG_ERRORS = [
    pytest.param(("nope", None, 3, None, "auto"), "nope", id="unknown-field"),
    pytest.param(("tag", None, 3, None, "auto"), "tag", id="non-vector-field"),
    pytest.param(("id", None, 3, None, "auto"), "id", id="key-field"),
    pytest.param(("v", None, 3, {"id": 3}, "auto"), "id", id="where-non-filter-field"),
    pytest.param(("v", None, 3, {"zz": 3}, "auto"), "zz", id="where-unknown-field"),
    pytest.param(("v", None, 3, {"tag": {"~": "x"}}, "auto"), "tag", id="unknown-operator"),
    pytest.param(("v", None, 3, {"tag": {"like": "x"}}, "vec0"), "tag", id="unknown-operator-vec0"),
    pytest.param(("v", None, 3, {"tag": 5}, "auto"), "tag", id="where-wrong-type"),
    pytest.param(("v", None, 3, {"tag": {"<": None}}, "auto"), "tag", id="none-with-less-than"),
    pytest.param(("v", None, 3, "tag = 'x'", "auto"), "", id="where-not-a-dict"),
]
for _bad_k in (0, -1, 4097, 2.0, True, "3", None):
    NEAREST_ARG_ERRORS.append(pytest.param(("v", None, _bad_k, None, "auto"), "v", id=f"k={_bad_k!r}"))
NEAREST_ARG_ERRORS.append(pytest.param(("v", None, 3, None, "fast"), "v", id="engine"))
NEAREST_ARG_ERRORS.append(pytest.param(("v", None, 3, None, None), "v", id="engine-none"))


@pytest.mark.parametrize("args, field", NEAREST_ARG_ERRORS)
def test_nearest_argument_errors(store: ls.Store, args: tuple[Any, ...], field: str) -> None:
    coll = declare(store, "l2", 4)
    coll.put({"id": 1, "tag": "t", "v": [1, 2, 3, 4]})
    name, _, k, where, engine = args
    with pytest.raises((ls.QueryError, ls.ValidationError)) as info:
        coll.nearest(name, [0, 0, 0, 0], k=k, where=where, engine=engine)
    message = str(info.value)
    assert "docs" in message and field in message, message


def test_nearest_k_bounds_are_enforced(store: ls.Store) -> None:
    coll = declare(store, "l2", 4)
    coll.put({"id": 1, "tag": "t", "v": [1, 2, 3, 4]})
    for bad in (0, -1, 4097, 2.0, True, "3", None, np.int64(0)):
        with pytest.raises(ls.QueryError, match="k"):
            coll.nearest("v", [0, 0, 0, 0], k=bad)
    for engine in ("bogus", "", None, "VEC0"):
        with pytest.raises(ls.QueryError, match="engine"):
            coll.nearest("v", [0, 0, 0, 0], k=1, engine=engine)
    assert len(coll.nearest("v", [0, 0, 0, 0], k=4096)) == 1


def test_vector_schema_errors(store: ls.Store) -> None:
    for bad in (
        lambda: ls.Vector(0),
        lambda: ls.Vector(8193),
        lambda: ls.Vector(8, metric="dot"),
        lambda: ls.Vector(8, quantize="int4"),
        lambda: ls.Vector(12, quantize="bit"),
        lambda: ls.Vector(True),
    ):
        with pytest.raises(ls.SchemaError):
            bad()
    with pytest.raises(ls.SchemaError):
        store.collection("bad", key="id", fields={"id": ls.Integer(), "v": ls.Vector(8, filter=True)})
    assert "bad" not in store.collections()

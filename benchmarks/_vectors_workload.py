"""The workload the vectors benchmarks share: sizes, embedding-like data, ground truth, baselines.

The sizes of every section (``FULL``, ``QUICK``, ``TINY``); float32 unit vectors
around fixed cluster centres (or isotropic noise) with a key and two filter fields
per row; the filters of about 1/3 and 1% selectivity; exact top-k in float64 and
recall@k; and the contenders that are not localstore (a bare sqlite-vec vec0 table
queried with apsw, a numpy/BLAS scan) with the cases that time one query per run.
Used by ``vectors.py``, ``_vectors_knn.py`` and ``peers.py`` (through ``vectors.py``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import apsw
import numpy as np
from _harness import Case

import localstore as ls
from localstore._sqlite import connect

K = 10
COLLECTION = "docs"
KINDS = ("observation", "reflection", "plan")  # the ~1/3 filter: one of three values
GROUPS = 100  # the ~1% filter: one of 100 values
CLUSTERS = 1_000  # centres of the embedding-like data
SPREAD = 0.6  # norm of the noise around a centre (before normalising); cosine to centre ~0.86


@dataclass(frozen=True)
class Sizes:
    """How much work each section does; ``QUICK`` runs in a few seconds."""

    rows: int  # rows per store in the per-dimension sections
    dims: tuple[int, ...]
    queries: int  # timed single queries per case (p50 and p95 come from these)
    batch: int  # queries in one 2-D batch
    batch_repeat: int
    build_repeat: int  # cache builds timed per dimension
    insert_rows: int
    insert_repeat: int
    insert_dim: int
    sweep: tuple[int, ...]  # N of the latency sweep (empty: no sweep, no plot)
    sweep_dim: int
    sweep_queries: int
    warmup: int = 2


FULL = Sizes(
    rows=100_000,
    dims=(8, 64, 384),
    queries=40,
    batch=100,
    batch_repeat=5,
    build_repeat=3,
    insert_rows=100_000,
    insert_repeat=3,
    insert_dim=384,
    sweep=(10_000, 30_000, 100_000, 300_000, 1_000_000),
    sweep_dim=64,
    sweep_queries=20,
)
QUICK = Sizes(
    rows=10_000,
    dims=(8, 64, 384),
    queries=15,
    batch=100,
    batch_repeat=3,
    build_repeat=2,
    insert_rows=10_000,
    insert_repeat=2,
    insert_dim=384,
    sweep=(),
    sweep_dim=64,
    sweep_queries=10,
    warmup=1,
)
#: ``LOCALSTORE_BENCH_TINY=1`` (smoke tests): every section runs, on sizes too small to mean anything.
TINY = Sizes(
    rows=2_000,
    dims=(8, 64, 384),
    queries=3,
    batch=10,
    batch_repeat=1,
    build_repeat=1,
    insert_rows=500,
    insert_repeat=1,
    insert_dim=384,
    sweep=(),
    sweep_dim=64,
    sweep_queries=3,
    warmup=1,
)


def dim_label(rows: int, dim: int) -> str:
    """``100k×384`` style size label."""
    return f"{rows // 1000}k×{dim}" if rows < 1_000_000 else f"{rows // 1_000_000}M×{dim}"


# -- data --------------------------------------------------------------------------------------


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` with every row scaled to unit length (float32, in place)."""
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix


def embeddings(count: int, dim: int, seed: int, *, isotropic: bool = False) -> np.ndarray:
    """``count`` unit float32 vectors: clustered like text embeddings, or isotropic Gaussian noise.

    Clustered rows are one of ``CLUSTERS`` fixed centres (the same for every seed at a
    given ``dim``) plus Gaussian noise of norm about ``SPREAD``, so queries drawn with
    another seed have near neighbours, as real embedding queries do.
    """
    rng = np.random.default_rng((seed, dim))
    if isotropic:
        return unit_rows(rng.standard_normal((count, dim), dtype=np.float32))
    centres = unit_rows(
        np.random.default_rng((99, dim)).standard_normal((CLUSTERS, dim), dtype=np.float32)
    )
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        block = rng.standard_normal((n, dim), dtype=np.float32)
        block *= np.float32(SPREAD / math.sqrt(dim))
        block += centres[rng.integers(CLUSTERS, size=n)]
        out[start : start + n] = block
    return unit_rows(out)


def kind_of(i: int) -> str:
    """The ~1/3-selectivity filter value of row ``i``."""
    return KINDS[(i * 7 + i // 3) % 3]


def group_of(i: int) -> str:
    """The ~1%-selectivity filter value of row ``i``."""
    return f"g{(i * 37 + 11) % GROUPS:02d}"


def key_of(i: int) -> str:
    """The key of row ``i`` in the query stores (the row number is readable back from it)."""
    return f"doc-{i:07d}"


def index_of(key: str) -> int:
    """The row number in a key made by ``key_of``."""
    return int(key[4:])


def query_rows(matrix: np.ndarray, start: int = 0) -> list[dict[str, Any]]:
    """Rows for the query stores: key, the two filter fields and the vector (a view into ``matrix``)."""
    return [
        {"id": key_of(i), "kind": kind_of(i), "grp": group_of(i), "embedding": matrix[i - start]}
        for i in range(start, start + len(matrix))
    ]


def query_fields(dim: int) -> dict[str, Any]:
    """The query collection: a text key, two filter fields and a cosine vector."""
    return {
        "id": ls.Text(),
        "kind": ls.Text(filter=True),
        "grp": ls.Text(filter=True),
        "embedding": ls.Vector(dim),
    }


FILTERS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "all": ("unfiltered", None),
    "third": ("kind = 1 of 3 (~33%)", {"kind": KINDS[0]}),
    "rare": ("grp = 1 of 100 (~1%)", {"grp": group_of(0)}),
}


def filter_mask(count: int, where: dict[str, Any] | None) -> np.ndarray:
    """Which of the first ``count`` rows a ``where`` of ``FILTERS`` keeps."""
    if not where:
        return np.ones(count, dtype=bool)
    ((name, value),) = where.items()
    of = kind_of if name == "kind" else group_of
    return np.fromiter((of(i) == value for i in range(count)), dtype=bool, count=count)


def truth(
    matrix: np.ndarray, queries: np.ndarray, mask: np.ndarray | None = None
) -> list[set[int]]:
    """The exact top-k row numbers per query by cosine, computed in float64."""
    rows = np.arange(len(matrix)) if mask is None else np.flatnonzero(mask)
    q = queries.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = np.empty((len(queries), len(rows)), dtype=np.float64)
    for start in range(0, len(rows), 50_000):
        block = matrix[rows[start : start + 50_000]].astype(np.float64)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        scores[:, start : start + len(block)] = q @ block.T
    top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
    return [set(rows[t].tolist()) for t in top]


def recall(found: dict[int, list[int]], expected: list[set[int]]) -> float:
    """Mean recall@k of ``found`` (row numbers per query index) against ``expected``."""
    if not found:
        return float("nan")
    return float(np.mean([len(set(found[i]) & expected[i]) / len(expected[i]) for i in found]))


# -- contenders ----------------------------------------------------------------------------------


def raw_vec0(
    path: str, dim: int, *, kind: str = "float", metadata: Sequence[str] = ("kind", "grp")
) -> apsw.Connection:
    """An apsw connection set up as localstore's with one bare vec0 table ``vecs``."""
    conn = connect(path)
    metric = "" if kind == "bit" else " distance_metric=cosine"
    meta = "".join(f", {m} text" for m in metadata)
    conn.execute(f"CREATE VIRTUAL TABLE vecs USING vec0(embedding {kind}[{dim}]{metric}{meta})")
    return conn


def raw_vec0_fill(conn: apsw.Connection, matrix: np.ndarray, start: int = 0) -> None:
    """Insert rows ``start..`` of the query data (rowid = row number + 1) in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO vecs(rowid, embedding, kind, grp) VALUES(?, ?, ?, ?)",
        (
            (i + 1, matrix[i - start].tobytes(), kind_of(i), group_of(i))
            for i in range(start, start + len(matrix))
        ),
    )
    conn.execute("COMMIT")


def raw_knn_sql(where: dict[str, Any] | None) -> tuple[str, list[Any]]:
    """The raw sqlite-vec KNN statement and its extra parameters for a ``FILTERS`` where."""
    sql = f"SELECT rowid, distance FROM vecs WHERE embedding MATCH ? AND k = {K}"
    params: list[Any] = []
    for name, value in (where or {}).items():
        sql += f" AND {name} = ?"
        params.append(value)
    return sql, params


def blas_topk(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The baseline: ``matrix @ query`` (BLAS sgemv) and argpartition, best first."""
    scores = matrix @ query
    top = np.argpartition(scores, len(scores) - K)[-K:]
    return top[np.argsort(-scores[top])]


def blas_topk_batch(matrix: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The batch baseline: ``queries @ matrix.T`` (BLAS sgemm) and argpartition per row."""
    scores = queries @ matrix.T
    n = scores.shape[1]
    top = np.argpartition(scores, n - K, axis=1)[:, -K:]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def query_case(
    name: str, label: str, fn: Callable[[np.ndarray], Any], queries: np.ndarray, out: dict[int, Any]
) -> Case:
    """A case timing one query per run; runs cycle through ``queries`` and keep each answer in ``out``."""
    counter = itertools.count()

    def run(i: int) -> None:
        out[i] = fn(queries[i])

    return Case(name, run, lambda: next(counter) % len(queries), label=label, unit="query")


def ours_query(
    coll: Any, field: str, where: dict[str, Any] | None, engine: str
) -> Callable[[np.ndarray], Any]:
    """A one-query function: ``coll.nearest`` with this filter and engine."""
    return lambda q: coll.nearest(field, q, k=K, where=where, engine=engine)


def raw_query(conn: apsw.Connection, sql: str, params: list[Any]) -> Callable[[np.ndarray], Any]:
    """A one-query function: the raw sqlite-vec KNN statement on ``conn``."""
    return lambda q: conn.execute(sql, (q.tobytes(), *params)).fetchall()

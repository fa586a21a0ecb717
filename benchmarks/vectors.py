"""Vector search: nearest (cache and vec0) against raw sqlite-vec and a numpy/BLAS scan, side by side.

At 100k rows of 8, 64 and 384 dimensions (float32, cosine, k=10; 10k rows with
``--quick``) it times ``Collection.nearest`` with ``engine="auto"`` (the
in-memory matrix) and ``engine="vec0"``, a vec0 table queried directly with
apsw, and ``M @ q`` + ``argpartition`` on the same matrix; unfiltered and with a
filter of about 1/3 and about 1% selectivity; a batch of 100 queries against 100
single calls; ``put_many`` of rows with a 384-d vector against raw apsw; and
recall@10 of every path against a float64 brute force, including the int8 and
bit quantized vec0 indexes. The full run also sweeps N from 10k to 1M at 64
dimensions and draws ``benchmarks/vectors_latency.png``.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import itertools
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import apsw
import numpy as np
from _harness import Case, Figure, Report, Scratch, Timing, is_tiny, log, measure

import localstore as ls
from localstore._sqlite import connect

K = 10
COLLECTION = "docs"
KINDS = ("observation", "reflection", "plan")  # the ~1/3 filter: one of three values
GROUPS = 100  # the ~1% filter: one of 100 values
CLUSTERS = 1_000  # centres of the embedding-like data
SPREAD = 0.6  # norm of the noise around a centre (before normalising); cosine to centre ~0.86
PLOT_PATH = Path(__file__).resolve().parent / "vectors_latency.png"


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


def percentile(timing: Timing, q: float) -> float:
    """The ``q``-th percentile of a timing's runs, in seconds."""
    return float(np.percentile(timing.runs, q))


def blas_info() -> str:
    """Which BLAS numpy runs on: library, version, build, and the core and threads OpenBLAS chose."""
    try:
        config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        text = f"{config.get('name')} {config.get('version')}"
        build = str(config.get("openblas configuration", ""))
        if "DYNAMIC_ARCH" in build:
            text += " (DYNAMIC_ARCH)"
    except Exception:  # noqa: BLE001 - informational only
        text = "unknown BLAS"
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(glob.glob(str(libs / "*openblas*.so*"))):
        lib = ctypes.CDLL(path)
        for corename, threads in (
            ("scipy_openblas_get_corename64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_get_corename", "scipy_openblas_get_num_threads"),
            ("openblas_get_corename64_", "openblas_get_num_threads64_"),
            ("openblas_get_corename", "openblas_get_num_threads"),
        ):
            if hasattr(lib, corename):
                getattr(lib, corename).restype = ctypes.c_char_p
                text += f", core {getattr(lib, corename)().decode()}"
                if hasattr(lib, threads):
                    text += f", {getattr(lib, threads)()} threads"
                break
        break
    return text + f", OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}"


# -- sections -------------------------------------------------------------------------------------


def dim_label(rows: int, dim: int) -> str:
    """``100k×384`` style size label."""
    return f"{rows // 1000}k×{dim}" if rows < 1_000_000 else f"{rows // 1_000_000}M×{dim}"


def build_query_store(path: str, matrix: np.ndarray) -> None:
    """A store at ``path`` holding the query rows of ``matrix`` (untimed set-up)."""
    with ls.open(path) as store:
        coll = store.collection(COLLECTION, key="id", fields=query_fields(matrix.shape[1]))
        for start in range(0, len(matrix), 100_000):
            coll.put_many(query_rows(matrix[start : start + 100_000], start))


def bench_dim(report: Report, scratch: Scratch, sizes: Sizes, dim: int) -> None:
    """Single and batch queries at one dimension: ours (auto, vec0), raw sqlite-vec, BLAS; recall of each."""
    n = sizes.rows
    tag = f"d{dim}"
    size = dim_label(n, dim)
    log(f"{size}: making data and stores")
    matrix = embeddings(n, dim, seed=1)
    pool = embeddings(max(sizes.queries, sizes.batch), dim, seed=2)
    queries, batch = pool[: sizes.queries], pool[: sizes.batch]
    ours_path, raw_path = scratch.path(f"ours-{dim}"), scratch.path(f"raw-{dim}")
    built = time.perf_counter()
    build_query_store(ours_path, matrix)
    report.params[f"{tag}_store_build_s"] = round(time.perf_counter() - built, 2)
    conn = raw_vec0(raw_path, dim)
    raw_vec0_fill(conn, matrix)

    # The first auto call builds the in-memory matrix from the rows: timed apart, on a fresh open.
    def opened() -> tuple[ls.Store, Any]:
        store = ls.open(ours_path)
        return store, store.collection(COLLECTION)

    report.add(
        *measure(
            [
                Case(
                    f"{tag}.cache_build",
                    lambda s: s[1].nearest("embedding", queries[0], k=K),
                    opened,
                    lambda s: s[0].close(),
                    label=f"{size}  first auto call on a fresh open (cache build + 1 query)",
                )
            ],
            sizes.build_repeat,
            progress=f"{size} cache build",
        )
    )

    store = ls.open(ours_path)
    try:
        coll = store.collection(COLLECTION)
        answers: dict[str, dict[int, Any]] = {}
        cases: list[Case] = []
        for fkey, (flabel, where) in FILTERS.items():
            for engine in ("auto", "vec0"):
                name = f"{tag}.{engine}.{fkey}"
                answers[name] = {}
                cases.append(
                    query_case(
                        name,
                        f"{size}  nearest engine={engine:4}  {flabel}",
                        ours_query(coll, "embedding", where, engine),
                        queries,
                        answers[name],
                    )
                )
            sql, params = raw_knn_sql(where)
            name = f"{tag}.raw.{fkey}"
            answers[name] = {}
            cases.append(
                query_case(
                    name,
                    f"{size}  raw sqlite-vec MATCH k=10    {flabel}",
                    raw_query(conn, sql, params),
                    queries,
                    answers[name],
                )
            )
        answers[f"{tag}.blas.all"] = {}
        cases.append(
            query_case(
                f"{tag}.blas.all",
                f"{size}  numpy/BLAS M @ q + argpartition",
                lambda q: blas_topk(matrix, q),
                queries,
                answers[f"{tag}.blas.all"],
            )
        )
        report.add(
            *measure(cases, sizes.queries, warmup=sizes.warmup, progress=f"{size} single queries")
        )

        # Batch: one 2-D array of queries against as many single calls, and BLAS both ways.
        batch_answers: dict[str, Any] = {}

        def keep(name: str, fn: Callable[[], Any]) -> Callable[[Any], None]:
            def run(_: Any) -> None:
                batch_answers[name] = fn()

            return run

        report.add(
            *measure(
                [
                    Case(
                        f"{tag}.batch.auto",
                        keep("auto", lambda: coll.nearest("embedding", batch, k=K)),
                        items=len(batch),
                        unit="query",
                        label=f"{size}  nearest auto, one {len(batch)}x{dim} array",
                    ),
                    Case(
                        f"{tag}.batch.auto_single",
                        keep(
                            "auto_single",
                            lambda: [coll.nearest("embedding", q, k=K) for q in batch],
                        ),
                        items=len(batch),
                        unit="query",
                        label=f"{size}  nearest auto, {len(batch)} single calls",
                    ),
                    Case(
                        f"{tag}.batch.blas",
                        keep("blas", lambda: blas_topk_batch(matrix, batch)),
                        items=len(batch),
                        unit="query",
                        label=f"{size}  numpy/BLAS Q @ M.T, one {len(batch)}x{dim} array",
                    ),
                    Case(
                        f"{tag}.batch.blas_single",
                        keep("blas_single", lambda: [blas_topk(matrix, q) for q in batch]),
                        items=len(batch),
                        unit="query",
                        label=f"{size}  numpy/BLAS, {len(batch)} single scans",
                    ),
                ],
                sizes.batch_repeat,
                warmup=1,
                progress=f"{size} batch of {len(batch)}",
            )
        )
    finally:
        store.close()
        conn.close()
        scratch.remove(ours_path)
        scratch.remove(raw_path)

    # -- figures
    def ms(name: str, label: str, q: float, **target: Any) -> None:
        t = report.timings[name]
        report.figure(
            Figure(
                f"{name}.p{q:g}", f"{size}  {label} p{q:g}", percentile(t, q) * 1e3, "ms", **target
            )
        )

    for engine, label in (
        ("auto", "nearest auto"),
        ("vec0", "nearest vec0"),
        ("raw", "raw sqlite-vec"),
        ("blas", "numpy/BLAS"),
    ):
        ms(f"{tag}.{engine}.all", label, 50)
        ms(f"{tag}.{engine}.all", label, 95)
    report.figure(
        Figure(
            f"{tag}.cache_build.s",
            f"{size}  cache build (first auto call, median)",
            report.timings[f"{tag}.cache_build"].median,
            "s",
        )
    )
    report.cost_ratio(
        f"{tag}.auto.vs_blas",
        f"{size}  exact KNN: auto / BLAS (p50 time)",
        f"{tag}.auto.all",
        f"{tag}.blas.all",
        target_op="<=",
        target=2.0,
    )
    report.cost_ratio(
        f"{tag}.vec0.vs_blas",
        f"{size}  exact KNN: vec0 / BLAS (p50 time)",
        f"{tag}.vec0.all",
        f"{tag}.blas.all",
    )
    report.cost_ratio(
        f"{tag}.raw.vs_blas",
        f"{size}  raw sqlite-vec / BLAS (p50 time)",
        f"{tag}.raw.all",
        f"{tag}.blas.all",
    )
    report.cost_ratio(
        f"{tag}.vec0.vs_raw",
        f"{size}  nearest vec0 / raw sqlite-vec (p50 time)",
        f"{tag}.vec0.all",
        f"{tag}.raw.all",
    )
    for engine, label, target in (
        ("auto", "auto", 1.0),
        ("vec0", "vec0", 1.0),
        ("raw", "raw sqlite-vec", None),
    ):
        for fkey, short in (("third", "33%"), ("rare", "1%")):
            report.cost_ratio(
                f"{tag}.{engine}.{fkey}.vs_all",
                f"{size}  {label}: filtered {short} / unfiltered (p50 time)",
                f"{tag}.{engine}.{fkey}",
                f"{tag}.{engine}.all",
                target_op="<=" if target else None,
                target=target,
            )
    report.speed_ratio(
        f"{tag}.batch.gain",
        f"{size}  auto: batch / single calls (queries/s)",
        f"{tag}.batch.auto",
        f"{tag}.batch.auto_single",
    )
    report.cost_ratio(
        f"{tag}.batch.vs_blas",
        f"{size}  auto batch / BLAS batch (time per query)",
        f"{tag}.batch.auto",
        f"{tag}.batch.blas",
        target_op="<=",
        target=2.0,
    )

    # -- recall of every path against float64 brute force (exact paths should give 1.0)
    expected = {
        fkey: truth(matrix, queries, filter_mask(n, where)) for fkey, (_, where) in FILTERS.items()
    }
    found: dict[str, list[float]] = {"auto": [], "vec0": [], "raw": []}
    for fkey, (_, where) in FILTERS.items():
        matching = int(filter_mask(n, where).sum())
        for engine in ("auto", "vec0"):
            got = {
                i: [index_of(h.key) for h in hits]
                for i, hits in answers[f"{tag}.{engine}.{fkey}"].items()
            }
            found[engine].append(recall(got, expected[fkey]))
            if any(len(v) != min(K, matching) for v in got.values()):
                report.notes.append(
                    f"{size} {engine} {fkey}: a query returned fewer than min(k, matching) hits"
                )
        got = {i: [int(r) - 1 for r, _ in rows] for i, rows in answers[f"{tag}.raw.{fkey}"].items()}
        found["raw"].append(recall(got, expected[fkey]))
    got = {i: [int(x) for x in top] for i, top in answers[f"{tag}.blas.all"].items()}
    found["blas"] = [recall(got, expected["all"])]
    for engine, label in (
        ("auto", "nearest auto"),
        ("vec0", "nearest vec0"),
        ("raw", "raw sqlite-vec"),
        ("blas", "numpy/BLAS float32"),
    ):
        scope = "unfiltered" if engine == "blas" else "all 3 filters"
        report.figure(
            Figure(
                f"{tag}.{engine}.recall",
                f"{size}  recall@10 {label} (exact; {scope})",
                min(found[engine]),
                "",
            )
        )
    batch_truth = truth(matrix, batch)
    got = {i: [index_of(h.key) for h in hits] for i, hits in enumerate(batch_answers["auto"])}
    report.figure(
        Figure(
            f"{tag}.batch.recall",
            f"{size}  recall@10 nearest auto batch (exact)",
            recall(got, batch_truth),
            "",
        )
    )


def bench_quantized(report: Report, scratch: Scratch, sizes: Sizes, *, isotropic: bool) -> None:
    """engine='vec0' on an int8 quantized field (rescored in float): latency and recall@10."""
    n, dim = sizes.rows, 384
    data = "isotropic" if isotropic else "clustered"
    tag = f"q384.{data}"
    size = f"{dim_label(n, dim)} {data}"
    log(f"{size}: quantized store")
    matrix = embeddings(n, dim, seed=3, isotropic=isotropic)
    queries = embeddings(sizes.queries, dim, seed=4, isotropic=isotropic)
    path = scratch.path("quant")
    store = ls.open(path)
    try:
        coll = store.collection(
            COLLECTION,
            key="id",
            fields={
                "id": ls.Text(),
                "kind": ls.Text(filter=True),
                "int8": ls.Vector(dim, quantize="int8"),
            },
        )
        for start in range(0, n, 50_000):
            block = matrix[start : start + 50_000]
            coll.put_many(
                [
                    {"id": key_of(start + i), "kind": kind_of(start + i), "int8": v}
                    for i, v in enumerate(block)
                ]
            )
        answers: dict[str, dict[int, Any]] = {"int8": {}, "auto": {}, "blas": {}}
        cases = [
            query_case(
                f"{tag}.int8",
                f"{size}  nearest vec0 int8 (oversampled, float rescore)",
                lambda q: coll.nearest("int8", q, k=K, engine="vec0"),
                queries,
                answers["int8"],
            ),
            query_case(
                f"{tag}.auto",
                f"{size}  nearest auto on the int8 field (float cache)",
                lambda q: coll.nearest("int8", q, k=K),
                queries,
                answers["auto"],
            ),
            query_case(
                f"{tag}.blas",
                f"{size}  numpy/BLAS M @ q",
                lambda q: blas_topk(matrix, q),
                queries,
                answers["blas"],
            ),
        ]
        report.add(
            *measure(
                cases, sizes.queries, warmup=sizes.warmup, progress=f"{size} quantized queries"
            )
        )
    finally:
        store.close()
        scratch.remove(path)
    expected = truth(matrix, queries)
    for name, label, approximate in (
        ("int8", "nearest vec0 int8", True),
        ("auto", "nearest auto (exact)", False),
    ):
        got = {i: [index_of(h.key) for h in hits] for i, hits in answers[name].items()}
        report.figure(
            Figure(
                f"{tag}.{name}.recall",
                f"{size}  recall@10 {label}",
                recall(got, expected),
                "",
                ">=" if approximate else None,
                0.95 if approximate else None,
            )
        )
    for name, label in (("int8", "vec0 int8"),):
        report.figure(
            Figure(
                f"{tag}.{name}.p50",
                f"{size}  {label} p50",
                percentile(report.timings[f"{tag}.{name}"], 50) * 1e3,
                "ms",
            )
        )
        report.cost_ratio(
            f"{tag}.{name}.vs_blas",
            f"{size}  {label} / BLAS (p50 time)",
            f"{tag}.{name}",
            f"{tag}.blas",
        )


def bench_insert(report: Report, scratch: Scratch, sizes: Sizes) -> None:
    """put_many of rows with a key, a filter field and a 384-d vector, against raw apsw into a table + vec0."""
    n, dim = sizes.insert_rows, sizes.insert_dim
    log(f"insert: making {n:,} rows with {dim}-d vectors")
    matrix = embeddings(n, dim, seed=5)
    rng = np.random.default_rng(6)
    keys = [
        str(uuid.UUID(bytes=bytes(b), version=4))
        for b in rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    ]
    rows = [{"id": keys[i], "kind": kind_of(i), "embedding": matrix[i]} for i in range(n)]
    fields: dict[str, Any] = {
        "id": ls.Text(),
        "kind": ls.Text(filter=True),
        "embedding": ls.Vector(dim),
    }

    def ours_case(name: str, label: str, sync: bool, then_vec0: bool = False) -> Case:
        def setup() -> tuple[str, ls.Store, Any]:
            path = scratch.path(name)
            store = ls.open(path)
            return path, store, store.collection(COLLECTION, key="id", fields=fields, sync=sync)

        def teardown(state: tuple[str, ls.Store, Any]) -> None:
            state[1].close()
            scratch.remove(state[0])

        def run(state: tuple[str, ls.Store, Any]) -> None:
            state[2].put_many(rows)
            if then_vec0:  # the first vec0 query indexes the fresh rows in bulk (its catch-up)
                state[2].nearest("embedding", matrix[0], k=10, engine="vec0")

        return Case(name, run, setup, teardown, items=n, unit="row", label=label)

    def raw_setup() -> tuple[str, apsw.Connection]:
        path = scratch.path("insert-raw")
        conn = raw_vec0(path, dim, metadata=("kind",))
        conn.execute(
            f"CREATE TABLE {COLLECTION}(id TEXT PRIMARY KEY NOT NULL, kind TEXT, embedding BLOB) STRICT;"
            f" CREATE INDEX {COLLECTION}_kind ON {COLLECTION}(kind)"
        )
        return path, conn

    def raw_teardown(state: tuple[str, apsw.Connection]) -> None:
        state[1].close()
        scratch.remove(state[0])

    def raw_insert(state: tuple[str, apsw.Connection], vec0: bool = True) -> None:
        conn = state[1]
        blobs = [r["embedding"].tobytes() for r in rows]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            f"INSERT INTO {COLLECTION}(id, kind, embedding) VALUES(?, ?, ?)",
            [(r["id"], r["kind"], b) for r, b in zip(rows, blobs)],
        )
        if vec0:
            # A fresh table numbers its rows 1..n, so the vec0 rowids follow the same order.
            conn.executemany(
                "INSERT INTO vecs(rowid, embedding, kind) VALUES(?, ?, ?)",
                [(i + 1, b, r["kind"]) for i, (r, b) in enumerate(zip(rows, blobs))],
            )
        conn.execute("COMMIT")

    report.add(
        *measure(
            [
                ours_case(
                    "insert.ours", f"put_many  {n // 1000}k rows, {dim}-d vector (sync=True)", True
                ),
                ours_case(
                    "insert.ours_nosync",
                    f"put_many  {n // 1000}k rows, {dim}-d vector (sync=False)",
                    False,
                ),
                ours_case(
                    "insert.ours_vec0",
                    f"put_many  {n // 1000}k rows + first vec0 query (catch-up)",
                    True,
                    then_vec0=True,
                ),
                Case(
                    "insert.raw",
                    raw_insert,
                    raw_setup,
                    raw_teardown,
                    items=n,
                    unit="row",
                    label=f"insert    raw apsw: table + vec0, {n // 1000}k rows",
                ),
                Case(
                    "insert.raw_rows",
                    lambda s: raw_insert(s, vec0=False),
                    raw_setup,
                    raw_teardown,
                    items=n,
                    unit="row",
                    label=f"insert    raw apsw: table only, {n // 1000}k rows",
                ),
            ],
            sizes.insert_repeat,
            progress=f"insert {n:,} x {dim}-d",
        )
    )
    report.figure(
        Figure(
            "insert.rate",
            f"put_many with a {dim}-d vector (sync=True, rows/s)",
            report.timings["insert.ours"].rate,
            "rows/s",
            ">=",
            20_000,
        )
    )
    report.figure(
        Figure(
            "insert.rate_nosync",
            f"put_many with a {dim}-d vector (sync=False, rows/s)",
            report.timings["insert.ours_nosync"].rate,
            "rows/s",
        )
    )
    report.speed_ratio(
        "insert.vs_raw", "put_many / raw apsw table + vec0 (rows/s)", "insert.ours", "insert.raw"
    )
    report.speed_ratio(
        "insert.vs_raw_rows", "put_many / raw apsw table only (rows/s)", "insert.ours", "insert.raw_rows"
    )
    report.speed_ratio(
        "insert.vec0_vs_raw",
        "put_many + first vec0 query / raw apsw table + vec0 (rows/s)",
        "insert.ours_vec0",
        "insert.raw",
    )
    t = report.timings
    report.figure(
        Figure(
            "insert.catch_up",
            f"first vec0 query after put_many of {n:,} (its catch-up), median",
            t["insert.ours_vec0"].median - t["insert.ours"].median,
            "s",
        )
    )
    report.cost_ratio(
        "insert.changelog",
        "put_many: time sync=True / sync=False",
        "insert.ours",
        "insert.ours_nosync",
    )


def bench_waiting(report: Report, scratch: Scratch, sizes: Sizes) -> None:
    """A vec0 query with fresh rows waiting for the catch-up (scored beside the index) against one caught up."""
    from localstore.nearest import DEFAULT_PENDING_SCAN

    n, dim = sizes.insert_rows, sizes.insert_dim
    waiting = max(1, min(DEFAULT_PENDING_SCAN, n // 5))
    log(f"waiting: {n:,} indexed rows + {waiting:,} waiting, {dim}-d")
    matrix = embeddings(n + waiting, dim, seed=9)
    queries = embeddings(sizes.queries, dim, seed=10)
    store = ls.open(scratch.path("waiting"))
    coll = store.collection(COLLECTION, key="id", fields=query_fields(dim))
    coll.put_many(query_rows(matrix[:n]))
    with store.transaction():  # a vec0 query inside a transaction always catches up
        coll.nearest("embedding", queries[0], k=10, engine="vec0")
    coll.put_many(query_rows(matrix[n:], n))

    def case(name: str, label: str) -> Case:
        counter = itertools.count()

        def run(i: int) -> None:
            coll.nearest("embedding", queries[i], k=10, engine="vec0")

        return Case(name, run, lambda: next(counter) % len(queries), label=label, unit="query")

    report.add(*measure([case("waiting.scan", f"vec0 query, {waiting:,} rows waiting (scanned)")],
                        sizes.queries, warmup=1, progress="vec0 with waiting rows"))
    with store.transaction():
        coll.nearest("embedding", queries[0], k=10, engine="vec0")
    report.add(*measure([case("waiting.indexed", "vec0 query, every row indexed")],
                        sizes.queries, warmup=1, progress="vec0 caught up"))
    store.close()
    report.cost_ratio("waiting.cost", f"vec0 query: {waiting:,} rows waiting / all indexed (p50 time)",
                      "waiting.scan", "waiting.indexed")


def bench_sweep(
    report: Report, scratch: Scratch, sizes: Sizes
) -> dict[str, list[tuple[int, float, float]]]:
    """Latency against N at ``sweep_dim``: ours (auto, vec0), raw sqlite-vec and BLAS, stores grown in place."""
    dim, top = sizes.sweep_dim, max(sizes.sweep)
    log(f"sweep: making {top:,}x{dim} vectors")
    matrix = embeddings(top, dim, seed=7)
    queries = embeddings(sizes.sweep_queries, dim, seed=8)
    ours_path, raw_path = scratch.path("sweep"), scratch.path("sweep-raw")
    store = ls.open(ours_path)
    conn = raw_vec0(raw_path, dim)
    series: dict[str, list[tuple[int, float, float]]] = {
        "auto": [],
        "vec0": [],
        "raw": [],
        "blas": [],
    }
    try:
        coll = store.collection(COLLECTION, key="id", fields=query_fields(dim))
        have = 0
        for n in sizes.sweep:
            log(f"sweep: growing the stores to {n:,} rows")
            for start in range(have, n, 100_000):
                stop = min(n, start + 100_000)
                coll.put_many(query_rows(matrix[start:stop], start))
                raw_vec0_fill(conn, matrix[start:stop], start)
            have = n
            sql, _ = raw_knn_sql(None)
            size = dim_label(n, dim)
            sink: dict[int, Any] = {}
            cases = [
                query_case(
                    f"sweep.{n}.auto",
                    f"sweep {size}  nearest auto",
                    lambda q: coll.nearest("embedding", q, k=K),
                    queries,
                    sink,
                ),
                query_case(
                    f"sweep.{n}.vec0",
                    f"sweep {size}  nearest vec0",
                    ours_query(coll, "embedding", None, "vec0"),
                    queries,
                    sink,
                ),
                query_case(
                    f"sweep.{n}.raw",
                    f"sweep {size}  raw sqlite-vec",
                    raw_query(conn, sql, []),
                    queries,
                    sink,
                ),
                query_case(
                    f"sweep.{n}.blas",
                    f"sweep {size}  numpy/BLAS",
                    functools.partial(blas_topk, matrix[:n]),
                    queries,
                    sink,
                ),
            ]
            report.add(
                *measure(cases, sizes.sweep_queries, warmup=sizes.warmup, progress=f"sweep {size}")
            )
            for name, points in series.items():
                timing = report.timings[f"sweep.{n}.{name}"]
                points.append((n, timing.median, timing.best))
    finally:
        store.close()
        conn.close()
    # The cache build at the largest N, on a fresh open (the sweep's own cache was patched by each put).
    with ls.open(ours_path) as reopened:
        coll = reopened.collection(COLLECTION)
        started = time.perf_counter()
        coll.nearest("embedding", queries[0], k=K)
        build = time.perf_counter() - started
    scratch.remove(ours_path)
    scratch.remove(raw_path)
    size = dim_label(top, dim)
    report.figure(
        Figure(
            "sweep.cache_build.s", f"sweep {size}  cache build (first auto call, 1 run)", build, "s"
        )
    )
    report.cost_ratio(
        "sweep.top.auto.vs_blas",
        f"sweep {size}  exact KNN: auto / BLAS (p50 time)",
        f"sweep.{top}.auto",
        f"sweep.{top}.blas",
        target_op="<=",
        target=2.0,
    )
    report.cost_ratio(
        "sweep.top.raw.vs_blas",
        f"sweep {size}  raw sqlite-vec / BLAS (p50 time)",
        f"sweep.{top}.raw",
        f"sweep.{top}.blas",
    )
    return series


def plot_latency(
    series: dict[str, list[tuple[int, float, float]]], dim: int, path: Path = PLOT_PATH
) -> Path:
    """Draw p50 latency (and, dashed, the best run) against N, log-log, and save it as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "auto": ("localstore nearest, engine=auto (in-memory cache)", "tab:blue", "o"),
        "vec0": ("localstore nearest, engine=vec0", "tab:cyan", "s"),
        "raw": ("raw sqlite-vec (vec0 MATCH, apsw)", "tab:orange", "^"),
        "blas": ("numpy/BLAS M @ q + argpartition", "tab:green", "D"),
    }
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, points in series.items():
        label, color, marker = styles[name]
        ax.plot(
            [p[0] for p in points],
            [p[1] * 1e3 for p in points],
            marker=marker,
            color=color,
            label=label,
        )
        ax.plot(
            [p[0] for p in points],
            [p[2] * 1e3 for p in points],
            linestyle="--",
            linewidth=0.8,
            alpha=0.6,
            color=color,
        )
    ax.plot([], [], linestyle="--", linewidth=0.8, color="grey", label="dashed: best run of each")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows (N)")
    ax.set_ylabel("p50 latency per query (ms)")
    ax.set_title(f"Exact k={K} nearest neighbours, float32 dim {dim} (cosine), by N")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- entry point -------------------------------------------------------------------------------------


def run(quick: bool = False) -> Report:
    """Run the vectors benchmark; ``quick`` shrinks every size so it finishes in a few seconds."""
    sizes = TINY if is_tiny() else QUICK if quick else FULL
    params: dict[str, Any] = {k: v for k, v in asdict(sizes).items() if k not in ("sweep", "dims")}
    params["dims"] = "/".join(map(str, sizes.dims))
    if sizes.sweep:
        params["sweep"] = "/".join(dim_label(n, sizes.sweep_dim) for n in sizes.sweep)
    params["blas"] = blas_info()
    from localstore import vectors as library_vectors

    params["vec0_oversample"] = str(
        getattr(library_vectors, "DEFAULT_OVERSAMPLE", None)
        or getattr(library_vectors, "DEFAULT_QUANTIZED_OVERSAMPLE", "unknown")
    )
    params["loadavg_1min_at_start"] = round(os.getloadavg()[0], 2)
    report = Report("vectors", quick, params=params)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="localstore-bench-") as root:
        report.params["folder"] = os.path.dirname(root)
        scratch = Scratch(root)
        bench_insert(report, scratch, sizes)
        bench_waiting(report, scratch, sizes)
        for dim in sizes.dims:
            bench_dim(report, scratch, sizes, dim)
        bench_quantized(report, scratch, sizes, isotropic=False)
        bench_quantized(report, scratch, sizes, isotropic=True)
        if sizes.sweep:
            series = bench_sweep(report, scratch, sizes)
            try:
                saved = plot_latency(series, sizes.sweep_dim)
                report.notes.append(f"latency plot written to {saved}")
            except ImportError:
                report.notes.append(
                    "matplotlib is not installed (pip install -e '.[bench]'); no plot drawn"
                )
    report.notes += [
        "p50/p95 are over single queries (one query per timed run, cases interleaved); ratios use p50",
        (
            "ours returns Hit(key, row, distance) with the rows read back; raw sqlite-vec and BLAS return "
            "row ids only"
        ),
        (
            "recall@10 is against a float64 brute force; data are unit vectors around 1,000 cluster centres "
            "(embedding-like) unless marked isotropic (Gaussian noise, the worst case for quantization)"
        ),
        "targets are informational; a MISS does not fail the run",
    ]
    report.elapsed_s = time.perf_counter() - started
    return report

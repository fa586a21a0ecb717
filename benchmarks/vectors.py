"""Vector search: nearest (cache and vec0) against raw sqlite-vec and a numpy/BLAS scan, side by side.

At 100k rows of 8, 64 and 384 dimensions (float32, cosine, k=10; 10k rows with
``--quick``) it times ``Collection.nearest`` with ``engine="auto"`` (the
in-memory matrix) and ``engine="vec0"``, a vec0 table queried directly with
apsw, and ``M @ q`` + ``argpartition`` on the same matrix; unfiltered and with a
filter of about 1/3 and about 1% selectivity; a batch of 100 queries against 100
single calls; ``put_many`` of rows with a 384-d vector against raw apsw; and
recall@10 of every path against a float64 brute force, including the int8
quantized vec0 index. The full run also sweeps N from 10k to 1M at 64
dimensions and draws ``benchmarks/vectors_latency.png``.

This module is the entry point (``run``) and holds the write side: ``put_many``
with a vector against raw apsw, and a vec0 query with fresh rows waiting for the
index's catch-up. The query sections live in ``_vectors_knn.py``; the sizes, data,
ground truth and baselines in ``_vectors_workload.py``, whose names ``peers.py``
imports from here.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import os
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import apsw
import numpy as np
from _harness import Case, Figure, Report, Scratch, is_tiny, log, measure
from _vectors_knn import bench_dim, bench_quantized, bench_sweep, plot_latency
from _vectors_workload import (
    COLLECTION,
    FULL,
    KINDS,
    QUICK,
    TINY,
    Sizes,
    blas_topk,
    dim_label,
    embeddings,
    filter_mask,
    group_of,
    index_of,
    key_of,
    kind_of,
    query_fields,
    query_rows,
    raw_vec0,
    recall,
    truth,
)

import localstore as ls

#: What ``peers.py`` reads from this module (it loads ``vectors.py``, not the helper modules).
__all__ = [
    "COLLECTION",
    "KINDS",
    "blas_topk",
    "embeddings",
    "filter_mask",
    "group_of",
    "index_of",
    "key_of",
    "kind_of",
    "query_fields",
    "query_rows",
    "recall",
    "run",
    "truth",
]


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

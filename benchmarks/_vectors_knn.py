"""Nearest-neighbour queries: latency and recall@10 of ``nearest`` against raw sqlite-vec and BLAS.

Per dimension (100k rows of 8, 64 and 384; 10k with ``--quick``): ``nearest``
with ``engine="auto"`` (the in-memory matrix, its first build timed apart) and
``engine="vec0"``, a bare vec0 table queried with apsw, and ``M @ q`` +
``argpartition``; unfiltered and filtered at about 1/3 and 1%; a batch of queries
against as many single calls; recall@10 of every path against a float64 brute
force. Also ``engine="vec0"`` on an int8 quantized field (clustered and isotropic
data), and, in the full run, latency against N at 64 dimensions with its plot
``benchmarks/vectors_latency.png``. ``vectors.py`` runs these sections.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _harness import Case, Figure, Report, Scratch, Timing, log, measure
from _vectors_workload import (
    COLLECTION,
    FILTERS,
    K,
    Sizes,
    blas_topk,
    blas_topk_batch,
    dim_label,
    embeddings,
    filter_mask,
    index_of,
    key_of,
    kind_of,
    ours_query,
    query_case,
    query_fields,
    query_rows,
    raw_knn_sql,
    raw_query,
    raw_vec0,
    raw_vec0_fill,
    recall,
    truth,
)

import localstore as ls

PLOT_PATH = Path(__file__).resolve().parent / "vectors_latency.png"


def percentile(timing: Timing, q: float) -> float:
    """The ``q``-th percentile of a timing's runs, in seconds."""
    return float(np.percentile(timing.runs, q))


def build_query_store(path: str, matrix: np.ndarray) -> None:
    """A store at ``path`` holding the query rows of ``matrix`` (untimed set-up)."""
    with ls.open(path) as store:
        coll = store.collection(COLLECTION, key="id", fields=query_fields(matrix.shape[1]))
        for start in range(0, len(matrix), 100_000):
            coll.put_many(query_rows(matrix[start : start + 100_000], start))


# -- sections -------------------------------------------------------------------------------------


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

"""Peers side by side: Chroma and LanceDB (vectors), LangGraph SqliteSaver (checkpoints), Postgres direct (telemetry).

Every section times ours and the peer in one ``measure`` call on the same data.
A peer that is not installed (``pip install -e '.[bench]'``) or fails to start is
reported as skipped: its figures carry ``skipped`` and a reason, never an error.

- vectors: N×384 clustered unit vectors (the data of ``vectors.py``), a ``kind``
  filter field (1 of 3) and a ``grp`` field (1 of 100). Insert: our ``put_many``
  against Chroma ``PersistentClient`` ``add`` (in its max batch size) and LanceDB
  ``create_table`` from an Arrow table. Queries (k=10, cosine): our
  ``nearest(engine="auto")``, Chroma's HNSW ``query`` and LanceDB's flat search
  (no index), unfiltered and filtered, and the numpy/BLAS scan; Chroma's recall@10
  against exact.
- checkpoints: ~64 KB agent state (float32 arrays plus a JSON message list) put
  N times (spread over threads of 100 steps, as agent runs are): LangGraph
  ``SqliteSaver.put`` against our telemetry kit's ``save_checkpoint`` on a store
  opened with ``wal_checkpoint="background"`` (the headline; the same kit with
  SQLite's own checkpoints, and batches of ``CKPT_BATCH`` through
  ``save_checkpoints``, as separate figures), and a plain collection ``put`` of the
  same ``encode_state`` bytes (on a store set up as the headline's); throughput and the file size afterwards. Every side
  serialises the state inside the timed loop, one call (and one commit) per
  checkpoint except the batched figure. The kit's rows written by hand-made apsw
  statements (``_ckpt_raw.py``) give the floor of its layout without the collection layer.
- postgres: telemetry rows written straight to Postgres with psycopg, row by row
  (autocommit) and with COPY, against our local ``record_telemetry`` /
  ``record_telemetry_many`` and the background sync's drain of the same rows.

Sections can be chosen with ``LOCALSTORE_BENCH_SECTIONS=vectors,checkpoints,postgres``
(``run.py all --only peers.vectors`` sets it). ``scaling`` (latency and insert rate at
N = 10k, 30k, 100k, drawn to ``benchmarks/peers_scaling.png``) runs only when chosen.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _harness import Case, Figure, Report, Scratch, Timing, english_text, is_tiny, log, measure

import localstore as ls

BENCH_DIR = Path(__file__).resolve().parent
K = 10
SECTIONS = ("vectors", "checkpoints", "postgres")


@dataclass(frozen=True)
class Sizes:
    """How much work each section does."""

    vec_rows: int
    dim: int
    queries: int
    insert_repeat: int
    checkpoints: int
    kit_checkpoints: int  # the kit's puts (whole threads); the same as checkpoints unless cut for time
    steps_per_thread: int
    ckpt_repeat: int
    pg_rows: int  # COPY, batch and sync
    pg_single: int  # row-by-row inserts
    pg_repeat: int


FULL = Sizes(vec_rows=100_000, dim=384, queries=20, insert_repeat=1, checkpoints=10_000,
             kit_checkpoints=10_000, steps_per_thread=100, ckpt_repeat=1, pg_rows=100_000, pg_single=5_000, pg_repeat=2)
QUICK = Sizes(vec_rows=10_000, dim=384, queries=10, insert_repeat=1, checkpoints=1_000,
              kit_checkpoints=1_000, steps_per_thread=100, ckpt_repeat=1, pg_rows=10_000, pg_single=1_000, pg_repeat=1)
TINY = Sizes(vec_rows=2_000, dim=384, queries=3, insert_repeat=1, checkpoints=20,
             kit_checkpoints=20, steps_per_thread=10, ckpt_repeat=1, pg_rows=300, pg_single=50, pg_repeat=1)


def _vectors_module() -> Any:
    """``benchmarks/vectors.py`` (its data and helpers), loaded under run.py's private name."""
    name = "_localstore_bench_vectors"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / "vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _skip(report: Report, names: list[tuple[str, str, str, str | None, float | None]], reason: str) -> None:
    """Add each figure as skipped (value NaN) with ``reason``."""
    for name, label, unit, op, target in names:
        report.figure(Figure(name, label, float("nan"), unit, op, target, skipped=reason))


def _try_import(module: str) -> tuple[Any, str]:
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # noqa: BLE001 - any failure means skipped
        return None, f"{module} not importable ({type(exc).__name__}: {exc}); pip install -e '.[bench]'"



def _p50(t: Timing) -> float:
    return float(np.percentile(t.runs, 50))


# -- vectors: Chroma, LanceDB ----------------------------------------------------------------------

VECTOR_FIGURES: dict[str, list[tuple[str, str, str, str | None, float | None]]] = {
    "chroma": [
        ("insert.vs_chroma", "insert with a 384-d vector: ours / Chroma add (speed)", "x", ">=", 20.0),
        ("knn.vs_chroma", "KNN unfiltered: ours / Chroma query (time)", "x", None, None),
        ("knn_third.vs_chroma", "filtered KNN, 1 of 3: ours / Chroma (time)", "x", "<", 1.0),
        ("knn_rare.vs_chroma", "filtered KNN, 1 of 100: ours / Chroma (time)", "x", "<", 1.0),
        ("chroma.recall", "Chroma recall@10 vs exact, unfiltered", "", None, None),
        ("chroma.recall_filtered", "Chroma recall@10 vs exact, min over the two filters", "", None, None),
    ],
    "lancedb": [
        ("insert.vs_lancedb", "insert with a 384-d vector: ours / LanceDB (speed)", "x", None, None),
        ("knn.vs_lancedb", "KNN unfiltered: ours / LanceDB flat (time)", "x", None, None),
        ("knn_third.vs_lancedb", "filtered KNN, 1 of 3: ours / LanceDB flat (time)", "x", None, None),
        ("knn_rare.vs_lancedb", "filtered KNN, 1 of 100: ours / LanceDB flat (time)", "x", None, None),
    ],
}


def bench_vectors(report: Report, scratch: Scratch, sizes: Sizes) -> None:
    vec = _vectors_module()
    n, dim = sizes.vec_rows, sizes.dim
    log(f"peers vectors: {n:,}x{dim}")
    matrix = vec.embeddings(n, dim, seed=1)
    queries = vec.embeddings(sizes.queries, dim, seed=2)
    kinds = [vec.kind_of(i) for i in range(n)]
    groups = [vec.group_of(i) for i in range(n)]
    ids = [vec.key_of(i) for i in range(n)]
    rows = vec.query_rows(matrix)
    filters = {"all": None, "third": {"kind": vec.KINDS[0]}, "rare": {"grp": vec.group_of(0)}}

    chromadb, chroma_why = _try_import("chromadb")
    lancedb, lance_why = _try_import("lancedb")
    pa = None
    if lancedb is not None:
        pa, lance_why = _try_import("pyarrow")
        if pa is None:
            lancedb = None

    kept: dict[str, Any] = {}
    counter = [0]

    def folder(stem: str) -> str:
        counter[0] += 1
        return os.path.join(scratch.root, f"{stem}-{counter[0]}")

    # insert ---------------------------------------------------------------------------------------
    def ours_setup() -> tuple[str, ls.Store, Any]:
        path = scratch.path("peers-ours")
        store = ls.open(path)
        return path, store, store.collection(vec.COLLECTION, key="id", fields=vec.query_fields(dim))

    def ours_teardown(state: tuple[str, ls.Store, Any]) -> None:
        state[1].close()
        old = kept.pop("ours", None)
        if old:
            Scratch.remove(old)
        kept["ours"] = state[0]

    cases = [Case("insert.ours", lambda s: s[2].put_many(rows), ours_setup, ours_teardown, items=n,
                  unit="row", label="ours: put_many (key, 2 filter fields, 384-d vector)")]

    def chroma_setup() -> tuple[str, Any, Any]:
        path = folder("chroma")
        client = chromadb.PersistentClient(path=path)
        coll = client.create_collection("bench", metadata={"hnsw:space": "cosine"}, embedding_function=None)
        return path, client, coll

    def chroma_run(state: tuple[str, Any, Any]) -> None:
        client, coll = state[1], state[2]
        step = max(1, min(5_000, client.get_max_batch_size()))
        for start in range(0, n, step):
            end = min(n, start + step)
            coll.add(ids=ids[start:end], embeddings=matrix[start:end],
                     metadatas=[{"kind": kinds[i], "grp": groups[i]} for i in range(start, end)])

    def chroma_teardown(state: tuple[str, Any, Any]) -> None:
        old = kept.pop("chroma", None)
        if old:
            old[1].clear_system_cache() if hasattr(old[1], "clear_system_cache") else None
            shutil.rmtree(old[0], ignore_errors=True)
        kept["chroma"] = state

    if chromadb is not None:
        cases.append(Case("insert.chroma", chroma_run, chroma_setup, chroma_teardown, items=n, unit="row",
                          label="Chroma PersistentClient add (ids, embeddings, metadatas)"))

    def lance_setup() -> tuple[str, Any]:
        path = folder("lance")
        return path, lancedb.connect(path)

    def lance_run(state: tuple[str, Any]) -> None:
        table = pa.table({
            "id": ids, "kind": kinds, "grp": groups,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim),
        })
        state[1].create_table("bench", data=table)

    def lance_teardown(state: tuple[str, Any]) -> None:
        old = kept.pop("lance", None)
        if old:
            shutil.rmtree(old[0], ignore_errors=True)
        kept["lance"] = state

    if lancedb is not None:
        cases.append(Case("insert.lancedb", lance_run, lance_setup, lance_teardown, items=n, unit="row",
                          label="LanceDB create_table from an Arrow table"))
    try:
        report.add(*measure(cases, sizes.insert_repeat, progress="peers insert"))
    except Exception as exc:  # noqa: BLE001 - a peer failing at run time is skipped too
        log(f"peers insert failed: {exc!r}; retrying ours alone")
        chroma_why = lance_why = f"failed during insert: {type(exc).__name__}: {exc}"
        chromadb = lancedb = None
        report.add(*measure(cases[:1], sizes.insert_repeat, progress="peers insert (ours)"))

    # queries ---------------------------------------------------------------------------------------
    store = ls.open(kept["ours"])
    coll = store.collection(vec.COLLECTION)
    coll.nearest("embedding", queries[0], k=K)  # builds the in-memory matrix (timed in vectors.py)
    answers: dict[str, dict[int, list[int]]] = {}

    def case(name: str, label: str, fn: Callable[[np.ndarray], list[int]]) -> Case:
        out = answers.setdefault(name, {})
        it = iter(range(10**9))

        def run(i: int) -> None:
            out[i] = fn(queries[i])

        return Case(name, run, lambda: next(it) % len(queries), label=label, unit="query")

    qcases = []
    for tag, where in filters.items():
        what = "unfiltered" if where is None else f"where {where}"
        qcases.append(case(f"knn_{tag}.ours", f"ours nearest auto, {what}",
                           lambda q, w=where: [vec.index_of(h.key) for h in coll.nearest("embedding", q, k=K, where=w)]))
        if tag == "all":
            qcases.append(case("knn_all.blas", "numpy/BLAS scan, unfiltered", lambda q: vec.blas_topk(matrix, q).tolist()))
        if chromadb is not None:
            ccoll = kept["chroma"][2]
            qcases.append(case(f"knn_{tag}.chroma", f"Chroma query (HNSW), {what}",
                               lambda q, w=where, c=ccoll: [vec.index_of(k) for k in c.query(
                                   query_embeddings=[q], n_results=K, where=w, include=["distances"])["ids"][0]]))
        if lancedb is not None:
            ltable = kept["lance"][1].open_table("bench")
            sql_where = None if where is None else " AND ".join(f"{k} = '{v}'" for k, v in where.items())

            def lance_q(q: np.ndarray, w: str | None = sql_where, table: Any = ltable) -> list[int]:
                search = table.search(q).metric("cosine").limit(K)
                if w is not None:
                    search = search.where(w, prefilter=True)
                return [vec.index_of(k) for k in search.select(["id", "_distance"]).to_arrow()["id"].to_pylist()]

            qcases.append(case(f"knn_{tag}.lancedb", f"LanceDB flat search, {what}", lance_q))
    try:
        report.add(*measure(qcases, sizes.queries, warmup=1, progress="peers queries"))
    except Exception as exc:
        log(f"peers queries failed: {exc!r}")
        raise
    store.close()

    for tag, where in filters.items():
        expected = vec.truth(matrix, queries, vec.filter_mask(n, where))
        for who in ("ours", "chroma", "lancedb"):
            found = answers.get(f"knn_{tag}.{who}")
            if found:
                report.params[f"recall_{tag}_{who}"] = round(vec.recall(found, expected), 4)

    # figures ---------------------------------------------------------------------------------------
    t = report.timings
    report.figure(Figure("insert.ours_rate", "insert with a 384-d vector, ours", t["insert.ours"].rate, "rows/s"))
    report.figure(Figure("knn.vs_blas", "exact KNN: ours / BLAS scan (p50)", _p50(t["knn_all.ours"]) / _p50(t["knn_all.blas"]),
                         "x", "<=", 2.0, ours=f"{_p50(t['knn_all.ours']) * 1e3:.2f} ms",
                         peers={"BLAS": f"{_p50(t['knn_all.blas']) * 1e3:.2f} ms"}))
    report.figure(Figure("knn_third.vs_unfiltered", "ours: filtered 1 of 3 / unfiltered (p50)",
                         _p50(t["knn_third.ours"]) / _p50(t["knn_all.ours"]), "x"))
    for peer, module, why in (("chroma", chromadb, chroma_why), ("lancedb", lancedb, lance_why)):
        if module is None:
            _skip(report, VECTOR_FIGURES[peer], why)
            continue
        name = "Chroma" if peer == "chroma" else "LanceDB"
        a, b = t["insert.ours"], t[f"insert.{peer}"]
        spec = {f[0]: f for f in VECTOR_FIGURES[peer]}
        f = spec[f"insert.vs_{peer}"]
        report.figure(Figure(f[0], f[1], a.rate / b.rate, "x", f[3], f[4], ours=f"{a.rate:,.0f} rows/s",
                             peers={name: f"{b.rate:,.0f} rows/s"}))
        for tag in filters:
            f = spec[f"knn_{tag}.vs_{peer}" if tag != "all" else f"knn.vs_{peer}"]
            ours_s, theirs_s = _p50(t[f"knn_{tag}.ours"]), _p50(t[f"knn_{tag}.{peer}"])
            report.figure(Figure(f[0], f[1], ours_s / theirs_s, "x", f[3], f[4], ours=f"{ours_s * 1e3:.2f} ms",
                                 peers={name: f"{theirs_s * 1e3:.2f} ms"}))
        if peer == "chroma":
            report.figure(Figure("chroma.recall", spec["chroma.recall"][1], report.params["recall_all_chroma"], "",
                                 ours=str(report.params["recall_all_ours"])))
            report.figure(Figure("chroma.recall_filtered", spec["chroma.recall_filtered"][1],
                                 min(report.params["recall_third_chroma"], report.params["recall_rare_chroma"]), "",
                                 ours=str(min(report.params["recall_third_ours"], report.params["recall_rare_ours"]))))
    for key in ("ours", "lance"):
        if key in kept and key != "ours":
            shutil.rmtree(kept[key][0], ignore_errors=True)
    if "chroma" in kept:
        shutil.rmtree(kept["chroma"][0], ignore_errors=True)
    Scratch.remove(kept["ours"])


# -- checkpoints: LangGraph SqliteSaver ------------------------------------------------------------

CKPT_FIGURES = [
    ("ckpt.vs_langgraph", "checkpoint puts, ~64 KB state: ours / SqliteSaver (speed)", "x", ">=", 2.0),
    ("ckpt.size_vs_langgraph", "checkpoint file size per checkpoint: ours / SqliteSaver", "x", "<", 1.0),
    ("ckpt.plain_vs_langgraph", "checkpoint puts, plain collection / SqliteSaver (speed)", "x", None, None),
    ("ckpt.plain_size_vs_langgraph", "file size per checkpoint, plain collection / SqliteSaver", "x", None, None),
    ("ckpt.auto_vs_langgraph", "checkpoint puts, kit with SQLite's own WAL checkpoints / SqliteSaver (speed)", "x", None, None),
    ("ckpt.batch_vs_langgraph", "checkpoint puts, kit save_checkpoints batches / SqliteSaver (speed)", "x", None, None),
    ("ckpt.cpu_vs_langgraph", "CPU time per checkpoint put: ours (telemetry kit) / SqliteSaver", "x", None, None),
    ("ckpt.raw_vs_langgraph", "checkpoint puts, the kit's rows as raw apsw statements / SqliteSaver (speed)", "x", None, None),
]
#: Checkpoints per ``save_checkpoints`` call in the batched figure (an agent saving every step, flushing every 10).
CKPT_BATCH = 10


def agent_state(rng: np.random.Generator, prng: random.Random, step: int) -> dict[str, Any]:
    """About 64 KB of agent state: float32 arrays (~40 KB) and a JSON message list (~24 KB of English)."""
    return {
        "embedding_cache": rng.standard_normal((16, 384), dtype=np.float32),  # 24 KB
        "scores": rng.random(4_096, dtype=np.float32),  # 16 KB
        "messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": english_text(prng, 1_000)}
                     for i in range(24)],
        "step": step,
        "plan": ["search", "read", "summarise", "answer"],
    }


def bench_checkpoints(report: Report, scratch: Scratch, sizes: Sizes) -> None:
    n, per = sizes.checkpoints, sizes.steps_per_thread
    log(f"peers checkpoints: {n:,} puts of ~64 KB")
    rng, prng = np.random.default_rng(3), random.Random(3)
    pool = [agent_state(rng, prng, i) for i in range(min(n, 50))]
    states = [pool[i % len(pool)] | {"step": i} for i in range(n)]
    raw = sum(a.nbytes for a in pool[0].values() if isinstance(a, np.ndarray)) + len(json.dumps(pool[0]["messages"]))
    report.params["ckpt_state_bytes"] = raw
    report.params["ckpt_threads"] = max(1, n // per)
    report.params["ckpt_kit_puts"] = min(n, sizes.kit_checkpoints)

    saver_mod, why = _try_import("langgraph.checkpoint.sqlite")
    base_mod = None
    if saver_mod is not None:
        base_mod, why = _try_import("langgraph.checkpoint.base")
    sizes_on_disk: dict[str, list[int]] = {"ours": [], "langgraph": [], "plain": [], "auto": [], "batch": [], "raw": []}

    def kit_setup(name: str, wal_checkpoint: str) -> Callable[[], tuple[str, Any, Any]]:
        def setup() -> tuple[str, Any, Any]:
            from localstore.kits.telemetry import Telemetry

            path = scratch.path(name)
            store = ls.open(path, wal_checkpoint=wal_checkpoint)
            return path, store, Telemetry(store)
        return setup

    kit_n = min(n, sizes.kit_checkpoints)

    def ours_run(state: tuple[str, Any, Any]) -> None:
        tm = state[2]
        sid = None
        for i, s in enumerate(states[:kit_n]):
            if i % per == 0:
                sid = tm.start_session()
            tm.save_checkpoint(sid, phi=0.5 + (i % 97) / 200, kappa=64.0, regime="geometric", state_dict=s)

    def raw_run(state: tuple[str, Any, Any]) -> None:
        from _ckpt_raw import RawSaver

        tm = state[2]
        saver, sid = RawSaver(tm), None
        for i, s in enumerate(states[:kit_n]):
            if i % per == 0:
                sid = tm.start_session()
            saver.save(sid, 0.5 + (i % 97) / 200, s)

    def batch_run(state: tuple[str, Any, Any]) -> None:
        tm = state[2]
        for start in range(0, kit_n, per):  # one session per thread, CKPT_BATCH checkpoints per call
            sid = tm.start_session()
            end = min(start + per, kit_n)
            for b in range(start, end, CKPT_BATCH):
                tm.save_checkpoints(sid, [{"phi": 0.5 + (i % 97) / 200, "kappa": 64.0, "regime": "geometric",
                                           "state_dict": states[i]} for i in range(b, min(b + CKPT_BATCH, end))])

    def plain_setup() -> tuple[str, Any, Any]:
        path = scratch.path("ckpt-plain")
        store = ls.open(path, wal_checkpoint="background")  # the headline's store set-up
        # encode_state already compresses the JSON part; the arrays would barely shrink.
        return path, store, store.collection("checkpoints", key="id", fields={
            "id": ls.Text(), "thread": ls.Text(filter=True), "step": ls.Integer(),
            "phi": ls.Real(filter=True), "state": ls.Blob()})

    def plain_run(state: tuple[str, Any, Any]) -> None:
        from localstore.kits.telemetry import encode_state

        coll = state[2]
        for i, s in enumerate(states):
            coll.put({"id": f"t{i // per}#{i:08d}", "thread": f"t{i // per}", "step": i,
                      "phi": 0.5 + (i % 97) / 200, "state": encode_state(s)})

    def plain_teardown(state: tuple[str, Any, Any]) -> None:
        state[1].close()
        sizes_on_disk["plain"].append(sum(os.path.getsize(state[0] + s) for s in ("", "-wal") if os.path.exists(state[0] + s)))
        Scratch.remove(state[0])

    def kit_teardown(kind: str) -> Callable[[tuple[str, Any, Any]], None]:
        def teardown(state: tuple[str, Any, Any]) -> None:
            if kind == "raw":  # the hand-written statements must have kept the rows and change log consistent
                check = state[1].verify()
                if not check.ok:
                    raise RuntimeError(f"peers checkpoints: the raw statement plan left {check.problems}")
            state[1].close()
            sizes_on_disk[kind].append(sum(os.path.getsize(state[0] + s) for s in ("", "-wal") if os.path.exists(state[0] + s)))
            Scratch.remove(state[0])
        return teardown

    # CPU seconds per case (all threads of this process: our WAL checkpointer's included), to show
    # where each side's time goes: the rest of the wall time is spent waiting for the disk.
    cpu: dict[str, list[float]] = {}

    def on_cpu(name: str, run: Callable[[Any], None]) -> Callable[[Any], None]:
        def timed(state: Any) -> None:
            start = time.process_time()
            run(state)
            cpu.setdefault(name, []).append(time.process_time() - start)
        return timed

    ours_run = on_cpu("ours", ours_run)
    cases = [Case("ckpt.ours", ours_run, kit_setup("ckpt-ours", "background"), kit_teardown("ours"), items=kit_n, unit="put",
                  label=f"ours: Telemetry.save_checkpoint, wal_checkpoint='background' (state, row, history), {kit_n:,} puts"),
             Case("ckpt.plain", plain_run, plain_setup, plain_teardown, items=n, unit="put",
                  label="ours: plain collection put of the same encoded state, wal_checkpoint='background' (no history, no best flag)"),
             Case("ckpt.ours_auto", ours_run, kit_setup("ckpt-auto", "auto"), kit_teardown("auto"), items=kit_n, unit="put",
                  label="ours: Telemetry.save_checkpoint, SQLite's own WAL checkpoints (the default)"),
             Case("ckpt.ours_batch", batch_run, kit_setup("ckpt-batch", "background"), kit_teardown("batch"), items=kit_n,
                  unit="put", label=f"ours: Telemetry.save_checkpoints, {CKPT_BATCH} per call, wal_checkpoint='background'"),
             Case("ckpt.raw", raw_run, kit_setup("ckpt-raw", "background"), kit_teardown("raw"), items=kit_n, unit="put",
                  label="the kit's rows written by raw apsw statements (benchmarks/_ckpt_raw.py), wal_checkpoint='background'")]

    def lg_setup() -> tuple[str, Any, Any]:
        path = scratch.path("ckpt-langgraph")
        conn = sqlite3.connect(path, check_same_thread=False)
        saver = saver_mod.SqliteSaver(conn)
        saver.setup()
        return path, conn, saver

    def lg_run(state: tuple[str, Any, Any]) -> None:
        saver = state[2]
        config: dict[str, Any] = {}
        for i, s in enumerate(states):
            if i % per == 0:
                config = {"configurable": {"thread_id": f"thread-{i // per}", "checkpoint_ns": ""}}
            ckpt = base_mod.empty_checkpoint()
            ckpt["channel_values"] = dict(s)
            ckpt["channel_versions"] = {k: i + 1 for k in s}
            config = saver.put(config, ckpt, {"source": "loop", "step": i, "parents": {}},
                               {k: i + 1 for k in s})

    def lg_teardown(state: tuple[str, Any, Any]) -> None:
        state[1].close()
        sizes_on_disk["langgraph"].append(sum(os.path.getsize(state[0] + s) for s in ("", "-wal") if os.path.exists(state[0] + s)))
        Scratch.remove(state[0])

    if saver_mod is not None and base_mod is not None:
        cases.append(Case("ckpt.langgraph", on_cpu("langgraph", lg_run), lg_setup, lg_teardown, items=n, unit="put",
                          label="LangGraph SqliteSaver.put (same state in channel_values)"))
    try:
        report.add(*measure(cases, sizes.ckpt_repeat, progress="peers checkpoints"))
    except Exception as exc:  # noqa: BLE001
        log(f"peers checkpoints: LangGraph failed ({exc!r}); ours alone")
        why, saver_mod = f"failed: {type(exc).__name__}: {exc}", None
        sizes_on_disk = {"ours": [], "langgraph": [], "plain": [], "auto": [], "batch": [], "raw": []}
        report.add(*measure(cases[:5], sizes.ckpt_repeat, progress="peers checkpoints (ours)"))
    ours_t, plain_t = report.timings["ckpt.ours"], report.timings["ckpt.plain"]
    # per checkpoint, since the kit may run fewer puts (whole threads of the same length) in --quick
    ours_kb = sizes_on_disk["ours"][-1] / 1e3 / kit_n
    plain_kb = sizes_on_disk["plain"][-1] / 1e3 / n
    report.figure(Figure("ckpt.ours_rate", "checkpoint puts, ours (telemetry kit)", ours_t.rate, "puts/s"))
    report.figure(Figure("ckpt.ours_kb", "file size per checkpoint, ours (telemetry kit)", ours_kb, "KB"))
    report.figure(Figure("ckpt.plain_rate", "checkpoint puts, ours as a plain collection", plain_t.rate, "puts/s",
                         ours=f"{plain_t.rate:,.0f} puts/s; {plain_kb:,.1f} KB per checkpoint"))
    if saver_mod is None or base_mod is None or "ckpt.langgraph" not in report.timings:
        _skip(report, CKPT_FIGURES, why)
        return
    lg_t = report.timings["ckpt.langgraph"]
    lg_kb = sizes_on_disk["langgraph"][-1] / 1e3 / n
    report.figure(Figure(*CKPT_FIGURES[0][:2], ours_t.rate / lg_t.rate, "x", *CKPT_FIGURES[0][3:],
                         ours=f"{ours_t.rate:,.0f} puts/s", peers={"SqliteSaver": f"{lg_t.rate:,.0f} puts/s"}))
    report.figure(Figure(*CKPT_FIGURES[1][:2], ours_kb / lg_kb, "x", *CKPT_FIGURES[1][3:],
                         ours=f"{ours_kb:,.1f} KB/checkpoint", peers={"SqliteSaver": f"{lg_kb:,.1f} KB/checkpoint"}))
    report.figure(Figure(*CKPT_FIGURES[2][:2], plain_t.rate / lg_t.rate, "x", *CKPT_FIGURES[2][3:],
                         ours=f"{plain_t.rate:,.0f} puts/s", peers={"SqliteSaver": f"{lg_t.rate:,.0f} puts/s"}))
    report.figure(Figure(*CKPT_FIGURES[3][:2], plain_kb / lg_kb, "x", *CKPT_FIGURES[3][3:],
                         ours=f"{plain_kb:,.1f} KB/checkpoint", peers={"SqliteSaver": f"{lg_kb:,.1f} KB/checkpoint"}))
    for fig, key in ((CKPT_FIGURES[4], "ckpt.ours_auto"), (CKPT_FIGURES[5], "ckpt.ours_batch"), (CKPT_FIGURES[7], "ckpt.raw")):
        rate = report.timings[key].rate
        report.figure(Figure(*fig[:2], rate / lg_t.rate, "x", *fig[3:],
                             ours=f"{rate:,.0f} puts/s", peers={"SqliteSaver": f"{lg_t.rate:,.0f} puts/s"}))
    sides = {}
    for name, timing, puts in (("ours", ours_t, kit_n), ("langgraph", lg_t, n)):
        on = sum(cpu[name]) / len(cpu[name]) / puts * 1e6
        sides[name] = (on, f"{on:,.0f} us CPU + {max(0.0, timing.per_item * 1e6 - on):,.0f} us waiting per put")
    report.figure(Figure(*CKPT_FIGURES[6][:2], sides["ours"][0] / sides["langgraph"][0], "x", *CKPT_FIGURES[6][3:],
                         ours=sides["ours"][1], peers={"SqliteSaver": sides["langgraph"][1]}))


# -- postgres direct ------------------------------------------------------------------------------

PG_FIGURES = [
    ("pg.single_vs_rowwise", "telemetry, one row per call: ours local / Postgres INSERT (speed)", "x", None, None),
    ("pg.batch_vs_copy", "telemetry batch: ours record_telemetry_many / Postgres COPY (speed)", "x", None, None),
    ("pg.sync_vs_copy", "into Postgres: ours local write + sync drain / COPY (time)", "x", None, None),
]
PG_COLUMNS = ("session_id", "step", "timestamp", "phi", "kappa_eff", "regime", "basin_distance", "emergency")


def bench_postgres(report: Report, scratch: Scratch, sizes: Sizes) -> None:
    psycopg, why = _try_import("psycopg")
    postgres_url = None
    if psycopg is not None:
        try:
            from localstore.sync import SyncEngine
            from localstore.sync.embedded import postgres_url
        except Exception as exc:  # noqa: BLE001
            why, psycopg = f"localstore.sync not importable: {exc}", None
    if psycopg is None or postgres_url is None:
        _skip(report, PG_FIGURES, why)
        return
    from psycopg import sql

    from localstore.kits.telemetry import Telemetry

    log(f"peers postgres: {sizes.pg_rows:,} telemetry rows")
    rng = random.Random(11)
    records = [{"step": i, "timestamp": 1_700_000_000 + i * 0.1, "phi": rng.random(), "kappa_eff": 60 + rng.random() * 8,
                "regime": rng.choice(("linear", "geometric", "breakdown")), "basin_distance": rng.random(),
                "emergency": i % 500 == 0} for i in range(sizes.pg_rows)]
    counter = [0]
    ddl = ("CREATE TABLE {} (session_id text, step bigint, timestamp double precision, phi double precision, "
           "kappa_eff double precision, regime text, basin_distance double precision, emergency boolean, "
           "PRIMARY KEY (session_id, step))")
    try:
        ctx = postgres_url("bench", prefix="lsbench")
        url = ctx.__enter__()
    except Exception as exc:  # noqa: BLE001
        _skip(report, PG_FIGURES, f"no Postgres: {type(exc).__name__}: {exc}")
        return
    try:
        def pg_setup() -> tuple[str, Any]:
            counter[0] += 1
            schema = f"bench_peer_{counter[0]}"
            conn = psycopg.connect(url, autocommit=True)
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL(ddl).format(sql.Identifier(schema, "telemetry")))
            return schema, conn

        def pg_teardown(state: tuple[str, Any]) -> None:
            state[1].execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(state[0])))
            state[1].close()

        def rowwise(state: tuple[str, Any]) -> None:
            stmt = sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, %s, %s)").format(
                sql.Identifier(state[0], "telemetry"))
            for r in records[: sizes.pg_single]:
                state[1].execute(stmt, ("s1", *(r[c] for c in PG_COLUMNS[1:])))

        def copy(state: tuple[str, Any]) -> None:
            with state[1].transaction(), state[1].cursor() as cur, cur.copy(
                sql.SQL("COPY {} FROM STDIN").format(sql.Identifier(state[0], "telemetry"))) as cp:
                for r in records:
                    cp.write_row(("s1", *(r[c] for c in PG_COLUMNS[1:])))

        def ours_setup() -> tuple[str, Any, Any, str]:
            folder = os.path.join(scratch.root, f"pgours-{len(os.listdir(scratch.root))}-{uuid.uuid4().hex[:6]}")
            ws = ls.Workspace(folder)
            tm = Telemetry(ws.open("agent"))
            return folder, ws, tm, tm.start_session()

        def ours_teardown(state: tuple[str, Any, Any, str]) -> None:
            state[1].close()
            shutil.rmtree(state[0], ignore_errors=True)

        def ours_single(state: tuple[str, Any, Any, str]) -> None:
            tm, sid = state[2], state[3]
            for r in records[: sizes.pg_single]:
                tm.record_telemetry(sid, **r)

        def ours_many(state: tuple[str, Any, Any, str]) -> None:
            state[2].record_telemetry_many(state[3], records)

        schemas: list[str] = []

        def ours_sync(state: tuple[str, Any, Any, str]) -> None:
            state[2].record_telemetry_many(state[3], records)
            counter[0] += 1
            schemas.append(f"bench_peer_sync_{counter[0]}")
            engine = SyncEngine(state[0], url, schema=schemas[-1], watch=False, pull=False)
            try:
                engine.sync_now()
            finally:
                engine.close()

        def sync_teardown(state: tuple[str, Any, Any, str]) -> None:
            ours_teardown(state)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schemas[-1])))

        n, s = sizes.pg_rows, sizes.pg_single
        report.add(*measure([
            Case("pg.rowwise", rowwise, pg_setup, pg_teardown, items=s, unit="row",
                 label="Postgres: psycopg INSERT per row, autocommit"),
            Case("pg.ours_single", ours_single, ours_setup, ours_teardown, items=s, unit="row",
                 label="ours: record_telemetry per row (each its own transaction)"),
            Case("pg.copy", copy, pg_setup, pg_teardown, items=n, unit="row", label="Postgres: psycopg COPY, one transaction"),
            Case("pg.ours_many", ours_many, ours_setup, ours_teardown, items=n, unit="row",
                 label="ours: record_telemetry_many (local)"),
            Case("pg.ours_sync", ours_sync, ours_setup, sync_teardown, items=n, unit="row",
                 label="ours: record_telemetry_many + SyncEngine.sync_now into Postgres"),
        ], sizes.pg_repeat, progress="peers postgres"))
    finally:
        ctx.__exit__(None, None, None)
    t = report.timings
    report.figure(Figure(*PG_FIGURES[0][:2], t["pg.ours_single"].rate / t["pg.rowwise"].rate, "x",
                         ours=f"{t['pg.ours_single'].rate:,.0f} rows/s", peers={"Postgres": f"{t['pg.rowwise'].rate:,.0f} rows/s"}))
    report.figure(Figure(*PG_FIGURES[1][:2], t["pg.ours_many"].rate / t["pg.copy"].rate, "x",
                         ours=f"{t['pg.ours_many'].rate:,.0f} rows/s", peers={"Postgres COPY": f"{t['pg.copy'].rate:,.0f} rows/s"}))
    report.figure(Figure(*PG_FIGURES[2][:2], t["pg.ours_sync"].median / t["pg.copy"].median, "x",
                         ours=f"{t['pg.ours_sync'].rate:,.0f} rows/s", peers={"Postgres COPY": f"{t['pg.copy'].rate:,.0f} rows/s"}))


# -- scaling: latency and insert rate against N (opt-in: --only peers.scaling) ----------------------

SCALING_N = (10_000, 30_000, 100_000)
SCALING_N_QUICK = (2_000, 5_000, 10_000)
#: Overrides the N of the scaling section: comma-separated row counts.
SCALING_N_ENV = "LOCALSTORE_BENCH_SCALING_N"


def bench_scaling(report: Report, scratch: Scratch, sizes: Sizes, quick: bool) -> None:
    """p50 query latency (unfiltered and 1 of 3) and insert rate at several N, drawn to peers_scaling.png."""
    vec = _vectors_module()
    chromadb, _ = _try_import("chromadb")
    lancedb, _ = _try_import("lancedb")
    pa, _ = _try_import("pyarrow")
    dim, nq = sizes.dim, sizes.queries
    ns = (500, 1_000, 2_000) if is_tiny() else SCALING_N_QUICK if quick else SCALING_N
    if os.environ.get(SCALING_N_ENV):  # e.g. 10000,100000,1000000 for the 1M point (Chroma takes minutes there)
        ns = tuple(int(v) for v in os.environ[SCALING_N_ENV].split(","))
    queries = vec.embeddings(nq, dim, seed=2)
    series: dict[str, dict[str, list[float]]] = {}

    def p50(fn: Callable[[np.ndarray], Any]) -> float:
        fn(queries[0])
        runs = []
        for q in queries:
            start = time.perf_counter()
            fn(q)
            runs.append(time.perf_counter() - start)
        return float(np.median(runs)) * 1e3

    def add(who: str, insert_s: float, n: int, unfiltered: float, filtered: float) -> None:
        d = series.setdefault(who, {"n": [], "rate": [], "p50": [], "p50_filtered": []})
        d["n"].append(n)
        d["rate"].append(n / insert_s if insert_s else float("nan"))
        d["p50"].append(unfiltered)
        d["p50_filtered"].append(filtered)

    for n in ns:
        log(f"scaling: N={n:,}")
        matrix = vec.embeddings(n, dim, seed=1)
        rows = vec.query_rows(matrix)
        where = {"kind": vec.KINDS[0]}
        path = scratch.path("scale-ours")
        with ls.open(path) as store:
            coll = store.collection(vec.COLLECTION, key="id", fields=vec.query_fields(dim))
            t = time.perf_counter()
            coll.put_many(rows)
            ins = time.perf_counter() - t
            add("ours (auto)", ins, n, p50(lambda q: coll.nearest("embedding", q, k=K)),  # noqa: B023 - called within the iteration
                p50(lambda q: coll.nearest("embedding", q, k=K, where=where)))  # noqa: B023 - called within the iteration
        Scratch.remove(path)
        kept_rows = np.ascontiguousarray(matrix[[vec.kind_of(i) == vec.KINDS[0] for i in range(n)]])
        add("numpy/BLAS", 0.0, n, p50(lambda q: vec.blas_topk(matrix, q)),  # noqa: B023 - called within the iteration
            p50(lambda q: vec.blas_topk(kept_rows, q)))  # noqa: B023 - called within the iteration
        if chromadb is not None:
            folder = os.path.join(scratch.root, f"scale-chroma-{n}")
            client = chromadb.PersistentClient(path=folder)
            ccoll = client.create_collection("bench", metadata={"hnsw:space": "cosine"}, embedding_function=None)
            ids = [vec.key_of(i) for i in range(n)]
            step = max(1, min(5_000, client.get_max_batch_size()))
            t = time.perf_counter()
            for a in range(0, n, step):
                b = min(n, a + step)
                ccoll.add(ids=ids[a:b], embeddings=matrix[a:b],
                          metadatas=[{"kind": vec.kind_of(i), "grp": vec.group_of(i)} for i in range(a, b)])
            ins = time.perf_counter() - t
            add("Chroma (HNSW)", ins, n, p50(lambda q: ccoll.query(query_embeddings=[q], n_results=K)),  # noqa: B023 - called within the iteration
                p50(lambda q: ccoll.query(query_embeddings=[q], n_results=K, where=where)))  # noqa: B023 - called within the iteration
            shutil.rmtree(folder, ignore_errors=True)
        if lancedb is not None and pa is not None:
            folder = os.path.join(scratch.root, f"scale-lance-{n}")
            db = lancedb.connect(folder)
            t = time.perf_counter()
            table = db.create_table("bench", data=pa.table({
                "id": [vec.key_of(i) for i in range(n)], "kind": [vec.kind_of(i) for i in range(n)],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim)}))
            ins = time.perf_counter() - t

            def lq(q: np.ndarray, w: str | None = None) -> Any:
                search = table.search(q).metric("cosine").limit(K).select(["id", "_distance"])  # noqa: B023 - called within the iteration
                if w:
                    search = search.where(w, prefilter=True)
                return search.to_arrow()

            add("LanceDB (flat)", ins, n, p50(lq), p50(lambda q: lq(q, f"kind = '{vec.KINDS[0]}'")))
            shutil.rmtree(folder, ignore_errors=True)
    report.params["scaling"] = json.dumps(series)
    last = {who: d["p50"][-1] for who, d in series.items()}
    report.figure(Figure("scaling.p50_ms", f"KNN p50 at N={ns[-1]:,}×{dim}, ours", last["ours (auto)"], "ms",
                         peers={w: f"{v:.2f} ms" for w, v in last.items() if w != "ours (auto)"}))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report.notes.append("matplotlib is not installed; no scaling plot drawn")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for who, d in series.items():
        line = ax1.plot(d["n"], d["p50"], marker="o", label=f"{who}, unfiltered")[0]
        ax1.plot(d["n"], d["p50_filtered"], marker="x", linestyle="--", color=line.get_color(),
                 label=f"{who}, kind = 1 of 3")
        if who != "numpy/BLAS":
            ax2.plot(d["n"], d["rate"], marker="o", label=who, color=line.get_color())
    for ax, title, ylabel in ((ax1, f"k={K} query p50, dim {dim}", "ms per query"),
                              (ax2, f"insert rate, dim {dim}", "rows/s")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (rows)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = BENCH_DIR / "peers_scaling.png"
    if not is_tiny():
        fig.savefig(out, dpi=110)
        report.notes.append(f"scaling plot written to {out}")
    plt.close(fig)


# -- entry point ------------------------------------------------------------------------------------


def run(quick: bool = False) -> Report:
    """Run the peers benchmark; ``quick`` shrinks every size so it finishes in well under a minute."""
    sizes = TINY if is_tiny() else QUICK if quick else FULL
    wanted = [s for s in os.environ.get("LOCALSTORE_BENCH_SECTIONS", "").split(",") if s] or list(SECTIONS)
    report = Report("peers", quick, params=dict(asdict(sizes)) | {"sections": ",".join(wanted)})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="localstore-bench-") as root:
        scratch = Scratch(root)
        if "vectors" in wanted:
            bench_vectors(report, scratch, sizes)
        if "checkpoints" in wanted:
            bench_checkpoints(report, scratch, sizes)
        if "postgres" in wanted:
            bench_postgres(report, scratch, sizes)
        if "scaling" in wanted:
            bench_scaling(report, scratch, sizes, quick)
    report.notes += [
        "Chroma is approximate (HNSW); its recall@10 is shown. Ours and LanceDB flat search are exact",
        "ratios in x: (speed) above 1 means ours is faster; (time) below 1 means ours is faster",
        "targets are informational; a MISS does not fail the run",
    ]
    report.elapsed_s = time.perf_counter() - started
    return report

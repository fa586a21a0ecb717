"""Background WAL checkpointing (``localstore.open(wal_checkpoint="background")``): same data, bounded WAL, crash-safe."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import localstore as ls
from localstore.kits.telemetry import Telemetry

#: One WAL frame: a 4 KiB page and its 24-byte header.
FRAME = 4096 + 24


def blobs(store: ls.Store) -> ls.Collection:
    return store.collection("blobs", key="k", fields={"k": ls.Integer(), "pad": ls.Blob()})


def test_bad_mode_is_refused_before_the_file_is_made(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    for bad in ("BACKGROUND", "off", 1, None):
        with pytest.raises(ls.StoreOpenError, match="wal_checkpoint must be one of auto, background"):
            ls.open(path, wal_checkpoint=bad)  # type: ignore[arg-type]
    assert not path.exists()


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_background_store_reads_and_writes_as_usual_and_removes_its_wal(tmp_path: Path, durability: str) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, wal_checkpoint="background", durability=durability) as store:
        assert store.wal_checkpoint == "background"
        sync = store._wal._conn.execute("PRAGMA synchronous").fetchone()[0]  # type: ignore[union-attr]
        assert sync == {"normal": 1, "full": 2}[durability]  # the thread syncs as the store does
        coll = blobs(store)
        for i in range(300):
            coll.put({"k": i, "pad": bytes([i % 256]) * 9_000})
        with ls.open(path) as other:  # another connection sees every commit
            assert blobs(other).count() == 300 and blobs(other).get(299)["pad"][:1] == bytes([299 % 256])  # type: ignore[index]
        assert store.verify().ok
        thread = store._wal._thread  # type: ignore[union-attr]
    assert not thread.is_alive()
    assert not Path(f"{path}-wal").exists()  # the last close checkpointed and removed it, as without the thread
    with ls.open(path) as store:
        assert store.wal_checkpoint == "auto" and blobs(store).count() == 300


def test_the_wal_stays_bounded_under_a_steady_writer(tmp_path: Path) -> None:
    """Past max_pages the writer finishes the checkpoint after its commit, so the WAL rewinds instead of growing."""
    path = tmp_path / "s.db"
    with ls.open(path, wal_checkpoint="background") as store:
        wal = store._wal
        assert wal is not None
        wal.wake_pages, wal.max_pages = 8, 64
        coll = blobs(store)
        for i in range(400):  # ~3 pages per commit: ~1,200 frames if the WAL never rewound
            coll.put({"k": i, "pad": os.urandom(9_000)})
        size = os.path.getsize(f"{path}-wal")
        assert wal.counts["catch_up"] >= 5 and wal.last_error is None
        assert size < 200 * FRAME, f"WAL grew to {size // FRAME} frames"
        assert coll.count() == 400
        assert store.verify().ok


def test_key_destruction_still_empties_the_wal(tmp_path: Path) -> None:
    """forget() checkpoints the whole WAL (so destroyed key bytes leave it) with the background thread running."""
    with ls.open(tmp_path / "s.db", wal_checkpoint="background", key=ls.generate_key()) as store:
        notes = store.collection("notes", key="k", fields={
            "k": ls.Text(), "who": ls.Text(), "body": ls.Text(encrypt=True, subject="who")})
        for i in range(300):
            notes.put({"k": f"n{i}", "who": f"p{i % 3}", "body": "x" * 3_000})
        assert store.forget("p1") is True
        assert os.path.getsize(f"{store.path}-wal") == 0
        assert notes.get("n1")["body"] is ls.FORGOTTEN and notes.get("n0")["body"] == "x" * 3_000  # type: ignore[index]


# -- crash safety ------------------------------------------------------------------------------

CHILD = r"""
import sys
import numpy as np
import localstore as ls
from localstore.kits.telemetry import Telemetry

path, run = sys.argv[1], int(sys.argv[2])
store = ls.open(path, wal_checkpoint="background")
store._wal.wake_pages, store._wal.max_pages = 16, 200  # checkpoints and rewinds all through the run
tm = Telemetry(store)
sid = tm.start_session(f"run{run}")
print("READY", flush=True)
i = 0
while True:
    state = {"w": np.full(5_000, i, dtype="<f4"), "msgs": [f"step {i}"] * 200}
    cid = tm.save_checkpoint(sid, phi=(i % 13) / 13, state_dict=state, checkpoint_id=f"r{run}-{i}")
    print("P", cid, flush=True)
    i += 1
"""


def test_sigkill_loses_no_acknowledged_checkpoint(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """Kill a background-checkpointing writer of ~30 KB checkpoints at random moments; every acknowledged save survives."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    path = tmp_path / "crash.db"
    acked: set[str] = set()
    for run in range(8):
        out = tmp_path / f"out-{run}.txt"
        with out.open("w") as fout:
            proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(run)], env=subprocess_env,
                                    stdout=fout, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while "READY\n" not in out.read_text():
                assert proc.poll() is None, f"writer died: {out.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "writer never got ready"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.1, 0.6))
            assert proc.poll() is None, f"writer died on its own: {out.read_text()[-2000:]}"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        lines = out.read_text().split("\n")[:-1]  # the last piece has no newline: possibly cut
        acked |= {line[2:] for line in lines if line.startswith("P ")}
        with ls.open(path) as store:
            tm = Telemetry(store)
            present = {r["checkpoint_id"] for r in tm.checkpoints.find(None, fields=[])}
            lost = acked - present
            assert not lost, f"(seed {seed}, run {run}) {len(lost)} acknowledged saves lost, e.g. {sorted(lost)[:5]}"
            last = max((c for c in acked if c.startswith(f"r{run}-")), key=lambda c: int(c.split("-")[1]), default=None)
            if last is not None:
                state = tm.load_checkpoint(last)["state_dict"]  # type: ignore[index]
                assert state["w"][0] == int(last.split("-")[1]) and state["w"].shape == (5_000,)
    assert len(acked) > 8, "the writer acknowledged almost nothing before being killed"
    with ls.open(path) as store:
        assert store.verify().ok
        assert np.isfinite(Telemetry(store).load_checkpoint(min(acked))["phi"])  # type: ignore[index]


def test_a_store_dropped_without_close_stops_its_thread(tmp_path: Path) -> None:
    import gc

    store = ls.open(tmp_path / "s.db", wal_checkpoint="background")
    blobs(store).put({"k": 1, "pad": b"x"})
    thread = store._wal._thread  # type: ignore[union-attr]
    del store
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
    with ls.open(tmp_path / "s.db") as again:
        assert blobs(again).get(1)["pad"] == b"x"  # type: ignore[index]


def test_optimize_truncates_the_wal_while_the_thread_runs(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with ls.open(path, wal_checkpoint="background") as store:
        coll = blobs(store)
        for round_ in range(5):
            coll.put_many([{"k": round_ * 100 + i, "pad": os.urandom(20_000)} for i in range(100)])
            store.optimize()
            assert os.path.getsize(f"{path}-wal") == 0, f"round {round_}: optimize left the WAL unreset"
        assert coll.count() == 500

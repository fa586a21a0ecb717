"""Crashes and outages: SIGKILL of the sync process during a backlog, Postgres stopped mid-sync."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from _sync_workers import assert_converged
from conftest import PYTHON
from localstore.sync import PostgresError, SyncEngine
from pg_fixture import PgServer

import localstore as ls

#: How many times the sync process must be killed mid-backlog.
KILLS = 20

FIELDS = {"id": ls.Text(), "n": ls.Integer(), "phi": ls.Real(), "v": ls.Vector(8), "meta": ls.Json()}


def _write(store: ls.Store, rng: random.Random, count: int, keys: int) -> None:
    coll = store.collection("events", key="id", fields=FIELDS)
    vecs = np.random.default_rng(rng.randint(0, 2**31)).random((count, 8))
    ids = rng.sample(range(keys), min(count, keys))  # distinct keys within one put_many
    coll.put_many([{"id": f"e{k}", "n": i, "phi": rng.random(), "v": vecs[i], "meta": {"i": i}}
                   for i, k in enumerate(ids)])
    coll.delete_many([f"e{rng.randrange(keys)}" for _ in range(count // 20)])


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting ({timeout:.0f}s) for {what}")
        time.sleep(0.05)


def test_sigkill_of_the_sync_process_never_loses_or_duplicates(
    tmp_path: Path, pg_url: str, pg_schema: str, subprocess_env: dict[str, str]
) -> None:
    rng = random.Random(20)
    ws = ls.Workspace(tmp_path / "ws")
    stores = [ws.open(f"s{i}") for i in range(3)]
    for s in stores:
        _write(s, rng, 8000, 6000)  # the backlog
    cmd = [PYTHON, "-m", "localstore", "sync", "once", str(tmp_path / "ws"), "--url", pg_url, "--schema", pg_schema,
           "--batch-rows", "400", "--quiet"]
    kills = attempts = 0
    while kills < KILLS:
        attempts += 1
        assert attempts < 3 * KILLS, f"only {kills} kills landed in {attempts} attempts"
        for s in rng.sample(stores, 2):  # keep a backlog, and write while syncing
            _write(s, rng, 2500, 6000)
        before = sum(s.changelog.watermark() for s in stores)
        proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Kill at a random point once shipping is under way (mid-batch, between commit and watermark, ...).
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and \
                sum(s.changelog.watermark() for s in stores) == before:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.2))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(60)
        if proc.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else proc.returncode)
        if proc.stderr:
            proc.stderr.close()
    final = subprocess.run(cmd, check=False, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    for s in stores:
        assert_converged(pg_url, pg_schema, s)
        assert s.verify().ok
    ws.close()


def test_postgres_stopped_mid_sync_recovers_without_intervention(
    tmp_path: Path, pg_server: PgServer, pg_url: str, pg_schema: str
) -> None:
    if not pg_server.can_restart:
        pytest.skip("needs the embedded Postgres: the test stops and starts the server")
    rng = random.Random(7)
    ws = ls.Workspace(tmp_path / "ws")
    stores = [ws.open(f"s{i}") for i in range(2)]
    engine = SyncEngine(ws, pg_url, schema=pg_schema, batch_rows=200, backoff_cap=1.0).start()
    try:
        for s in stores:
            _write(s, rng, 3000, 2000)
        _wait_for(lambda: engine.shipped > 0, 60, "a first batch to ship")
        pg_server.stop()
        try:
            for s in stores:  # writers are not slowed or failed by the outage
                _write(s, rng, 2000, 2000)
            _wait_for(lambda: isinstance(engine.last_error, PostgresError), 60, "the engine to report the outage")
            assert "Pw-" not in str(engine.last_error)
        finally:
            pg_server.start()
        _wait_for(lambda: all(s.changelog.watermark() == s.changelog.last_seq() for s in stores), 120,
                  "the engine to catch up after Postgres came back")
    finally:
        engine.stop()
    for s in stores:
        assert_converged(pg_url, pg_schema, s)
    ws.close()

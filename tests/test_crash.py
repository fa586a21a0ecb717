"""Crash safety: a writer process SIGKILLed at random moments never loses an acknowledged put or damages the store."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from itertools import pairwise
from pathlib import Path

from _workers import items, reaped, spawn

import localstore as ls

KILLS = 24
BATCH_EVERY = 7  # every 7th step of the writer is a put_many of 5 rows
STEP = re.compile(r"^r(\d+)-(\d+)(?:-(\d+))?$")


def wait_for_line(out: Path, text: str, proc: subprocess.Popen[str], timeout_s: float = 60.0) -> None:
    """Wait until the child's stdout file holds a line ``text``; fail if the child dies first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if f"{text}\n" in out.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"writer exited with {proc.returncode} before {text!r}:\n{out.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"writer printed no {text!r} within {timeout_s}s")
        time.sleep(0.005)


def parse(out: Path) -> tuple[set[str], list[list[str]]]:
    """Keys acknowledged (``P key`` lines, complete only) and batches started (``S k1,...``)."""
    acked: set[str] = set()
    batches: list[list[str]] = []
    for line in out.read_text().split("\n")[:-1]:  # the last piece has no newline: possibly cut
        if line.startswith("P "):
            acked.add(line[2:])
        elif line.startswith("S "):
            batches.append(line[2:].split(","))
    return acked, batches


def step_of(key: str) -> tuple[int, int]:
    m = STEP.match(key)
    assert m, key
    return int(m.group(1)), int(m.group(2))


def check_after_kill(
    store: ls.Store, run: int, all_acked: set[str], acked: set[str], batches: list[list[str]], extras: set[str]
) -> None:
    """Check the store after kill ``run``; ``extras`` holds committed-but-unacknowledged rows of earlier runs and grows."""
    coll = items(store)
    present = set(coll.keys())
    lost = all_acked - present
    assert not lost, f"after kill {run}: {len(lost)} acknowledged puts lost, e.g. {sorted(lost)[:5]}"
    assert extras <= present, f"after kill {run}: rows seen after an earlier kill vanished: {sorted(extras - present)}"
    # Rows nobody acknowledged may only come from the one step in flight when the kill landed.
    unacked = present - all_acked - extras
    steps = {step_of(k) for k in unacked}
    assert len(steps) <= 1, f"after kill {run}: unacknowledged rows from several steps: {sorted(unacked)[:10]}"
    if steps:
        (r, i), = steps
        assert r == run, f"unacknowledged row from an earlier run: {sorted(unacked)}"
        assert all(step_of(k)[1] < i for k in acked), "an unacknowledged row precedes acknowledged ones"
    extras |= unacked
    # put_many is all or none.
    for batch in batches:
        n = len(present.intersection(batch))
        assert n in (0, len(batch)), f"after kill {run}: {n} of {len(batch)} rows of one put_many present"
    for key in acked:
        r, i = step_of(key)
        row = coll.get(key)
        assert row is not None and row["owner"] == r and row["i"] == i
    report = store.verify()
    assert report.ok, f"after kill {run}:\n{report}"
    assert report.collections["items"] == len(present)
    # Each present row has a put record of that key in the log (verify checks the seq); the log is ordered.
    changes = []
    after = 0
    for _ in range(10_000):
        batch_ = store.changelog.changes(after, limit=2_000)
        if not batch_:
            break
        changes += batch_
        after = batch_[-1].seq
    assert {c.key for c in changes} == present
    assert all(a.seq < b.seq and a.hlc < b.hlc for a, b in pairwise(changes))
    assert store.changelog.last_seq() == (changes[-1].seq if changes else 0)


def test_sigkill_during_writes_loses_no_acknowledged_put(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """Kill a writing process with SIGKILL 24 times at random moments; restart it on the same store each time."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    path = tmp_path / "crash.db"
    with ls.open(path) as store:
        items(store)
    all_acked: set[str] = set()
    extras: set[str] = set()
    kept_open = ls.open(path)  # a second connection that lives through every crash
    try:
        for run in range(KILLS):
            out, err = tmp_path / f"out-{run}.txt", tmp_path / f"err-{run}.txt"
            with out.open("w") as fout, err.open("w") as ferr:
                proc = spawn(["crash-writer", str(path), str(run), str(BATCH_EVERY)], subprocess_env, stdout=fout, stderr=ferr)
            with reaped([proc]):
                wait_for_line(out, "READY", proc)
                delay = rng.uniform(0.05, 0.4)
                time.sleep(delay)
                assert proc.poll() is None, f"writer died on its own:\n{err.read_text()[-2000:]}"
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            acked, batches = parse(out)
            all_acked |= acked
            context = f"(seed {seed}, run {run}, delay {delay:.3f}s)"
            try:
                if run % 2:
                    check_after_kill(kept_open, run, all_acked, acked, batches, extras)
                else:
                    with ls.open(path) as store:
                        check_after_kill(store, run, all_acked, acked, batches, extras)
            except AssertionError as exc:
                raise AssertionError(f"{context}: {exc}") from exc
        assert len(all_acked) > 0, "the writer never acknowledged a put before being killed"
    finally:
        kept_open.close()
    with ls.open(path) as store:
        assert store.verify().ok
        assert set(items(store).keys()) == all_acked | extras

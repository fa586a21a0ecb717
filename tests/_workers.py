"""Child-process workers for the concurrency, crash and live-backup tests (run as a script; helpers for parents)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()

#: Longest a child waits for the parent's go signal, in seconds.
GO_TIMEOUT_S = 60.0

# -- collections shared by parents and children ------------------------------------------------


def items(store: Any) -> Any:
    """The collection the multi-writer tests put into: Text key, an owner and a number."""
    import localstore as ls

    return store.collection("items", key="k", fields={
        "k": ls.Text(),
        "owner": ls.Integer(index=True),
        "i": ls.Integer(),
        "body": ls.Text(),
    })


def ordered(store: Any) -> Any:
    """The collection of the in-order writer: row n has key n, written one per transaction."""
    import localstore as ls

    return store.collection("ordered", key="n", fields={
        "n": ls.Integer(),
        "half": ls.Integer(),
        "pad": ls.Blob(),
    })


def ordered_row(n: int) -> dict[str, Any]:
    """The row the ordered writer writes for ``n``; checkers rebuild it to compare."""
    return {"n": n, "half": n // 2, "pad": (n % 251).to_bytes(1, "little") * 700}


# -- small helpers for children ------------------------------------------------------------


def wait_for(path: Path, timeout_s: float = GO_TIMEOUT_S) -> None:
    """Block until ``path`` exists (the parent's go signal), or exit the child after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            report({"errors": 1, "first_errors": [f"no go signal at {path} within {timeout_s}s"]})
            sys.exit(3)
        time.sleep(0.001)


def report(result: dict[str, Any]) -> None:
    """Print the child's result as the last line of stdout, as JSON."""
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


class Errors:
    """Counts errors in a child and keeps the first few tracebacks for the parent's message."""

    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []

    def add(self, what: str) -> None:
        self.count += 1
        if len(self.first) < 3:
            self.first.append(f"{what}\n{traceback.format_exc()}")


# -- modes ---------------------------------------------------------------------------------


def mode_puts(path: str, go: str, worker: int, count: int, open_after_go: bool) -> None:
    """Put ``count`` single rows, each its own transaction, after the go signal; report errors."""
    import localstore as ls

    errors = Errors()
    store = None
    if not open_after_go:
        store = ls.open(path)
        coll = items(store)
        Path(f"{go}.ready-{worker}").touch()
    wait_for(Path(go))
    done = 0
    try:
        if store is None:
            store = ls.open(path)
            coll = items(store)
        for i in range(count):
            try:
                key = coll.put({"k": f"w{worker}-{i}", "owner": worker, "i": i, "body": f"row {i} of worker {worker}"})
                assert key == f"w{worker}-{i}"
                done += 1
            except Exception:  # noqa: BLE001
                errors.add(f"put {i}")
    except Exception:  # noqa: BLE001
        errors.add("opening")
    finally:
        if store is not None:
            store.close()
    report({"errors": errors.count, "first_errors": errors.first, "done": done})


def mixed_row(key: str, worker: int, counter: int) -> dict[str, Any]:
    """A row of the mixed workload; its body ties the other fields together so a mixed-up payload shows."""
    return {"k": key, "owner": worker, "i": counter, "body": f"{worker}:{counter}:{key}"}


def mode_mixed(path: str, go: str, worker: int, count: int, seed: int) -> None:
    """Random puts, deletes, put_many and transactions on a small shared key space, after the go signal."""
    import random

    import localstore as ls

    rng = random.Random(seed)
    errors = Errors()
    store = ls.open(path)
    coll = items(store)
    Path(f"{go}.ready-{worker}").touch()
    wait_for(Path(go))
    keys = [f"m{j}" for j in range(40)]
    counter = 0
    try:
        for step in range(count):
            try:
                kind = rng.random()
                if kind < 0.45:
                    counter += 1
                    coll.put(mixed_row(rng.choice(keys), worker, counter))
                elif kind < 0.65:
                    coll.delete(rng.choice(keys))
                elif kind < 0.8:
                    rows = []
                    for _ in range(rng.randint(1, 4)):
                        counter += 1
                        rows.append(mixed_row(rng.choice(keys), worker, counter))
                    coll.put_many(rows)
                else:
                    with store.transaction():
                        for _ in range(rng.randint(1, 3)):
                            counter += 1
                            coll.put(mixed_row(rng.choice(keys), worker, counter))
                            if rng.random() < 0.3:
                                coll.delete(rng.choice(keys))
                        if rng.random() < 0.2:
                            try:
                                with store.transaction():
                                    counter += 1
                                    coll.put(mixed_row(rng.choice(keys), worker, counter))
                                    raise LookupError("savepoint rollback")
                            except LookupError:
                                pass
            except Exception:  # noqa: BLE001
                errors.add(f"step {step}")
    finally:
        store.close()
    report({"errors": errors.count, "first_errors": errors.first, "done": count})


def mode_ordered_writer(path: str, go: str, stop: str, limit: int) -> None:
    """Write rows 0, 1, 2, ... one per transaction until ``stop`` exists or ``limit`` rows are written."""
    import localstore as ls

    errors = Errors()
    store = ls.open(path)
    coll = ordered(store)
    start = coll.count()
    Path(f"{go}.ready-writer").touch()
    wait_for(Path(go))
    written = start
    stop_path = Path(stop)
    try:
        for n in range(start, limit):
            if stop_path.exists():
                break
            try:
                coll.put(ordered_row(n))
                written = n + 1
            except Exception:  # noqa: BLE001
                errors.add(f"put {n}")
                break  # the rows must stay in order: never skip one
    finally:
        store.close()
    report({"errors": errors.count, "first_errors": errors.first, "written": written})


def mode_reader(path: str, go: str, stop: str, limit: int) -> None:
    """Read the ordered collection in a loop while a writer writes; every snapshot must be a committed prefix."""
    import localstore as ls

    errors = Errors()
    store = ls.open(path)
    coll = ordered(store)
    Path(f"{go}.ready-reader").touch()
    wait_for(Path(go))
    stop_path = Path(stop)
    seen = 0
    reads = 0
    try:
        for it in range(limit):
            if stop_path.exists():
                break
            try:
                keys = coll.keys()  # one statement: one snapshot
                assert keys == list(range(len(keys))), f"not a prefix: {len(keys)} keys, max {max(keys, default=None)}"
                assert len(keys) >= seen, f"row count went back from {seen} to {len(keys)}"
                seen = len(keys)
                if keys:
                    last = keys[-1]
                    assert coll.get(last) == ordered_row(last)
                    rows = coll.find(where={"n": {">=": max(0, last - 20)}}, order_by="n")
                    assert [r["n"] for r in rows][:1] == [max(0, last - 20)]
                    assert all(r == ordered_row(r["n"]) for r in rows)
                changes = store.changelog.changes(0, limit=100_000)
                assert [c.key for c in changes] == list(range(len(changes))), "change log is not a prefix"
                assert len(changes) >= seen
                if it % 25 == 0:
                    report_ = store.verify()
                    assert report_.ok, str(report_)
                reads += 1
            except Exception:  # noqa: BLE001
                errors.add(f"read {it}")
    finally:
        store.close()
    report({"errors": errors.count, "first_errors": errors.first, "reads": reads, "seen": seen})


def mode_crash_writer(path: str, run: int, batch_every: int) -> None:
    """Put rows forever (until killed), printing ``P key`` after each put returns.

    Every ``batch_every``-th step is a put_many of 5 rows, announced with ``S k1,k2,...``
    before the call and acknowledged with one ``P key`` line per key after it.
    """
    import localstore as ls

    store = ls.open(path)
    coll = items(store)
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    for i in range(10_000_000):
        if batch_every and i % batch_every == batch_every - 1:
            keys = [f"r{run}-{i}-{j}" for j in range(5)]
            out.write("S " + ",".join(keys) + "\n")
            out.flush()
            coll.put_many([{"k": k, "owner": run, "i": i, "body": "x" * (i % 300)} for k in keys])
            out.write("".join(f"P {k}\n" for k in keys))
            out.flush()
        else:
            key = coll.put({"k": f"r{run}-{i}", "owner": run, "i": i, "body": "y" * (i % 300)})
            out.write(f"P {key}\n")
            out.flush()


def mode_backup_in_transaction(path: str, target: str) -> None:
    """Call ``store.backup()`` inside a transaction holding an uncommitted row; report what happened."""
    import localstore as ls

    store = ls.open(path)
    coll = ordered(store)
    coll.put(ordered_row(0))
    outcome: dict[str, Any] = {"errors": 0, "first_errors": []}
    try:
        with store.transaction():
            coll.put(ordered_row(1))  # never committed
            try:
                store.backup(target)
                outcome["raised"] = None
            except Exception as exc:  # noqa: BLE001
                outcome["raised"] = type(exc).__name__
                outcome["message"] = str(exc)
            raise KeyError("roll back")
    except KeyError:
        pass
    store.close()
    if outcome["raised"] is None:
        with ls.open(target) as copy:
            outcome["copy_keys"] = ordered(copy).keys()
    report(outcome)


def mode_add_field(path: str) -> None:
    """Redeclare ``items`` with a new field ``note`` and put one row that uses it."""
    import localstore as ls

    with ls.open(path) as store:
        coll = store.collection("items", key="k", fields={
            "k": ls.Text(),
            "owner": ls.Integer(index=True),
            "i": ls.Integer(),
            "body": ls.Text(),
            "note": ls.Text(),
        })
        coll.put({"k": "with-note", "owner": 99, "i": 0, "body": "", "note": "hello"})
    report({"errors": 0, "first_errors": []})


def mode_write_and_die(path: str, count: int) -> None:
    """Open the store, put ``count`` rows of the ordered collection, then exit without closing (like a crash)."""
    import localstore as ls

    store = ls.open(path)
    coll = ordered(store)
    start = coll.count()
    for n in range(start, start + count):
        coll.put(ordered_row(n))
    sys.stdout.write("WROTE\n")
    sys.stdout.flush()
    os._exit(0)  # no close: the WAL stays behind, as after a crash


# -- helpers for parents ----------------------------------------------------------------------


def spawn(args: Sequence[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    """Start this file as a child process in the given mode."""
    return subprocess.Popen(
        [sys.executable, str(HERE), *args],
        env=env,
        text=True,
        stdout=kwargs.pop("stdout", subprocess.PIPE),
        stderr=kwargs.pop("stderr", subprocess.PIPE),
        **kwargs,
    )


@contextmanager
def reaped(procs: list[subprocess.Popen[str]]) -> Iterator[list[subprocess.Popen[str]]]:
    """Kill every child still running when the block ends, however it ends."""
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def wait_ready(go: Path, names: Sequence[str], procs: Sequence[subprocess.Popen[str]], timeout_s: float = 60.0) -> None:
    """Wait until each child has touched ``<go>.ready-<name>``; fail early if a child dies."""
    deadline = time.monotonic() + timeout_s
    pending = [Path(f"{go}.ready-{n}") for n in names]
    while pending:
        pending = [p for p in pending if not p.exists()]
        for proc in procs:
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"a child exited early with {proc.returncode}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"children not ready within {timeout_s}s: {pending}")
        time.sleep(0.01)


def result_of(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    """Wait for a child and parse its RESULT line; fail with its output if it has none."""
    out, err = proc.communicate(timeout=timeout_s)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"child exited with {proc.returncode} and no result:\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
    return result


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "puts":
        mode_puts(args[0], args[1], int(args[2]), int(args[3]), args[4] == "1")
    elif mode == "mixed":
        mode_mixed(args[0], args[1], int(args[2]), int(args[3]), int(args[4]))
    elif mode == "ordered-writer":
        mode_ordered_writer(args[0], args[1], args[2], int(args[3]))
    elif mode == "reader":
        mode_reader(args[0], args[1], args[2], int(args[3]))
    elif mode == "backup-in-transaction":
        mode_backup_in_transaction(args[0], args[1])
    elif mode == "add-field":
        mode_add_field(args[0])
    elif mode == "write-and-die":
        mode_write_and_die(args[0], int(args[1]))
    elif mode == "crash-writer":
        mode_crash_writer(args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Threads opening and closing one store at once, beside other handles and another process: no lock is lost.

Before SQLite opens a store, ``walcheck.check_file`` may open and close the store's
``-shm`` to read it. POSIX drops every lock a process holds on a file when any of its
descriptors of that file is closed, so that close must never happen while another
thread of the process has a connection on the file: the process would lose its shared
lock on the shm's DMS byte, and another process could then reset the shm, or on close
checkpoint and delete the WAL that connection still writes to. ``_sqlite.path_lock``
makes the check and every new connection to one file take turns.

The race needs no other connection of this process on the file when a thread starts
its check (otherwise the check is skipped), a WAL and shm left live by another process,
and a second thread connecting while the first holds the shm open. The first test makes
that happen on every round; the second keeps a handle open throughout, as a long-lived
daemon would, and checks the skip path under the same churn. Both assert what must
hold, not how long anything takes: every acknowledged write survives, no thread fails,
``verify()`` is clean, and while this process has the store open it holds its DMS lock
(read from ``/proc/locks``; ``F_GETLK`` does not report a process's own locks).

Run as a script, this file is the child process of both tests (mode ``cycler``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
from _workers import result_of, wait_ready

import localstore as ls

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the -shm check and /proc/locks are Linux-only")

HERE = Path(__file__).resolve()

THREADS = 4
#: Rounds of the first test: each round every thread opens the store, writes, reads and closes it.
ROUNDS = 40
#: Open-write-close cycles per thread in the second test.
CYCLES = 40
#: Rows the child writes per open before closing again.
CHILD_PUTS_PER_OPEN = 8
#: Longest a round's leader keeps its -shm check open waiting for another thread's connection,
#: in seconds (see ``held_shm_check``). With the per-file lock no connection can come, so
#: every round that reaches the check waits this long: it bounds the test's run time.
LEADER_HOLD_S = 0.05
#: Longest any thread, barrier or child is waited for, in seconds: a hang fails the test instead of the run.
WAIT_S = 120.0
#: SQLite's DMS byte of the -shm: every process with the store open holds a shared lock on it.
DMS_BYTE = 128


def numbers(store: ls.Store, name: str) -> Any:
    """The collection every writer here puts into: a text key and a number."""
    return store.collection(name, key="id", fields={"id": ls.Text(), "v": ls.Integer()})


def holds_dms_lock(path: Path) -> bool:
    """Whether this process holds a POSIX lock covering the DMS byte of ``path``'s -shm.

    A process loses it when one of its threads closes a descriptor of the shm; other
    processes then no longer see this one's connections. ``/proc/locks`` lines read
    ``N: POSIX ADVISORY READ pid maj:min:inode start end`` (lines with ``->`` are waiters).
    """
    try:
        inode = os.stat(f"{path}-shm").st_ino
    except FileNotFoundError:
        return False  # a connection of ours is open, so another process deleted it: as bad
    me = str(os.getpid())
    with open("/proc/locks") as handle:
        for line in handle:
            fields = line.split()
            if "->" in fields or len(fields) < 8 or fields[1] != "POSIX" or fields[4] != me:
                continue
            if int(fields[5].rsplit(":", 1)[1]) != inode:
                continue
            start, end = int(fields[6]), fields[7]
            if start <= DMS_BYTE and (end == "EOF" or DMS_BYTE <= int(end)):
                return True
    return False


def held_shm_check(monkeypatch: pytest.MonkeyPatch, path: Path, local: threading.local,
                   in_check: list[threading.Event]) -> list[int]:
    """Make a round's leader hold ``walcheck.check_file``'s -shm open until another thread connects; count such holds.

    The check opens the shm, asks whether another process holds it (``_locked_elsewhere``)
    and closes it: tens of microseconds, too short for another thread's connection to land
    in it on demand. Here the thread whose ``local.leading`` names a round signals
    ``in_check[round]`` from inside that window, then keeps it open until this process holds
    the DMS lock (some other thread's new connection has mapped the shm) or
    ``LEADER_HOLD_S`` passes. With ``path_lock`` the others wait for the check to end, so
    the hold always runs out; without it their connections land inside it, every round.
    """
    from localstore import walcheck

    original = walcheck._locked_elsewhere
    holds = [0]

    def held(fd: int) -> bool:
        answer = original(fd)
        leading = getattr(local, "leading", None)
        if leading is not None:
            local.leading = None
            holds[0] += 1
            in_check[leading].set()
            deadline = time.monotonic() + LEADER_HOLD_S
            while not holds_dms_lock(path) and time.monotonic() < deadline:
                time.sleep(0.0005)
        return answer

    monkeypatch.setattr(walcheck, "_locked_elsewhere", held)
    return holds


def run_threads(count: int, work: Any, barrier: threading.Barrier | None = None) -> list[str]:
    """Run ``work(t)`` in ``count`` threads and return the tracebacks of those that raised (empty: none did)."""
    errors: list[str] = []
    lock = threading.Lock()

    def guarded(t: int) -> None:
        try:
            work(t)
        except BaseException:  # noqa: BLE001 - reported to the test, which fails on any
            with lock:
                errors.append(f"thread {t}:\n{traceback.format_exc()}")
            if barrier is not None:
                barrier.abort()  # the others fail fast instead of waiting for this one

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    hung = [t for t, thread in enumerate(threads) if thread.is_alive()]
    if hung:
        errors.append(f"threads {hung} still running after {WAIT_S}s")
    return errors


def start_child(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start this file as a child process in a mode."""
    return subprocess.Popen([sys.executable, str(HERE), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop_child(child: subprocess.Popen[str], stop: Path) -> None:
    """Ask the child to stop (it then checks its rows and reports); kill it if it has not ended within ``WAIT_S``."""
    stop.touch()
    try:
        child.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        child.kill()


def test_threads_opening_one_store_at_once_keep_their_locks(tmp_path: Path, subprocess_env: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """4 threads open the store together each round, with no other handle here, while a process cycles on it.

    At each round's start no connection of this process is on the file. One thread (the
    round's leader) opens first, and its WAL check reads the -shm the child keeps live;
    the other three open while that check has the shm open. The child, as it closes and
    reopens, would delete or reset the WAL and shm under any connection of ours whose
    locks were dropped.
    """
    path = tmp_path / "s.db"
    with ls.open(path) as store:
        numbers(store, "threads")
        numbers(store, "child")
    local = threading.local()
    in_check = [threading.Event() for _ in range(ROUNDS)]
    holds = held_shm_check(monkeypatch, path, local, in_check)
    go, stop = tmp_path / "go", tmp_path / "stop"
    ready = Path(f"{go}.ready-cycler")  # what _workers.wait_ready looks for
    child = start_child(["cycler", str(path), str(ready), str(stop), str(CHILD_PUTS_PER_OPEN)], subprocess_env)
    acked: list[list[str]] = [[] for _ in range(THREADS)]
    unlocked: list[str] = []
    start = threading.Barrier(THREADS, timeout=WAIT_S)

    def work(t: int) -> None:
        for i in range(ROUNDS):
            start.wait()  # every thread closed its store last round: none of ours is open now
            if i % THREADS == t:
                local.leading = i
            else:  # the leader's check has the shm open now (or found no live WAL, and never says so)
                in_check[i].wait(LEADER_HOLD_S)
            with ls.open(path) as store:
                local.leading = None
                coll = numbers(store, "threads")
                key = f"t{t}-{i}"
                coll.put({"id": key, "v": i})
                acked[t].append(key)
                assert coll.get(key) == {"id": key, "v": i}
                # Every thread closed before this round began, so all earlier rounds' rows are committed.
                assert coll.count() >= THREADS * i, f"round {i}: rows of earlier rounds are missing"
                if not holds_dms_lock(path):
                    unlocked.append(f"thread {t}, round {i}")

    try:
        wait_ready(go, ["cycler"], [child], WAIT_S)
        errors = run_threads(THREADS, work, start)
    finally:
        stop_child(child, stop)
    result = result_of(child, WAIT_S)
    assert not errors, f"{len(errors)} thread(s) failed; first:\n{errors[0]}"
    assert not unlocked, f"this process lost its lock on the shm while a store was open: {unlocked[:5]}"
    assert holds[0] > 0, "no leader's open read the -shm of a live WAL: the test did not set up the race"
    assert result["errors"] == [], "the child failed:\n" + "\n".join(result["errors"])
    assert result["missing"] == [] and result["verify_ok"], f"the child lost rows or sees damage: {result}"
    assert result["acked"] > 0
    with ls.open(path) as store:
        rows = {r["id"]: r["v"] for r in numbers(store, "threads").find()}
        expected = {key: int(key.rsplit("-", 1)[1]) for keys in acked for key in keys}
        assert len(expected) == THREADS * ROUNDS
        assert rows == expected, f"{len(set(expected) - set(rows))} acknowledged row(s) lost"
        assert numbers(store, "child").count() == result["acked"]
        report = store.verify()
        assert report.ok, str(report)


def test_threads_churn_opens_beside_a_long_lived_handle_and_a_writer_process(tmp_path: Path,
                                                                              subprocess_env: dict[str, str]) -> None:
    """A handle kept open (writing) here, 4 threads opening and closing beside it, and a process cycling on it.

    With a handle of this process always open, no open may read the -shm at all; the
    process must keep its DMS lock the whole time, so the child's closes never take the
    WAL away. Every row of the handle, the threads and the child is there at the end.
    """
    path = tmp_path / "s.db"
    main = ls.open(path)
    try:
        mine = numbers(main, "main")
        numbers(main, "threads")
        numbers(main, "child")
        go, stop = tmp_path / "go", tmp_path / "stop"
        ready = Path(f"{go}.ready-cycler")
        child = start_child(["cycler", str(path), str(ready), str(stop), str(CHILD_PUTS_PER_OPEN)], subprocess_env)
        acked: list[list[str]] = [[] for _ in range(THREADS)]
        done = threading.Event()
        errors: list[str] = []

        def work(t: int) -> None:
            for i in range(CYCLES):
                with ls.open(path) as store:
                    coll = numbers(store, "threads")
                    key = f"t{t}-{i}"
                    coll.put({"id": key, "v": i})
                    acked[t].append(key)
                    assert coll.get(key) == {"id": key, "v": i}
                    assert coll.count() >= len(acked[t])

        def churn() -> None:
            try:
                errors.extend(run_threads(THREADS, work))
            finally:
                done.set()

        main_acked = 0
        unlocked = 0
        try:
            wait_ready(go, ["cycler"], [child], WAIT_S)
            churner = threading.Thread(target=churn, daemon=True)
            churner.start()
            while not done.is_set():  # the long-lived handle writes while the threads churn
                mine.put({"id": f"m{main_acked}", "v": main_acked})
                main_acked += 1
                unlocked += not holds_dms_lock(path)
            churner.join(WAIT_S)
        finally:
            stop_child(child, stop)
        result = result_of(child, WAIT_S)
        assert not errors, f"{len(errors)} thread(s) failed; first:\n{errors[0]}"
        assert unlocked == 0, f"this process lost its lock on the shm {unlocked} time(s) while the handle was open"
        assert result["errors"] == [], "the child failed:\n" + "\n".join(result["errors"])
        assert result["missing"] == [] and result["verify_ok"], f"the child lost rows or sees damage: {result}"
        assert mine.count() == main_acked
        report = main.verify()
        assert report.ok, str(report)
    finally:
        main.close()
    with ls.open(path) as store:
        rows = {r["id"]: r["v"] for r in numbers(store, "threads").find()}
        assert rows == {key: int(key.rsplit("-", 1)[1]) for keys in acked for key in keys}
        assert len(rows) == THREADS * CYCLES
        assert {r["id"] for r in numbers(store, "main").find()} == {f"m{n}" for n in range(main_acked)}
        assert numbers(store, "child").count() == result["acked"]
        report = store.verify()
        assert report.ok, str(report)


def db_file_locks(path: Path) -> list[str]:
    """This process's POSIX locks on the store file itself (``start-end`` ranges from ``/proc/locks``)."""
    inode, me = os.stat(path).st_ino, str(os.getpid())
    with open("/proc/locks") as handle:
        return [f"{f[6]}-{f[7]}" for f in (line.split() for line in handle)
                if "->" not in f and len(f) >= 8 and f[4] == me and int(f[5].rsplit(":", 1)[1]) == inode]


def test_opening_and_verifying_again_keeps_the_open_handles_lock_on_the_file(tmp_path: Path) -> None:
    """Reading the store's header (at every open, and in verify) must not drop SQLite's shared lock on the file.

    A WAL-mode connection holds a shared lock on the database file for its whole life; it is
    how a closing connection elsewhere learns the WAL is still in use. A descriptor of the
    file opened and closed by Python would drop it for every connection of this process.
    """
    path = tmp_path / "s.db"
    held = ls.open(path)
    numbers(held, "c").put({"id": "a", "v": 1})
    before = db_file_locks(path)
    assert before, "an open WAL-mode connection holds a shared lock on the file"
    for _ in range(3):
        ls.open(path).close()
        assert db_file_locks(path) == before
    assert held.verify().ok
    assert db_file_locks(path) == before
    numbers(held, "c").put({"id": "b", "v": 2})
    held.close()
    assert db_file_locks(path) == []


# -- the child process ------------------------------------------------------------------------


def cycler(path: str, ready: str, stop: str, per_open: int) -> None:
    """Open the store, put ``per_open`` rows (each its own transaction), close; repeat until ``stop`` exists.

    Row n has key ``c<n>``; after each put it is read back, and at each open every row
    acknowledged so far must be there. At the end the store is reopened and checked whole.
    Prints ``RESULT {json}``: rows acknowledged, those missing at the end, verify's verdict, errors.
    """
    acked = 0
    errors: list[str] = []
    stop_path = Path(stop)
    try:
        while not stop_path.exists():
            with ls.open(path) as store:
                coll = numbers(store, "child")
                count = coll.count()
                if count != acked:
                    raise AssertionError(f"after {acked} acknowledged puts the store holds {count} of our rows")
                for _ in range(per_open):
                    key = f"c{acked}"
                    coll.put({"id": key, "v": acked})
                    acked += 1
                    if coll.get(key) != {"id": key, "v": acked - 1}:
                        raise AssertionError(f"{key} does not read back as written")
            if acked == per_open:
                Path(ready).touch()  # a full cycle done: the parent may start its threads
    except Exception:  # noqa: BLE001 - reported to the parent
        errors.append(traceback.format_exc())
    missing: list[str] = []
    verify_ok = False
    try:
        with ls.open(path) as store:
            present = {r["id"]: r["v"] for r in numbers(store, "child").find()}
            missing = [f"c{n}" for n in range(acked) if present.get(f"c{n}") != n]
            verify_ok = store.verify().ok
    except Exception:  # noqa: BLE001
        errors.append(traceback.format_exc())
    Path(ready).touch()  # even after a failure, so the parent does not wait in vain
    sys.stdout.write("RESULT " + json.dumps({"acked": acked, "missing": missing[:20], "verify_ok": verify_ok,
                                             "errors": errors[:3]}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode != "cycler":
        raise SystemExit(f"unknown mode {mode!r}")
    cycler(args[0], args[1], args[2], int(args[3]))

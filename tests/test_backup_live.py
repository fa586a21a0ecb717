"""Online backup: copies taken while a writer process writes are consistent, committed prefixes of the store."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from _workers import ordered, ordered_row, reaped, result_of, spawn, wait_ready

import localstore as ls

BACKUPS = 6
WRITER_LIMIT = 20_000


def all_changes(store: ls.Store) -> list[ls.Change]:
    """The whole change log, read in batches."""
    return list(store.changelog.iter_changes(batch=1_000))


def check_copy(target: Path, store_id: str) -> int:
    """Open a backup copy and check it is a healthy committed prefix of the ordered writer's rows; return its row count."""
    with ls.open(target, create=False) as copy:
        report = copy.verify()
        assert report.ok, f"{target}:\n{report}"
        assert copy.id == store_id
        coll = ordered(copy)
        keys = coll.keys()
        assert keys == list(range(len(keys))), f"{target}: rows are not a prefix ({len(keys)} rows, max {max(keys, default=None)})"
        for row in coll.find():
            assert row == ordered_row(row["n"])
        changes = all_changes(copy)
        assert [c.key for c in changes] == keys, f"{target}: the change log does not match the rows"
        assert all(c.op == "put" for c in changes)
        for change in changes[-5:]:
            assert change.payload is not None
            assert coll.decode_payload(change.payload) == ordered_row(change.key)
        assert copy.changelog.last_seq() == (changes[-1].seq if changes else 0)
        return len(keys)


def test_backup_while_a_writer_process_writes(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """Six backups taken while another process writes rows 0, 1, 2, ... one per transaction."""
    path = tmp_path / "live.db"
    with ls.open(path) as store:
        ordered(store)
        store_id = store.id
    go, stop = tmp_path / "go", tmp_path / "stop"
    writer = spawn(["ordered-writer", str(path), str(go), str(stop), str(WRITER_LIMIT)], subprocess_env)
    copies: list[Path] = []
    with reaped([writer]), ls.open(path) as store:
        coll = ordered(store)
        wait_ready(go, ["writer"], [writer])
        go.touch()
        deadline = time.monotonic() + 60
        while coll.count() < 300 and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        for b in range(BACKUPS):
            target = tmp_path / f"copy-{b}.db"
            assert store.backup(target) == str(target)
            copies.append(target)
            time.sleep(0.02 * b)
        # One more backup over the first copy: the path now holds the newest one.
        inode = copies[0].stat().st_ino
        assert store.backup(copies[0]) == str(copies[0])
        assert copies[0].stat().st_ino != inode
        stop.touch()
        result = result_of(writer, timeout_s=120)
    assert result["errors"] == 0, "\n".join(result["first_errors"])
    counts = [check_copy(target, store_id) for target in copies[1:] + copies[:1]]  # in the order taken
    assert counts[0] > 0
    assert counts == sorted(counts), f"a later backup holds fewer rows: {counts}"
    assert counts[-1] <= result["written"]
    assert not list(tmp_path.glob("*.tmp-*")), "backup left temporary files behind"
    with ls.open(path) as store:
        assert ordered(store).keys() == list(range(result["written"]))
        assert store.verify().ok


def test_backup_waits_for_another_threads_transaction(store: ls.Store, tmp_path: Path) -> None:
    """A backup through a Store that another thread is mid-transaction on waits for it, then copies its rows."""
    coll = ordered(store)
    coll.put(ordered_row(0))
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with store.transaction():
                coll.put(ordered_row(1))
                coll.put(ordered_row(2))
                inside.set()
                release.wait(30)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    target = tmp_path / "while-held.db"

    def take_backup() -> None:
        try:
            store.backup(target)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    holder = threading.Thread(target=hold, daemon=True)
    backer = threading.Thread(target=take_backup, daemon=True)
    holder.start()
    try:
        assert inside.wait(30)
        backer.start()
        backer.join(timeout=1.0)  # give it time to reach the store; it must wait for the lock
    finally:
        release.set()
        holder.join(timeout=60)
        if backer.ident is not None:
            backer.join(timeout=60)
    assert not holder.is_alive() and not backer.is_alive()
    assert not errors, errors
    assert check_copy(target, store.id) == 3


def test_backup_while_another_thread_writes_through_the_same_store(store: ls.Store, tmp_path: Path) -> None:
    """Backups through a Store object that another thread keeps writing through are committed prefixes."""
    coll = ordered(store)
    errors: list[BaseException] = []
    stop = threading.Event()

    def write() -> None:
        try:
            for n in range(5_000):
                if stop.is_set():
                    break
                coll.put(ordered_row(n))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    counts = []
    try:
        for b in range(4):
            target = tmp_path / f"thread-copy-{b}.db"
            store.backup(target)  # waits for the other thread's transaction, never fails on it
            counts.append(check_copy(target, store.id))
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert not errors, errors
    assert counts == sorted(counts)


def test_backup_over_a_copy_left_with_a_hot_wal(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """Backing up over an earlier copy whose last user crashed gives a clean copy of the source."""
    source, target = tmp_path / "source.db", tmp_path / "backup.db"
    with ls.open(source) as store:
        coll = ordered(store)
        coll.put_many([ordered_row(n) for n in range(50)])
        store.backup(target)
        # Someone opens the old copy, writes to it, and dies without closing it.
        proc = spawn(["write-and-die", str(target), "40"], subprocess_env)
        with reaped([proc]):
            out, err = proc.communicate(timeout=60)
        assert "WROTE" in out, err
        assert Path(f"{target}-wal").exists()
        coll.put_many([ordered_row(n) for n in range(50, 400)])
        store.backup(target)
        store_id = store.id
    assert check_copy(target, store_id) == 400


def test_backup_inside_a_transaction_does_not_hang(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """backup() inside the caller's own write transaction fails clearly at once, or copies the committed state."""
    path, target = tmp_path / "tx.db", tmp_path / "tx-copy.db"
    proc = spawn(["backup-in-transaction", str(path), str(target)], subprocess_env)
    with reaped([proc]):
        try:
            # A liveness bound, not a performance one: the call should take well under a second.
            outcome = result_of(proc, timeout_s=20)
        except subprocess.TimeoutExpired:
            pytest.fail("store.backup() inside store.transaction() hung for more than 20 s")
    if outcome["raised"] is None:
        assert outcome["copy_keys"] == [0], "the copy holds uncommitted rows"
    else:
        assert outcome["raised"] != "StoreBusyError", (
            "backup() inside a transaction reported another writer holding the store: " + outcome["message"]
        )

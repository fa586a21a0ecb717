"""The WAL check: damage SQLite would silently drop is refused at open and named by verify(); normal WALs pass.

The campaign over random flips is in test_corruption.py; this module covers the rules
one by one, the escape hatch, and the normal WALs a crash, a rollback or a WAL restart
leave behind (none may be mistaken for damage).
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import localstore as ls
from localstore import walcheck
from localstore._sqlite import open_here

FIELDS = {"k": ls.Integer(), "pad": ls.Blob()}


def open_in_process(path: str) -> bool:
    """Whether the WAL check counts the store at ``path`` as open in this process (and so skips it)."""
    return open_here(os.path.realpath(path))


def synthetic_wal(pages: list[bytes], commits: set[int], *, big_endian: bool, salts: tuple[int, int] = (7, 9)) -> bytes:
    """A WAL built with the plain-loop checksum: frame i holds pages[i]; frames in ``commits`` end a transaction."""
    size = len(pages[0])
    header = struct.pack(">IIIIII", walcheck.MAGIC_BE if big_endian else walcheck.MAGIC_LE, walcheck.WAL_VERSION,
                         size, 0, *salts)
    cksum = walcheck.checksum(header, big_endian)
    out = [header, struct.pack(">II", *cksum)]
    for i, page in enumerate(pages):
        head = struct.pack(">II", i + 1, 3 if i in commits else 0)
        cksum = walcheck.checksum(head + page, big_endian, cksum)
        out += [head, struct.pack(">II", *salts), struct.pack(">II", *cksum), page]
    return b"".join(out)


def frame_offset(frame: int, page_size: int = 4096) -> int:
    """Where frame ``frame`` (1-based) starts in a WAL file."""
    return walcheck.WAL_HEADER + (frame - 1) * (walcheck.FRAME_HEADER + page_size)


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_vectorised_checksums_agree_with_the_plain_recurrence(big_endian: bool, page_size: int) -> None:
    rng = random.Random(page_size)
    pages = [rng.randbytes(page_size) for _ in range(7)]
    wal = synthetic_wal(pages, {2, 6}, big_endian=big_endian)
    assert walcheck.inspect("w", wal) is None  # intact: every frame chains
    damaged = bytearray(wal)
    damaged[frame_offset(2, page_size) + 100] ^= 1  # inside frame 2's page
    found = walcheck.inspect("w", bytes(damaged))
    assert found is not None
    assert (found.frame, found.kept, found.lost_commits, found.evidence) == (2, 0, 2, "chain")
    damaged = bytearray(wal)
    damaged[frame_offset(5, page_size) + 30] ^= 0x80
    found = walcheck.inspect("w", bytes(damaged))
    assert found is not None and (found.frame, found.kept, found.lost_commits) == (5, 3, 1)


def test_a_torn_or_uncommitted_tail_is_not_damage() -> None:
    rng = random.Random(1)
    pages = [rng.randbytes(4096) for _ in range(6)]
    wal = synthetic_wal(pages, {2}, big_endian=False)  # frames 4-6: an uncommitted transaction
    assert walcheck.inspect("w", wal[:-1000]) is None  # torn mid-frame
    damaged = bytearray(wal)
    damaged[frame_offset(5) + 50] ^= 1  # damage among uncommitted frames drops nothing committed
    assert walcheck.inspect("w", bytes(damaged)) is None
    assert walcheck.inspect("w", synthetic_wal(pages, {2, 5}, big_endian=False)[:-10]) is None  # torn last frame


def test_frames_of_an_older_generation_are_not_damage() -> None:
    rng = random.Random(2)
    old = synthetic_wal([rng.randbytes(4096) for _ in range(8)], {3, 7}, big_endian=False, salts=(7, 9))
    new = synthetic_wal([rng.randbytes(4096) for _ in range(3)], {2}, big_endian=False, salts=(8, 1234))
    restarted = new + old[len(new):]  # a restarted WAL overwrites from the start; the old tail stays
    assert walcheck.inspect("w", restarted) is None


def test_a_damaged_header_loses_every_commit() -> None:
    rng = random.Random(3)
    wal = bytearray(synthetic_wal([rng.randbytes(4096) for _ in range(4)], {1, 3}, big_endian=False))
    wal[12] ^= 4  # the checkpoint sequence: the header checksum fails, SQLite ignores the whole WAL
    found = walcheck.inspect("w", bytes(wal))
    assert found is not None and (found.frame, found.kept, found.lost_commits) == (0, 0, 2)
    assert "WAL header" in found.describe()


# -- real stores -----------------------------------------------------------------------------------


def crashed_store(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A store with 4 commits only in its WAL, and its three files as a crash at that moment leaves them."""
    path = tmp_path / "s.db"
    with ls.open(path) as store:
        coll = store.collection("t", key="k", fields=FIELDS)
        coll.put_many([{"k": i, "pad": bytes([i]) * 300} for i in range(50)])
        store.optimize()
        store._db.execute("PRAGMA wal_autocheckpoint=0")
        for j in range(4):
            coll.put_many([{"k": 100 + 10 * j + i, "pad": bytes([j]) * 2000} for i in range(10)])
        files = {s: Path(f"{path}{s}").read_bytes() for s in ("", "-wal", "-shm")}
    return path, files


def restore(path: Path, files: dict[str, bytes], wal: bytes | None = None) -> None:
    for suffix, data in files.items():
        Path(f"{path}{suffix}").write_bytes(wal if suffix == "-wal" and wal is not None else data)


def test_open_refuses_a_wal_it_would_truncate_and_changes_nothing(tmp_path: Path) -> None:
    path, files = crashed_store(tmp_path)
    wal = bytearray(files["-wal"])
    wal[frame_offset(3) + 2000] ^= 0x10
    restore(path, files, bytes(wal))
    before = {s: Path(f"{path}{s}").read_bytes() for s in files}
    with pytest.raises(ls.CorruptStoreError) as err:
        ls.open(path)
    message = str(err.value)
    assert str(path) in message and "frame 3 of" in message and "wal_damage='discard'" in message
    assert "backup" in message
    assert {s: Path(f"{path}{s}").read_bytes() for s in files} == before  # untouched, evidence kept
    restore(path, files)  # the undamaged WAL opens with every commit
    with ls.open(path) as store:
        assert store.collection("t").count() == 90
        assert store.verify().ok


def test_wal_damage_discard_keeps_a_copy_and_opens_at_the_last_intact_commit(tmp_path: Path) -> None:
    path, files = crashed_store(tmp_path)
    wal = bytearray(files["-wal"])
    last = (len(wal) - walcheck.WAL_HEADER) // (4096 + walcheck.FRAME_HEADER)
    wal[frame_offset(last) + 500] ^= 0x01  # the final commit frame: caught through the crash-time -shm
    restore(path, files, bytes(wal))
    with pytest.raises(ls.CorruptStoreError):
        ls.open(path)
    with ls.open(path, wal_damage="discard") as store:
        count = store.collection("t").count()
        assert 50 <= count < 90
        assert store.verify().ok
    kept = Path(f"{path}-wal.damaged")
    assert kept.read_bytes() == bytes(wal)
    assert kept.stat().st_mode & 0o777 == 0o600
    with ls.open(path) as store:  # the store carries on from there
        assert store.collection("t").count() == count


def test_bad_wal_damage_option(tmp_path: Path) -> None:
    with pytest.raises(ls.StoreOpenError, match="wal_damage must be one of raise, discard"):
        ls.open(tmp_path / "s.db", wal_damage="ignore")
    assert not (tmp_path / "s.db").exists()


def test_verify_names_a_damaged_frame_of_a_live_store(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with ls.open(path) as store:
        coll = store.collection("t", key="k", fields=FIELDS)
        store._db.execute("PRAGMA wal_autocheckpoint=0")
        for j in range(3):
            coll.put_many([{"k": 10 * j + i, "pad": b"x" * 1500} for i in range(10)])
        assert store.verify().ok
        with open(f"{path}-wal", "r+b") as handle:
            handle.seek(frame_offset(2) + 3000)
            byte = handle.read(1)
            handle.seek(frame_offset(2) + 3000)
            handle.write(bytes([byte[0] ^ 0x40]))
        report = store.verify()
        assert not report.ok
        assert any("frame 2 of" in p and "restore from a backup" in p for p in report.problems), report.problems


WRITER = r"""
import os, random, sys
import localstore as ls
path, seed = sys.argv[1], int(sys.argv[2])
store = ls.open(path)
store._db.execute("PRAGMA wal_autocheckpoint=0")
store._db.execute("PRAGMA cache_size=-100")  # a small cache: big transactions spill frames into the WAL
coll = store.collection("t", key="k", fields={"k": ls.Integer(), "pad": ls.Blob()})
rng = random.Random(seed)
n = max(coll.keys(), default=-1) + 1
print("ready", flush=True)
while True:
    roll = rng.random()
    if roll < 0.2:  # a large transaction rolled back: its spilled frames stay in the WAL, uncommitted
        try:
            with store.transaction():
                coll.put_many([{"k": -1 - i, "pad": os.urandom(3000)} for i in range(300)])
                raise KeyError("roll back")
        except KeyError:
            pass
    elif roll < 0.3:  # a checkpoint: the next write restarts the WAL over the old generation's frames
        store._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    else:
        size = rng.randrange(1, 40)
        coll.put_many([{"k": n + i, "pad": os.urandom(rng.randrange(10, 5000))} for i in range(size)])
        n += size
        print(n, flush=True)
"""


def test_wals_left_by_killed_writers_are_never_called_damaged(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    path = tmp_path / "s.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(5)
    checked = 0
    for kill in range(12):
        out = tmp_path / f"out{kill}.txt"
        with out.open("w") as handle:
            proc = subprocess.Popen([sys.executable, str(script), str(path), str(kill)], stdout=handle,
                                    env=subprocess_env)
            deadline = time.monotonic() + 60
            while "ready" not in out.read_text() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.05, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        acked = [int(x) for x in out.read_text().split() if x.isdigit()]
        header = path.read_bytes()[:100]
        if os.path.exists(f"{path}-wal") and os.path.getsize(f"{path}-wal") > walcheck.WAL_HEADER:
            checked += 1
            assert walcheck.check_file(str(path), header) is None, f"kill {kill}: a normal WAL called damaged"
            shm = Path(f"{path}-shm")
            saved = shm.read_bytes() if shm.exists() else None
            shm.unlink(missing_ok=True)  # and judged without the crash-time index (chain evidence only)
            assert walcheck.check_file(str(path), header) is None, f"kill {kill}: (no -shm) called damaged"
            if saved is not None:
                shm.write_bytes(saved)
        with ls.open(path) as store:
            coll = store.collection("t")
            if acked:
                assert coll.count(where={"k": {"<": acked[-1]}}) == acked[-1], f"kill {kill}: acknowledged rows lost"
            assert store.verify().ok
    assert checked >= 6, "too few kills left a WAL to check"


def test_a_store_open_in_another_process_is_not_judged(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    path = tmp_path / "s.db"
    with ls.open(path) as store:
        store.collection("t", key="k", fields=FIELDS).put({"k": 1, "pad": b"x"})
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys, localstore as ls; s = ls.open(sys.argv[1]); s.collection('t').count(); "
         "print('open', flush=True); sys.stdin.read()"), str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        fd = os.open(f"{path}-shm", os.O_RDONLY)
        try:
            assert walcheck._locked_elsewhere(fd)
        finally:
            os.close(fd)
    finally:
        holder.communicate("")
    fd = os.open(f"{path}-shm", os.O_RDONLY) if os.path.exists(f"{path}-shm") else None
    if fd is not None:  # the holder's close removed it, or left it unlocked
        try:
            assert not walcheck._locked_elsewhere(fd)
        finally:
            os.close(fd)


def test_a_second_handle_in_the_same_process_keeps_the_first_ones_locks(tmp_path: Path,
                                                                        subprocess_env: dict[str, str]) -> None:
    # POSIX drops a process's locks on a file when any descriptor of it is closed: opening the
    # store again in-process must not open and close its -shm, or another process closing the
    # store would think it was the last one and checkpoint and delete the WAL under the first handle.
    path = tmp_path / "s.db"
    first = ls.open(path)
    try:
        first._db.execute("PRAGMA wal_autocheckpoint=0")
        first.collection("t", key="k", fields=FIELDS).put_many([{"k": i, "pad": b"x"} for i in range(100)])
        ls.open(path).close()
        assert first.verify().ok
        subprocess.run([sys.executable, "-c", "import sys, localstore as ls; ls.open(sys.argv[1]).close()", str(path)],
                       check=True, env=subprocess_env)
        assert os.path.exists(f"{path}-wal"), "another process's close deleted the WAL the first handle still uses"
    finally:
        first.close()


def test_a_raw_apsw_connection_in_the_same_process_keeps_its_locks(tmp_path: Path,
                                                                    subprocess_env: dict[str, str]) -> None:
    import apsw

    path = tmp_path / "s.db"
    with ls.open(path) as store:
        store.collection("t", key="k", fields=FIELDS).put({"k": 0, "pad": b"x"})
    raw = apsw.Connection(str(path))
    try:
        raw.execute("PRAGMA wal_autocheckpoint=0")
        raw.execute("CREATE TABLE scratch(x)")
        raw.execute("INSERT INTO scratch VALUES (1)")  # a WAL with frames, held by the raw connection
        ls.open(path).close()
        subprocess.run([sys.executable, "-c", "import sys, localstore as ls; ls.open(sys.argv[1]).close()", str(path)],
                       check=True, env=subprocess_env)
        assert os.path.exists(f"{path}-wal"), "another process's close deleted the WAL the raw connection still uses"
        assert raw.execute("SELECT x FROM scratch").fetchall() == [(1,)]
    finally:
        raw.close()


def test_open_while_other_connections_are_busy_in_other_threads(tmp_path: Path) -> None:
    # apsw refuses to tell a connection's file while another thread runs a statement on it;
    # the check must not fail the open, and knows each connection's file from its creation.
    import threading

    import apsw

    crashed, files = crashed_store(tmp_path)
    restore(crashed, files)  # a WAL to check, from a "crash"
    busy_store = ls.open(tmp_path / "other.db")
    raw = apsw.Connection(str(tmp_path / "raw.db"))
    release = threading.Event()
    running = threading.Barrier(3)

    def hold() -> int:  # a statement that runs until the test lets it go
        running.wait()
        release.wait(60)
        return 1

    for conn in (busy_store._db, raw):
        conn.create_scalar_function("hold", hold, 0)
    threads = [threading.Thread(target=lambda c=c: c.execute("SELECT hold()").fetchall()) for c in (busy_store._db, raw)]
    try:
        for t in threads:
            t.start()
        running.wait()
        assert open_in_process(str(tmp_path / "raw.db"))  # busy in another thread: open
        assert open_in_process(str(tmp_path / "other.db"))
        assert not open_in_process(str(crashed))  # neither is on this file
        with ls.open(crashed) as store:  # and the open goes through, its WAL checked
            assert store.collection("t").count() == 90
    finally:
        release.set()
        for t in threads:
            t.join()
        busy_store.close()
        raw.close()
    assert not open_in_process(str(crashed))


def test_which_files_count_as_open_in_this_process(tmp_path: Path) -> None:
    """Known by path for localstore's connections, by asking apsw for raw ones; a closed store is forgotten."""
    import apsw

    stores = [ls.open(tmp_path / f"s{i}.db") for i in range(3)]
    linked = tmp_path / "link.db"
    linked.symlink_to(tmp_path / "s1.db")
    assert open_in_process(str(tmp_path / "s0.db"))
    assert open_in_process(str(linked))  # the same file under another name
    assert not open_in_process(str(tmp_path / "other.db"))
    raw = apsw.Connection(str(tmp_path / "raw.db"))
    assert open_in_process(str(tmp_path / "raw.db"))
    assert not open_in_process(str(tmp_path / "other.db"))  # raw connections asked one by one
    raw.close()
    del raw
    assert open_in_process(str(tmp_path / "s2.db"))
    kept = stores[2]._db  # a closed connection still referenced (by a kept traceback, say) counts for nothing
    stores[2].close()
    assert not open_in_process(str(tmp_path / "s2.db"))
    raw = apsw.Connection(str(tmp_path / "raw.db"))  # ... and hides no raw connection
    assert open_in_process(str(tmp_path / "raw.db"))
    raw.close()
    del kept
    for store in stores:
        store.close()


def test_a_raw_connection_made_before_localstore_was_imported_is_known(tmp_path: Path,
                                                                       subprocess_env: dict[str, str]) -> None:
    script = textwrap.dedent("""
        import sys, apsw
        raw = apsw.Connection(sys.argv[1])
        import os
        from localstore._sqlite import open_here
        print(open_here(os.path.realpath(sys.argv[1])), open_here(os.path.realpath(sys.argv[1] + ".other")))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "raw.db")], check=True, env=subprocess_env,
                         capture_output=True, text=True).stdout
    assert out.split() == ["True", "False"]

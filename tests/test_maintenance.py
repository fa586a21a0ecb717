"""Maintenance: verify, backup, optimize/vacuum, TTL expiry and stats on real store files."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

import localstore as ls


def _fill(store: ls.Store, rows: int = 5) -> ls.Collection:
    coll = store.collection("items", key="k", fields={"k": ls.Text(), "n": ls.Integer(), "blob": ls.Blob()})
    coll.put_many([{"k": f"k{i}", "n": i} for i in range(rows)])
    return coll


def _tamper(path: Path, *sql: str) -> None:
    """Change the file behind localstore's back, through a raw apsw connection."""
    conn = apsw.Connection(str(path))
    try:
        for statement in sql:
            conn.execute(statement)
    finally:
        conn.close()


@pytest.fixture
def closed_store(store_path: Path) -> Iterator[Path]:
    """A store with one collection of five rows (seq 1..5) and a deleted sixth row, closed."""
    with ls.open(store_path) as s:
        coll = _fill(s)
        coll.put({"k": "gone"})
        coll.delete("gone")
    yield store_path


# -- verify ------------------------------------------------------------------------------------------


def test_verify_ok_on_a_healthy_store(store: ls.Store) -> None:
    coll = _fill(store)
    coll.put({"k": "k1", "n": 100})
    coll.delete("k2")
    store.changelog.ack(3)
    store.changelog.prune(keep=1)
    report = store.verify()
    assert report.ok, report.problems
    assert report.problems == []
    assert report.integrity == ["ok"]
    assert report.collections == {"items": 4}
    assert report.last_seq == 7
    assert report.watermark == 3
    assert report.changes == 5
    assert report.store_id == store.id
    assert report.as_dict()["ok"] is True
    assert "ok" in str(report)


def test_verify_ok_on_an_empty_store(store: ls.Store) -> None:
    report = store.verify()
    assert report.ok and report.collections == {} and report.last_seq == 0


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM _ls_changes WHERE seq = 3",  # a middle put record
        "DELETE FROM _ls_changes WHERE seq = 5",  # the newest put record
        "DELETE FROM _ls_changes WHERE seq = 7",  # the delete record of 'gone'
        "DELETE FROM _ls_changes",
        "UPDATE items SET _ls_seq = 999 WHERE k = 'k1'",
        "UPDATE items SET _ls_seq = 3 WHERE k = 'k1'",  # points at another key's record
        "UPDATE items SET _ls_seq = NULL WHERE k = 'k1'",
        "UPDATE items SET n = 42, _ls_seq = 4 WHERE k = 'k4'",  # edited row claiming an older change
        "INSERT INTO items(k, n, _ls_seq, _ls_hlc) VALUES('smuggled', 1, NULL, 0)",
        "UPDATE _ls_meta SET value = 2 WHERE key = 'last_seq'",
        "UPDATE _ls_meta SET value = 99 WHERE key = 'watermark'",
        "UPDATE _ls_changes SET hlc = 1 WHERE seq = 4",
        "UPDATE _ls_changes SET coll = 77 WHERE seq = 2",
    ],
    ids=["del-middle", "del-newest", "del-delete-record", "del-all", "seq-999", "seq-other-key", "seq-null",
         "seq-older", "smuggled-row", "last-seq-lowered", "watermark-ahead", "hlc-backwards", "orphan-coll"],
)
def test_verify_reports_tampering(closed_store: Path, sql: str) -> None:
    _tamper(closed_store, sql)
    with ls.open(closed_store) as s:
        report = s.verify()
        assert not report.ok
        assert report.problems
        assert "PROBLEMS" in str(report)


def test_verify_reports_missing_unacknowledged_oldest_record(closed_store: Path) -> None:
    _tamper(closed_store, "DELETE FROM _ls_changes WHERE seq = 1")
    with ls.open(closed_store) as s:
        assert s.changelog.watermark() == 0
        assert not s.verify().ok


def test_verify_reports_missing_table(closed_store: Path) -> None:
    _tamper(closed_store, "DROP TABLE items")
    with ls.open(closed_store) as s:
        report = s.verify()
        assert not report.ok
        assert any("items" in p for p in report.problems)


# -- backup ---------------------------------------------------------------------------------------------


def test_backup_opens_and_verifies_with_same_id_and_rows(store: ls.Store, tmp_path: Path) -> None:
    coll = _fill(store, rows=50)
    coll.put({"k": "k1", "n": -1, "blob": b"\x00\x01"})
    calls: list[tuple[int, int]] = []
    target = tmp_path / "backups" / "copy.db"
    target.parent.mkdir()
    assert store.backup(target, progress=lambda done, total: calls.append((done, total))) == str(target)
    assert calls and calls[-1][0] == calls[-1][1] > 0
    # The live store is unaffected and keeps working.
    coll.put({"k": "after-backup"})
    with ls.open(target) as copy:
        assert copy.id == store.id
        assert copy.verify().ok
        ccoll = copy.collection("items")
        assert ccoll.count() == 50
        assert ccoll.get("k1") == {"k": "k1", "n": -1, "blob": b"\x00\x01"}
        assert ccoll.get("after-backup") is None
        assert [c.seq for c in copy.changelog.changes()] == list(range(1, 52))
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["copy.db"]  # no temp files left


def test_backup_replaces_an_existing_file(store: ls.Store, tmp_path: Path) -> None:
    coll = _fill(store, rows=3)
    target = tmp_path / "copy.db"
    store.backup(target)
    coll.put({"k": "extra"})
    store.backup(target)
    with ls.open(target) as copy:
        assert copy.collection("items").count() == 4


def test_backup_to_the_store_itself_is_refused(store: ls.Store, store_path: Path) -> None:
    _fill(store)
    before = store_path.read_bytes()
    for target in (store_path, str(store_path), store_path.parent / "." / store_path.name,
                   store_path.parent / "sub" / ".." / store_path.name):
        with pytest.raises(ls.BackupError):
            store.backup(target)
    assert store.collection("items").count() == 5
    assert store.verify().ok
    assert store_path.read_bytes() == before


def test_backup_to_a_directory_is_refused(store: ls.Store, tmp_path: Path) -> None:
    _fill(store)
    folder = tmp_path / "dir"
    folder.mkdir()
    with pytest.raises(ls.BackupError):
        store.backup(folder)
    assert list(folder.iterdir()) == []


def test_backup_into_a_missing_folder_is_backup_error(store: ls.Store, tmp_path: Path) -> None:
    _fill(store)
    with pytest.raises(ls.BackupError):
        store.backup(tmp_path / "no" / "such" / "copy.db")
    assert not (tmp_path / "no").exists()


# -- optimize -------------------------------------------------------------------------------------------


def test_optimize_vacuum_shrinks_file_after_deleting_rows(store: ls.Store, store_path: Path) -> None:
    scratch = store.collection("scratch", key="k", fields={"k": ls.Text(), "blob": ls.Blob()}, sync=False)
    scratch.put_many([{"k": f"k{i}", "blob": os.urandom(1000)} for i in range(2000)])
    store.optimize()
    full = os.path.getsize(store_path)
    assert full > 2_000_000
    scratch.delete_many([f"k{i}" for i in range(2000)])
    store.optimize(vacuum=True)
    assert os.path.getsize(store_path) < full // 4
    wal = Path(f"{store_path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    assert store.verify().ok
    scratch.put({"k": "still-works"})
    assert scratch.count() == 1


def test_deleted_synced_rows_are_reclaimed_only_after_prune(store: ls.Store, store_path: Path) -> None:
    coll = store.collection("items", key="k", fields={"k": ls.Text(), "blob": ls.Blob()})
    coll.put_many([{"k": f"k{i}", "blob": os.urandom(1000)} for i in range(1000)])
    store.optimize()
    full = os.path.getsize(store_path)
    coll.delete_many([f"k{i}" for i in range(1000)])
    store.optimize(vacuum=True)
    # The delete records keep the rows as written (sync still needs them).
    assert os.path.getsize(store_path) > full // 2
    store.changelog.ack(store.changelog.last_seq())
    assert store.changelog.prune(keep=0) == 2000
    store.optimize(vacuum=True)
    assert os.path.getsize(store_path) < full // 4
    assert store.verify().ok


def test_optimize_inside_a_transaction_is_refused(store: ls.Store) -> None:
    _fill(store)
    with store.transaction():
        with pytest.raises(ls.LocalStoreError):
            store.optimize()
        store.collection("items").put({"k": "inside"})
    assert store.collection("items").get("inside") is not None


# -- TTL ------------------------------------------------------------------------------------------------


def test_expire_deletes_old_rows_and_logs_deletes(store: ls.Store) -> None:
    temp = store.collection("temp", key="k", fields={"k": ls.Text()}, ttl=3600)
    keep = store.collection("keep", key="k", fields={"k": ls.Text()})
    temp.put_many([{"k": f"t{i}"} for i in range(5)])
    keep.put_many([{"k": f"p{i}"} for i in range(3)])
    now = time.time()
    assert store.expire(now=now) == {"temp": 0}
    assert temp.count() == 5
    last = store.changelog.last_seq()
    assert store.expire(now=now + 7200) == {"temp": 5}
    assert temp.count() == 0
    assert keep.count() == 3
    deletes = store.changelog.changes(after=last)
    assert sorted((c.op, c.key) for c in deletes) == [("delete", f"t{i}") for i in range(5)]
    assert all(c.collection == "temp" for c in deletes)
    assert store.expire(now=now + 7200) == {"temp": 0}
    assert store.verify().ok


def test_expire_keeps_recently_rewritten_rows(store: ls.Store) -> None:
    temp = store.collection("temp", key="k", fields={"k": ls.Text(), "v": ls.Integer()}, ttl=3600)
    temp.put_many([{"k": "old"}, {"k": "fresh"}])
    old_hlc = store.changelog.changes()[-1].hlc
    # Move a row's write time forward by rewriting it later; wait for the HLC to pass a cutoff between.
    cutoff_s = ((old_hlc >> 16) + 5) / 1000
    while time.time() <= cutoff_s + 0.01:
        time.sleep(0.005)
    temp.put({"k": "fresh", "v": 2})
    assert store.expire(now=cutoff_s + 3600) == {"temp": 1}
    assert temp.keys() == ["fresh"]


def test_expire_on_sync_false_collection_logs_nothing(store: ls.Store) -> None:
    temp = store.collection("temp", key="k", fields={"k": ls.Text()}, ttl=10, sync=False)
    temp.put_many([{"k": "a"}, {"k": "b"}])
    assert store.expire(now=time.time() + 100) == {"temp": 2}
    assert store.changelog.last_seq() == 0


# -- stats ----------------------------------------------------------------------------------------------


def test_stats(store: ls.Store, store_path: Path) -> None:
    coll = _fill(store, rows=10)
    store.collection("scratch", key="k", fields={"k": ls.Text()}, sync=False, ttl=60).put({"k": "x"})
    coll.delete("k0")
    store.changelog.ack(4)
    st = store.stats()
    assert st.path == str(store_path)
    assert st.store_id == store.id
    assert st.file_bytes > 0
    assert st.last_seq == 11
    assert st.watermark == 4
    assert st.pending_changes == 7
    assert st.history_changes == 4
    assert set(st.collections) == {"items", "scratch"}
    items = st.collections["items"]
    assert items["rows"] == 9 and items["key"] == "k" and items["sync"] is True and items["ttl"] is None
    assert items["fields"] == {"k": "Text()", "n": "Integer()", "blob": "Blob()"}
    assert st.collections["scratch"]["rows"] == 1
    assert st.collections["scratch"]["sync"] is False and st.collections["scratch"]["ttl"] == 60
    assert st.as_dict()["last_seq"] == 11


def test_verify_names_a_damaged_compressed_value(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    with ls.open(path) as s:
        notes = s.collection("notes", key="k", fields={"k": ls.Text(), "body": ls.Text(compress=True)})
        notes.put_many([{"k": f"n{i}", "body": f"note {i} " + "lorem ipsum " * 200} for i in range(5)])
        assert s.verify().ok
        stored = bytearray(s._db.execute("SELECT body FROM notes WHERE k = 'n3'").fetchone()[0])
        stored[len(stored) // 2] ^= 0x40
        s._db.execute("UPDATE notes SET body = ? WHERE k = 'n3'", (bytes(stored),))
        report = s.verify()
        assert not report.ok
        assert any("notes" in p and "body" in p and "n3" in p for p in report.problems), report.problems
        assert len(report.problems) == 1

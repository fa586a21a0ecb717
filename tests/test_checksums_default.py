"""Page checksums are on for new stores: opting out, older stores, foreign writers, and the ``checksums`` command."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

import localstore as ls
from localstore import checksums
from localstore.cli import main as cli

pytestmark = pytest.mark.skipif(not checksums.available(), reason="apsw ships no cksumvfs here")

FIELDS = {"k": ls.Text(), "body": ls.Text(), "x": ls.Real()}


def fill(path: Path, **options: object) -> None:
    with ls.open(path, **options) as store:  # type: ignore[arg-type]
        store.collection("notes", key="k", fields=FIELDS).put_many(
            [{"k": f"k{i}", "body": f"MARKER-{i:04d}-" + "x" * 40, "x": i / 7} for i in range(200)])


def test_a_new_store_keeps_page_checksums_and_reopens_with_them(tmp_path: Path) -> None:
    fill(tmp_path / "s.db")
    assert checksums.enabled(tmp_path / "s.db")
    with ls.open(tmp_path / "s.db") as store:
        assert store.vfs == checksums.VFS_NAME
        assert store.verify().ok
        assert store.collection("notes").count() == 200


def test_opting_out_and_custom_vfs_make_stores_without_and_they_stay_so(tmp_path: Path) -> None:
    fill(tmp_path / "off.db", checksums=False)
    assert not checksums.enabled(tmp_path / "off.db")
    with ls.open(tmp_path / "off.db") as store:  # the default does not convert an existing store
        assert store.collection("notes").count() == 200
    assert not checksums.enabled(tmp_path / "off.db")
    fill(tmp_path / "vfs.db", vfs="unix")  # a VFS of the caller's choosing, not declared to wrap cksumvfs
    assert not checksums.enabled(tmp_path / "vfs.db")
    with pytest.raises(ls.StoreOpenError, match="convert"):
        ls.open(tmp_path / "off.db", checksums=True)


def test_a_flipped_byte_in_a_plain_real_of_a_default_store_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    fill(path)
    data = bytearray(path.read_bytes())
    pos = data.find(b"MARKER-0150-")
    assert pos > 0
    data[pos + 7] ^= 0x01  # "MARKER-0150" -> "MARKER-1150": a plain Text value, no value checksum of its own
    path.write_bytes(bytes(data))
    with pytest.raises(ls.CorruptStoreError, match="fails its checksum"), ls.open(path) as store:
        store.collection("notes").find()


def test_an_edit_by_a_tool_without_checksums_reads_as_damage_until_refreshed(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    fill(path)
    with ls.open(path) as store:
        table = store.collection("notes").schema.table.strip('"')
    conn = sqlite3.connect(path)  # the stdlib's own SQLite: no cksumvfs in it
    conn.execute(f'UPDATE "{table}" SET body = ? WHERE k = ?', ("edited by hand", "k3"))
    conn.commit()
    conn.close()
    with pytest.raises(ls.CorruptStoreError) as err, ls.open(path) as store:
        store.collection("notes").find()
    assert "localstore checksums --refresh" in str(err.value)
    assert cli(["checksums", "--refresh", str(path)]) == 0
    with ls.open(path) as store:
        assert store.collection("notes").get("k3")["body"] == "edited by hand"
        assert store.verify().ok


def test_the_checksums_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill(tmp_path / "old.db", checksums=False)
    assert cli(["checksums", str(tmp_path / "old.db")]) == 0
    assert "page checksums off" in capsys.readouterr().out
    assert cli(["checksums", "--refresh", str(tmp_path / "old.db")]) == 1
    assert "nothing to refresh" in capsys.readouterr().err
    assert cli(["checksums", "--convert", str(tmp_path / "old.db"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(tmp_path / "old.db"), "checksums": True}
    with ls.open(tmp_path / "old.db") as store:
        assert store.collection("notes").count() == 200 and store.verify().ok
    assert cli(["checksums", str(tmp_path / "missing.db")]) == 1
    assert "no store at" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()


def test_a_backup_larger_than_the_page_cache_keeps_valid_checksums(tmp_path: Path) -> None:
    # The copy's pages can spill to disk before its page 1 is written; each must carry its checksum.
    import os

    with ls.open(tmp_path / "s.db") as store:
        coll = store.collection("blobs", key="k", fields={"k": ls.Integer(), "b": ls.Blob()})
        for start in range(0, 1200, 200):
            coll.put_many([{"k": i, "b": os.urandom(4000)} for i in range(start, start + 200)])
        store._db.execute("PRAGMA cache_size=-500")  # well below the store's ~5 MB
        store.backup(tmp_path / "copy.db")
    assert checksums.enabled(tmp_path / "copy.db")
    with ls.open(tmp_path / "copy.db") as copy:
        assert copy.collection("blobs").count() == 1200
        assert copy.verify().ok

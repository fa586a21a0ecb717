"""Security sweep: every file the project creates is 0600, every folder it creates is 0700.

Each test runs the code that creates files (stores and their -wal/-shm, backups, key
files, restore outputs, kit exports, workspace folders) under a given umask, then walks
what appeared and checks the modes. A looser mode that is a library bug is kept as a
strict xfail naming the bug, so the test starts passing (and must be un-marked) once
it is fixed.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import localstore as ls

UMASKS = [0o022, 0o002, 0o000]


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def assert_private_files(root: Path, expect_some: tuple[str, ...] = ()) -> list[Path]:
    found = files_under(root)
    names = {p.name for p in found}
    for name in expect_some:
        assert name in names, f"{name} was not created under {root}: {sorted(names)}"
    loose = {str(p.relative_to(root)): f"{mode(p):04o}" for p in found if mode(p) != 0o600}
    assert not loose, f"files not 0600: {loose}"
    return found


def _fields() -> dict[str, ls.Field]:
    return {
        "id": ls.Text(),
        "secret": ls.Text(encrypt=True, blind_index=True, subject="id"),
        "notes": ls.Text(compress=True),
        "state": ls.Array(encrypt=True, compress=True),
        "v": ls.Vector(4),
    }


def _fill(store: ls.Store, n: int = 50) -> None:
    coll = store.collection("things", key="id", fields=_fields())
    coll.put_many([{"id": f"k{i}", "secret": f"s{i}", "notes": "word " * 40 + str(i),
                    "state": np.arange(16.0) * i, "v": [1.0, 0.0, float(i), 1.0]} for i in range(n)])


# -- stores, WAL, shm -------------------------------------------------------------------------------


def test_store_wal_and_shm_are_0600(tmp_path: Path, umask: int) -> None:
    key = ls.generate_key()
    path = tmp_path / "agent.db"
    store = ls.open(path, key=key)
    try:
        _fill(store)
        # While open: main file, -wal and -shm all exist.
        assert_private_files(tmp_path, ("agent.db", "agent.db-wal", "agent.db-shm"))
        store.forget("k1")
        store.rotate_key(ls.generate_key())
        store.optimize(vacuum=True)
        assert_private_files(tmp_path, ("agent.db",))
    finally:
        store.close()
    assert_private_files(tmp_path, ("agent.db",))


def test_store_full_durability_is_0600(tmp_path: Path, umask: int) -> None:
    with ls.open(tmp_path / "full.db", durability="full", key=ls.generate_key()) as store:
        _fill(store, 5)
        assert_private_files(tmp_path, ("full.db", "full.db-wal", "full.db-shm"))


# -- workspaces -----------------------------------------------------------------------------------


def test_workspace_folder_is_0700_and_its_stores_0600(tmp_path: Path, umask: int) -> None:
    with ls.Workspace(tmp_path / "ws") as ws:
        for name in ("a", "b"):
            _fill(ws.open(name, key=ls.generate_key()), 5)
        assert mode(tmp_path / "ws") == 0o700
        assert_private_files(tmp_path / "ws", ("a.db", "a.db-wal", "b.db-shm"))


def test_workspace_parent_folders_it_creates_are_0700(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        ls.Workspace(tmp_path / "a" / "b" / "ws").close()
    finally:
        os.umask(old)
    loose = {p: f"{mode(tmp_path / p):04o}" for p in ("a", "a/b", "a/b/ws") if mode(tmp_path / p) != 0o700}
    assert not loose, f"folders created by Workspace that are not 0700: {loose}"


def test_workspace_keeps_an_existing_folder_mode(tmp_path: Path) -> None:
    """A folder the user made is theirs: the workspace does not chmod it (only folders it creates must be 0700)."""
    (tmp_path / "mine").mkdir(mode=0o750)
    os.chmod(tmp_path / "mine", 0o750)
    with ls.Workspace(tmp_path / "mine") as ws:
        _fill(ws.open("x", key=ls.generate_key()), 3)
    assert mode(tmp_path / "mine") == 0o750
    assert_private_files(tmp_path / "mine", ("x.db",))


# -- backups ------------------------------------------------------------------------------------


def test_backups_are_0600(tmp_path: Path, umask: int) -> None:
    (tmp_path / "live").mkdir()
    (tmp_path / "backups").mkdir()
    key = ls.generate_key()
    with ls.open(tmp_path / "live" / "agent.db", key=key) as store:
        _fill(store)
        store.backup(tmp_path / "backups" / "one.db")
        # Over an existing, world-readable file: the replacement is private.
        loose = tmp_path / "backups" / "two.db"
        loose.write_bytes(b"")
        os.chmod(loose, 0o644)
        store.backup(loose)
        with ls.open(tmp_path / "backups" / "one.db", key=key, keys_from=store) as copy:
            assert copy.collection("things").count() == 50
    assert_private_files(tmp_path / "backups", ("one.db", "two.db"))
    assert_private_files(tmp_path / "live", ("agent.db",))


def test_cli_backup_is_0600(tmp_path: Path, umask: int, subprocess_env: dict[str, str]) -> None:
    with ls.open(tmp_path / "agent.db", key=ls.generate_key()) as store:
        _fill(store, 5)
    (tmp_path / "out").mkdir()
    subprocess.run([sys.executable, "-m", "localstore", "backup", str(tmp_path / "agent.db"),
                    str(tmp_path / "out" / "b.db")], env=subprocess_env, check=True, capture_output=True)
    assert_private_files(tmp_path / "out", ("b.db",))


# -- key files --------------------------------------------------------------------------------------


def test_key_files_are_0600(tmp_path: Path, umask: int) -> None:
    ls.write_key_file(tmp_path / "master.key")
    ls.write_key_file(tmp_path / "given.key", ls.generate_key())
    assert_private_files(tmp_path, ("master.key", "given.key"))
    with ls.open(tmp_path / "agent.db", key_file=tmp_path / "master.key") as store:
        _fill(store, 3)
    assert_private_files(tmp_path, ("master.key", "agent.db"))


def test_a_loose_key_file_is_refused(tmp_path: Path) -> None:
    ls.write_key_file(tmp_path / "master.key")
    os.chmod(tmp_path / "master.key", 0o640)
    with pytest.raises(ls.KeyFileError, match="chmod 600"):
        ls.open(tmp_path / "agent.db", key_file=tmp_path / "master.key")
    assert not (tmp_path / "agent.db").exists()


# -- kit exports ------------------------------------------------------------------------------------


def _profiles(tmp_path: Path):  # type: ignore[no-untyped-def]
    from localstore.kits.profiles import LearningProfiles

    store = ls.open(tmp_path / "tutor.db", key=ls.generate_key())
    lp = LearningProfiles(store)
    pid = lp.create_profile(user_id="ada@example.org", sensitive_data={"ssn": "123"})
    return store, lp, pid


def test_profile_export_to_a_new_file_is_0600(tmp_path: Path, umask: int) -> None:
    store, lp, pid = _profiles(tmp_path)
    try:
        (tmp_path / "exports").mkdir()
        lp.export_json(pid, tmp_path / "exports" / "ada.json")
    finally:
        store.close()
    assert_private_files(tmp_path / "exports", ("ada.json",))


def test_profile_export_over_an_existing_file_is_0600(tmp_path: Path) -> None:
    store, lp, pid = _profiles(tmp_path)
    try:
        (tmp_path / "exports").mkdir()
        target = tmp_path / "exports" / "ada.json"
        target.write_text("{}")
        os.chmod(target, 0o644)
        lp.export_json(pid, target)
    finally:
        store.close()
    assert_private_files(tmp_path / "exports", ("ada.json",))


# -- restore from Postgres ----------------------------------------------------------------------------


def test_restored_store_is_0600(tmp_path: Path, umask: int, pg_url: str, pg_schema: str) -> None:
    from localstore.sync import SyncEngine, restore

    key = ls.generate_key()
    ws = ls.Workspace(tmp_path / "ws", key=key)
    _fill(ws.open("agent"))
    engine = SyncEngine(ws, pg_url, schema=pg_schema, watch=False)  # type: ignore[arg-type]
    try:
        engine.sync_now()
    finally:
        engine.close()
        ws.close()
    (tmp_path / "restored").mkdir()
    r = restore(pg_url, "agent", tmp_path / "restored" / "agent.db", schema=pg_schema, key=key)
    try:
        assert r.collection("things").count() == 50
        assert_private_files(tmp_path / "restored", ("agent.db",))
    finally:
        r.close()
    assert_private_files(tmp_path / "restored", ("agent.db",))

"""Packaging: the public API, the sync package mapping, and the declared dependencies."""

from __future__ import annotations

import tomllib
from pathlib import Path

from conftest import ROOT

import localstore as ls


def test_sync_folder_is_imported_as_localstore_sync() -> None:
    from localstore import sync

    assert Path(sync.__file__).resolve().parent == ROOT / "sync"
    assert sync.__doc__ and "Postgres" in sync.__doc__


def test_public_api_is_exactly_all() -> None:
    for name in ls.__all__:
        assert hasattr(ls, name), name
    for name in ("open", "Workspace", "Text", "Integer", "Real", "Boolean", "Json", "Blob", "Array", "Vector",
                 "LocalStoreError"):
        assert name in ls.__all__
    assert all(issubclass(getattr(ls, n), ls.LocalStoreError) for n in ls.__all__ if n.endswith("Error"))


def test_runtime_dependencies_have_lower_bounds() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {d.split(">=")[0].split("[")[0]: d for d in project["dependencies"]}
    for name in ("apsw", "sqlite-vec", "numpy", "cryptography", "zstandard", "watchdog"):
        assert name in deps and ">=" in deps[name], name
    assert project["requires-python"] == ">=3.11"


def test_sqlite_vec_is_loaded_in_every_store(store: ls.Store) -> None:
    version = store._run(lambda db: db.execute("SELECT vec_version()").fetchone()[0], "test")
    assert version.startswith("v")
    mode = store._run(lambda db: db.execute("PRAGMA journal_mode").fetchone()[0], "test")
    assert mode == "wal"
    assert store._run(lambda db: db.execute("PRAGMA foreign_keys").fetchone()[0], "test") == 1
    assert store._run(lambda db: db.execute("PRAGMA synchronous").fetchone()[0], "test") == 1  # NORMAL


def test_durability_full(tmp_path: Path) -> None:
    with ls.open(tmp_path / "f.db", durability="full") as store:
        assert store._run(lambda db: db.execute("PRAGMA synchronous").fetchone()[0], "test") == 2  # FULL

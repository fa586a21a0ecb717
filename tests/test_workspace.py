"""Workspaces: a folder of stores, opened by name, listed cheaply, with names checked."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

import localstore as ls


def test_open_creates_named_store_files(tmp_path: Path) -> None:
    ws = ls.Workspace(tmp_path / "ws")
    try:
        assert (tmp_path / "ws").is_dir()
        assert ws.names() == [] and len(ws) == 0 and list(ws) == []
        k7 = ws.open("kernel-7")
        assert k7.path == str(tmp_path / "ws" / "kernel-7.db")
        assert k7.name == "kernel-7"
        ws.open("a.b_c")
        ws.open("0zero")
        assert ws.names() == ["0zero", "a.b_c", "kernel-7"]
        assert list(ws) == ["0zero", "a.b_c", "kernel-7"]
        assert len(ws) == 3
        assert "kernel-7" in ws
        assert "kernel-8" not in ws
        assert "kernel-7.db" not in ws
        assert 7 not in ws
        assert stat.S_IMODE(os.stat(k7.path).st_mode) == 0o600
    finally:
        ws.close()


def test_open_returns_the_same_object_while_open(tmp_path: Path) -> None:
    with ls.Workspace(tmp_path) as ws:
        first = ws.open("agent")
        assert ws.open("agent") is first
        first.close()
        second = ws.open("agent")
        assert second is not first
        assert not second.closed
        assert second.id == first.id


def test_stores_persist_data_across_workspaces(tmp_path: Path) -> None:
    with ls.Workspace(tmp_path) as ws:
        ws.open("agent").collection("c", key="k", fields={"k": ls.Text()}).put({"k": "v"})
    with ls.Workspace(tmp_path, create=False) as ws:
        assert ws.names() == ["agent"]
        assert ws.open("agent").collection("c").get("v") == {"k": "v"}


def test_close_closes_every_store(tmp_path: Path) -> None:
    ws = ls.Workspace(tmp_path)
    stores = [ws.open(f"s{i}") for i in range(3)]
    ws.close()
    assert all(s.closed for s in stores)
    with pytest.raises(ls.StoreClosedError):
        stores[0].collections()


def test_stores_iterates_sorted_and_opens_each(tmp_path: Path) -> None:
    with ls.Workspace(tmp_path) as ws:
        for name in ("b", "a", "c"):
            ws.open(name).close()
        opened = list(ws.stores())
        assert [s.name for s in opened] == ["a", "b", "c"]
        assert all(not s.closed for s in opened)


def test_names_ignores_other_files(tmp_path: Path) -> None:
    with ls.Workspace(tmp_path) as ws:
        ws.open("real")
        (tmp_path / "notes.txt").write_text("x")
        (tmp_path / ".hidden.db").write_bytes(b"")
        (tmp_path / "folder.db").mkdir()
        (tmp_path / "real.db-backup").write_bytes(b"")
        assert ws.names() == ["real"]


@pytest.mark.parametrize(
    "name",
    ["../x", "..", ".", "a/b", "/abs", "a\\b", "", "x.db", "-lead", ".hidden", "a" * 129, "sp ace", "é", None, 5],
    ids=repr,
)
def test_invalid_store_names_are_refused(tmp_path: Path, name: Any) -> None:
    root = tmp_path / "ws"
    with ls.Workspace(root) as ws:
        with pytest.raises(ls.InvalidNameError):
            ws.open(name)
        with pytest.raises(ls.InvalidNameError):
            ws.path_of(name)
        assert ws.names() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]
    assert list(root.iterdir()) == []


def test_longest_valid_store_name(tmp_path: Path) -> None:
    with ls.Workspace(tmp_path) as ws:
        name = "a" * 128
        ws.open(name)
        assert ws.names() == [name]


def test_unhashable_store_name_is_invalid_name(tmp_path: Path) -> None:
    with ls.Workspace(tmp_path) as ws, pytest.raises(ls.InvalidNameError):
        ws.open(["x"])  # type: ignore[arg-type]


def test_workspace_path_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"not a folder")
    with pytest.raises(ls.StoreOpenError):
        ls.Workspace(path)
    assert path.read_bytes() == b"not a folder"


def test_missing_workspace_with_create_false_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ls.StoreOpenError):
        ls.Workspace(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


def test_workspace_path_under_a_file_is_store_open_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ls.StoreOpenError):
        ls.Workspace(tmp_path / "file" / "ws")


def test_store_options_pass_through(tmp_path: Path) -> None:
    with ls.Workspace(tmp_path, durability="full") as ws:
        assert ws.open("a").durability == "full"
        assert ws.open("b", durability="normal").durability == "normal"


def test_a_thousand_stores(tmp_path: Path) -> None:
    root = tmp_path / "many"
    names = [f"agent-{i:04d}" for i in range(1000)]
    with ls.Workspace(root) as ws:
        for name in names:
            ws.open(name).close()
        assert ws.names() == names
        assert len(ws) == 1000
        assert "agent-0999" in ws and "agent-1000" not in ws
    assert len(list(root.glob("*.db"))) == 1000
    with ls.Workspace(root, create=False) as again:
        assert again.names() == names

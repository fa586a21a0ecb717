"""``ls.open(path, checksums=True)``: page checksums through cksumvfs, wired into open, errors and verify.

Loading cksumvfs makes it SQLite's default VFS for the whole process, so each case
runs in a child process and the test process keeps its own default.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import localstore as ls

pytest.importorskip("localstore.checksums")
from localstore import checksums

pytestmark = pytest.mark.skipif(not checksums.available(), reason="apsw ships no cksumvfs here")

CHILD = textwrap.dedent('''
    import json, sys
    import localstore as ls
    path, step = sys.argv[1], sys.argv[2]
    out = {}
    if step == "write":
        with ls.open(path, checksums=True) as s:
            s.collection("notes", key="k", fields={"k": ls.Text(), "body": ls.Text()}).put_many(
                [{"k": f"k{i}", "body": f"MARKER-{i:04d}-" + "x" * 40} for i in range(300)])
            out["vfs"] = s.vfs
    elif step == "read":
        try:
            with ls.open(path) as s:  # no checksums=True: the file says it keeps them
                out["vfs"] = s.vfs
                out["report"] = s.verify().problems
                try:
                    out["rows"] = len(s.collection("notes").find())
                except ls.LocalStoreError as exc:
                    out["read_error"] = [type(exc).__name__, str(exc)]
        except ls.LocalStoreError as exc:
            out["open_error"] = [type(exc).__name__, str(exc)]
    elif step == "refuse":
        try:
            ls.open(path, checksums=True)
        except ls.LocalStoreError as exc:
            out["open_error"] = [type(exc).__name__, str(exc)]
    elif step == "conflict":
        try:
            ls.open(path, checksums=True, vfs="unix")
        except ls.LocalStoreError as exc:
            out["open_error"] = [type(exc).__name__, str(exc)]
    print(json.dumps(out))
''')


def child(path: Path, step: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), step], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_checksummed_store_reads_back_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    assert child(path, "write")["vfs"] == checksums.VFS_NAME
    assert checksums.enabled(path)
    out = child(path, "read")
    assert out["vfs"] == checksums.VFS_NAME and out["report"] == [] and out["rows"] == 300


def test_a_flipped_byte_in_a_plain_value_is_a_corrupt_store_error(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    child(path, "write")
    data = bytearray(path.read_bytes())
    at = data.find(b"MARKER-0150-")
    assert at > 0, "the value is not in the main file (still in the WAL?)"
    data[at + 7] ^= 0x01  # '0' -> '1': without checksums this reads back as another value
    path.write_bytes(bytes(data))
    out = child(path, "read")
    assert out["report"] and all("fails its checksum" in p for p in out["report"]), out
    assert out["read_error"][0] == "CorruptStoreError" and "fails its checksum" in out["read_error"][1]
    assert "rows" not in out, "a damaged page was read without an error"


def test_an_existing_store_without_checksums_is_refused_naming_convert(tmp_path: Path) -> None:
    path = tmp_path / "plain.db"
    with ls.open(path, checksums=False) as s:
        s.collection("notes", key="k", fields={"k": ls.Text()}).put({"k": "a"})
    before = path.read_bytes()
    out = child(path, "refuse")
    assert out["open_error"][0] == "StoreOpenError" and "convert" in out["open_error"][1]
    assert path.read_bytes() == before


def test_checksums_cannot_be_combined_with_another_vfs(tmp_path: Path) -> None:
    out = child(tmp_path / "x.db", "conflict")
    assert out["open_error"][0] == "StoreOpenError" and "vfs='unix'" in out["open_error"][1]
    assert not (tmp_path / "x.db").exists()

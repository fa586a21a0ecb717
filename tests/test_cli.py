"""The localstore command: each subcommand on real store files, its JSON output and its errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import apsw
import numpy as np
import pytest
from conftest import PYTHON

import localstore as ls
from localstore.cli import build_parser, main


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    path = tmp_path / "k.db"
    with ls.open(path) as store:
        kernels = store.collection("kernels", key="kernel_id", fields={
            "kernel_id": ls.Text(), "phi": ls.Real(), "regime": ls.Text(), "basin": ls.Vector(4), "blob": ls.Blob(),
        })
        kernels.put_many([
            {"kernel_id": f"k{i}", "phi": i / 10, "regime": "geometric" if i % 2 else "linear",
             "basin": np.full(4, i, dtype=np.float32), "blob": b"\x00\x01"}
            for i in range(10)
        ])
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_help_has_an_example() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    assert set(subparsers.choices) >= {"info", "stats", "query", "backup", "verify"}
    for name, sub in subparsers.choices.items():
        assert "Example" in (sub.epilog or ""), name
        assert "localstore " + name in sub.epilog, name


def test_stats_json(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "stats", str(populated), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["collections"]["kernels"]["rows"] == 10
    assert data["pending_changes"] == 10 and data["last_seq"] == 10


def test_info_lists_schema(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info", str(populated))
    assert code == 0
    assert "kernels" in out and "Vector(dim=4" in out
    code, out, _ = run(capsys, "info", str(populated), "--json")
    assert json.loads(out)["collections"]["kernels"]["key"] == "kernel_id"


def test_query_collection_with_where(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "query", str(populated), "kernels", "--where", '{"phi": {">": 0.55}}',
                       "--order-by=-phi", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["kernel_id"] for r in rows] == ["k9", "k8", "k7", "k6"]
    assert rows[0]["basin"] == [9.0] * 4 and rows[0]["blob"] == {"base64": "AAE="}


def test_query_sql_is_read_only(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "query", str(populated), "--sql", "SELECT regime, count(*) AS n FROM kernels GROUP BY regime ORDER BY regime", "--json")
    assert code == 0 and json.loads(out) == [{"regime": "geometric", "n": 5}, {"regime": "linear", "n": 5}]
    code, _, err = run(capsys, "query", str(populated), "--sql", "DELETE FROM kernels")
    assert code == 1 and "read-only" in err
    with ls.open(populated) as store:
        assert store.collection("kernels").count() == 10


def test_query_bad_where_is_clear(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "query", str(populated), "kernels", "--where", "{not json")
    assert code == 1 and "--where is not valid JSON" in err
    code, _, err = run(capsys, "query", str(populated), "kernels", "--where", '{"nope": 1}')
    assert code == 1 and "unknown field 'nope'" in err


def test_backup_and_verify(populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "copy.db"
    code, out, _ = run(capsys, "backup", str(populated), str(dest))
    assert code == 0 and dest.exists()
    assert os.stat(dest).st_mode & 0o777 == 0o600
    code, out, _ = run(capsys, "verify", str(dest), "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_verify_fails_on_tampered_store(populated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import apsw

    conn = apsw.Connection(str(populated))
    conn.execute("DELETE FROM _ls_changes WHERE seq = 3")
    conn.close()
    code, out, _ = run(capsys, "verify", str(populated))
    assert code == 1 and "PROBLEMS FOUND" in out


def test_missing_and_non_store_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "stats", str(tmp_path / "nope.db"))
    assert code == 1 and "does not exist" in err
    assert not (tmp_path / "nope.db").exists()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    code, _, err = run(capsys, "verify", str(junk))
    assert code == 1 and "not a SQLite database" in err
    assert junk.read_bytes() == b"this is not sqlite" * 100


def test_console_script_runs(populated: Path, subprocess_env: dict[str, str]) -> None:
    result = subprocess.run([PYTHON, "-m", "localstore", "stats", str(populated)], check=False,
                            env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "kernels" in result.stdout and "10 rows" in result.stdout


def test_optimize_rewrite_unchecked_moves_older_raw_values_to_checked_forms(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "old.db"
    with ls.open(path) as s:
        s.collection("c", key="id", fields={"id": ls.Integer(), "b": ls.Blob(compress=True)}).put_many(
            [{"id": i, "b": b"new"} for i in range(4)])
    conn = apsw.Connection(str(path))
    conn.execute("UPDATE c SET b = ? WHERE id IN (1, 2)", (b"\x00old",))  # the raw form written before checksums
    conn.close()
    code, out, _ = run(capsys, "optimize", str(path), "--rewrite-unchecked")
    assert code == 0 and "rewrote 2 rows" in out
    with ls.open(path) as s:
        assert [s.collection("c").get(i)["b"] for i in range(4)] == [b"new", b"old", b"old", b"new"]
        assert s.verify().ok
    conn = apsw.Connection(str(path))
    assert {r[0] for r in conn.execute("SELECT substr(b, 1, 1) FROM c")} == {b"\x04"}
    conn.close()

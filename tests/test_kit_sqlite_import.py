"""Importing a table of an existing SQLite database: inference, mapping, bad rows, idempotency, the command."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

import localstore as ls
from localstore.cli import main as cli_main
from localstore.kits.sqlite_import import (
    ROWID_FIELD,
    SqliteImportError,
    import_sqlite_table,
    infer_type,
)

GOOD = 200


def make_programs_db(path: Path, *, bad: bool = True) -> Path:
    """An evolution system's ``programs`` table: JSON text columns, a boolean, scores, a few broken rows."""
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE programs (id TEXT PRIMARY KEY, code TEXT, language TEXT, generation INTEGER, parent_id TEXT, "
        "island_idx INTEGER, correct BOOLEAN, combined_score REAL, public_metrics TEXT, private_metrics TEXT, "
        "\"created at\" REAL)"
    )
    rows = [
        (f"p{i}", f"def f{i}(x):\n    return x * {i}\n", "python", i // 10, f"p{i - 1}" if i else None, i % 4,
         i % 3 == 0, i / GOOD, json.dumps({"score": i, "tests": [1, 2]}), json.dumps([i, "hidden"]), 1000.0 + i)
        for i in range(GOOD)
    ]
    conn.executemany("INSERT INTO programs VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
    if bad:
        conn.executemany("INSERT INTO programs VALUES (?,?,?,?,?,?,?,?,?,?,?)", [
            ("bad-json", "x", "python", 1, None, 0, 1, 0.5, '{"score": ', "[]", 1.0),  # row 201
            ("bad-int", "x", "python", "seven", None, 0, 1, 0.5, "{}", "[]", 1.0),   # row 202
            (None, "x", "python", 1, None, 0, 1, 0.5, "{}", "[]", 1.0),               # row 203: no key
            ("bad-real", "x", "python", 1, None, 0, 1, "high", "{}", "[]", 1.0),      # row 204
            ("bad-bool", "x", "python", 1, None, 0, "maybe", 0.5, "{}", "[]", 1.0),   # row 205
        ])
        conn.execute("INSERT INTO programs VALUES ('p-late', 'y', 'python', 9, 'p0', 1, 0, 0.25, '{}', '[]', 5.0)")
    conn.commit()
    conn.close()
    return path


def test_programs_table_types_inferred_bad_rows_reported_good_rows_kept(tmp_path: Path) -> None:
    src = make_programs_db(tmp_path / "evolution.db")
    with ls.open(tmp_path / "store.db") as store:
        seen: list[tuple[int, int]] = []
        report = import_sqlite_table(src, "programs", store, "programs", batch_size=64,
                                     progress=lambda done, total: seen.append((done, total)))
        assert report.key == "id"
        assert report.fields == {
            "id": "Text", "code": "Text", "language": "Text", "generation": "Integer", "parent_id": "Text",
            "island_idx": "Integer", "correct": "Boolean", "combined_score": "Real", "public_metrics": "Json",
            "private_metrics": "Json", "created_at": "Real",
        }
        assert (report.read, report.inserted, report.updated, report.unchanged) == (GOOD + 6, GOOD + 1, 0, 0)
        assert [(s.row_number, s.key) for s in report.skipped] == [
            (201, "bad-json"), (202, "bad-int"), (203, None), (204, "bad-real"), (205, "bad-bool"),
        ]
        reasons = [s.reason for s in report.skipped]
        assert "invalid JSON" in reasons[0] and "public_metrics" in reasons[0]
        assert "integer" in reasons[1] and "no key" in reasons[2] and "number" in reasons[3] and "boolean" in reasons[4]
        assert seen[-1] == (GOOD + 6, GOOD + 6) and len(seen) == 4

        programs = store.collection("programs")
        assert programs.count() == GOOD + 1
        p7 = programs.get("p7")
        assert p7 == {
            "id": "p7", "code": "def f7(x):\n    return x * 7\n", "language": "python", "generation": 0,
            "parent_id": "p6", "island_idx": 3, "correct": False, "combined_score": 7 / GOOD,
            "public_metrics": {"score": 7, "tests": [1, 2]}, "private_metrics": [7, "hidden"], "created_at": 1007.0,
        }
        assert programs.get("p-late")["parent_id"] == "p0"  # type: ignore[index]  # a good row after bad ones


def test_reimport_adds_nothing(tmp_path: Path) -> None:
    src = make_programs_db(tmp_path / "evolution.db")
    with ls.open(tmp_path / "store.db") as store:
        import_sqlite_table(src, "programs", store, "programs", progress=False)
        seq = store.changelog.last_seq()
        again = import_sqlite_table(src, "programs", store, "programs", progress=False)
        assert (again.inserted, again.updated, again.unchanged) == (0, 0, GOOD + 1)
        assert len(again.skipped) == 5
        assert store.changelog.last_seq() == seq and store.collection("programs").count() == GOOD + 1

        conn = sqlite3.connect(src)
        conn.execute("UPDATE programs SET combined_score = 0.99 WHERE id = 'p3'")
        conn.execute("INSERT INTO programs VALUES ('p-new', 'z', 'python', 2, NULL, 0, 1, 0.1, '{}', '[]', 9.0)")
        conn.commit()
        conn.close()
        third = import_sqlite_table(src, "programs", store, "programs", progress=False)
        assert (third.inserted, third.updated, third.unchanged) == (1, 1, GOOD)
        assert store.changelog.last_seq() == seq + 2
        assert store.collection("programs").get("p3")["combined_score"] == 0.99  # type: ignore[index]


def test_mapping_renames_and_drops_columns(tmp_path: Path) -> None:
    src = make_programs_db(tmp_path / "evolution.db", bad=False)
    with ls.open(tmp_path / "store.db") as store:
        report = import_sqlite_table(src, "programs", store, "archive", key="id",
                                     mapping={"id": "program_id", "private_metrics": None, "created at": "created"},
                                     progress=False)
        assert report.key == "program_id" and report.ok
        row = store.collection("archive").get("p1")
        assert row is not None and "private_metrics" not in row and row["created"] == 1001.0
        with pytest.raises(SqliteImportError, match="lacks"):
            import_sqlite_table(src, "programs", store, "x", mapping={"nope": "a"})
        with pytest.raises(SqliteImportError, match="no table"):
            import_sqlite_table(src, "missing", store, "x")
        with pytest.raises(SqliteImportError, match="not a column"):
            import_sqlite_table(src, "programs", store, "x", key="nope")
        with pytest.raises(SqliteImportError, match="no such file"):
            import_sqlite_table(tmp_path / "absent.db", "programs", store, "x")
        with pytest.raises(SqliteImportError, match="no field"):  # the existing collection lacks private_metrics
            import_sqlite_table(src, "programs", store, "archive", mapping={"id": "program_id"}, progress=False)


def test_table_without_primary_key_uses_rowid_and_duplicates_are_reported(tmp_path: Path) -> None:
    src = tmp_path / "log.db"
    conn = sqlite3.connect(src)
    conn.execute("CREATE TABLE events (name TEXT, value, payload BLOB, extra TEXT)")
    conn.executemany("INSERT INTO events VALUES (?,?,?,?)", [
        ("a", 1, b"\x00\x01", '{"k": 1}'), ("b", 2.5, None, "plain words"), ("a", 3, b"", None),
    ])
    conn.commit()
    conn.close()
    with ls.open(tmp_path / "store.db") as store:
        report = import_sqlite_table(src, "events", store, "events", progress=False)
        assert report.key == ROWID_FIELD and report.inserted == 3
        assert report.fields["value"] == "Real" and report.fields["payload"] == "Blob" and report.fields["extra"] == "Text"
        assert store.collection("events").get(1)["payload"] == b"\x00\x01"  # type: ignore[index]
        by_name = import_sqlite_table(src, "events", store, "by_name", key="name", progress=False)
        assert by_name.inserted == 2 and [(s.row_number, s.key) for s in by_name.skipped] == [(3, "a")]
        assert "duplicate key" in by_name.skipped[0].reason


def test_infer_type() -> None:
    assert infer_type("INTEGER", [1, 2, 3]) == "Integer"
    assert infer_type("", [1, 2.5]) == "Real"
    assert infer_type("REAL", [1, 2]) == "Real"
    assert infer_type("TEXT", ['{"a": 1}', "[1]"]) == "Json"
    assert infer_type("TEXT", ['{"a": 1}', "plain"]) == "Text"
    assert infer_type("JSON", []) == "Json"
    assert infer_type("BOOLEAN", [0, 1]) == "Boolean"
    assert infer_type("", [b"x"]) == "Blob"
    assert infer_type("INTEGER", [1, 2, "x"]) == "Integer"  # the odd one out is reported at import
    assert infer_type("", []) == "Text"


def test_import_sqlite_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_programs_db(tmp_path / "evolution.db")
    dest = tmp_path / "agent.db"
    args = ["import-sqlite", str(src), "programs", str(dest), "programs", "--key", "id", "--map", "private_metrics="]
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    assert f"{GOOD + 1} inserted" in captured.out and "5 skipped" in captured.out
    assert "row 201 skipped" in captured.err and "row 205 skipped" in captured.err
    assert cli_main(args + ["--json", "--strict"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["inserted"] == 0 and data["unchanged"] == GOOD + 1 and len(data["skipped"]) == 5
    assert cli_main(["import-sqlite", str(src), "programs", str(dest), "programs", "--map", "oops"]) == 1
    assert "COLUMN=FIELD" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["import-sqlite", "--help"])
    assert "Example" in capsys.readouterr().out
    with ls.open(dest) as store:
        assert "private_metrics" not in store.collection("programs").fields

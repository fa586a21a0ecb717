"""Import a table of an existing SQLite database into a collection.

Column names become field names (``mapping`` renames or drops columns); field types are
inferred from the declared column types and a sample of the values: integers, reals,
booleans (columns declared ``BOOL``/``BOOLEAN``), blobs, text, and ``Json`` for text columns
whose values are JSON objects or arrays (as an evolution system's ``programs`` table keeps
its metrics). An existing collection keeps its own schema and the values are converted to it.

The import is idempotent: rows are upserted by key, and a row equal to the one already
stored is not written again, so re-running it adds nothing, not even change records.
A row that cannot be converted (bad JSON, a word in a number column, a missing or
duplicate key, ...) is reported with its row number and the reason, and skipped; the
good rows around it are all imported.

    report = import_sqlite_table("evolution.db", "programs", store, "programs", key="id")
    print(report.summary())
    for bad in report.skipped:
        print(bad.row_number, bad.reason)
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import localstore as ls

#: Rows written per transaction.
DEFAULT_BATCH_ROWS = 1000

#: Rows read to infer the field types (the first ones, in storage order); 0 means all rows.
DEFAULT_INFER_SAMPLE = 2000

#: The field that holds the source rowid when the table has no single-column primary key and no key is given.
ROWID_FIELD = "source_rowid"

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BOOL_TEXT = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False, "t": True, "f": False}

Progress = Callable[[int, int], None]


class SqliteImportError(ls.LocalStoreError):
    """A SQLite import could not start: a missing file or table, a bad mapping or key, or a schema clash."""


@dataclass(frozen=True)
class SkippedRow:
    """A source row that was not imported: its 1-based position in the scan, its key if known, and why."""

    row_number: int
    key: Any
    reason: str


@dataclass
class ImportReport:
    """What an import did: rows read, inserted, updated, unchanged, and the rows skipped with reasons."""

    source: str
    table: str
    collection: str
    key: str
    fields: dict[str, str]
    read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every row was imported (none skipped)."""
        return not self.skipped

    def summary(self) -> str:
        """One line: the counts."""
        return (f"{self.table} -> {self.collection}: {self.read} rows read, {self.inserted} inserted, "
                f"{self.updated} updated, {self.unchanged} unchanged, {len(self.skipped)} skipped")

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "source": self.source, "table": self.table, "collection": self.collection, "key": self.key,
            "fields": self.fields, "read": self.read, "inserted": self.inserted, "updated": self.updated,
            "unchanged": self.unchanged,
            "skipped": [{"row_number": s.row_number, "key": _plain(s.key), "reason": s.reason} for s in self.skipped],
        }


class _BadValue(Exception):
    pass


# -- progress -----------------------------------------------------------------------------------


def _progress_bar(progress: bool | Progress | None, label: str, total: int) -> Any:
    """The kits' shared progress bar (``_progress.make_progress``), or a minimal local one if it is absent."""
    try:
        from ._progress import make_progress
    except ImportError:
        if progress is False:
            return _NoProgress()
        if callable(progress):
            return _CallbackProgress(progress, total)
        return _StderrProgress(label, total)
    return make_progress(progress, label, total, unit="rows")


class _StderrProgress:
    """A one-line counter redrawn on stderr when it is a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.live = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        if self.live:
            sys.stderr.write(f"\r{self.label}: {self.done}/{self.total} rows")
            sys.stderr.flush()

    def close(self) -> None:
        if self.live:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _CallbackProgress:
    def __init__(self, fn: Progress, total: int) -> None:
        self.fn, self.total, self.done = fn, total, 0

    def update(self, n: int) -> None:
        self.done += n
        self.fn(self.done, self.total)

    def close(self) -> None:
        pass


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


# -- reading the source ------------------------------------------------------------------------------


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _connect(source: str | os.PathLike[str]) -> sqlite3.Connection:
    path = Path(source)
    if not path.is_file():
        raise SqliteImportError(f"import-sqlite: no such file {str(path)!r}; give the path of an SQLite database")
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise SqliteImportError(f"import-sqlite: {str(path)!r} is not a readable SQLite database ({exc})") from None
    conn.text_factory = _text_factory
    return conn


def _text_factory(data: bytes) -> Any:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data  # reported at conversion time as text that is not UTF-8


def _columns(conn: sqlite3.Connection, table: str, source: str) -> list[tuple[str, str, int]]:
    """(name, declared type, pk position) of each column."""
    found = conn.execute("SELECT type FROM sqlite_master WHERE name = ? AND type IN ('table', 'view')", (table,)).fetchone()
    if found is None:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                                             "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        raise SqliteImportError(f"import-sqlite: {source} has no table {table!r} (tables: {', '.join(tables) or 'none'})")
    return [(r[1], (r[2] or "").upper(), int(r[5])) for r in conn.execute(f"PRAGMA table_info({_qi(table)})")]


def _has_rowid(conn: sqlite3.Connection, table: str) -> bool:
    try:
        conn.execute(f"SELECT rowid FROM {_qi(table)} LIMIT 1").fetchall()
        return True
    except sqlite3.OperationalError:
        return False


# -- inference and conversion ----------------------------------------------------------------------


def _field_name(column: str) -> str:
    if _NAME.match(column) and not column.lower().startswith(("_ls", "sqlite_")):
        return column
    name = re.sub(r"\W", "_", column)
    if not name or name[0].isdigit():
        name = "c_" + name
    if name.lower().startswith(("_ls", "sqlite_")):
        name = "c" + name
    return name


def infer_type(declared: str, values: list[Any]) -> str:
    """The field type name for a column from its declared type and sample values (non-null)."""
    if "BOOL" in declared:
        return "Boolean"
    kinds = {"int": 0, "float": 0, "str": 0, "bytes": 0}
    json_like = 0
    for v in values:
        if isinstance(v, int):  # bool included
            kinds["int"] += 1
        elif isinstance(v, float):
            kinds["float"] += 1
        elif isinstance(v, str):
            kinds["str"] += 1
            if v.lstrip()[:1] in ("{", "["):
                json_like += 1
        else:
            kinds["bytes"] += 1
    if "JSON" in declared:
        return "Json"
    if not values:
        if any(t in declared for t in ("INT",)):
            return "Integer"
        if any(t in declared for t in ("REAL", "FLOA", "DOUB", "NUMERIC", "DECIMAL")):
            return "Real"
        return "Blob" if "BLOB" in declared else "Text"
    numeric = kinds["int"] + kinds["float"]
    if kinds["str"] and json_like == kinds["str"] and kinds["str"] >= numeric + kinds["bytes"]:
        return "Json"
    best = max(("str", kinds["str"]), ("num", numeric), ("bytes", kinds["bytes"]), key=lambda kv: kv[1])[0]
    if best == "num":
        if kinds["float"] or any(t in declared for t in ("REAL", "FLOA", "DOUB")):
            return "Real"
        return "Integer"
    return "Blob" if best == "bytes" else "Text"


def _make_field(type_name: str) -> ls.Field:
    return {"Integer": ls.Integer, "Real": ls.Real, "Boolean": ls.Boolean, "Json": ls.Json,
            "Blob": ls.Blob, "Text": ls.Text}[type_name]()


def convert(value: Any, target: ls.Field, column: str) -> Any:
    """Convert one source value to what ``target`` takes; raise ``_BadValue`` with a reason otherwise."""
    if value is None:
        return None
    kind = target.type_name
    try:
        if kind == "Text":
            if isinstance(value, (bytes, bytearray)):
                raise _BadValue(f"column {column!r}: text that is not UTF-8")
            return value if isinstance(value, str) else str(value)
        if kind == "Integer":
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
                return int(value)
            raise _BadValue(f"column {column!r}: expected an integer, got {_short(value)}")
        if kind == "Real":
            try:
                number = float(value) if isinstance(value, (int, float, str)) else math.nan
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise _BadValue(f"column {column!r}: expected a finite number, got {_short(value)}")
            return number
        if kind == "Boolean":
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _BOOL_TEXT:
                return _BOOL_TEXT[value.strip().lower()]
            raise _BadValue(f"column {column!r}: expected a boolean (0/1, true/false), got {_short(value)}")
        if kind == "Json":
            if isinstance(value, str):
                try:
                    return json.loads(value)
                except json.JSONDecodeError as exc:
                    raise _BadValue(f"column {column!r}: invalid JSON ({exc.msg} at character {exc.pos})") from None
            if isinstance(value, (int, float)) and math.isfinite(value):
                return value
            raise _BadValue(f"column {column!r}: expected JSON text, got {_short(value)}")
        if kind == "Blob":
            return value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if kind == "Vector":
            if isinstance(value, (bytes, bytearray)):
                return np.frombuffer(bytes(value), dtype="<f4")
            return json.loads(value) if isinstance(value, str) else value
        if kind == "Array":
            raise _BadValue(f"column {column!r}: Array fields cannot be imported from SQLite values")
    except ValueError as exc:
        raise _BadValue(f"column {column!r}: {exc}") from None
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float)) or value is None else repr(value)


def _same(a: Any, b: Any) -> bool:
    """Whether a stored value equals the value an import would write (so the row can be left alone)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is not None and b is not None and np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and bool(a == b)


# -- the import ----------------------------------------------------------------------------------------


def import_sqlite_table(
    source: str | os.PathLike[str],
    table: str,
    store: ls.Store,
    collection: str,
    *,
    key: str | None = None,
    mapping: Mapping[str, str | None] | None = None,
    batch_size: int = DEFAULT_BATCH_ROWS,
    infer_sample: int = DEFAULT_INFER_SAMPLE,
    progress: bool | Progress | None = None,
) -> ImportReport:
    """Import ``table`` of the SQLite file ``source`` into ``collection`` of ``store``; return a report.

    ``mapping`` maps a source column to a field name, or to None (or "") to leave it out;
    other columns keep their names (characters outside letters, digits and ``_`` become
    ``_``). ``key`` names the column (or its mapped field) that keys the rows; by default the
    table's single-column primary key, else its rowid, kept in a ``source_rowid`` field.
    ``progress``: None shows a bar on a terminal, False shows nothing, a function is
    called with (rows done, total).
    """
    if batch_size < 1:
        raise SqliteImportError(f"import-sqlite: batch_size must be at least 1, got {batch_size}")
    src = str(source)
    conn = _connect(source)
    try:
        return _import(conn, src, table, store, collection, key, dict(mapping or {}), batch_size, infer_sample, progress)
    finally:
        conn.close()


def _import(
    conn: sqlite3.Connection, src: str, table: str, store: ls.Store, collection: str, key: str | None,
    mapping: dict[str, str | None], batch_size: int, infer_sample: int, progress: bool | Progress | None,
) -> ImportReport:
    columns = _columns(conn, table, src)
    names = [c[0] for c in columns]
    unknown = [c for c in mapping if c not in names]
    if unknown:
        raise SqliteImportError(
            f"import-sqlite: --map names column(s) {', '.join(map(repr, unknown))} that {table!r} lacks "
            f"(columns: {', '.join(names)})"
        )
    targets: dict[str, str] = {}  # source column -> field
    for col in names:
        target = mapping.get(col, _field_name(col)) if col in mapping else _field_name(col)
        if target:
            if not _NAME.match(target):
                raise SqliteImportError(f"import-sqlite: {target!r} (for column {col!r}) is not a valid field name")
            targets[col] = target
    clash = {f for f in targets.values() if list(targets.values()).count(f) > 1}
    if clash:
        raise SqliteImportError(f"import-sqlite: several columns map to field(s) {', '.join(sorted(clash))}; rename with --map")

    rowid_ok = _has_rowid(conn, table)
    pk = [c[0] for c in sorted(columns, key=lambda c: c[2]) if c[2] > 0]
    key_col: str | None
    if key is not None:
        by_field = {f: c for c, f in targets.items()}
        key_col = key if key in targets else by_field.get(key)
        if key_col is None:
            raise SqliteImportError(f"import-sqlite: key {key!r} is not a column of {table!r} (columns: {', '.join(names)})")
    elif len(pk) == 1 and pk[0] in targets:
        key_col = pk[0]
    elif rowid_ok:
        key_col = None
    else:
        raise SqliteImportError(f"import-sqlite: {table!r} has no rowid and no single-column primary key; pass --key COLUMN")
    key_field = targets[key_col] if key_col is not None else ROWID_FIELD

    select_cols = ", ".join(_qi(c) for c in targets)
    order = " ORDER BY rowid" if rowid_ok else (" ORDER BY " + ", ".join(_qi(c) for c in pk) if pk else "")
    select = f"SELECT {'rowid, ' if rowid_ok else 'NULL, '}{select_cols} FROM {_qi(table)}{order}"
    cols = list(targets)

    coll = _target_collection(conn, store, collection, table, select, cols, targets, columns, key_col, key_field, infer_sample)
    fields = coll.fields
    missing = [targets[c] for c in cols if targets[c] not in fields]
    if key_col is None and ROWID_FIELD not in fields:
        missing.append(ROWID_FIELD)
    if missing:
        raise SqliteImportError(
            f"import-sqlite: collection {collection!r} in {store.path} has no field(s) {', '.join(missing)}; "
            "leave those columns out with --map COLUMN= or import into a new collection"
        )
    if coll.key != key_field:
        raise SqliteImportError(
            f"import-sqlite: collection {collection!r} is keyed by {coll.key!r}, but the import keys by {key_field!r}; "
            f"pass --key with the column that maps to {coll.key!r}"
        )

    total = int(conn.execute(f"SELECT count(*) FROM {_qi(table)}").fetchone()[0])
    report = ImportReport(src, table, collection, key_field, {n: f.type_name for n, f in fields.items()})
    bar = _progress_bar(progress, f"import {table}", total)
    seen: dict[Any, int] = {}
    try:
        cursor = conn.execute(select)
        batch: list[tuple[int, dict[str, Any]]] = []
        while True:
            rows = cursor.fetchmany(batch_size)
            if not rows:
                break
            for raw in rows:
                report.read += 1
                number = report.read
                row = _convert_row(raw, cols, targets, fields, key_col, report, number)
                if row is None:
                    continue
                k = row[key_field]
                if k in seen:
                    report.skipped.append(SkippedRow(number, k, f"duplicate key {k!r} (first at row {seen[k]})"))
                    continue
                seen[k] = number
                batch.append((number, row))
            _write(coll, batch, report)
            bar.update(len(rows))
            batch = []
    finally:
        bar.close()
    return report


def _target_collection(
    conn: sqlite3.Connection, store: ls.Store, collection: str, table: str, select: str, cols: list[str],
    targets: dict[str, str], columns: list[tuple[str, str, int]], key_col: str | None, key_field: str,
    infer_sample: int,
) -> ls.Collection:
    """The existing collection, or a new one declared with inferred field types."""
    if collection in store.collections():
        return store.collection(collection)
    sql = select + (f" LIMIT {int(infer_sample)}" if infer_sample else "")
    samples: dict[str, list[Any]] = {c: [] for c in cols}
    for raw in conn.execute(sql):
        for col, value in zip(cols, raw[1:]):
            if value is not None:
                samples[col].append(value)
    declared = {c[0]: c[1] for c in columns}
    fields: dict[str, ls.Field | type[ls.Field]] = {}
    if key_col is None:
        fields[ROWID_FIELD] = ls.Integer()
    for col in cols:
        kind = infer_type(declared[col], samples[col])
        if col == key_col and kind not in ("Integer", "Text"):
            kind = "Text"
        fields[targets[col]] = _make_field(kind)
    try:
        return store.collection(collection, key=key_field, fields=fields)
    except ls.LocalStoreError as exc:
        raise SqliteImportError(f"import-sqlite: cannot declare collection {collection!r} from {table!r}: {exc}") from None


def _convert_row(
    raw: tuple[Any, ...], cols: list[str], targets: dict[str, str], fields: dict[str, ls.Field],
    key_col: str | None, report: ImportReport, number: int,
) -> dict[str, Any] | None:
    row: dict[str, Any] = {} if key_col is not None else {ROWID_FIELD: raw[0]}
    pairs = list(zip(cols, raw[1:]))
    pairs.sort(key=lambda cv: cv[0] != key_col)  # the key first, so a bad row is reported with its key
    try:
        for col, value in pairs:
            name = targets[col]
            row[name] = convert(value, fields[name], col)
    except _BadValue as exc:
        key = row.get(targets[key_col]) if key_col is not None else raw[0]
        report.skipped.append(SkippedRow(number, key, str(exc)))
        return None
    key_field = targets[key_col] if key_col is not None else ROWID_FIELD
    if row.get(key_field) is None:
        report.skipped.append(SkippedRow(number, None, f"no key: column {key_col or 'rowid'!r} is NULL"))
        return None
    return row


def _write(coll: ls.Collection, batch: list[tuple[int, dict[str, Any]]], report: ImportReport) -> None:
    """Write the rows of a batch that are new or changed; isolate rows the collection refuses."""
    if not batch:
        return
    fields = coll.fields
    existing = coll.get_many([row[coll.key] for _, row in batch])
    fresh: list[tuple[int, dict[str, Any], bool]] = []
    for (number, row), old in zip(batch, existing):
        if old is not None and all(_same(old.get(f), row.get(f, fields[f].default)) for f in fields):
            report.unchanged += 1
        else:
            fresh.append((number, row, old is not None))
    if not fresh:
        return
    try:
        coll.put_many([row for _, row, _ in fresh])
        good = fresh
    except ls.ValidationError:
        good = []
        for number, row, existed in fresh:  # find the rows at fault; keep every good one
            try:
                coll.put(row)
                good.append((number, row, existed))
            except ls.ValidationError as exc:
                report.skipped.append(SkippedRow(number, row.get(coll.key), str(exc)))
    for _, _, existed in good:
        if existed:
            report.updated += 1
        else:
            report.inserted += 1


__all__ = [
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_INFER_SAMPLE",
    "ROWID_FIELD",
    "ImportReport",
    "SkippedRow",
    "SqliteImportError",
    "convert",
    "import_sqlite_table",
    "infer_type",
]

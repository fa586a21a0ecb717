"""Importers for the telemetry kit: telemetry JSONL session files and emergency JSON files.

These are the file-based fallback that telemetry systems write when no database
is at hand. Both imports are idempotent (re-running one adds nothing and rewrites
nothing), never crash on a bad line (it is reported with its line number and
skipped, and every good line is kept), and show a progress bar on stderr when it
is a terminal (or call ``progress(done_bytes, total_bytes)``).

Telemetry session file (``*.jsonl``), one JSON object per line::

    {"type": "session", "session_id": "run-7", "started_at": "2026-11-20T10:00:00Z", "metadata": {"lr": 0.1}}
    {"step": 0, "timestamp": 1763632800.0, "phi": 0.71, "kappa_eff": 63.8, "regime": "geometric",
     "basin_distance": 0.02, "emergency": false}
    {"type": "emergency", "step": 1, "reason": "phi collapse", "severity": "critical", "metric": "phi",
     "value": 0.12, "threshold": 0.3, "timestamp": 1763632801.0}
    {"type": "session_end", "ended_at": "2026-11-20T11:00:00Z", "status": "completed"}

- Lines without ``type`` (or ``"type": "record"``) are telemetry records; ``kappa``
  is read as ``kappa_eff`` and ``is_emergency`` as ``emergency``. A record's
  ``session_id`` defaults to the header's, then to ``session_id=``, then to the file
  name without its extension.
- The header and the end line are optional. A session missing from the store is
  created (status ``imported`` until an end line says otherwise). The session's
  stats are recomputed after the import.
- Records are keyed by session and step: a step already in the store is skipped,
  and so is a repeated step within the file (the first one wins).

Emergency file (``*.json``): one event object per line (JSON Lines), or a whole-file
JSON array of events, or ``{"session_id": ..., "events": [...]}``. Event fields:
event_id, session_id, timestamp, reason, severity, metric, value, threshold, step.
An event without ``event_id`` gets one derived from its content, so re-importing it
matches it. For a whole-file array, "line" in error reports is the event's position
(1-based).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import localstore as ls

from ._progress import make_progress
from .telemetry import Telemetry, check_session_id

#: Records written per transaction during an import.
DEFAULT_BATCH = 5_000
TELEMETRY_SUFFIXES = (".jsonl", ".ndjson")
EMERGENCY_SUFFIXES = (".json",)
_ALIASES = {"kappa": "kappa_eff", "is_emergency": "emergency"}
_RECORD_FIELDS = frozenset({"step", "timestamp", "phi", "kappa_eff", "regime", "basin_distance", "emergency"})
_EVENT_FIELDS = frozenset({"event_id", "timestamp", "reason", "severity", "metric", "value", "threshold", "step"})


def _known(obj: dict[str, Any], known: frozenset[str], report: ImportReport) -> dict[str, Any]:
    """The fields the kit stores; the others are noted in the report and dropped."""
    extra = obj.keys() - known
    if extra:
        report.ignored_fields.update(extra)
        obj = {k: v for k, v in obj.items() if k in known}
    return obj


@dataclass(frozen=True)
class LineError:
    """A line that was skipped: where it is and why."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class ImportReport:
    """What one file's import did."""

    path: str
    kind: str                               # "telemetry" or "emergency"
    lines: int = 0                          # non-blank lines (or array items) read
    records_added: int = 0
    records_present: int = 0                # already in the store, or repeated in the file
    events_added: int = 0
    events_present: int = 0
    sessions_created: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    #: Fields of records or events that the kit does not store (dropped, not an error).
    ignored_fields: set[str] = field(default_factory=set)

    @property
    def added(self) -> int:
        """Rows added (records and events)."""
        return self.records_added + self.events_added

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["errors"] = [{"line": e.line, "message": e.message} for e in self.errors]
        out["ignored_fields"] = sorted(self.ignored_fields)
        return out


def _kit(target: ls.Store | Telemetry) -> Telemetry:
    return target if isinstance(target, Telemetry) else Telemetry(target)


def _lines(path: Path, bar: Any) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; advances the bar by bytes read."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            bar.update(len(raw))
            text = raw.decode("utf-8", errors="replace").strip()
            if text:
                yield number, text


class _Batch:
    """Pending rows of one collection, written idempotently (present keys skipped) in batches."""

    def __init__(self, coll: ls.Collection, report: ImportReport, what: str, size: int) -> None:
        self.coll, self.report, self.what, self.size = coll, report, what, size
        self.rows: dict[Any, tuple[int, dict[str, Any]]] = {}
        self.added = self.present = 0

    def add(self, line: int, row: dict[str, Any]) -> None:
        key = row[self.coll.key]
        if key in self.rows:
            self.present += 1  # repeated in the file: the first one wins
            return
        self.rows[key] = (line, row)
        if len(self.rows) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        pending, self.rows = self.rows, {}
        present = set(self.coll.keys(where={self.coll.key: {"in": list(pending)}}))
        self.present += len(present)
        new = [(line, row) for key, (line, row) in pending.items() if key not in present]
        try:
            self.added += self.coll.put_many([row for _, row in new])
        except ls.ValidationError:
            for line, row in new:  # find the culprit; keep every good row
                try:
                    self.coll.put(row)
                    self.added += 1
                except ls.ValidationError as exc:
                    self.report.errors.append(LineError(self.report.path, line, f"{self.what}: {exc}"))


def _event_id(session_id: str, event: dict[str, Any]) -> str:
    """A stable id for an event given without one, from its content."""
    content = {k: event.get(k) for k in ("timestamp", "reason", "severity", "metric", "value", "threshold", "step")}
    digest = hashlib.sha256(json.dumps([session_id, content], sort_keys=True, default=str).encode()).hexdigest()
    return f"ev-{digest[:32]}"


class _SessionTracker:
    """Creates sessions on first sight (in the import's own terms) and remembers what was touched."""

    def __init__(self, tm: Telemetry, report: ImportReport) -> None:
        self.tm, self.report = tm, report
        self.seen: dict[str, bool] = {}

    def ensure(self, sid: str, started_at: Any = None, metadata: Any = None) -> None:
        if sid in self.seen:
            return
        check_session_id(sid)
        if self.tm.get_session(sid) is None:
            self.tm.start_session(sid, started_at=started_at, metadata=metadata if isinstance(metadata, dict) else None,
                                  status="imported")
            self.report.sessions_created.append(sid)
        self.seen[sid] = True
        self.report.sessions.append(sid)


def import_telemetry_file(
    target: ls.Store | Telemetry, path: str | os.PathLike[str], *, session_id: str | None = None,
    batch_size: int = DEFAULT_BATCH, progress: Any = None,
) -> ImportReport:
    """Import one telemetry JSONL session file (format in the module docstring); return its report."""
    tm, p = _kit(target), Path(path)
    report = ImportReport(str(p), "telemetry")
    records = _Batch(tm.records, report, "record", batch_size)
    events = _Batch(tm.emergencies, report, "emergency", batch_size)
    sessions = _SessionTracker(tm, report)
    default_sid = session_id or p.name.split(".")[0].replace("#", "_")
    ends: dict[str, dict[str, Any]] = {}
    with make_progress(progress, f"import {p.name}", p.stat().st_size, unit="B") as bar:
        for number, text in _lines(p, bar):
            report.lines += 1
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                report.errors.append(LineError(str(p), number, f"not JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(obj, dict):
                report.errors.append(LineError(str(p), number, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            kind = obj.pop("type", "record")
            try:
                sid = obj.pop("session_id", None) or default_sid
                if kind == "session":
                    default_sid = sid
                    sessions.ensure(sid, obj.get("started_at"), obj.get("metadata"))
                elif kind == "session_end":
                    ends[sid] = obj
                elif kind == "record":
                    for alias, name in _ALIASES.items():
                        if alias in obj and name not in obj:
                            obj[name] = obj.pop(alias)
                    row = tm.make_record(check_session_id(sid), _known(obj, _RECORD_FIELDS, report))
                    sessions.ensure(sid, row["timestamp"])
                    records.add(number, row)
                elif kind == "emergency":
                    obj.setdefault("event_id", _event_id(sid, obj))
                    row = tm.make_emergency(check_session_id(sid), _known(obj, _EVENT_FIELDS, report))
                    sessions.ensure(sid, row["timestamp"])
                    events.add(number, row)
                else:
                    raise ls.ValidationError(f"unknown line type {kind!r} (record, session, session_end, emergency)")
            except ls.LocalStoreError as exc:
                report.errors.append(LineError(str(p), number, str(exc)))
        records.flush()
        events.flush()
    report.records_added, report.records_present = records.added, records.present
    report.events_added, report.events_present = events.added, events.present
    for sid in report.sessions:
        _finish_session(tm, sid, ends.get(sid), report)
    return report


def _finish_session(tm: Telemetry, sid: str, end: dict[str, Any] | None, report: ImportReport) -> None:
    """Recompute the session's stats; apply its end line. Writes nothing when nothing changed."""
    if end is None:
        tm.refresh_session_stats(sid)
        return
    row = tm.get_session(sid)
    assert row is not None
    status = end.get("status", "completed")
    try:
        ended_at = end.get("ended_at")
        if row["status"] == status and row["ended_at"] is not None:
            tm.refresh_session_stats(sid)  # already ended by an earlier run: only the stats may move
        else:
            tm.end_session(sid, status=status, ended_at=ended_at)
    except ls.ValidationError as exc:
        report.errors.append(LineError(report.path, 0, f"session_end of {sid!r}: {exc}"))
        tm.refresh_session_stats(sid)


def _emergency_items(p: Path, bar: Any) -> Iterator[tuple[int, Any, str | None]]:
    """(line or position, parsed object or None, error) for each event of an emergency file."""
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, (list, dict)):
        bar.update(p.stat().st_size)
        if isinstance(whole, dict) and isinstance(whole.get("events"), list):
            shared = {k: v for k, v in whole.items() if k != "events"}
            items = [{**shared, **e} if isinstance(e, dict) else e for e in whole["events"]]
        else:
            items = whole if isinstance(whole, list) else [whole]
        for position, item in enumerate(items, 1):
            yield position, item, None
        return
    for number, line in _lines(p, bar):
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as exc:
            yield number, None, f"not JSON ({exc.msg} at column {exc.colno})"


def import_emergency_file(
    target: ls.Store | Telemetry, path: str | os.PathLike[str], *, session_id: str | None = None,
    batch_size: int = DEFAULT_BATCH, progress: Any = None,
) -> ImportReport:
    """Import one emergency JSON file (format in the module docstring); return its report."""
    tm, p = _kit(target), Path(path)
    report = ImportReport(str(p), "emergency")
    events = _Batch(tm.emergencies, report, "emergency", batch_size)
    sessions = _SessionTracker(tm, report)
    with make_progress(progress, f"import {p.name}", p.stat().st_size, unit="B") as bar:
        for number, obj, error in _emergency_items(p, bar):
            report.lines += 1
            if error is not None or not isinstance(obj, dict):
                report.errors.append(LineError(str(p), number, error or f"expected a JSON object, got {type(obj).__name__}"))
                continue
            try:
                sid = obj.pop("session_id", None) or session_id
                if sid is None:
                    raise ls.ValidationError("the event names no session_id (pass session_id= for files of one session)")
                obj.pop("type", None)
                obj.setdefault("event_id", _event_id(sid, obj))
                row = tm.make_emergency(check_session_id(sid), _known(obj, _EVENT_FIELDS, report))
                sessions.ensure(sid, row["timestamp"])
                events.add(number, row)
            except ls.LocalStoreError as exc:
                report.errors.append(LineError(str(p), number, str(exc)))
        events.flush()
    report.events_added, report.events_present = events.added, events.present
    for sid in report.sessions:
        tm.refresh_session_stats(sid)
    return report


def import_path(
    target: ls.Store | Telemetry, path: str | os.PathLike[str], *, kind: str = "auto",
    session_id: str | None = None, batch_size: int = DEFAULT_BATCH, progress: Any = None,
) -> list[ImportReport]:
    """Import a file, or every telemetry (``*.jsonl``) and emergency (``*.json``) file under a folder.

    ``kind`` is ``"auto"`` (by suffix), ``"telemetry"`` or ``"emergency"``. Telemetry
    files go first, so events find their sessions created with their start times.
    """
    if kind not in ("auto", "telemetry", "emergency"):
        raise ls.ValidationError(f"kind must be auto, telemetry or emergency, got {kind!r}")
    tm, p = _kit(target), Path(path)
    if not p.exists():
        raise ls.ValidationError(f"no file or folder at {p}")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]

    def kind_of(f: Path) -> str | None:
        if kind != "auto":
            return kind
        suffix = f.suffix.lower()
        return "telemetry" if suffix in TELEMETRY_SUFFIXES else "emergency" if suffix in EMERGENCY_SUFFIXES else None

    chosen = [(f, k) for f in files if (k := kind_of(f)) is not None]
    if p.is_file() and not chosen:
        raise ls.ValidationError(f"{p}: cannot tell the file's kind from its suffix; pass kind='telemetry' or 'emergency'")
    chosen.sort(key=lambda fk: (fk[1] != "telemetry", str(fk[0])))
    reports = []
    for f, k in chosen:
        run = import_telemetry_file if k == "telemetry" else import_emergency_file
        reports.append(run(tm, f, session_id=session_id, batch_size=batch_size, progress=progress))
    return reports

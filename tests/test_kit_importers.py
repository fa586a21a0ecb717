"""Telemetry and emergency file importers, the progress helper and the kits' CLI commands."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import localstore as ls
from localstore.cli import build_parser, main
from localstore.kits._progress import Progress, make_progress
from localstore.kits.importers import import_emergency_file, import_path, import_telemetry_file
from localstore.kits.telemetry import Telemetry


def write_session(path: Path, sid: str, steps: int, *, bad: dict[int, str] | None = None, end: bool = True) -> None:
    """A telemetry JSONL file; ``bad`` replaces the given 1-based lines with raw text."""
    lines = [json.dumps({"type": "session", "session_id": sid, "started_at": "2025-11-20T10:00:00Z",
                         "metadata": {"lr": 0.1}})]
    for step in range(steps):
        rec: dict = {"step": step, "timestamp": 1_763_632_800 + step, "phi": round(0.5 + step / (2 * steps), 6),
                     "kappa": 64.0 - step / steps, "regime": "geometric", "basin_distance": 0.01,
                     "emergency": step == 3, "loss": 1.0}
        lines.append(json.dumps(rec))
    lines.insert(5, json.dumps({"type": "emergency", "step": 3, "reason": "phi spike", "severity": "warning",
                                "metric": "phi", "value": 0.9, "threshold": 0.8, "timestamp": 1_763_632_803}))
    lines.insert(6, "")  # blank lines are not errors
    if end:
        lines.append(json.dumps({"type": "session_end", "ended_at": 1_763_640_000, "status": "completed"}))
    for number, text in (bad or {}).items():
        lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


BAD = {
    8: '{"step": 5, "phi": 0.5',                # truncated JSON
    9: '[1, 2, 3]',                             # not an object
    10: '{"phi": 0.5}',                         # no step
    11: '{"step": -4, "phi": 0.5}',             # negative step
    12: '{"step": 9, "phi": "NaN-ish"}',        # phi not a number
    13: '{"type": "weird"}',                    # unknown line type
    14: '{"step": 10, "emergency": "sometimes"}',
}


def test_import_reports_bad_lines_and_keeps_good_ones(store: ls.Store, tmp_path: Path) -> None:
    path = tmp_path / "run-7.jsonl"
    write_session(path, "run-7", 40, bad=BAD)
    report = import_telemetry_file(store, path, progress=False)
    assert [(e.line, e.path) for e in report.errors] == [(n, str(path)) for n in sorted(BAD)]
    assert "not JSON" in report.errors[0].message and "step" in report.errors[2].message
    assert str(report.errors[0]).startswith(f"{path}:8: ")
    # Lines 8..14 held the records of steps 4..10 (line 1 is the header, 6 the emergency, 7 blank).
    tm = Telemetry(store)
    steps = [r["step"] for r in tm.session_records("run-7")]
    expected = [s for s in range(40) if s not in {4, 5, 6, 7, 8, 9, 10}]
    assert steps == expected
    assert report.records_added == len(expected) and report.events_added == 1
    assert report.ignored_fields == {"loss"}
    rec = tm.records.get("run-7#000000000003")
    assert rec is not None and rec["kappa_eff"] == pytest.approx(64.0 - 3 / 40) and rec["emergency"] is True
    session = tm.get_session("run-7")
    assert session is not None and session["status"] == "completed" and session["ended_at"] == 1_763_640_000
    assert session["total_steps"] == len(expected) and session["emergency_count"] == 1
    assert session["started_at"] == 1_763_632_800.0 and session["metadata"] == {"lr": 0.1}
    assert report.sessions_created == ["run-7"]


def test_reimport_adds_and_rewrites_nothing(store: ls.Store, tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_session(path, "run", 25, bad={9: "garbage"})
    emerg = tmp_path / "emergencies.json"
    emerg.write_text("\n".join(json.dumps({"session_id": "run", "reason": f"r{i}", "severity": "critical",
                                           "timestamp": f"2026-11-20T10:00:0{i}Z"}) for i in range(3)) + "\n")
    first = import_path(store, tmp_path, progress=False)
    assert [r.kind for r in first] == ["telemetry", "emergency"]
    assert first[0].records_added == 24 and first[1].events_added == 3
    last_seq = store.changelog.changes(after=0, limit=100_000)[-1].seq
    counts = {c: store.collection(c).count() for c in store.collections()}
    again = import_path(store, tmp_path, progress=False)
    assert [r.added for r in again] == [0, 0]
    assert again[0].records_present == 24 and again[1].events_present == 3 and again[0].events_present == 1
    assert [len(r.errors) for r in again] == [1, 0]
    assert {c: store.collection(c).count() for c in store.collections()} == counts
    assert store.changelog.changes(after=last_seq, limit=10) == []
    assert Telemetry(store).get_session("run")["emergency_count"] == 4  # type: ignore[index]


def test_interrupted_import_completes_on_rerun(store: ls.Store, tmp_path: Path) -> None:
    full = tmp_path / "s.jsonl"
    write_session(full, "s", 30, end=False)
    head = tmp_path / "head" / "s.jsonl"
    head.parent.mkdir()
    head.write_text("".join(full.read_text().splitlines(keepends=True)[:12]))
    import_telemetry_file(store, head, progress=False)
    done = Telemetry(store).count_records("s")
    report = import_telemetry_file(store, full, progress=False)
    assert report.records_added == 30 - done and report.records_present == done
    session = Telemetry(store).get_session("s")
    assert session is not None and session["status"] == "imported" and session["total_steps"] == 30


def test_session_id_fallbacks_and_duplicate_steps(store: ls.Store, tmp_path: Path) -> None:
    path = tmp_path / "nameless.run.jsonl"
    path.write_text('{"step": 1, "phi": 0.1}\n{"step": 1, "phi": 0.9}\n{"step": 2, "session_id": "other"}\n')
    report = import_telemetry_file(store, path, progress=False)
    tm = Telemetry(store)
    assert sorted(report.sessions) == ["nameless", "other"] and report.records_present == 1
    assert tm.records.get("nameless#000000000001")["phi"] == 0.1  # type: ignore[index]
    named = tmp_path / "x.jsonl"
    named.write_text('{"step": 1}\n')
    assert import_telemetry_file(store, named, session_id="given", progress=False).sessions == ["given"]
    bad = tmp_path / "y.jsonl"
    bad.write_text('{"step": 1, "session_id": "a#b"}\n')
    assert "'#'" in import_telemetry_file(store, bad, progress=False).errors[0].message


@pytest.mark.parametrize("layout", ["lines", "array", "events"])
def test_emergency_file_layouts(store: ls.Store, tmp_path: Path, layout: str) -> None:
    events = [{"session_id": "s", "event_id": f"e{i}", "reason": "kappa runaway", "severity": "critical",
               "metric": "kappa", "value": 90.0 + i, "threshold": 80.0, "timestamp": 1000 + i} for i in range(4)]
    path = tmp_path / "em.json"
    if layout == "lines":
        text = "\n".join(json.dumps(e) for e in events)
        text = text.replace('"severity": "critical", "metric": "kappa", "value": 92.0', '"severity": ""', 1)
        path.write_text(text + "\n{not json\n")
    elif layout == "array":
        path.write_text(json.dumps(events[:2] + [{"reason": "x"}, 5] + events[2:]))
    else:
        path.write_text(json.dumps({"session_id": "s", "events": [{k: v for k, v in e.items() if k != "session_id"}
                                                                  for e in events]}))
    report = import_emergency_file(store, path, progress=False)
    tm = Telemetry(store)
    if layout == "lines":
        assert [e.line for e in report.errors] == [3, 5] and tm.emergencies.keys() == ["e0", "e1", "e3"]
    elif layout == "array":
        assert [e.line for e in report.errors] == [3, 4] and tm.emergencies.count() == 4
    else:
        assert report.errors == [] and tm.emergencies.count() == 4
    assert tm.get_session("s")["status"] == "imported"  # type: ignore[index]
    assert tm.get_session("s")["emergency_count"] == tm.emergencies.count()  # type: ignore[index]
    assert import_emergency_file(store, path, progress=False).events_added == 0


def test_events_without_session_or_id(store: ls.Store, tmp_path: Path) -> None:
    path = tmp_path / "em.json"
    path.write_text('{"reason": "a", "severity": "warning"}\n')
    report = import_emergency_file(store, path, progress=False)
    assert report.events_added == 0 and "session_id" in report.errors[0].message
    report = import_emergency_file(store, path, session_id="s", progress=False)
    assert report.events_added == 1 and Telemetry(store).emergencies.keys()[0].startswith("ev-")
    assert import_emergency_file(store, path, session_id="s", progress=False).events_present == 1


def test_import_path_errors(store: ls.Store, tmp_path: Path) -> None:
    with pytest.raises(ls.ValidationError):
        import_path(store, tmp_path / "missing")
    odd = tmp_path / "data.txt"
    odd.write_text('{"step": 1}\n')
    with pytest.raises(ls.ValidationError, match="kind"):
        import_path(store, odd)
    assert import_path(store, odd, kind="telemetry", progress=False)[0].records_added == 1
    with pytest.raises(ls.ValidationError):
        import_path(store, odd, kind="other")


def test_progress_callback_and_terminal_drawing(store: ls.Store, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    write_session(path, "p", 200)
    calls: list[tuple[int, int | None]] = []
    import_telemetry_file(store, path, progress=lambda done, total: calls.append((done, total)))
    size = path.stat().st_size
    assert calls[-1] == (size, size) and [d for d, _ in calls] == sorted(d for d, _ in calls)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    with Progress("copy", total=4, unit="B", stream=out) as bar:
        for _ in range(4):
            bar.update(1)
    assert "copy [" in out.getvalue() and "100%" in out.getvalue() and out.getvalue().endswith("\n")
    quiet = io.StringIO()
    with Progress("copy", total=4, stream=quiet) as bar:
        bar.update(4)
    assert quiet.getvalue() == ""  # not a terminal: nothing drawn
    with pytest.raises(TypeError):
        make_progress("yes", "x", 1)


def test_cli_import_telemetry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    write_session(logs / "run-1.jsonl", "run-1", 20, bad={4: "oops"})
    db = tmp_path / "agent.db"
    assert main(["import-telemetry", str(logs), str(db)]) == 0
    out, err = capsys.readouterr()
    assert "19 records added" in out and "run-1.jsonl:4:" in err
    assert main(["import-telemetry", str(logs), str(db), "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert reports[0]["records_added"] == 0 and reports[0]["records_present"] == 19
    assert reports[0]["errors"][0]["line"] == 4
    assert main(["import-telemetry", str(logs), str(db), "--strict", "--quiet"]) == 1
    assert main(["import-telemetry", str(tmp_path / "nope"), str(db)]) == 1


def test_cli_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.jsonl"
    write_session(path, "run", 50)
    db = tmp_path / "agent.db"
    assert main(["import-telemetry", str(path), str(db), "--quiet"]) == 0
    png = tmp_path / "run.png"
    assert main(["plot", str(db), "run", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "1 emergency events and 1 emergency steps marked" in capsys.readouterr().out
    assert main(["plot", str(db), "missing", "-o", str(png)]) == 1
    assert "no telemetry session 'missing'" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "absent.db"), "run", "-o", str(png)]) == 1


@pytest.mark.parametrize("command", ["import-telemetry", "plot"])
def test_cli_help_has_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert "Example" in capsys.readouterr().out

"""The demo (`localstore demo`): runs end to end, offline and with a real Postgres, and reports its figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from localstore import demo
from localstore.cli import main

SMALL = {"kernels": 6, "generations": 1, "memories": 40, "steps": 200}


def test_demo_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures = demo.run(tmp_path / "ws", agents=2, sizes=SMALL, postgres=False)
    out = capsys.readouterr().out
    assert set(figures["rows"]) == {"agent-0", "agent-1"}
    assert figures["rows"]["agent-0"]["telemetry_records"] == 200
    assert figures["rows"]["agent-1"]["kernel_geometry"] == 6
    assert figures["local_nearest"][0] == "a0-k0"  # a kernel is nearest to its own basin
    assert figures["memory_compression"] > 1.0
    assert "localstore stats" in out and "central_nearest" not in figures


def test_demo_with_postgres(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LOCALSTORE_POSTGRES_URL", pg_url)
    figures = demo.run(tmp_path / "ws", agents=3, sizes=SMALL, postgres=True)
    out = capsys.readouterr().out
    assert figures["central_nearest"][0] == ("agent-0", "a0-k0")
    assert figures["sync_catch_up_s"] >= 0
    assert "pgvector" in out and "sync: every change in Postgres" in out
    password = pg_url.split("@")[0].rsplit(":", 1)[-1] if "@" in pg_url else ""
    if len(password) > 3:
        assert password not in out


def test_demo_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "Example" in capsys.readouterr().out

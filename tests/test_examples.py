"""Every script in examples/ runs to completion, so the examples cannot go stale."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_there_are_examples() -> None:
    assert any(p.name == "demo.py" for p in EXAMPLES)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script: Path, tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    result = subprocess.run(
        [PYTHON, str(script), str(tmp_path / "out")],
        check=False, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "an example should show what it did"
    assert "Traceback" not in result.stderr


def test_demo_output_reports_a_verified_backup(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    result = subprocess.run(
        [PYTHON, str(ROOT / "examples" / "demo.py"), str(tmp_path / "ws")],
        env=subprocess_env, capture_output=True, text=True, timeout=300, check=True,
    )
    assert "verified ok, same id: True" in result.stdout
    assert sorted(p.name for p in (tmp_path / "ws").glob("*.db")) == [f"kernel-{i}.db" for i in range(4)]

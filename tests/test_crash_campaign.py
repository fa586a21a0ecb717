"""CI's short crash campaign: 50 SIGKILLs of a writer (25 per durability mode), nothing acknowledged lost.

The long campaign is ``.venv/bin/python tests/campaign_crash.py --iterations 1000``.
"""

from __future__ import annotations

import os
from pathlib import Path

from campaign_crash import run_campaign

ITERATIONS = int(os.environ.get("LOCALSTORE_CRASH_ITERATIONS", "50"))


def test_crash_campaign(tmp_path: Path) -> None:
    fig = run_campaign(ITERATIONS, tmp_path, max_delay=0.15)
    print(f"\ncrash campaign: {fig.iterations} iterations (seed {fig.seed}), kills {fig.kills}, "
          f"{fig.acknowledged_writes} acknowledged writes, {fig.rows_checked} row checks, "
          f"in-flight committed {fig.in_flight_committed}, {fig.seconds}s")
    assert fig.iterations == ITERATIONS and fig.kills["normal"] and fig.kills["full"]
    assert fig.acknowledged_writes > ITERATIONS, "the writers acknowledged too few writes to test anything"
    assert fig.acknowledged_lost == 0, "\n".join(fig.failures[:20])
    assert fig.torn_writes == 0, "\n".join(fig.failures[:20])
    assert fig.integrity_errors == 0, "\n".join(fig.failures[:20])
    assert fig.changelog_mismatches == 0, "\n".join(fig.failures[:20])
    assert not fig.failures


SYNC_KILLS = int(os.environ.get("LOCALSTORE_SYNC_CRASH_KILLS", "10"))


def test_sync_crash_campaign(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    from campaign_crash import run_sync_campaign

    fig = run_sync_campaign(SYNC_KILLS, tmp_path, pg_url, pg_schema)
    print(f"\nsync crash campaign: mid-batch {fig.kills_mid_batch}, window {fig.kills_in_window} "
          f"({fig.window_gap_changes} changes committed centrally but unacknowledged), resyncs {fig.resyncs}, "
          f"{fig.seconds}s")
    assert not fig.failures, "\n".join(fig.failures[:20])
    assert fig.kills_in_window == SYNC_KILLS // 2 and fig.window_gap_changes > 0
    assert fig.kills_mid_batch > 0
    assert fig.not_converged == 0 and fig.integrity_errors == 0

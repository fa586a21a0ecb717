"""The kits' central views: after a sync, plain SQL against each view returns what the kits wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psycopg
from localstore.sync import KIT_TABLES, SyncEngine, create_kit_views
from psycopg import sql

import localstore as ls
from localstore.kits.documents import Documents
from localstore.kits.evolution import EvolutionRuns
from localstore.kits.kernels import KernelGeometry
from localstore.kits.memory import AgentMemory
from localstore.kits.profiles import LearningProfiles
from localstore.kits.telemetry import Telemetry


def _basin(rng: np.random.Generator, dim: int = 64) -> np.ndarray:
    return rng.dirichlet(np.ones(dim)).astype(np.float32)


def test_kit_views_answer_plain_sql(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    rng = np.random.default_rng(3)
    ws = ls.Workspace(tmp_path / "ws")
    target = _basin(rng)
    for a in range(3):
        store = ws.open(f"agent-{a}")
        kernels = KernelGeometry(store)
        for i in range(5):
            basin = target if (a, i) == (2, 4) else _basin(rng)
            kernels.save_kernel_snapshot(f"k{a}-{i}", basin_coordinates=basin, phi=0.1 * i + a, regime="geometric")
        tel = Telemetry(store)
        sid = tel.start_session(f"s{a}")
        tel.record_telemetry_many(sid, [{"step": s, "phi": 0.5 + 0.01 * s, "kappa_eff": 64.0} for s in range(20)])
        tel.record_emergency(sid, reason="phi collapse", severity="critical", metric="phi", value=0.1, threshold=0.2)
        tel.save_checkpoint(sid, phi=0.9 + a, basin_coords=target if a == 1 else _basin(rng), state_dict={"w": np.eye(2)})
        tel.record_basin(sid, 19, _basin(rng), phi=0.7)
        tel.end_session(sid)
        memory = AgentMemory(store)
        memory.remember(f"agent {a} saw drift", significance=0.5)
        if a == 0:
            memory.reflect("why drift?", "kappa rose", insights=["watch kappa"])
            memory.shift_tone("calm", "alert", trigger_type="emergency")
    # One agent runs every other kit, so that every view has rows.
    store = ws.open("agent-0")
    runs = EvolutionRuns(store, embedding_dim=8)
    runs.start_round(1, generation=0, population_size=4, mutation_rate=0.1, selection_pressure=2.0)
    runs.record_fitness(1, "agent-0", 0.8)
    runs.record_resources(1, "agent-0", cpu_percent=50.0, memory_mb=128.0)
    runs.record_selection(1, "p0", "p1", method="tournament")
    runs.archive_program("p1", "print(1)", combined_score=0.8, embedding=np.ones(8, dtype=np.float32))
    Documents(store).ingest("Basins drift when kappa rises. " * 20, title="notes")
    secure = ws.open("profiles", key=ls.generate_key())
    profiles = LearningProfiles(secure)
    pid = profiles.create_profile(user_id="ada@example.org", learning_style="visual")
    profiles.record_session(pid, domain="math")
    profiles.update_knowledge(pid, "math", "limits", mastery=0.5, confidence=0.7)
    engine = SyncEngine(ws, pg_url, schema=pg_schema, watch=False)
    try:
        engine.sync_now()
    finally:
        engine.stop()
    views = f"{pg_schema}_agents"
    made = create_kit_views(pg_url, schema=pg_schema, views_schema=views)
    assert set(made) == {*KIT_TABLES, "latest_telemetry", "best_checkpoints", "emergency_summary", "session_stats"}
    v = sql.Identifier
    with psycopg.connect(pg_url) as conn:
        def q(query: str, *params: object) -> list[tuple[object, ...]]:
            return conn.execute(sql.SQL(query).format(s=v(views)), params).fetchall()

        for table in made:  # every view answers plain SQL with the rows the kits wrote
            assert q(f"SELECT count(*) FROM {{s}}.{table}")[0][0] > 0, table
        assert q("SELECT count(*) FROM {s}.kernel_geometry")[0][0] == 15
        profile = q("SELECT agent, user_id FROM {s}.learning_profiles")
        assert profile[0][0] == "profiles" and isinstance(profile[0][1], bytes)  # ciphertext only
        nearest = q("SELECT agent, kernel_id FROM {s}.kernel_geometry ORDER BY basin_coordinates <=> %s::vector LIMIT 1",
                    str(target.tolist()))
        assert nearest == [("agent-2", "k2-4")]
        closest = q("SELECT agent FROM {s}.checkpoints ORDER BY basin_coords <=> %s::vector LIMIT 1", str(target.tolist()))
        assert closest == [("agent-1",)]
        latest = q("SELECT agent, session_id, step FROM {s}.latest_telemetry ORDER BY agent")
        assert latest == [(f"agent-{a}", f"s{a}", 19) for a in range(3)]
        assert [r[0] for r in q("SELECT phi FROM {s}.best_checkpoints")] == [2.9, 1.9, 0.9]
        summary = q("SELECT agent, emergency_count FROM {s}.emergency_summary ORDER BY agent")
        assert summary == [(f"agent-{a}", 1) for a in range(3)]
        stats = q("SELECT agent, total_steps, checkpoint_count FROM {s}.session_stats ORDER BY agent")
        assert stats == [(f"agent-{a}", 20, 1) for a in range(3)]
    # Idempotent: running it again replaces the views.
    assert create_kit_views(pg_url, schema=pg_schema, views_schema=views) == made
    ws.close()

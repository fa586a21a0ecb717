"""The telemetry and checkpoints kit on real stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import localstore as ls
from localstore.kits.telemetry import Telemetry, decode_state, encode_state, record_key


@pytest.fixture
def tm(store: ls.Store) -> Telemetry:
    return Telemetry(store)


def basin(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(64))


def test_session_lifecycle_and_stats(tm: Telemetry) -> None:
    sid = tm.start_session("run-1", started_at=0, metadata={"lr": 0.1})
    assert tm.get_session(sid)["status"] == "running"  # type: ignore[index]
    n = tm.record_telemetry_many(sid, [
        {"step": i, "timestamp": i, "phi": i / 10, "kappa_eff": 64.0, "regime": "geometric",
         "basin_distance": 0.01, "emergency": i == 7}
        for i in range(10)
    ])
    assert n == 10
    tm.record_telemetry(sid, 10, timestamp=10, kappa_eff=60.0)  # no phi: skipped by the phi stats
    tm.record_emergency(sid, reason="phi drop", severity="critical", metric="phi", value=0.1, threshold=0.3, step=7)
    row = tm.end_session(sid, ended_at=11)
    assert (row["status"], row["ended_at"], row["total_steps"]) == ("completed", 11.0, 11)
    assert row["avg_phi"] == pytest.approx(0.45) and row["max_phi"] == pytest.approx(0.9)
    assert row["emergency_count"] == 1
    assert tm.get_session(sid) == row
    with pytest.raises(ls.ValidationError, match="already exists"):
        tm.start_session(sid)


def test_rerecording_a_step_replaces_it(tm: Telemetry) -> None:
    sid = tm.start_session("s")
    tm.record_telemetry(sid, 5, phi=0.1)
    tm.record_telemetry(sid, 5, phi=0.2)
    assert tm.count_records(sid) == 1 and tm.latest_record(sid)["phi"] == 0.2  # type: ignore[index]
    assert tm.records.get(record_key(sid, 5))["phi"] == 0.2  # type: ignore[index]


def test_sessions_do_not_leak_into_each_other(tm: Telemetry) -> None:
    for sid in ("a", "a-b", "ab", "b"):
        tm.start_session(sid)
        tm.record_telemetry_many(sid, [{"step": s, "phi": 0.5} for s in range(3 if sid == "a" else 5)])
    assert tm.count_records("a") == 3 and tm.latest_record("a")["step"] == 2  # type: ignore[index]
    assert [r["step"] for r in tm.session_records("a")] == [0, 1, 2]
    assert {k: v["step"] for k, v in tm.latest_telemetry().items()} == {"a": 2, "a-b": 4, "ab": 4, "b": 4}


def test_steps_are_ordered_numerically_and_paged(tm: Telemetry) -> None:
    sid = tm.start_session("s")
    tm.record_telemetry_many(sid, [{"step": s, "phi": s / 2000} for s in (2000, 9, 100, 10, *range(11, 30))])
    steps = [r["step"] for page in tm._record_pages(sid, page=4) for r in page]
    assert steps == sorted(steps) and len(steps) == 23
    assert tm.latest_record(sid)["step"] == 2000  # type: ignore[index]


@pytest.mark.parametrize("bad", [
    {"step": -1}, {"step": 1.5}, {"step": None}, {"step": True}, {"step": 1, "phi": float("nan")},
    {"step": 1, "phi": "high"}, {"step": 1, "emergency": "yes"}, {"step": 1, "regime": 3},
    {"step": 1, "timestamp": "soon"}, {"step": 1, "session_id": "other"}, {"step": 1, "psi": 1.0},
])
def test_bad_records_are_refused_and_a_batch_is_all_or_none(tm: Telemetry, bad: dict) -> None:
    sid = tm.start_session("s")
    with pytest.raises(ls.ValidationError):
        tm.record_telemetry_many(sid, [{"step": 0, "phi": 0.1}, bad])
    assert tm.count_records(sid) == 0


def test_unknown_and_malformed_sessions(tm: Telemetry) -> None:
    with pytest.raises(ls.ValidationError, match="start_session"):
        tm.record_telemetry("nope", 1, phi=0.1)
    with pytest.raises(ls.ValidationError):
        tm.start_session("has#hash")
    with pytest.raises(ls.ValidationError):
        tm.end_session("nope")
    sid = tm.start_session("s")
    with pytest.raises(ls.ValidationError):
        tm.end_session(sid, status="exploded")
    with pytest.raises(ls.ValidationError):
        tm.record_emergency(sid, reason="", severity="warning")


def test_emergency_summary(tm: Telemetry) -> None:
    for sid in ("s1", "s2"):
        tm.start_session(sid)
    tm.record_emergency("s1", reason="phi low", severity="critical", metric="phi", value=0.1, threshold=0.3, timestamp=5)
    tm.record_emergency("s1", reason="kappa high", severity="warning", metric="kappa", value=90, threshold=80, timestamp=3)
    eid = tm.record_emergency("s1", reason="phi low", severity="critical", metric="phi", timestamp=9, event_id="e-1")
    assert eid == "e-1" and tm.emergencies.get("e-1")["session_id"] == "s1"  # type: ignore[index]
    summary = tm.emergency_summary()
    assert summary == [{"session_id": "s1", "count": 3, "by_severity": {"critical": 2, "warning": 1},
                        "by_metric": {"kappa": 1, "phi": 2}, "first_at": 3.0, "last_at": 9.0}]
    assert tm.emergency_summary("s2") == []


def test_state_dict_round_trip() -> None:
    state = {"w": np.arange(12, dtype="<f4").reshape(3, 4), "b": np.array([1, 2], dtype=np.int64),
             "lr": 0.01, "opt": {"betas": [0.9, 0.99]}}
    back = decode_state(encode_state(state))
    assert back is not None and back.keys() == state.keys()
    assert back["w"].dtype == np.dtype("<f4") and np.array_equal(back["w"], state["w"])
    assert back["opt"] == {"betas": [0.9, 0.99]} and decode_state(encode_state(None)) is None
    with pytest.raises(ls.ValidationError):
        encode_state({"f": object()})
    with pytest.raises(ls.ValidationError):
        encode_state({"o": np.array([object()])})


def test_checkpoints_rank_best_prune_and_history(tm: Telemetry) -> None:
    tm.start_session("s1")
    tm.start_session("s2")
    ids = [tm.save_checkpoint("s1", phi=phi, kappa=64.0, regime="geometric", basin_coords=basin(i),
                              state_dict={"w": np.full(4, phi)}, created_at=i)
           for i, phi in enumerate([0.3, 0.9, 0.5, 0.7])]
    other = tm.save_checkpoint("s2", phi=0.95, basin_coords=basin(9), created_at=10)
    ranks = {r["checkpoint_id"]: (r["rank"], r["is_best"]) for r in tm.checkpoints.find({"session_id": "s1"})}
    assert ranks == {ids[0]: (4, False), ids[1]: (1, True), ids[2]: (3, False), ids[3]: (2, False)}
    best = tm.get_best_checkpoint("s1")
    assert best is not None and best["checkpoint_id"] == ids[1] and np.array_equal(best["state_dict"]["w"], np.full(4, 0.9))
    assert tm.get_best_checkpoint()["checkpoint_id"] == other  # type: ignore[index]
    assert [c["phi"] for c in tm.best_checkpoints(limit=3)] == [0.95, 0.9, 0.7]
    assert "state_dict" not in tm.best_checkpoints()[0]

    pruned = tm.prune_checkpoints(keep=2, session_id="s1")
    assert sorted(pruned) == sorted([ids[0], ids[2]])
    assert {r["checkpoint_id"]: r["rank"] for r in tm.checkpoints.find({"session_id": "s1"})} == {ids[1]: 1, ids[3]: 2}
    assert tm.checkpoints.get(other) is not None
    actions = [h["action"] for h in tm.checkpoint_history(ids[0])]
    assert actions[0] == "created" and actions[-1] == "pruned" and "ranked" in actions
    loaded = tm.load_checkpoint(ids[3])
    assert loaded is not None and loaded["state_dict"]["w"][0] == pytest.approx(0.7)
    assert tm.checkpoint_history(ids[3])[-1]["action"] == "loaded"
    assert tm.load_checkpoint("nope") is None
    # Store-wide prune keeps the global best.
    assert sorted(tm.prune_checkpoints(keep=1)) == sorted([ids[1], ids[3]])
    assert [c["checkpoint_id"] for c in tm.checkpoints.find()] == [other]
    with pytest.raises(ls.ValidationError):
        tm.prune_checkpoints(keep=0)


def test_checkpoint_basins_are_searchable(tm: Telemetry) -> None:
    tm.start_session("s")
    for i in range(5):
        tm.save_checkpoint("s", phi=i / 5, basin_coords=basin(i), checkpoint_id=f"c{i}")
    hits = tm.checkpoints.nearest("basin_coords", basin(3), k=2, where={"is_best": False})
    assert hits[0].key == "c3" and all(not h.row["is_best"] for h in hits)
    with pytest.raises(ls.ValidationError):
        tm.save_checkpoint("s", phi=0.1, basin_coords=np.ones(8))
    with pytest.raises(ls.ValidationError):
        tm.save_checkpoint("missing", phi=0.1)


def test_session_stats_include_checkpoints(tm: Telemetry) -> None:
    tm.start_session("s1")
    tm.start_session("s2")
    tm.record_telemetry_many("s1", [{"step": i, "phi": 0.5} for i in range(4)])
    tm.end_session("s1")
    tm.save_checkpoint("s1", phi=0.4)
    tm.save_checkpoint("s1", phi=0.6)
    stats = {s["session_id"]: s for s in tm.session_stats()}
    assert stats["s1"]["checkpoint_count"] == 2 and stats["s1"]["best_phi"] == 0.6
    assert stats["s1"]["total_steps"] == 4 and stats["s2"]["best_phi"] is None
    assert [s["session_id"] for s in tm.session_stats("s2")] == ["s2"]


def test_refresh_session_stats_writes_only_on_change(tm: Telemetry, store: ls.Store) -> None:
    sid = tm.start_session("s")
    tm.record_telemetry_many(sid, [{"step": i, "phi": 0.2} for i in range(3)])
    assert tm.refresh_session_stats(sid)["total_steps"] == 3
    last = store.changelog.changes(after=0, limit=10_000)[-1].seq
    assert tm.refresh_session_stats(sid)["status"] == "running"
    assert store.changelog.changes(after=last, limit=10) == []


def test_basin_history(tm: Telemetry) -> None:
    tm.start_session("s")
    for step in (3, 1, 2):
        tm.record_basin("s", step, basin(step), phi=step / 10, regime="linear", timestamp=step)
    traj = tm.basin_trajectory("s")
    assert [b["step"] for b in traj] == [1, 2, 3] and np.allclose(traj[0]["basin_coords"], basin(1), atol=1e-6)
    with pytest.raises(ls.ValidationError):
        tm.record_basin("s", -2, basin(0))


def test_retention_deletes_old_telemetry_only(tm: Telemetry) -> None:
    day = 86_400
    sid = tm.start_session("s", started_at=0)
    tm.record_telemetry_many(sid, [{"step": i, "timestamp": i * day, "phi": 0.5} for i in range(10)])
    tm.record_basin(sid, 0, basin(0), timestamp=0)
    tm.record_basin(sid, 9, basin(9), timestamp=9 * day)
    tm.record_emergency(sid, reason="old", severity="warning", timestamp=0)
    tm.save_checkpoint(sid, phi=0.5, created_at=0)
    counts = tm.delete_telemetry_older_than(3, now_ts=9.5 * day, batch=2)
    assert counts == {"telemetry_records": 7, "basin_history": 1}
    assert [r["step"] for r in tm.session_records(sid)] == [7, 8, 9]
    assert tm.emergencies.count() == 1 and tm.checkpoints.count() == 1 and tm.get_session(sid) is not None
    assert tm.delete_telemetry_older_than(3, now_ts=9.5 * day) == {"telemetry_records": 0, "basin_history": 0}


def test_large_batch(tm: Telemetry) -> None:
    sid = tm.start_session("big")
    rng = np.random.default_rng(0)
    phi = rng.uniform(size=100_000)
    tm.record_telemetry_many(sid, ({"step": i, "phi": float(p), "timestamp": float(i)} for i, p in enumerate(phi)))
    row = tm.end_session(sid)
    assert row["total_steps"] == 100_000 and row["max_phi"] == pytest.approx(phi.max())
    assert row["avg_phi"] == pytest.approx(phi.mean())
    assert tm.latest_record(sid)["step"] == 99_999  # type: ignore[index]


def test_basin_metric_is_checked_and_remembered(tmp_path: Path) -> None:
    with pytest.raises(ls.SchemaError):
        Telemetry(ls.open(tmp_path / "a.db"), basin_metric="l2")
    with ls.open(tmp_path / "b.db") as store:
        Telemetry(store, basin_metric="cosine")
    with ls.open(tmp_path / "b.db") as store:
        assert store.collection("basin_history").fields["basin_coords"].metric == "cosine"  # type: ignore[attr-defined]
        Telemetry(store)
        with pytest.raises(ls.SchemaError, match="cosine"):
            Telemetry(store, basin_metric="fisher_rao")

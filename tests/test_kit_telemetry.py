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
    with pytest.raises(ls.ValidationError, match="64 bits"):
        encode_state({"big": 2**70})
    odd = decode_state(encode_state({"raw": b"\x00\x01", "nan": float("nan"), "t": (1, 2), "k": {1: "one"}}))
    assert odd is not None and odd["raw"] == b"\x00\x01" and odd["nan"] != odd["nan"]
    assert odd["t"] == [1, 2] and odd["k"] == {1: "one"}  # tuples come back as lists, as from JSON
    with pytest.raises(ls.ValidationError):
        encode_state({"o": np.array([object()])})


def test_checkpoints_rank_best_prune_and_history(tm: Telemetry) -> None:
    tm.start_session("s1")
    tm.start_session("s2")
    ids = [tm.save_checkpoint("s1", phi=phi, kappa=64.0, regime="geometric", basin_coords=basin(i),
                              state_dict={"w": np.full(4, phi)}, created_at=i)
           for i, phi in enumerate([0.3, 0.9, 0.5, 0.7])]
    other = tm.save_checkpoint("s2", phi=0.95, basin_coords=basin(9), created_at=10)
    listed = tm.list_checkpoints("s1")
    assert [r["checkpoint_id"] for r in listed] == [ids[1], ids[3], ids[2], ids[0]]
    ranks = {r["checkpoint_id"]: (r["rank"], r["is_best"]) for r in listed}
    assert ranks == {ids[0]: (4, False), ids[1]: (1, True), ids[2]: (3, False), ids[3]: (2, False)}
    assert "state_dict" not in listed[0]
    assert tm.ranks(["s1", "s2"]) == {ids[0]: 4, ids[1]: 1, ids[2]: 3, ids[3]: 2, other: 1}
    # The stored is_best flag (a vec0 filter) marks exactly each session's best.
    assert {r["checkpoint_id"] for r in tm.checkpoints.find({"is_best": True}, fields=[])} == {ids[1], other}
    best = tm.get_best_checkpoint("s1")
    assert best is not None and best["checkpoint_id"] == ids[1] and np.array_equal(best["state_dict"]["w"], np.full(4, 0.9))
    assert (best["rank"], best["is_best"]) == (1, True)
    assert tm.get_best_checkpoint()["checkpoint_id"] == other  # type: ignore[index]
    assert tm.get_best_checkpoint("s2")["state_dict"] is None  # type: ignore[index]
    top = tm.best_checkpoints(limit=3)
    assert [(c["phi"], c["rank"]) for c in top] == [(0.95, 1), (0.9, 1), (0.7, 2)]
    assert "state_dict" not in top[0]

    pruned = tm.prune_checkpoints(keep=2, session_id="s1")
    assert sorted(pruned) == sorted([ids[0], ids[2]])
    assert {r["checkpoint_id"]: r["rank"] for r in tm.list_checkpoints("s1")} == {ids[1]: 1, ids[3]: 2}
    assert tm.checkpoints.get(other) is not None
    assert tm.states.get(ids[0]) is None and tm.states.get(ids[3]) is not None
    history = tm.checkpoint_history(ids[0])
    # Ranks are computed when read, so a save logs no "ranked" entries for the other checkpoints.
    assert [h["action"] for h in history] == ["created", "pruned"]
    assert history[-1]["details"] == {"phi": 0.3, "rank": 4}
    loaded = tm.load_checkpoint(ids[3])
    assert loaded is not None and loaded["state_dict"]["w"][0] == pytest.approx(0.7) and loaded["rank"] == 2
    assert tm.checkpoint_history(ids[3])[-1]["action"] == "loaded"
    assert tm.load_checkpoint("nope") is None
    # Store-wide prune keeps the global best.
    assert sorted(tm.prune_checkpoints(keep=1)) == sorted([ids[1], ids[3]])
    assert [c["checkpoint_id"] for c in tm.checkpoints.find()] == [other]
    assert tm.states.count() == 0  # ``other`` was saved without a state
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


def _check_best_flags(tm: Telemetry) -> None:
    """The stored is_best flags mark exactly the rank-1 checkpoint of each session."""
    flagged = {r["checkpoint_id"] for r in tm.checkpoints.find({"is_best": True}, fields=[])}
    assert flagged == {r["checkpoint_id"] for r in tm.list_checkpoints() if r["rank"] == 1}


def test_best_flag_stays_exact_through_saves_resaves_and_prunes(tm: Telemetry) -> None:
    rng = np.random.default_rng(7)
    for sid in ("a", "b"):
        tm.start_session(sid)
    for i in range(60):
        sid = "ab"[int(rng.integers(2))]
        # Few distinct phi values and times, so ties on both happen; some ids are saved again.
        cid = f"c{int(rng.integers(40))}"
        tm.save_checkpoint(sid, phi=float(rng.integers(5)) / 4, created_at=int(rng.integers(6)), checkpoint_id=cid)
        _check_best_flags(tm)
        rows = tm.list_checkpoints(sid)
        order = sorted(rows, key=lambda r: (-r["phi"], r["created_at"]))  # stable: ties keep storage order
        assert [r["phi"] for r in rows] == [r["phi"] for r in order]
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    tm.prune_checkpoints(keep=3, session_id="a")
    _check_best_flags(tm)
    tm.prune_checkpoints(keep=2)
    _check_best_flags(tm)
    assert tm.store.verify().ok


def test_a_save_rewrites_no_other_checkpoint(tm: Telemetry, store: ls.Store) -> None:
    """Each save writes its own rows plus at most the previous best's flag; states are never copied."""
    sid = tm.start_session("s")
    state = {"w": np.arange(4096, dtype="<f4")}  # 16 KB that a rewrite would copy into the change log
    sizes = []
    for i in range(30):
        before = store.changelog.last_seq()
        tm.save_checkpoint(sid, phi=i / 30, state_dict=state)  # each one the new best
        changes = store.changelog.changes(after=before, limit=100, max_bytes=1 << 40)
        sizes.append(sum(c.size for c in changes))
        kinds = sorted((c.collection, c.op) for c in changes)
        expected = [("checkpoint_history", "put"), ("checkpoint_states", "put"), ("checkpoints", "put")]
        assert kinds == sorted(expected + ([("checkpoints", "put")] if i else []))
    # The log of the first save holds the state once; later saves cost the same, not more and more.
    assert max(sizes[1:]) < sizes[0] + 2_000
    every = store.changelog.changes(limit=10_000, max_bytes=1 << 40)
    assert sum(c.size for c in every if c.collection == "checkpoint_states") < 31 * len(encode_state(state))  # type: ignore[arg-type]
    assert tm.load_checkpoint(tm.list_checkpoints(sid)[-1]["checkpoint_id"])["rank"] == 30  # type: ignore[index]


def test_checkpoints_saved_by_earlier_versions_are_read(tm: Telemetry) -> None:
    """A store written before checkpoint_states: states in checkpoints.state_dict as JSON + .npz, ranks stored."""
    import io
    import json
    import struct

    tm.start_session("s")
    w = np.arange(6, dtype="<f8").reshape(2, 3)
    head = json.dumps({"json": {"lr": 0.5}, "arrays": ["w"]}).encode()
    npz = io.BytesIO()
    np.savez(npz, w=w)
    legacy = struct.pack("<4sI", b"LSCK", len(head)) + head + npz.getvalue()
    tm.checkpoints.put({"checkpoint_id": "old", "session_id": "s", "phi": 0.5, "created_at": 1.0,
                        "state_dict": legacy, "rank": 1, "is_best": True})
    loaded = tm.load_checkpoint("old")
    assert loaded is not None and loaded["state_dict"]["lr"] == 0.5 and np.array_equal(loaded["state_dict"]["w"], w)
    new = tm.save_checkpoint("s", phi=0.9, state_dict={"v": np.ones(2)}, created_at=2.0)
    assert [(r["checkpoint_id"], r["rank"]) for r in tm.list_checkpoints("s")] == [(new, 1), ("old", 2)]
    _check_best_flags(tm)
    assert tm.get_best_checkpoint("s")["state_dict"]["v"].tolist() == [1.0, 1.0]  # type: ignore[index]
    tm.save_checkpoint("s", phi=0.1, checkpoint_id="old", created_at=1.0)  # saved again: its old state goes
    assert tm.load_checkpoint("old")["state_dict"] is None  # type: ignore[index]


def test_state_layout_keeps_dtypes_shapes_and_detects_damage() -> None:
    state = {"f": np.asfortranarray(np.arange(6, dtype=">i4").reshape(2, 3)), "b": np.array([True, False]),
             "z": np.zeros((0, 3), dtype="<f2"), "s": np.array(3.5), "text": "x" * 2_000, "n": None}
    blob = encode_state(state)
    assert blob is not None and len(blob) < 1_000  # the repetitive JSON part is compressed
    back = decode_state(blob)
    assert back is not None and back.keys() == state.keys()
    for name in ("f", "b", "z", "s"):
        assert back[name].dtype == state[name].dtype and back[name].shape == state[name].shape
        assert np.array_equal(back[name], state[name])
    back["f"][0, 0] = 99  # arrays come back writable
    assert (back["text"], back["n"]) == ("x" * 2_000, None)
    with pytest.raises(ls.CorruptStoreError):
        decode_state(blob[:-3])
    with pytest.raises(ls.ValidationError):
        decode_state(b"nope")


def test_save_checkpoints_matches_saving_one_by_one(tmp_path: Path) -> None:
    """A batch gives the rows, ranks, best flags and history that the same saves one by one give."""
    rng = np.random.default_rng(11)
    batches = [[{"phi": float(rng.integers(4)) / 4, "created_at": int(rng.integers(5)), "checkpoint_id": f"c{b}-{j}",
                 "state_dict": {"w": np.full(3, b * 10 + j, dtype="<f4"), "note": f"{b}/{j}"}}
                for j in range(int(rng.integers(1, 6)))] for b in range(12)]
    one, many = Telemetry(ls.open(tmp_path / "one.db")), Telemetry(ls.open(tmp_path / "many.db"))
    for kit in (one, many):
        kit.start_session("s")
        kit.save_checkpoint("s", phi=0.5, created_at=2, checkpoint_id="first")
    for batch in batches:
        for item in batch:
            one.save_checkpoint("s", **item)
        assert many.save_checkpoints("s", batch) == [item["checkpoint_id"] for item in batch]
        _check_best_flags(many)

    def view(kit: Telemetry) -> list[tuple]:
        return [(r["checkpoint_id"], r["phi"], r["rank"], r["is_best"]) for r in kit.list_checkpoints("s")]

    assert view(many) == view(one)
    got = many.load_checkpoint("c3-0")["state_dict"]  # type: ignore[index]
    assert got["note"] == "3/0" and got["w"].tolist() == [30.0] * 3
    created = [h["checkpoint_id"] for h in many.checkpoint_history() if h["action"] == "created"]
    assert sorted(created) == sorted(r[0] for r in view(one))
    assert many.store.verify().ok
    one.store.close()
    many.store.close()


def test_save_checkpoints_resaves_and_refusals(tm: Telemetry) -> None:
    """Items naming saved checkpoints are saved again; a bad item refuses the whole batch."""
    sid = tm.start_session("s")
    first = tm.save_checkpoints(sid, [{"phi": 0.9}, {"phi": 0.1, "checkpoint_id": "low"}])
    assert len(first) == 2 and tm.get_best_checkpoint(sid)["checkpoint_id"] == first[0]  # type: ignore[index]
    tm.save_checkpoints(sid, [{"phi": 1.0, "checkpoint_id": "low"}, {"phi": 0.2, "checkpoint_id": "new"}])
    assert tm.get_best_checkpoint(sid)["checkpoint_id"] == "low"  # type: ignore[index]
    _check_best_flags(tm)
    assert tm.save_checkpoints(sid, []) == []
    before = tm.checkpoints.count()
    for bad, match in [
        ([{"phi": 0.5}, {"phi": float("nan")}], "finite"),
        ([{"phi": 0.5}, {"kappa": 1.0}], "phi is required"),
        ([{"phi": 0.5, "psi": 1}], "unknown argument"),
        ([{"phi": 0.5, "checkpoint_id": "x"}, {"phi": 0.6, "checkpoint_id": "x"}], "appears twice"),
        ([{"phi": 0.5}, ("phi", 0.6)], "dict of save_checkpoint's arguments"),
        ([{"phi": 0.5, "state_dict": {"f": object()}}], "neither a numpy array"),
    ]:
        with pytest.raises(ls.ValidationError, match=match):
            tm.save_checkpoints(sid, bad)  # type: ignore[arg-type]
    with pytest.raises(ls.ValidationError):
        tm.save_checkpoints("nobody", [{"phi": 0.5}])
    assert tm.checkpoints.count() == before

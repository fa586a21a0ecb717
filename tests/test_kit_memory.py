"""The agent memory kit on real stores: remember, recall scoring, reflections, tone history."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import localstore as ls
from localstore.kits.memory import DEFAULT_HALF_LIFE, AgentMemory


@pytest.fixture
def mem(store: ls.Store) -> AgentMemory:
    return AgentMemory(store, embedding_dim=8)


def unit(i: int, dim: int = 8) -> np.ndarray:
    v = np.zeros(dim)
    v[i] = 1.0
    return v


def test_remember_round_trip_and_compressed_content(mem: AgentMemory) -> None:
    mid = mem.remember("the user likes tea " * 50, type="preference", significance=0.7,
                       emotional_context={"valence": 0.4}, loop_context={"loop": 3},
                       metadata={"source": "chat"}, embedding=unit(0), timestamp=1000.0)
    row = mem.get(mid)
    assert row is not None
    assert row["content"] == "the user likes tea " * 50 and row["type"] == "preference"
    assert row["emotional_context"] == {"valence": 0.4} and row["loop_context"] == {"loop": 3}
    assert row["metadata"] == {"source": "chat"} and row["timestamp"] == 1000.0
    assert mem.memories.fields["content"].compress
    assert mem.forget_memory(mid) and mem.get(mid) is None


@pytest.mark.parametrize("bad", [{"significance": 1.5}, {"significance": -0.1}, {"significance": "high"},
                                 {"type": ""}, {"embedding": [1.0, 2.0]}, {"timestamp": "yesterday"}])
def test_bad_memories_are_refused(mem: AgentMemory, bad: dict) -> None:
    with pytest.raises(ls.ValidationError):
        mem.remember("x", **bad)
    assert mem.memories.count() == 0


def test_recall_without_query_scores_significance_and_recency(mem: AgentMemory) -> None:
    now = 10 * DEFAULT_HALF_LIFE
    mem.remember("old but vital", significance=1.0, timestamp=now - 3 * DEFAULT_HALF_LIFE, memory_id="old")
    mem.remember("fresh trivia", significance=0.1, timestamp=now, memory_id="fresh")
    mem.remember("middling", significance=0.5, timestamp=now - DEFAULT_HALF_LIFE, memory_id="mid")
    got = mem.recall(k=3, now_ts=now)
    by_id = {r.memory["memory_id"]: r for r in got}
    assert by_id["mid"].recency == pytest.approx(0.5)
    # Default weights without a query: 0.6 significance, 0.4 recency.
    assert by_id["old"].score == pytest.approx(0.6 * 1.0 + 0.4 * 0.125)
    assert by_id["fresh"].score == pytest.approx(0.6 * 0.1 + 0.4 * 1.0)
    assert [r.memory["memory_id"] for r in got] == ["old", "mid", "fresh"]
    assert got[0].similarity is None
    # Only recency counts: newest first.
    assert [r.memory["memory_id"] for r in mem.recall(k=3, weights=(0, 0, 1), now_ts=now)] == ["fresh", "mid", "old"]
    assert [r.memory["memory_id"] for r in mem.recall(k=1, min_significance=0.4, since=now - 2 * DEFAULT_HALF_LIFE,
                                                      now_ts=now)] == ["mid"]


def test_recall_with_query_matches_a_brute_force_ranking(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    with ls.open(tmp_path / "m.db") as store:
        mem = AgentMemory(store, embedding_dim=16)
        embeddings = rng.normal(size=(300, 16))
        sig = rng.uniform(size=300)
        ts = rng.uniform(0, 1e6, size=300)
        for i in range(300):
            mem.remember(f"memory {i}", type="a" if i % 2 else "b", significance=float(sig[i]),
                         embedding=embeddings[i], timestamp=float(ts[i]), memory_id=f"m{i}")
        mem.remember("no embedding", significance=1.0, timestamp=1e6, memory_id="plain")
        q = rng.normal(size=16)
        # Weights that favour significance, so the best by score are far down the similarity order.
        weights = (0.2, 0.7, 0.1)
        got = mem.recall(q, k=7, type="a", weights=weights, now_ts=1e6)
        cos = embeddings @ q / np.linalg.norm(embeddings, axis=1) / np.linalg.norm(q)
        score = 0.2 * (1 - (1 - cos) / 2) + 0.7 * sig + 0.1 * np.power(0.5, (1e6 - ts) / DEFAULT_HALF_LIFE)
        expected = [f"m{i}" for i in sorted((i for i in range(300) if i % 2), key=lambda i: -score[i])[:7]]
        assert [r.memory["memory_id"] for r in got] == expected
        assert [r.score for r in got] == pytest.approx([score[int(m[1:])] for m in expected], abs=1e-5)
        assert all(r.memory["memory_id"] != "plain" for r in mem.recall(q, k=400))


def test_recall_errors(mem: AgentMemory, tmp_path: Path) -> None:
    with pytest.raises(ls.QueryError):
        mem.recall(k=0)
    with pytest.raises(ls.QueryError):
        mem.recall(weights=(0, 0, 0))
    with ls.open(tmp_path / "plain.db") as store:
        plain = AgentMemory(store)
        assert "embedding" not in plain.memories.fields
        with pytest.raises(ls.QueryError):
            plain.recall(unit(0))
        with pytest.raises(ls.ValidationError):
            plain.remember("x", embedding=unit(0))


def test_embedding_dim_is_remembered_and_can_be_added(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    with ls.open(path) as store:
        AgentMemory(store).remember("before embeddings", memory_id="a")
    with ls.open(path) as store:
        mem = AgentMemory(store, embedding_dim=8)
        mem.remember("with", embedding=unit(1), memory_id="b")
    with ls.open(path) as store:
        mem = AgentMemory(store)
        assert mem.embedding_dim == 8
        assert [r.memory["memory_id"] for r in mem.recall(unit(1), k=5)] == ["b"]
        with pytest.raises(ls.SchemaError):
            AgentMemory(store, embedding_dim=4)


def test_reflections(mem: AgentMemory) -> None:
    a = mem.remember("a", memory_id="a")
    r1 = mem.reflect("What went well?", "Tea.", memory_context=[a], emotional_state={"mood": "calm"},
                     insights=["likes tea"], timestamp=1.0)
    mem.reflect("And then?", "More tea.", timestamp=2.0)
    recent = mem.recent_reflections()
    assert [r["prompt"] for r in recent] == ["And then?", "What went well?"]
    assert recent[1]["reflection_id"] == r1 and recent[1]["memory_context"] == ["a"]
    assert recent[1]["insights"] == ["likes tea"] and recent[1]["emotional_state"] == {"mood": "calm"}
    with pytest.raises(ls.ValidationError):
        mem.reflect("prompt", None)  # type: ignore[arg-type]


def test_tone_history(mem: AgentMemory) -> None:
    assert mem.current_tone() is None and mem.tone_history() == []
    mem.shift_tone("neutral", "warm", trigger_type="praise", trigger_content="thanks!", magnitude=0.4, timestamp=10)
    mem.shift_tone("warm", "terse", trigger_type="error", magnitude=0.7, timestamp=30)
    mem.shift_tone("terse", "neutral", magnitude=0.2, timestamp=20)  # recorded late: history sorts by time
    assert [s["to_tone"] for s in mem.tone_history()] == ["warm", "neutral", "terse"]
    assert mem.current_tone() == "terse"
    assert [s["to_tone"] for s in mem.tone_history(since=15)] == ["neutral", "terse"]
    assert [s["to_tone"] for s in mem.tone_history(limit=2)] == ["neutral", "terse"]
    assert mem.tone_history()[0]["trigger_content"] == "thanks!"
    with pytest.raises(ls.ValidationError):
        mem.shift_tone("", "warm")
    with pytest.raises(ls.ValidationError):
        mem.shift_tone("a", "b", magnitude=math.inf)

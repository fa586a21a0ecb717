"""The evolution-runs kit on real stores: rounds, metrics, selections, the program archive and lineage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import localstore as ls
from localstore.kits.evolution import EvolutionRuns


@pytest.fixture
def runs(tmp_path: Path) -> EvolutionRuns:
    return EvolutionRuns(ls.open(tmp_path / "evo.db"), embedding_dim=16)


def test_collections_keep_the_names_of_the_replaced_system(runs: EvolutionRuns) -> None:
    assert {"evolution_rounds", "fitness_metrics", "resource_metrics", "selection_outcomes", "programs"} <= set(
        runs.store.collections()
    )
    assert runs.programs.fields["code"].compress
    assert runs.programs.fields["embedding"].dim == 16  # type: ignore[attr-defined]


def test_rounds_start_and_end(runs: EvolutionRuns) -> None:
    runs.start_round(1, generation=0, population_size=32, mutation_rate=0.1, selection_pressure=2.0,
                     metadata={"seed": 7}, started_at=100.0)
    assert runs.get_round(1)["status"] == "running"  # type: ignore[index]
    row = runs.end_round(1, metadata={"best": 0.9}, ended_at=160.0)
    stored = runs.get_round(1)
    assert stored == row
    assert stored["status"] == "completed" and stored["ended_at"] == 160.0
    assert stored["metadata"] == {"seed": 7, "best": 0.9}
    with pytest.raises(ls.ValidationError, match="no round 2"):
        runs.end_round(2)
    with pytest.raises(ls.ValidationError, match="status"):
        runs.start_round(3, generation=0, population_size=1, mutation_rate=0, selection_pressure=1, status="odd")


def test_fitness_one_row_per_agent_and_round(runs: EvolutionRuns) -> None:
    runs.record_fitness(1, "a", 0.2, performance={"acc": 0.5}, resources={"cpu": 10})
    runs.record_fitness(1, "a", 0.4)  # a repeat replaces
    runs.record_fitness_many(1, {"b": 0.9, "c": 0.1})
    runs.record_fitness(2, "a", 0.7)
    rows = runs.fitness_of_round(1)
    assert [r["agent_id"] for r in rows] == ["b", "a", "c"]
    assert rows[1]["fitness_score"] == 0.4
    stats = runs.round_stats(1)
    assert stats["agents"] == 3 and stats["max"] == 0.9 and stats["min"] == 0.1
    assert stats["mean"] == pytest.approx((0.9 + 0.4 + 0.1) / 3)
    assert runs.round_stats(9)["agents"] == 0


def test_resources_and_selections_are_recorded(runs: EvolutionRuns) -> None:
    mid = runs.record_resources(1, "a", cpu_percent=55.0, memory_mb=512.0, network_kb=3.0, disk_kb=9.0, gpu_percent=0.0)
    runs.record_resources(1, "a", cpu_percent=60.0)
    assert runs.resources.count({"agent_id": "a"}) == 2
    assert runs.resources.get(mid)["memory_mb"] == 512.0  # type: ignore[index]
    oid = runs.record_selection(1, "p1", "c1", method="tournament", crossover_points=[3, 9], mutation_applied=True,
                                survival_reason="elite")
    row = runs.selections.get(oid)
    assert row is not None and row["crossover_points"] == [3, 9] and row["mutation_applied"] is True
    assert runs.selections.find(where={"child_id": "c1"})[0]["selection_method"] == "tournament"


def _tree(runs: EvolutionRuns) -> None:
    rng = np.random.default_rng(0)
    #   root -> a -> a1 -> a11
    #        -> b
    for pid, parent, gen, score, elite in [
        ("root", None, 0, 0.1, False), ("a", "root", 1, 0.5, True), ("b", "root", 1, 0.3, False),
        ("a1", "a", 2, 0.9, True), ("a11", "a1", 3, None, False),
    ]:
        runs.archive_program(pid, f"def {pid}(): return {gen}", generation=gen, parent_id=parent, combined_score=score,
                             correct=score is not None and score > 0.2, elite=elite, island_idx=gen % 2,
                             embedding=rng.normal(size=16), public_metrics={"score": score})


def test_archive_elites_and_best(runs: EvolutionRuns) -> None:
    _tree(runs)
    assert runs.get_program("a")["code"] == "def a(): return 1"  # type: ignore[index]
    assert [p["id"] for p in runs.elites()] == ["a1", "a"]
    assert [p["id"] for p in runs.elites(island_idx=1)] == ["a"]
    assert [p["id"] for p in runs.best_programs(3)] == ["a1", "a", "b"]
    assert [p["id"] for p in runs.best_programs(10)][-1] == "a11"  # unscored last
    assert [p["id"] for p in runs.best_programs(10, correct_only=True)] == ["a1", "a", "b"]
    runs.set_elite("a", False)
    runs.set_elite("b")
    assert [p["id"] for p in runs.elites()] == ["a1", "b"]
    with pytest.raises(ls.ValidationError):
        runs.set_elite("nope")


def test_lineage_walks_both_ways(runs: EvolutionRuns) -> None:
    _tree(runs)
    line = runs.lineage("a1")
    assert [p["id"] for p in line["ancestors"]] == ["a", "root"]
    assert [p["id"] for p in line["descendants"]] == ["a11"]
    assert [p["id"] for p in runs.lineage("root")["descendants"]] == ["a", "b", "a1", "a11"]
    runs.archive_program("x", "loop", parent_id="y")
    runs.archive_program("y", "loop", parent_id="x")  # a cycle is cut, not followed forever
    assert [p["id"] for p in runs.lineage("x")["ancestors"]] == ["y"]
    with pytest.raises(ls.ValidationError):
        runs.lineage("missing")


def test_similar_programs_by_embedding(runs: EvolutionRuns) -> None:
    _tree(runs)
    target = runs.get_program("b")["embedding"]  # type: ignore[index]
    hits = runs.similar_programs(target, k=2)
    assert hits[0].key == "b" and hits[0].distance == pytest.approx(0.0, abs=1e-6)
    assert [h.key for h in runs.similar_programs(target, k=5, where={"archived": True})] != []
    assert all(h.row["archived"] for h in runs.similar_programs(target, k=5, where={"archived": True}))


def test_reopening_keeps_the_data(tmp_path: Path) -> None:
    store = ls.open(tmp_path / "evo.db")
    EvolutionRuns(store, embedding_dim=16).archive_program("p", "code", combined_score=1.0, elite=True)
    store.close()
    with ls.open(tmp_path / "evo.db") as again:
        assert [p["id"] for p in EvolutionRuns(again, embedding_dim=16).elites()] == ["p"]
        with pytest.raises(ls.SchemaError):
            EvolutionRuns(again, embedding_dim=32)

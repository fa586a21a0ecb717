"""Evolution runs: a few rounds of a toy evolutionary search recorded with the evolution kit.

Run: python examples/kit_evolution.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import localstore as ls
from localstore.kits.evolution import EvolutionRuns


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(42)
    store = ls.open(out / "evolution.db")
    runs = EvolutionRuns(store, embedding_dim=32)  # programs.embedding is 32-d here (384 by default)

    population = {f"g0-{i}": None for i in range(8)}  # program id -> parent id
    for round_number in range(3):
        runs.start_round(round_number, generation=round_number, population_size=len(population),
                         mutation_rate=0.2, selection_pressure=1.5, metadata={"seed": 42})
        scores = {}
        for pid, parent in population.items():
            score = float(rng.uniform(0, 1)) + 0.1 * round_number  # later generations do a little better
            scores[pid] = score
            runs.archive_program(pid, f"def solve(x):\n    return x * {score:.3f}\n", generation=round_number,
                                 parent_id=parent, island_idx=int(pid.split("-")[1]) % 2, correct=score > 0.5,
                                 combined_score=score, public_metrics={"score": score},
                                 embedding=rng.normal(size=32))
            runs.record_resources(round_number, pid, cpu_percent=float(rng.uniform(10, 90)), memory_mb=256.0)
        runs.record_fitness_many(round_number, scores)
        # Keep the best half as elites; each survivor has two children in the next round.
        survivors = sorted(scores, key=scores.get, reverse=True)[: len(scores) // 2]  # type: ignore[arg-type]
        for pid in survivors:
            runs.set_elite(pid)
        population = {}
        for j, parent in enumerate(survivors):
            for c in range(2):
                child = f"g{round_number + 1}-{2 * j + c}"
                population[child] = parent
                runs.record_selection(round_number, parent, child, method="truncation",
                                      crossover_points=[c + 1], mutation_applied=True, survival_reason="top half")
        runs.end_round(round_number, metadata={"best": max(scores.values())})
        stats = runs.round_stats(round_number)
        print(f"round {round_number}: {stats['agents']} agents, mean fitness {stats['mean']:.3f}, best {stats['max']:.3f}")

    best = runs.best_programs(3)
    print("best programs:", [(p["id"], round(p["combined_score"], 3)) for p in best])
    print("elites:", len(runs.elites()), "of", runs.programs.count(), "programs")
    line = runs.lineage(best[0]["id"])
    print(f"lineage of {best[0]['id']}: ancestors {[p['id'] for p in line['ancestors']]}, "
          f"descendants {[p['id'] for p in line['descendants']]}")
    near = runs.similar_programs(best[0]["embedding"], k=3, where={"archived": True})
    print("elites nearest it by embedding:", [(h.key, round(h.distance, 3)) for h in near])
    store.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "kit-evolution-out"))

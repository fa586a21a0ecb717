"""Evolution runs: rounds, fitness and resource metrics, selection outcomes and a program archive.

The collections keep the names and fields of the systems this kit replaces, so that
the central Postgres views can show them under the same names:

- ``evolution_rounds``: round_number (key), generation, population_size, mutation_rate,
  selection_pressure, status, metadata, started_at, ended_at;
- ``fitness_metrics``: one row per (round, agent): fitness_score, performance_metrics and
  resource_usage (JSON);
- ``resource_metrics``: samples of cpu_percent, memory_mb, network_kb, disk_kb, gpu_percent;
- ``selection_outcomes``: parent_id, child_id, selection_method, crossover_points,
  mutation_applied, survival_reason;
- ``programs``: the archive: code (compressed), language, generation, parent_id, island_idx,
  correct, combined_score, public/private metrics (JSON), an embedding, and ``archived``, the
  flag for elites.

    import localstore as ls
    from localstore.kits.evolution import EvolutionRuns

    runs = EvolutionRuns(ls.open("data/evo.db"))
    runs.start_round(1, generation=0, population_size=64, mutation_rate=0.1, selection_pressure=2.0)
    runs.record_fitness(1, "agent-3", 0.82, performance={"acc": 0.9})
    runs.archive_program("p1", "def f(): ...", generation=0, combined_score=0.82, elite=True)
    runs.elites(); runs.best_programs(5); runs.lineage("p1")
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import localstore as ls

#: Dimension of the program embedding when the caller does not say (all-MiniLM-L6-v2's 384).
DEFAULT_EMBEDDING_DIM = 384

#: How many generations ``lineage`` walks up or down at most (a guard against cycles and runaway trees).
DEFAULT_LINEAGE_DEPTH = 10_000

ROUND_STATUSES = ("running", "completed", "failed", "aborted")


def _fields(embedding_dim: int) -> dict[str, dict[str, ls.Field | type[ls.Field]]]:
    return {
        "evolution_rounds": {
            "round_number": ls.Integer(),
            "generation": ls.Integer(index=True),
            "population_size": ls.Integer(),
            "mutation_rate": ls.Real(),
            "selection_pressure": ls.Real(),
            "status": ls.Text(index=True, default="running"),
            "metadata": ls.Json(default={}),
            "started_at": ls.Real(index=True),
            "ended_at": ls.Real(),
        },
        "fitness_metrics": {
            "metric_id": ls.Text(),  # "<round>/<agent>": one fitness per agent and round
            "round_number": ls.Integer(index=True),
            "agent_id": ls.Text(index=True),
            "fitness_score": ls.Real(index=True),
            "performance_metrics": ls.Json(default={}),
            "resource_usage": ls.Json(default={}),
            "recorded_at": ls.Real(),
        },
        "resource_metrics": {
            "metric_id": ls.Text(),
            "round_number": ls.Integer(index=True),
            "agent_id": ls.Text(index=True),
            "cpu_percent": ls.Real(),
            "memory_mb": ls.Real(),
            "network_kb": ls.Real(),
            "disk_kb": ls.Real(),
            "gpu_percent": ls.Real(),
            "recorded_at": ls.Real(index=True),
        },
        "selection_outcomes": {
            "outcome_id": ls.Text(),
            "round_number": ls.Integer(index=True),
            "parent_id": ls.Text(index=True),
            "child_id": ls.Text(index=True),
            "selection_method": ls.Text(),
            "crossover_points": ls.Json(default=[]),
            "mutation_applied": ls.Boolean(default=False),
            "survival_reason": ls.Text(),
            "recorded_at": ls.Real(),
        },
        "programs": {
            "id": ls.Text(),
            "code": ls.Text(compress=True),
            "language": ls.Text(index=True, default="python"),
            "generation": ls.Integer(filter=True, index=True),
            "parent_id": ls.Text(index=True),
            "island_idx": ls.Integer(filter=True, index=True),
            "correct": ls.Boolean(filter=True),
            "combined_score": ls.Real(filter=True, index=True),
            "public_metrics": ls.Json(default={}),
            "private_metrics": ls.Json(default={}),
            "embedding": ls.Vector(embedding_dim, metric="cosine"),
            "archived": ls.Boolean(filter=True, index=True, default=False),
            "created_at": ls.Real(),
        },
    }


_KEYS = {
    "evolution_rounds": "round_number",
    "fitness_metrics": "metric_id",
    "resource_metrics": "metric_id",
    "selection_outcomes": "outcome_id",
    "programs": "id",
}


class EvolutionRuns:
    """The evolution-runs kit over one store: declares its collections and records a run.

    ``embedding_dim`` fixes the dimension of ``programs.embedding`` when the collection is
    first declared; reopening a store with a different dimension raises ``SchemaError``.
    """

    def __init__(self, store: ls.Store, *, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> None:
        self.store = store
        self.embedding_dim = embedding_dim
        colls = {name: store.collection(name, key=_KEYS[name], fields=f) for name, f in _fields(embedding_dim).items()}
        self.rounds = colls["evolution_rounds"]
        self.fitness = colls["fitness_metrics"]
        self.resources = colls["resource_metrics"]
        self.selections = colls["selection_outcomes"]
        self.programs = colls["programs"]

    # -- rounds ---------------------------------------------------------------------------

    def start_round(
        self,
        round_number: int,
        *,
        generation: int,
        population_size: int,
        mutation_rate: float,
        selection_pressure: float,
        metadata: dict[str, Any] | None = None,
        status: str = "running",
        started_at: float | None = None,
    ) -> dict[str, Any]:
        """Record the start of a round (replacing any row with that number); return the row."""
        row = {
            "round_number": round_number, "generation": generation, "population_size": population_size,
            "mutation_rate": mutation_rate, "selection_pressure": selection_pressure,
            "status": _check_status(status), "metadata": metadata or {},
            "started_at": time.time() if started_at is None else started_at, "ended_at": None,
        }
        self.rounds.put(row)
        return row

    def end_round(
        self, round_number: int, *, status: str = "completed", metadata: dict[str, Any] | None = None,
        ended_at: float | None = None,
    ) -> dict[str, Any]:
        """Mark a round finished (``status``), merging ``metadata`` into its own; return the row."""
        with self.store._all_or_nothing():
            row = self.rounds.get(round_number)
            if row is None:
                raise ls.ValidationError(
                    f"evolution_rounds: no round {round_number!r} in {self.store.path}; call start_round first"
                )
            row["status"] = _check_status(status)
            row["ended_at"] = time.time() if ended_at is None else ended_at
            row["metadata"] = {**(row["metadata"] or {}), **(metadata or {})}
            self.rounds.put(row)
        return row

    def get_round(self, round_number: int) -> dict[str, Any] | None:
        """The round's row, or None."""
        return self.rounds.get(round_number)

    # -- metrics --------------------------------------------------------------------------

    def record_fitness(
        self,
        round_number: int,
        agent_id: str,
        fitness_score: float,
        *,
        performance: dict[str, Any] | None = None,
        resources: dict[str, Any] | None = None,
        recorded_at: float | None = None,
    ) -> str:
        """Record an agent's fitness in a round (one row per agent and round; a repeat replaces it)."""
        return str(self.fitness.put({
            "metric_id": f"{round_number}/{agent_id}", "round_number": round_number, "agent_id": agent_id,
            "fitness_score": fitness_score, "performance_metrics": performance or {},
            "resource_usage": resources or {}, "recorded_at": time.time() if recorded_at is None else recorded_at,
        }))

    def record_fitness_many(self, round_number: int, scores: dict[str, float]) -> int:
        """Record many agents' fitness scores of one round in one transaction; return the count."""
        now = time.time()
        return self.fitness.put_many([
            {"metric_id": f"{round_number}/{agent}", "round_number": round_number, "agent_id": agent,
             "fitness_score": score, "recorded_at": now}
            for agent, score in scores.items()
        ])

    def fitness_of_round(self, round_number: int) -> list[dict[str, Any]]:
        """The round's fitness rows, best first."""
        return self.fitness.find(where={"round_number": round_number}, order_by="-fitness_score")

    def round_stats(self, round_number: int) -> dict[str, Any]:
        """Count, mean, min and max fitness of a round (None values when it has no fitness rows)."""
        scores = [r["fitness_score"] for r in self.fitness.find(where={"round_number": round_number})]
        if not scores:
            return {"round_number": round_number, "agents": 0, "mean": None, "min": None, "max": None}
        return {"round_number": round_number, "agents": len(scores), "mean": sum(scores) / len(scores),
                "min": min(scores), "max": max(scores)}

    def record_resources(
        self,
        round_number: int,
        agent_id: str,
        *,
        cpu_percent: float | None = None,
        memory_mb: float | None = None,
        network_kb: float | None = None,
        disk_kb: float | None = None,
        gpu_percent: float | None = None,
        recorded_at: float | None = None,
        metric_id: str | None = None,
    ) -> str:
        """Record one resource sample of an agent in a round; return its id (a fresh one unless given)."""
        return str(self.resources.put({
            "metric_id": metric_id or uuid.uuid4().hex, "round_number": round_number, "agent_id": agent_id,
            "cpu_percent": cpu_percent, "memory_mb": memory_mb, "network_kb": network_kb, "disk_kb": disk_kb,
            "gpu_percent": gpu_percent, "recorded_at": time.time() if recorded_at is None else recorded_at,
        }))

    def record_selection(
        self,
        round_number: int,
        parent_id: str,
        child_id: str,
        *,
        method: str,
        crossover_points: Sequence[int] | None = None,
        mutation_applied: bool = False,
        survival_reason: str | None = None,
        outcome_id: str | None = None,
    ) -> str:
        """Record that ``parent_id`` produced ``child_id`` in a round; return the outcome's id."""
        return str(self.selections.put({
            "outcome_id": outcome_id or uuid.uuid4().hex, "round_number": round_number,
            "parent_id": parent_id, "child_id": child_id, "selection_method": method,
            "crossover_points": list(crossover_points or []), "mutation_applied": bool(mutation_applied),
            "survival_reason": survival_reason, "recorded_at": time.time(),
        }))

    # -- the program archive ------------------------------------------------------------------

    def archive_program(
        self,
        program_id: str,
        code: str,
        *,
        language: str = "python",
        generation: int = 0,
        parent_id: str | None = None,
        island_idx: int = 0,
        correct: bool = False,
        combined_score: float | None = None,
        public_metrics: dict[str, Any] | None = None,
        private_metrics: dict[str, Any] | None = None,
        embedding: Any = None,
        elite: bool = False,
        created_at: float | None = None,
    ) -> str:
        """Store a program (replacing one with the same id); ``elite=True`` sets its archive flag."""
        return str(self.programs.put({
            "id": program_id, "code": code, "language": language, "generation": generation,
            "parent_id": parent_id, "island_idx": island_idx, "correct": bool(correct),
            "combined_score": combined_score, "public_metrics": public_metrics or {},
            "private_metrics": private_metrics or {}, "embedding": embedding, "archived": bool(elite),
            "created_at": time.time() if created_at is None else created_at,
        }))

    def set_elite(self, program_id: str, elite: bool = True) -> None:
        """Set or clear a program's archive (elite) flag."""
        with self.store._all_or_nothing():
            row = self.programs.get(program_id)
            if row is None:
                raise ls.ValidationError(f"programs: no program {program_id!r} in {self.store.path}")
            row["archived"] = bool(elite)
            self.programs.put(row)

    def get_program(self, program_id: str) -> dict[str, Any] | None:
        """The program's row, or None."""
        return self.programs.get(program_id)

    def elites(self, *, island_idx: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The archived (elite) programs, best combined_score first, optionally of one island."""
        where: dict[str, Any] = {"archived": True}
        if island_idx is not None:
            where["island_idx"] = island_idx
        return self.programs.find(where=where, order_by="-combined_score", limit=limit)

    def best_programs(
        self, k: int = 10, *, correct_only: bool = False, island_idx: int | None = None,
        generation: int | None = None,
    ) -> list[dict[str, Any]]:
        """The ``k`` programs with the highest combined_score (programs without a score come last)."""
        where: dict[str, Any] = {}
        if correct_only:
            where["correct"] = True
        if island_idx is not None:
            where["island_idx"] = island_idx
        if generation is not None:
            where["generation"] = generation
        # SQLite sorts NULL below every number, so unscored programs come last when descending.
        return self.programs.find(where=where or None, order_by="-combined_score", limit=k)

    def similar_programs(self, embedding: Any, k: int = 10, *, where: dict[str, Any] | None = None) -> list[Any]:
        """Programs whose embedding is nearest ``embedding`` (cosine), as ``Hit(key, row, distance)``.

        ``where`` may use generation, island_idx, correct, combined_score and archived.
        """
        return list(self.programs.nearest("embedding", embedding, k=k, where=where))

    def lineage(self, program_id: str, *, max_depth: int = DEFAULT_LINEAGE_DEPTH) -> dict[str, list[dict[str, Any]]]:
        """A program's ancestors (parent first, up to the root) and descendants (breadth first).

        A parent that is not in the archive ends the ancestor chain; cycles are cut.
        """
        start = self.programs.get(program_id)
        if start is None:
            raise ls.ValidationError(f"programs: no program {program_id!r} in {self.store.path}")
        ancestors: list[dict[str, Any]] = []
        seen = {program_id}
        parent = start["parent_id"]
        while parent is not None and parent not in seen and len(ancestors) < max_depth:
            row = self.programs.get(parent)
            if row is None:
                break
            ancestors.append(row)
            seen.add(parent)
            parent = row["parent_id"]
        descendants: list[dict[str, Any]] = []
        frontier = [program_id]
        depth = 0
        while frontier and depth < max_depth:
            children = [r for r in self._children_of(frontier) if r["id"] not in seen]
            for r in children:
                seen.add(r["id"])
            descendants += children
            frontier = [r["id"] for r in children]
            depth += 1
        return {"ancestors": ancestors, "descendants": descendants}

    def _children_of(self, parents: Iterable[str]) -> list[dict[str, Any]]:
        parents = list(parents)
        out: list[dict[str, Any]] = []
        for i in range(0, len(parents), 500):  # keep each IN list short
            out += self.programs.find(where={"parent_id": {"in": parents[i:i + 500]}})
        return out


def _check_status(status: str) -> str:
    if status not in ROUND_STATUSES:
        raise ls.ValidationError(f"evolution_rounds.status: expected one of {', '.join(ROUND_STATUSES)}, got {status!r}")
    return status


__all__ = ["DEFAULT_EMBEDDING_DIM", "ROUND_STATUSES", "EvolutionRuns"]

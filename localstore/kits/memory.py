"""Agent memory kit: memories, reflections and tone shifts, with a scored recall.

    import localstore as ls
    from localstore.kits.memory import AgentMemory

    memory = AgentMemory(ls.open("data/agent.db"), embedding_dim=384)
    mid = memory.remember("The user prefers short answers.", type="preference", significance=0.8,
                          embedding=vector)
    memory.recall(query_embedding=vector, k=5)        # -> [Recalled(score, similarity, recency, memory)]
    memory.reflect("What went well?", "Short answers landed.", memory_context=[mid])
    memory.shift_tone("neutral", "warm", trigger_type="praise", magnitude=0.4)
    memory.tone_history()

Collections (names as the systems they replace use them): ``memories``,
``reflections``, ``tone_shifts``. Memory content is zstd-compressed (so it reaches
a central Postgres as compressed bytes); everything else is stored as is.
Timestamps are Unix seconds (UTC).

Recall scoring. Each candidate memory gets three parts, each in [0, 1]:

- similarity: ``1 - d / 2`` where ``d`` is the cosine distance (in [0, 2]) between
  the query embedding and the memory's embedding (only with ``query_embedding``);
- significance: the memory's own significance (0 to 1);
- recency: ``0.5 ** (age / half_life)``, so a memory ``half_life`` seconds old
  scores 0.5 (default half-life: one day).

The score is the weighted sum ``w_sim * similarity + w_sig * significance +
w_rec * recency`` with weights from ``weights=`` (default 0.6 / 0.25 / 0.15 with a
query, 0 / 0.6 / 0.4 without); they are divided by their sum, so a score lies in
[0, 1]. Results are exact: with a query, the nearest memories are fetched in
growing batches until no memory outside the batch could beat the k-th score (its
similarity is at most the batch's last one, and the other parts at most 1).
Memories without an embedding take part only in recalls without a query.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import localstore as ls

from ._util import finite, new_id, now, to_epoch

#: Recency half-life in seconds used by ``recall`` unless given (one day).
DEFAULT_HALF_LIFE = 86_400.0
#: Weights (similarity, significance, recency) with and without a query embedding.
DEFAULT_WEIGHTS = (0.6, 0.25, 0.15)
DEFAULT_WEIGHTS_NO_QUERY = (0.0, 0.6, 0.4)


@dataclass(frozen=True)
class Recalled:
    """One recalled memory: its total score and the parts it was made of."""

    score: float
    similarity: float | None
    significance: float
    recency: float
    memory: dict[str, Any]


class AgentMemory:
    """The agent memory kit on one store. Declares (or reopens) its collections.

    ``embedding_dim`` adds an optional cosine ``embedding`` vector to memories; None
    reuses the dimension the store holds, or declares no embedding on a new store
    (a later ``AgentMemory(store, embedding_dim=...)`` can add it).
    """

    def __init__(self, store: ls.Store, *, embedding_dim: int | None = None) -> None:
        self.store = store
        if "memories" in store:
            stored = store.collection("memories").fields.get("embedding")
            if stored is not None:
                if embedding_dim is not None and embedding_dim != stored.dim:  # type: ignore[attr-defined]
                    raise ls.SchemaError(
                        f"{store.path}: memories.embedding was declared with dim={stored.dim}, "  # type: ignore[attr-defined]
                        f"not {embedding_dim}; pass embedding_dim={stored.dim} or use another store"  # type: ignore[attr-defined]
                    )
                embedding_dim = stored.dim  # type: ignore[attr-defined]
        self.embedding_dim = embedding_dim
        fields: dict[str, ls.Field | type[ls.Field]] = {
            "memory_id": ls.Text(),
            "timestamp": ls.Real(filter=True),
            "type": ls.Text(filter=True),
            "content": ls.Text(compress=True),
            "emotional_context": ls.Json(),
            "loop_context": ls.Json(),
            "significance": ls.Real(filter=True),
            "metadata": ls.Json(default={}),
        }
        if embedding_dim is not None:
            fields["embedding"] = ls.Vector(embedding_dim, metric="cosine")
        self.memories = store.collection("memories", key="memory_id", fields=fields)
        self.reflections = store.collection("reflections", key="reflection_id", fields={
            "reflection_id": ls.Text(),
            "timestamp": ls.Real(index=True),
            "prompt": ls.Text(),                      # plain, so the central copy reads as text
            "response": ls.Text(),
            "memory_context": ls.Json(default=[]),     # ids of the memories reflected on
            "emotional_state": ls.Json(),
            "insights": ls.Json(default=[]),
        })
        self.tone_shifts = store.collection("tone_shifts", key="shift_id", fields={
            "shift_id": ls.Text(),
            "timestamp": ls.Real(index=True),
            "from_tone": ls.Text(index=True),
            "to_tone": ls.Text(index=True),
            "trigger_type": ls.Text(index=True),
            "trigger_content": ls.Text(),
            "magnitude": ls.Real(),
        })

    # -- memories -------------------------------------------------------------------------

    def remember(
        self,
        content: str,
        *,
        type: str = "episodic",
        significance: float = 0.5,
        emotional_context: Any = None,
        loop_context: Any = None,
        metadata: dict[str, Any] | None = None,
        embedding: Any = None,
        timestamp: Any = None,
        memory_id: str | None = None,
    ) -> str:
        """Store one memory; return its id (generated unless given; the same id replaces it)."""
        mid = new_id() if memory_id is None else memory_id
        if not isinstance(content, str):
            raise ls.ValidationError(f"memories[{mid!r}].content: expected text, got {content!r}")
        if not isinstance(type, str) or not type:
            raise ls.ValidationError(f"memories[{mid!r}].type: expected a non-empty string, got {type!r}")
        row: dict[str, Any] = {
            "memory_id": mid,
            "timestamp": now() if timestamp is None else to_epoch(timestamp, f"memories[{mid!r}].timestamp"),
            "type": type,
            "content": content,
            "emotional_context": emotional_context,
            "loop_context": loop_context,
            "significance": finite(significance, f"memories[{mid!r}].significance", low=0.0, high=1.0),
            "metadata": {} if metadata is None else metadata,
        }
        if embedding is not None:
            if self.embedding_dim is None:
                raise ls.ValidationError(
                    f"{self.store.path}: memories have no embedding field; open the kit with "
                    "AgentMemory(store, embedding_dim=N) to add one"
                )
            row["embedding"] = embedding
        self.memories.put(row)
        return mid

    def get(self, memory_id: str) -> dict[str, Any] | None:
        """The memory with this id, or None."""
        return self.memories.get(memory_id)

    def forget_memory(self, memory_id: str) -> bool:
        """Delete one memory; return whether it existed."""
        return self.memories.delete(memory_id)

    def recall(
        self,
        query_embedding: Any = None,
        k: int = 10,
        *,
        type: str | Sequence[str] | None = None,
        min_significance: float | None = None,
        since: Any = None,
        half_life: float = DEFAULT_HALF_LIFE,
        weights: tuple[float, float, float] | None = None,
        now_ts: Any = None,
    ) -> list[Recalled]:
        """The ``k`` best memories by the score in the module docstring, best first.

        Filters: ``type`` (one or several), ``min_significance``, ``since`` (a
        timestamp). ``now_ts`` fixes "now" for recency (default: the current time).
        Ties go to the newer memory.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ls.QueryError(f"memories: k must be a positive int, got {k!r}")
        finite(half_life, "recall half_life", low=1e-9)
        w = weights or (DEFAULT_WEIGHTS if query_embedding is not None else DEFAULT_WEIGHTS_NO_QUERY)
        if len(w) != 3 or any(finite(x, "recall weights", low=0.0) < 0 for x in w) or sum(w) <= 0:
            raise ls.QueryError(f"memories: weights must be three non-negative numbers, not all 0; got {w!r}")
        total = float(sum(w))
        w_sim, w_sig, w_rec = (x / total for x in w)
        t_now = now() if now_ts is None else to_epoch(now_ts, "recall now_ts")
        where: dict[str, Any] = {}
        if type is not None:
            where["type"] = type if isinstance(type, str) else {"in": list(type)}
        if min_significance is not None:
            where["significance"] = {">=": finite(min_significance, "recall min_significance")}
        if since is not None:
            where["timestamp"] = {">=": to_epoch(since, "recall since")}

        def part_scores(row: dict[str, Any], sim: float | None) -> Recalled:
            sig = float(row["significance"] or 0.0)
            age = max(0.0, t_now - float(row["timestamp"]))
            rec = math.pow(0.5, age / half_life)
            score = (w_sim * sim if sim is not None else 0.0) + w_sig * sig + w_rec * rec
            return Recalled(score, sim, sig, rec, row)

        def best(items: list[Recalled]) -> list[Recalled]:
            return sorted(items, key=lambda r: (-r.score, -r.memory["timestamp"]))[:k]

        if query_embedding is None:
            return best([part_scores(row, None) for row in self.memories.find(where=where or None)])
        if self.embedding_dim is None:
            raise ls.QueryError(f"{self.store.path}: memories have no embedding field, so recall cannot take a query")
        batch = max(4 * k, 64)
        while True:
            hits = self.memories.nearest("embedding", query_embedding, k=batch, where=where or None)
            scored = best([part_scores(h.row, 1.0 - h.distance / 2.0) for h in hits])
            if len(hits) < batch:
                return scored  # every candidate was seen
            bound = w_sim * (1.0 - hits[-1].distance / 2.0) + w_sig + w_rec
            if len(scored) == k and scored[-1].score >= bound:
                return scored
            batch *= 4

    # -- reflections --------------------------------------------------------------------------

    def reflect(
        self,
        prompt: str,
        response: str,
        *,
        memory_context: Sequence[str] = (),
        emotional_state: Any = None,
        insights: Sequence[Any] = (),
        timestamp: Any = None,
        reflection_id: str | None = None,
    ) -> str:
        """Store a reflection (a prompt, the agent's response, what it drew on); return its id."""
        rid = new_id() if reflection_id is None else reflection_id
        for name, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise ls.ValidationError(f"reflections[{rid!r}].{name}: expected text, got {value!r}")
        self.reflections.put({
            "reflection_id": rid,
            "timestamp": now() if timestamp is None else to_epoch(timestamp, f"reflections[{rid!r}].timestamp"),
            "prompt": prompt, "response": response, "memory_context": list(memory_context),
            "emotional_state": emotional_state, "insights": list(insights),
        })
        return rid

    def recent_reflections(self, limit: int = 10) -> list[dict[str, Any]]:
        """The newest reflections, newest first."""
        return self.reflections.find(order_by="-timestamp", limit=limit)

    # -- tone -----------------------------------------------------------------------------------

    def shift_tone(
        self,
        from_tone: str,
        to_tone: str,
        *,
        trigger_type: str | None = None,
        trigger_content: str | None = None,
        magnitude: float = 0.0,
        timestamp: Any = None,
        shift_id: str | None = None,
    ) -> str:
        """Record a change of tone; return its id."""
        sid = new_id() if shift_id is None else shift_id
        for name, value in (("from_tone", from_tone), ("to_tone", to_tone)):
            if not isinstance(value, str) or not value:
                raise ls.ValidationError(f"tone_shifts[{sid!r}].{name}: expected a non-empty string, got {value!r}")
        self.tone_shifts.put({
            "shift_id": sid,
            "timestamp": now() if timestamp is None else to_epoch(timestamp, f"tone_shifts[{sid!r}].timestamp"),
            "from_tone": from_tone, "to_tone": to_tone, "trigger_type": trigger_type,
            "trigger_content": trigger_content,
            "magnitude": finite(magnitude, f"tone_shifts[{sid!r}].magnitude"),
        })
        return sid

    def tone_history(self, *, since: Any = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Tone shifts in time order, oldest first (the newest ``limit`` when given)."""
        where = None if since is None else {"timestamp": {">=": to_epoch(since, "tone_history since")}}
        if limit is None:
            return self.tone_shifts.find(where=where, order_by="timestamp")
        return self.tone_shifts.find(where=where, order_by="-timestamp", limit=limit)[::-1]

    def current_tone(self) -> str | None:
        """The tone after the latest shift, or None if there was none."""
        last = self.tone_shifts.find(order_by="-timestamp", limit=1)
        return last[0]["to_tone"] if last else None

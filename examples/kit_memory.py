"""Agent memory kit: memories with embeddings, a scored recall, reflections and tone shifts.

Run: python examples/kit_memory.py OUT_DIR
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import localstore as ls
from localstore.kits.memory import AgentMemory

TOPICS = ["tea", "music", "geometry", "weather"]


def embed(text: str) -> np.ndarray:
    """A toy embedding: one axis per topic word, plus a little noise (use a real model in practice)."""
    v = np.array([float(t in text) for t in TOPICS] + [0.0] * 4)
    return v + np.random.default_rng(len(text)).normal(0, 0.05, 8)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    now = time.time()
    with ls.open(out / "memory.db") as store:
        memory = AgentMemory(store, embedding_dim=8)
        notes = [
            ("The user drinks green tea every morning.", "preference", 0.8, 3),
            ("We talked about music theory and geometry.", "episodic", 0.5, 1),
            ("The weather was grey; the user seemed tired.", "episodic", 0.3, 0.1),
            ("The user asked for tea recommendations.", "episodic", 0.6, 0.5),
        ]
        for text, kind, significance, days_ago in notes:
            memory.remember(text, type=kind, significance=significance, embedding=embed(text),
                            emotional_context={"valence": 0.2}, timestamp=now - days_ago * 86_400)

        # Recall: 0.6 similarity + 0.25 significance + 0.15 recency (half-life one day).
        print("recall 'tea':")
        for r in memory.recall(embed("tea"), k=2):
            print(f"  {r.score:.3f} (sim {r.similarity:.2f}, sig {r.significance:.2f}, rec {r.recency:.2f}) "
                  f"{r.memory['content']}")
        # Without a query: significance and recency only.
        top = memory.recall(k=1)[0]
        print(f"most salient overall: {top.memory['content']}")

        memory.reflect("What does the user care about?", "Tea, mostly; sometimes geometry.",
                       insights=["offer tea facts"], emotional_state={"mood": "curious"})
        memory.shift_tone("neutral", "warm", trigger_type="praise", trigger_content="thanks, that was great",
                          magnitude=0.4)
        print(f"reflections: {len(memory.recent_reflections())}, tone now: {memory.current_tone()}, "
              f"history: {[s['to_tone'] for s in memory.tone_history()]}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "kit-memory-out"))

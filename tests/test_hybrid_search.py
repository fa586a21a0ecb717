"""Hybrid search: FTS5 (BM25) and vector rankings fused by reciprocal rank fusion, with filters, freshness and errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import localstore as ls

DIM = 8
RRF_K = 60  # documented: 1/(60 + rank) summed


def declare(store: ls.Store) -> ls.Collection:
    return store.collection("docs", key="id", fields={
        "id": ls.Text(),
        "title": ls.Text(fulltext=True),
        "body": ls.Text(fulltext=True),
        "lang": ls.Text(filter=True),
        "year": ls.Integer(filter=True),
        "v": ls.Vector(DIM, metric="cosine"),
    })


@pytest.fixture
def corpus(store: ls.Store) -> Iterator[tuple[ls.Collection, np.ndarray]]:
    """60 filler documents, one matching 'zebra' only by keyword, one matching the query only by vector."""
    rng = np.random.default_rng(5)
    coll = declare(store)
    query = rng.normal(size=DIM).astype(np.float32)
    rows = []
    for i in range(60):
        v = rng.normal(size=DIM).astype(np.float32)
        v -= (v @ query) / (query @ query) * query * 1.2  # every filler leans away from the query
        rows.append({
            "id": f"doc{i:02d}", "title": f"filler number {i}", "body": "lorem ipsum dolor",
            "lang": "en" if i % 2 else "fr", "year": 2000 + i % 10, "v": v,
        })
    rows[10].update(body="a zebra crossing at night")  # keyword only; its vector is a filler
    rows[20].update(v=query)  # vector only; its text is filler
    coll.put_many(rows)
    yield coll, query


def keys(hits: list[Any]) -> list[Any]:
    return [h.key for h in hits]


def test_keyword_only_and_vector_only_documents_both_surface(corpus: tuple[ls.Collection, np.ndarray]) -> None:
    coll, query = corpus
    for k in (2, 5, 10):
        hits = coll.search(text="zebra", vector=query, k=k)
        assert len(hits) == k
        top2 = {h.key: h for h in hits[:2]}
        assert set(top2) == {"doc10", "doc20"}
        assert top2["doc10"].text_rank == 1
        assert top2["doc20"].vector_rank == 1 and top2["doc20"].text_rank is None
    for h in coll.search(text="zebra", vector=query, k=10):
        ranks = [r for r in (h.text_rank, h.vector_rank) if r is not None]
        assert ranks, h
        assert h.score == pytest.approx(sum(1.0 / (RRF_K + r) for r in ranks))
        assert h.row["id"] == h.key


def test_text_alone_and_vector_alone(corpus: tuple[ls.Collection, np.ndarray]) -> None:
    coll, query = corpus
    hits = coll.search(text="zebra", k=10)
    assert keys(hits) == ["doc10"]
    assert hits[0].text_rank == 1 and hits[0].vector_rank is None
    assert hits[0].score == pytest.approx(1 / (RRF_K + 1))
    hits = coll.search(text="zebra crossing night", k=3)
    assert keys(hits)[0] == "doc10"
    hits = coll.search(vector=query, k=5)
    assert keys(hits) == keys(coll.nearest("v", query, k=5))
    assert [h.vector_rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(h.text_rank is None for h in hits)
    assert coll.search(text="no such word anywhere", k=5) == []
    # Many keyword matches, ranked by BM25: more occurrences of the word ranks higher.
    assert len(coll.search(text="lorem", k=40)) == 40
    coll.put({"id": "lorem-heavy", "title": "lorem lorem lorem", "body": "lorem lorem", "lang": "en", "year": 2000,
              "v": -query})
    assert keys(coll.search(text="lorem", k=3))[0] == "lorem-heavy"


def test_fusion_order_is_deterministic(corpus: tuple[ls.Collection, np.ndarray], store_path: Path) -> None:
    coll, query = corpus
    calls = [
        {"text": "zebra lorem filler", "vector": query, "k": 30},
        {"text": "lorem", "k": 30},
        {"vector": query, "k": 30},
        {"text": "filler number", "vector": -query, "k": 30, "where": {"lang": "en"}},
    ]
    first = [[(h.key, h.score) for h in coll.search(**c)] for c in calls]
    assert first == [[(h.key, h.score) for h in coll.search(**c)] for c in calls]
    with ls.open(store_path) as fresh:
        other = fresh.collection("docs")
        assert first == [[(h.key, h.score) for h in other.search(**c)] for c in calls]
    with ls.open(store_path, vector_cache=False) as plain:
        other = plain.collection("docs")
        assert [[key for key, _ in hits] for hits in first] == [[h.key for h in other.search(**c)] for c in calls]
    for hits in first:
        scores = [score for _, score in hits]
        assert scores == sorted(scores, reverse=True)


def test_equal_scores_go_to_better_single_rank_then_older_row(store: ls.Store) -> None:
    """README: ties go to the better single rank, then the older row."""
    coll = declare(store)
    q = np.array([1.0] + [0.0] * (DIM - 1), dtype=np.float32)
    # Inserted first, so older, but its key sorts last: only the vector ranking has it (rank 1).
    coll.put({"id": "zz-vector", "title": "nothing", "body": "here", "lang": "en", "year": 1, "v": q})
    # Newer, key sorts first: only the text ranking has it (rank 1), no vector at all.
    coll.put({"id": "aa-text", "title": "unicorn", "body": "x", "lang": "en", "year": 1, "v": None})
    # Two more tied pairs further down: text rank 2 / vector rank 2.
    coll.put({"id": "yy-vector", "title": "nothing", "body": "here", "lang": "en", "year": 1,
              "v": q + np.array([0.0, 0.5] + [0.0] * (DIM - 2), dtype=np.float32)})
    coll.put({"id": "bb-text", "title": "unicorn unicorn", "body": "other words to lengthen it a lot", "lang": "en",
              "year": 1, "v": None})
    inserted = ["zz-vector", "aa-text", "yy-vector", "bb-text"]
    hits = coll.search(text="unicorn", vector=q, k=4)
    assert [h.score for h in hits] == pytest.approx([1 / 61, 1 / 61, 1 / 62, 1 / 62])
    text_order = keys(coll.search(text="unicorn", k=2))
    assert sorted(text_order) == ["aa-text", "bb-text"]
    assert keys(coll.search(vector=q, k=2)) == ["zz-vector", "yy-vector"]
    expected = sorted(["zz-vector", text_order[0]], key=inserted.index) + sorted(
        ["yy-vector", text_order[1]], key=inserted.index
    )
    assert keys(hits) == expected
    for _ in range(3):
        assert keys(coll.search(text="unicorn", vector=q, k=4)) == keys(hits)


def test_where_applies_to_both_rankings(corpus: tuple[ls.Collection, np.ndarray]) -> None:
    coll, query = corpus
    # doc10 (keyword) and doc20 (vector) are both "fr": an "en" filter must drop both.
    hits = coll.search(text="zebra lorem", vector=query, k=20, where={"lang": "en"})
    assert len(hits) == 20
    assert all(h.row["lang"] == "en" for h in hits)
    assert not {"doc10", "doc20"} & set(keys(hits))
    assert coll.search(text="zebra", k=5, where={"lang": "en"}) == []
    hits = coll.search(text="zebra", vector=query, k=5, where={"lang": "fr", "year": {">=": 2000}})
    assert set(keys(hits)[:2]) == {"doc10", "doc20"}
    assert all(h.row["lang"] == "fr" for h in hits)
    hits = coll.search(vector=query, k=60, where={"year": 2005})
    assert sorted(keys(hits)) == sorted(r["id"] for r in coll.find({"year": 2005}))
    hits = coll.search(text="lorem", k=60, where={"year": {"in": [2001, 2003]}, "lang": {"!=": "fr"}})
    assert sorted(keys(hits)) == sorted(r["id"] for r in coll.find({"year": {"in": [2001, 2003]}, "lang": "en"}))
    with pytest.raises(ls.QueryError, match="title"):
        coll.search(text="zebra", k=5, where={"title": "x"})
    with pytest.raises(ls.QueryError, match="title"):
        coll.search(vector=query, k=5, where={"title": "x"})


def test_where_none_semantics_in_search(store: ls.Store) -> None:
    coll = declare(store)
    q = np.ones(DIM, dtype=np.float32)
    coll.put({"id": "a", "title": "apple", "body": "", "lang": None, "year": None, "v": q})
    coll.put({"id": "b", "title": "apple", "body": "", "lang": "en", "year": 2001, "v": q * 2})
    assert keys(coll.search(text="apple", vector=q, k=5, where={"lang": None})) == ["a"]
    assert keys(coll.search(text="apple", vector=q, k=5, where={"lang": {"!=": None}})) == ["b"]
    assert keys(coll.search(text="apple", vector=q, k=5, where={"year": {"<": 3000}})) == ["b"]


NASTY = [
    '"', '""', "'", "NEAR(", "NEAR(zebra crossing", "NEAR(zebra crossing, 2)", "*", "zeb*", "-", "-zebra",
    "zebra -crossing", "AND", "OR", "NOT", "zebra AND", "AND zebra", "zebra OR", "zebra NOT night", "(", ")",
    "(zebra", "zebra)", ":", "title:zebra", "body : zebra", "{title body}: zebra", "^zebra", "zebra^", "+zebra",
    '"zebra', 'zebra"', '"zebra crossing"', "zebra\"; DROP TABLE docs; --", "\\", "%", "_", "\x00", "zebra\x00",
    "   ", "", "ünïcödé ☃ 漢字", "🦓 zebra", "a" * 5000,
]


@pytest.mark.parametrize("text", NASTY, ids=[repr(t)[:30] for t in NASTY])
def test_fts_syntax_in_text_cannot_break_the_query(corpus: tuple[ls.Collection, np.ndarray], text: str) -> None:
    coll, query = corpus
    hits = coll.search(text=text, k=5)
    assert isinstance(hits, list)
    expected = re.search(r"zebra|crossing|night", text.lower()) is not None
    assert ("doc10" in keys(hits)) == expected
    hybrid = coll.search(text=text, vector=query, k=10)
    assert "doc20" in keys(hybrid)
    assert coll.count() == 60


def test_search_sees_writes_deletes_and_rollbacks(corpus: tuple[ls.Collection, np.ndarray], store: ls.Store) -> None:
    coll, query = corpus
    row = coll.get("doc10")
    coll.put({**row, "body": "now about giraffes"})
    assert coll.search(text="zebra", k=5) == []
    assert keys(coll.search(text="giraffes", k=5)) == ["doc10"]
    with pytest.raises(RuntimeError), store.transaction():
        coll.put({**row, "body": "zebra again", "v": -query})
        coll.delete("doc20")
        assert keys(coll.search(text="zebra", k=5)) == ["doc10"]
        raise RuntimeError("roll back")
    assert coll.search(text="zebra", k=5) == []
    assert keys(coll.search(vector=query, k=1)) == ["doc20"]
    coll.delete("doc20")
    assert "doc20" not in keys(coll.search(text="lorem", vector=query, k=60))
    coll.put({**row, "title": None, "body": None})
    assert "doc10" not in keys(coll.search(text="giraffes filler number", k=60))
    with ls.open(store.path) as fresh:
        assert "doc10" not in keys(fresh.collection("docs").search(text="giraffes filler number", k=60))
    before = [(h.key, h.score) for h in coll.search(text="lorem filler", vector=query, k=30)]
    store.reindex()
    assert [(h.key, h.score) for h in coll.search(text="lorem filler", vector=query, k=30)] == before
    assert store.verify().ok


def test_large_k(corpus: tuple[ls.Collection, np.ndarray]) -> None:
    coll, query = corpus
    assert len(coll.search(text="lorem", k=4096)) == 59  # doc10's body has no "lorem"
    assert len(coll.search(text="lorem", vector=query, k=1024)) == 60


@pytest.mark.parametrize("k", [1025, 4096])
def test_vector_search_accepts_k_up_to_4096(corpus: tuple[ls.Collection, np.ndarray], k: int) -> None:
    coll, query = corpus
    assert len(coll.search(vector=query, k=k)) == 60
    assert len(coll.search(text="lorem", vector=query, k=k)) == 60
    assert len(coll.search(text="lorem", k=k)) == 59


def test_search_argument_errors(corpus: tuple[ls.Collection, np.ndarray], store: ls.Store) -> None:
    coll, query = corpus
    with pytest.raises(ls.QueryError, match="docs"):
        coll.search(k=5)
    with pytest.raises(ls.QueryError, match="docs"):
        coll.search(text=b"zebra", k=5)  # type: ignore[arg-type]
    with pytest.raises(ls.QueryError):
        coll.search(text="zebra", k=0)
    with pytest.raises(ls.QueryError):
        coll.search(text="zebra", k=4097)
    with pytest.raises(ls.ValidationError, match="docs.v"):
        coll.search(text="zebra", vector=[1.0, 2.0], k=5)
    with pytest.raises(ls.ValidationError, match="docs.v"):
        coll.search(vector=[float("nan")] * DIM, k=5)
    with pytest.raises(ls.QueryError, match="docs"):
        coll.search(text="zebra", vector=query, k=5, field="title")
    plain = store.collection("plain", key="id", fields={"id": ls.Integer(), "a": ls.Vector(4), "b": ls.Vector(4)})
    plain.put({"id": 1, "a": [1, 0, 0, 0], "b": [0, 1, 0, 0]})
    with pytest.raises(ls.QueryError, match="fulltext"):
        plain.search(text="anything", k=5)
    with pytest.raises(ls.QueryError, match="field="):
        plain.search(vector=[1, 0, 0, 0], k=5)
    assert keys(plain.search(vector=[1, 0, 0, 0], k=5, field="b")) == [1]


@pytest.mark.parametrize(
    "field",
    [ls.Integer(fulltext=True), ls.Real(fulltext=True), ls.Boolean(fulltext=True), ls.Json(fulltext=True),
     ls.Blob(fulltext=True), ls.Array(fulltext=True), ls.Vector(4, fulltext=True)],
    ids=["Integer", "Real", "Boolean", "Json", "Blob", "Array", "Vector"],
)
def test_fulltext_on_non_text_field_is_a_schema_error(store: ls.Store, field: ls.Field) -> None:
    with pytest.raises(ls.SchemaError, match="fulltext") as info:
        store.collection("bad", key="id", fields={"id": ls.Text(), "f": field})
    assert "bad.f" in str(info.value)
    assert "bad" not in store.collections()


def test_fulltext_with_encrypt_is_refused(store: ls.Store) -> None:
    with pytest.raises((ls.SchemaError, ls.NotYetSupportedError)) as info:
        store.collection("secret", key="id", fields={"id": ls.Text(), "notes": ls.Text(fulltext=True, encrypt=True)})
    assert "secret.notes" in str(info.value)
    assert "secret" not in store.collections()
    with pytest.raises((ls.SchemaError, ls.NotYetSupportedError)):
        store.collection("secret", key="id", fields={
            "id": ls.Text(), "notes": ls.Text(fulltext=True, encrypt=True, compress=True),
        })
    assert "secret" not in store.collections()

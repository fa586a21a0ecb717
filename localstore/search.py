"""Full-text indexes (SQLite FTS5, BM25) and hybrid ranking by reciprocal rank fusion.

A collection whose Text fields include ``fulltext=True`` gets one FTS5 table
holding those fields, keyed by the row's rowid and kept in step with the rows
in the same transaction. ``Collection.search`` fuses the BM25 ranking with the
vector ranking: each candidate scores the sum of ``1 / (RRF_K + rank)`` over
the rankings it appears in; equal scores go to the better single rank, then the
lower rowid (the older row for Text keys), so the order is deterministic.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, NamedTuple

from ._sqlite import quote
from .virtual import VirtualIndex

if TYPE_CHECKING:
    import apsw

    from .schema import CollectionSchema

#: The constant of reciprocal rank fusion (Cormack et al. use 60): larger flattens the ranks.
DEFAULT_RRF_K = 60

#: How deep each ranking goes before fusion, as a multiple of k (at least DEFAULT_FUSION_MIN).
DEFAULT_FUSION_DEPTH = 4
DEFAULT_FUSION_MIN = 50

_WORD = re.compile(r"\w+", re.UNICODE)


class SearchHit(NamedTuple):
    """One result of a hybrid search: the key, the row, the fused score and each ranking's rank (1-based)."""

    key: Any
    row: dict[str, Any]
    score: float
    text_rank: int | None
    vector_rank: int | None


def fts_table(collection: str) -> str:
    """The quoted name of a collection's FTS5 table."""
    return quote(f"_ls_fts.{collection}")


def match_expression(text: str) -> str | None:
    """An FTS5 query matching any word of ``text``, each word quoted (no FTS syntax gets through)."""
    words = _WORD.findall(text)
    if not words:
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


class FullTextIndex(VirtualIndex):
    """The FTS5 index over a collection's ``fulltext=True`` fields."""

    def __init__(self, schema: CollectionSchema) -> None:
        self.schema = schema
        self.fields = [n for n, f in schema.fields.items() if f.fulltext]
        order = [schema.key] + [n for n in schema.fields if n != schema.key]
        self.positions = [order.index(n) for n in self.fields]
        self.table = fts_table(schema.name)
        cols = ", ".join(["rowid", *(quote(n) for n in self.fields)])
        self.sql_insert = f"INSERT INTO {self.table}({cols}) VALUES({', '.join('?' for _ in range(len(self.fields) + 1))})"
        self.sql_delete = f"DELETE FROM {self.table} WHERE rowid = ?"

    def ddl(self) -> str:
        """The CREATE VIRTUAL TABLE statement."""
        cols = ", ".join(quote(n) for n in self.fields)
        return f"CREATE VIRTUAL TABLE IF NOT EXISTS {self.table} USING fts5({cols}, tokenize='unicode61')"

    def rebuild(self, db: apsw.Connection) -> int:
        """Recreate the index from the row table; return the rows indexed."""
        self.drop(db)
        self.create(db)
        cols = ", ".join(quote(n) for n in self.fields)
        present = " OR ".join(f"{quote(n)} IS NOT NULL" for n in self.fields)
        db.execute(
            f"INSERT INTO {self.table}(rowid, {cols}) SELECT rowid, {cols} FROM {self.schema.table} WHERE {present}"
        )
        return int(db.changes())

    def insert(self, db: apsw.Connection, rowids: list[int], bindings: list[tuple[Any, ...]]) -> None:
        """Add entries for rows just written; their old entries are already deleted."""
        pos = self.positions
        inserts = [
            (rowid, *(b[p] for p in pos))
            for rowid, b in zip(rowids, bindings)
            if any(b[p] is not None for p in pos)
        ]
        if inserts:
            db.executemany(self.sql_insert, inserts)

    def delete(self, db: apsw.Connection, rowids: list[int]) -> None:
        """Remove the entries of deleted rows."""
        db.executemany(self.sql_delete, [(r,) for r in rowids])

    def rank(
        self, db: apsw.Connection, text: str, limit: int, condition: str = "", params: list[Any] | None = None
    ) -> list[int]:
        """Row ids matching ``text`` by BM25, best first (ties by rowid), restricted by a row-table condition."""
        expression = match_expression(text)
        if expression is None:
            return []
        sql = f"SELECT rowid FROM {self.table} WHERE {self.table} MATCH ?"
        if condition:
            sql += f" AND rowid IN (SELECT rowid FROM {self.schema.table} WHERE {condition})"
        sql += f" ORDER BY bm25({self.table}), rowid LIMIT ?"
        return [int(r[0]) for r in db.execute(sql, [expression, *(params or []), limit])]


def fuse(rankings: list[list[int]], rrf_k: int = DEFAULT_RRF_K) -> list[tuple[int, float, list[int | None]]]:
    """Reciprocal rank fusion of several rankings of row ids.

    Returns (rowid, score, ranks) best first; ``ranks[i]`` is the 1-based rank in
    ranking ``i`` or None. Equal scores keep a fixed order: by best single rank, then rowid.
    """
    scores: dict[int, float] = {}
    ranks: dict[int, list[int | None]] = {}
    for i, ranking in enumerate(rankings):
        for position, rowid in enumerate(ranking, start=1):
            scores[rowid] = scores.get(rowid, 0.0) + 1.0 / (rrf_k + position)
            ranks.setdefault(rowid, [None] * len(rankings))[i] = position
    order = sorted(scores, key=lambda r: (-scores[r], min(x for x in ranks[r] if x is not None), r))
    return [(r, scores[r], ranks[r]) for r in order]

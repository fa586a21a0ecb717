"""The derived indexes of a collection (vec0 per Vector field, one FTS5 table), managed together.

They hold nothing the row table does not: each can be dropped and rebuilt from
the rows at any time (``store.reindex()``), and every write through the API
updates them in the same transaction as the row, except that a vec0 index leaves
rows above its high-water rowid to a bulk catch-up before its next read (see
``vectors.py``). FTS5 entries are always written with the row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._sqlite import quote
from .fields import Vector
from .search import FullTextIndex
from .vectors import NO_HIGH_WATER, VectorIndex, filter_fields

if TYPE_CHECKING:
    import apsw

    from .schema import CollectionSchema


class DerivedIndexes:
    """All vec0 and FTS5 indexes of one collection."""

    def __init__(self, schema: CollectionSchema) -> None:
        self.schema = schema
        self.filters = filter_fields(schema)
        self.vectors = {n: VectorIndex(schema, n) for n, f in schema.fields.items() if isinstance(f, Vector)}
        self.fulltext = FullTextIndex(schema) if any(f.fulltext for f in schema.fields.values()) else None
        #: The fields whose change reaches an index: vectors, their filters, full-text fields.
        self.indexed_fields = frozenset([*self.vectors, *(self.filters if self.vectors else ()),
                                         *(self.fulltext.fields if self.fulltext is not None else ())])

    @property
    def empty(self) -> bool:
        """Whether the collection has no derived index."""
        return not self.vectors and self.fulltext is None

    def ensure(self, db: apsw.Connection, previous: CollectionSchema | None) -> None:
        """Create missing indexes; rebuild those whose shape changed since ``previous``."""
        for name in self.filters:
            # Filters also run as SQL over the row table (for the in-memory scan and search).
            sql_index = quote(f"_ls_ix.{self.schema.name}.{name}")
            db.execute(f"CREATE INDEX IF NOT EXISTS {sql_index} ON {self.schema.table}({quote(name)})")
        old = DerivedIndexes(previous) if previous is not None else None
        for name, index in self.vectors.items():
            existing = old.vectors.get(name) if old else None
            if existing is None:
                index.create(db)
                if old is not None:
                    index.rebuild(db)
            elif existing.ddl() != index.ddl():
                index.rebuild(db)
        if self.fulltext is not None:
            if old is None or old.fulltext is None:
                self.fulltext.create(db)
                if old is not None:
                    self.fulltext.rebuild(db)
            elif old.fulltext.ddl() != self.fulltext.ddl():
                self.fulltext.rebuild(db)

    def write(self, db: apsw.Connection, rowids: list[int], bindings: list[tuple[Any, ...]], old_max: int) -> None:
        """Update every index for rows just written; rows with rowid > ``old_max`` were inserted, not replaced.

        ``old_max`` is the largest rowid before the write, or ``NO_HIGH_WATER`` when the
        caller cannot tell new rows from replaced ones (then every row may have entries).
        """
        if len(set(rowids)) != len(rowids):
            # The same key written twice in one batch: only its last version is indexed.
            last = {r: i for i, r in enumerate(rowids)}
            keep = sorted(last.values())
            rowids, bindings = [rowids[i] for i in keep], [bindings[i] for i in keep]
        if not rowids:
            return
        if self.fulltext is not None:
            replaced = [(r,) for r in rowids if r <= old_max]
            if replaced:
                db.executemany(self.fulltext.sql_delete, replaced)
            self.fulltext.insert(db, rowids, bindings)
        lowest = min(rowids)
        for index in self.vectors.values():
            through = index.high_water(db)
            if through is None:
                # An index kept row by row so far is complete up to old_max: defer from there on.
                through = old_max
                if old_max < NO_HIGH_WATER:
                    index.set_high_water(db, old_max)
            if lowest > through:
                continue  # all fresh rows above W: the next catch-up indexes them in bulk
            now = [i for i, r in enumerate(rowids) if r <= through]
            ids, rows = [rowids[i] for i in now], [bindings[i] for i in now]
            replaced = [(r,) for r in ids if r <= old_max]
            if replaced:
                db.executemany(index.sql_delete, replaced)
            index.insert(db, ids, rows)

    def delete(self, db: apsw.Connection, rowids: list[int]) -> None:
        """Remove deleted rows from every index (a vec0 index holds none of the rows above its W)."""
        if self.fulltext is not None:
            self.fulltext.delete(db, rowids)
        for index in self.vectors.values():
            through = index.indexed_through(db)
            gone = rowids if through >= NO_HIGH_WATER else [r for r in rowids if r <= through]
            if gone:
                index.delete(db, gone)

    def catch_up(self, db: apsw.Connection) -> int:
        """Index the rows waiting above each vec0 index's W (inside a write transaction); return how many."""
        return sum(index.catch_up(db) for index in self.vectors.values())

    def rebuild(self, db: apsw.Connection) -> dict[str, int]:
        """Rebuild every index from the rows; return the rows indexed per index."""
        out = {}
        for name, index in self.vectors.items():
            out[f"vec:{name}"] = index.rebuild(db)
        if self.fulltext is not None:
            out["fts"] = self.fulltext.rebuild(db)
        return out

    def fragmented(self, db: apsw.Connection) -> bool:
        """Whether any vec0 index keeps many deleted slots (sqlite-vec does not reuse them)."""
        for index in self.vectors.values():
            chunks = index.table[:-1] + '_chunks"'
            row = db.execute(f"SELECT coalesce(sum(size), 0) FROM {chunks}").fetchone()
            live = db.execute(f"SELECT count(*) FROM {index.table}").fetchone()
            capacity, count = int(row[0] if row else 0), int(live[0] if live else 0)
            # A partly filled last chunk is normal; flag when over a chunk and a quarter is dead.
            if capacity - count > max(1024, capacity // 4):
                return True
        return False

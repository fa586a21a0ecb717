"""The derived indexes of a collection (vec0 per Vector field, one FTS5 table), managed together.

They hold nothing the row table does not: each can be dropped and rebuilt from
the rows at any time (``store.reindex()``), and every write through the API
updates them in the same transaction as the row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._sqlite import quote
from .fields import Vector
from .search import FullTextIndex
from .vectors import VectorIndex, filter_fields

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

    @property
    def empty(self) -> bool:
        """Whether the collection has no derived index."""
        return not self.vectors and self.fulltext is None

    def _all(self) -> list[Any]:
        return [*self.vectors.values(), *([self.fulltext] if self.fulltext else [])]

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
        """Update every index for rows just written; rows with rowid > ``old_max`` were inserted, not replaced."""
        if len(set(rowids)) != len(rowids):
            # The same key written twice in one batch: only its last version is indexed.
            last = {r: i for i, r in enumerate(rowids)}
            keep = sorted(last.values())
            rowids, bindings = [rowids[i] for i in keep], [bindings[i] for i in keep]
        replaced = [(r,) for r in rowids if r <= old_max]
        for index in self._all():
            if replaced:
                db.executemany(index.sql_delete, replaced)
            index.insert(db, rowids, bindings)

    def delete(self, db: apsw.Connection, rowids: list[int]) -> None:
        """Remove deleted rows from every index."""
        for index in self._all():
            index.delete(db, rowids)

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

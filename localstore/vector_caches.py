"""The in-memory vector matrices of one store: built on demand, patched at commit, dropped when stale.

A ``Store`` owns one ``VectorCaches``. Writes inside a transaction queue their
vector changes (``note``); the store applies them once the transaction commits
(``apply``) and drops them on rollback. A commit by another connection changes
SQLite's ``data_version``, and every matrix is then reloaded from the rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._sqlite import quote, scalar
from .fields import Vector
from .knn import VectorCache

if TYPE_CHECKING:
    from .collection import Collection
    from .store import Store

#: How a vector cache holds each filter field type.
FILTER_KINDS = {"Text": "text", "Integer": "int", "Boolean": "int", "Real": "real"}

#: One queued change: (collection, field, [(rowid, stored vector or None, filter values), ...]).
Delta = tuple[str, str, list[tuple[int, Any, Any]]]


class VectorCaches:
    """The vector caches of one store, keyed by (collection, field)."""

    def __init__(self, store: Store, enabled: bool) -> None:
        self.store = store
        self.enabled = enabled
        self.caches: dict[tuple[str, str], VectorCache] = {}
        self.data_version: int | None = None

    def note(self, collection: str, field_name: str, changes: list[tuple[int, Any, Any]]) -> None:
        """Queue vector writes of the current transaction, if that field has a cache to patch."""
        tx = self.store._tx
        if tx is not None and (collection, field_name) in self.caches:
            tx.vector_deltas.append((collection, field_name, changes))

    def apply(self, deltas: list[Delta]) -> None:
        """Patch the caches with the changes of a committed transaction."""
        for collection, field_name, changes in deltas:
            cache = self.caches.get((collection, field_name))
            if cache is not None:
                cache.apply(changes)

    def clear(self) -> None:
        """Forget every cache (they are rebuilt on next use)."""
        self.caches.clear()

    def get(self, collection: Collection, field_name: str) -> VectorCache | None:
        """The matrix of a vector field, loaded or refreshed as needed; None when caching is off."""
        if not self.enabled:
            return None
        db = self.store._db
        version = scalar(db, "PRAGMA data_version")
        if version != self.data_version:
            # Another connection committed: any cached matrix may be stale.
            self.caches.clear()
            self.data_version = version
        key = (collection.name, field_name)
        spec = collection.fields[field_name]
        filters = collection._derived.filters
        cache = self.caches.get(key)
        if cache is None or cache.spec != (spec.spec(), tuple(filters)):
            assert isinstance(spec, Vector)
            cache = VectorCache(spec.metric, spec.dim, {n: FILTER_KINDS[collection.fields[n].type_name] for n in filters})
            cols = ", ".join(quote(n) for n in [field_name, *filters])
            rows = db.execute(
                f"SELECT rowid, {cols} FROM {collection.schema.table} WHERE {quote(field_name)} IS NOT NULL ORDER BY rowid"
            ).fetchall()
            cache.load([int(r[0]) for r in rows], [r[1] for r in rows], [r[2:] for r in rows])  # type: ignore[arg-type, misc]
            cache.spec = (spec.spec(), tuple(filters))
            self.caches[key] = cache
        return cache

"""Exact nearest-neighbour search over an in-memory copy of a vector field.

sqlite-vec's brute-force scan is exact but runs several times slower than a BLAS
matrix-vector product over the same float32 matrix. ``VectorCache`` keeps that
matrix in memory for one (collection, field), with the collection's
``filter=True`` columns beside it: built from the row table on first use, patched
by every commit made through the same store object, and rebuilt when another
connection commits (SQLite's ``data_version`` tells). Filters are evaluated on
those columns before ranking, with SQL's NULL semantics, so a filtered query
costs no more than an unfiltered one and returns exactly ``min(k, matching)``.

Ranking runs in float32 through BLAS; a margin of candidates is then rescored in
float64 with the metric's direct formula, so the order and distances are exact.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Rows of the matrix scored per step by the L1 scan (which has no BLAS form).
DEFAULT_L1_CHUNK = 8_192

#: Candidates rescored in float64 per wanted hit (plus 16), so float32 ranking stays exact.
DEFAULT_RESCORE = 2

_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq, "==": operator.eq, "!=": operator.ne,
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}


def _member(values: np.ndarray, wanted: Sequence[Any], dtype: Any) -> np.ndarray:
    """``values`` in ``wanted``: a few comparisons for short lists (np.isin sorts, which costs more)."""
    if len(wanted) <= 8:
        out = np.zeros(len(values), dtype=bool)
        for w in wanted:
            out |= values == w
        return out
    return np.isin(values, np.asarray(wanted, dtype=dtype))


class FilterColumn:
    """One filter field's values by slot: text as integer codes, numbers as int64 or float64, with a null mask."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "text", "int" or "real"
        self.dtype = {"text": np.int64, "int": np.int64, "real": np.float64}[kind]
        self.values = np.zeros(0, dtype=self.dtype)
        self.null = np.zeros(0, dtype=bool)
        self.codes: dict[Any, int] = {}
        self.texts: list[Any] = []

    def _code(self, value: Any) -> int:
        code = self.codes.get(value)
        if code is None:
            code = self.codes[value] = len(self.texts)
            self.texts.append(value)
        return code

    def put(self, slots: slice, values: Sequence[Any]) -> None:
        """Store ``values`` (stored encodings, None for NULL) at ``slots``."""
        self.null[slots] = [v is None for v in values]
        if self.kind == "text":
            self.values[slots] = [-1 if v is None else self._code(v) for v in values]
        else:
            self.values[slots] = [0 if v is None else v for v in values]

    def resize(self, capacity: int, size: int) -> None:
        """Grow the arrays to ``capacity`` keeping the first ``size`` slots."""
        for name, dtype in (("values", self.dtype), ("null", bool)):
            new = np.zeros(capacity, dtype=dtype)
            new[:size] = getattr(self, name)[:size]
            setattr(self, name, new)

    def keep(self, slots: np.ndarray) -> None:
        """Keep only ``slots``, in order (compaction)."""
        self.values, self.null = self.values[slots], self.null[slots]

    def test(self, op: str, value: Any, size: int) -> np.ndarray:
        """The slots where ``column op value`` holds, as SQL would decide (NULL never matches a comparison)."""
        values, null = self.values[:size], self.null[:size]
        if op in ("in", "not in"):
            wanted = list(value)
            has_null = any(v is None for v in wanted)
            wanted = [v for v in wanted if v is not None]
            if self.kind == "text":
                wanted = [self.codes[v] for v in wanted if v in self.codes]
            hit = _member(values, wanted, self.dtype) & ~null
            if op == "in":
                return hit | null if has_null else hit
            return ~hit & ~null
        if value is None:
            return null.copy() if op in ("=", "==") else ~null
        compare = _COMPARE[op]
        if self.kind == "text":
            if op in ("=", "=="):
                code = self.codes.get(value)
                return (values == code) & ~null if code is not None else np.zeros(size, dtype=bool)
            allowed = [c for text, c in self.codes.items() if compare(text, value)]
            return _member(values, allowed, np.int64) & ~null
        return np.asarray(compare(values, value)) & ~null


class VectorCache:
    """An in-memory float32 matrix of one vector field and its filter columns, addressable by row id."""

    def __init__(self, metric: str, dim: int, filters: dict[str, str] | None = None) -> None:
        self.metric = metric
        self.dim = dim
        self.matrix = np.zeros((0, dim), dtype=np.float32)
        self.rowids = np.zeros(0, dtype=np.int64)
        self.alive = np.zeros(0, dtype=bool)
        self.columns = {name: FilterColumn(kind) for name, kind in (filters or {}).items()}
        self.size = 0
        self.dead = 0
        self.slot: dict[int, int] = {}
        self.spec: Any = None
        self.center = np.zeros(dim, dtype=np.float32)

    # -- building and patching --------------------------------------------------------------

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        """Turn vectors into the form scored: unit rows for cosine, sqrt(p) for Fisher-Rao."""
        if self.metric == "cosine":
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            np.maximum(norms, 1e-30, out=norms)
            return np.asarray(vectors / norms, dtype=vectors.dtype)
        if self.metric == "fisher_rao":
            return np.asarray(np.sqrt(np.maximum(vectors, 0)), dtype=vectors.dtype)
        if self.metric == "l2":
            # Centring keeps ||m||² - 2q·m free of cancellation when all vectors share an offset.
            return np.asarray(vectors - self.center.astype(vectors.dtype), dtype=vectors.dtype)
        return vectors

    def load(self, rowids: Sequence[int], blobs: Sequence[bytes], filter_rows: Sequence[Sequence[Any]] = ()) -> None:
        """Replace the contents with these rows: stored float32 bytes and filter values (in column order)."""
        self.size = self.dead = 0
        self.slot = {}
        self.matrix = np.zeros((0, self.dim), dtype=np.float32)
        self.rowids = np.zeros(0, dtype=np.int64)
        self.alive = np.zeros(0, dtype=bool)
        for column in self.columns.values():
            column.resize(0, 0)
        if blobs and self.metric == "l2":
            raw = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), self.dim)
            self.center = raw.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.apply([(r, b, f) for r, b, f in zip(rowids, blobs, filter_rows or [()] * len(blobs))])

    def apply(self, changes: Sequence[tuple[int, bytes | None, Sequence[Any] | None]]) -> None:
        """Apply committed writes in order: (rowid, stored vector bytes, filter values), or (rowid, None, None)."""
        latest: dict[int, tuple[bytes, Sequence[Any]]] = {}
        for rowid, blob, filters in changes:
            slot = self.slot.pop(rowid, None)
            if slot is not None and self.alive[slot]:
                self.alive[slot] = False
                self.dead += 1
            latest.pop(rowid, None)
            if blob is not None:
                latest[rowid] = (blob, filters or ())
        if latest:
            count = len(latest)
            rows = np.frombuffer(b"".join(b for b, _ in latest.values()), dtype="<f4").reshape(count, self.dim)
            start = self.size
            self._grow(count)
            span = slice(start, start + count)
            self.matrix[span] = self._prepare(rows.astype(np.float32))
            self.rowids[span] = list(latest)
            self.alive[span] = True
            for i, column in enumerate(self.columns.values()):
                column.put(span, [f[i] if i < len(f) else None for _, f in latest.values()])
            for i, rowid in enumerate(latest):
                self.slot[rowid] = start + i
            self.size += count
        if self.dead > 1024 and self.dead > self.size // 4:
            self._compact()

    def _grow(self, extra: int) -> None:
        need = self.size + extra
        if need <= len(self.matrix):
            return
        capacity = max(need, int(len(self.matrix) * 1.5) + 1024)
        matrix = np.zeros((capacity, self.dim), dtype=np.float32)
        matrix[: self.size] = self.matrix[: self.size]
        rowids = np.zeros(capacity, dtype=np.int64)
        rowids[: self.size] = self.rowids[: self.size]
        alive = np.zeros(capacity, dtype=bool)
        alive[: self.size] = self.alive[: self.size]
        self.matrix, self.rowids, self.alive = matrix, rowids, alive
        for column in self.columns.values():
            column.resize(capacity, self.size)

    def _compact(self) -> None:
        keep = np.flatnonzero(self.alive[: self.size])
        self.matrix = np.ascontiguousarray(self.matrix[keep])
        self.rowids = self.rowids[keep]
        for column in self.columns.values():
            column.keep(keep)
        self.size = len(keep)
        self.alive = np.ones(self.size, dtype=bool)
        self.dead = 0
        self.slot = {int(r): i for i, r in enumerate(self.rowids.tolist())}

    @property
    def count(self) -> int:
        """The number of live vectors."""
        return self.size - self.dead

    # -- search ---------------------------------------------------------------------------------

    def where_mask(self, conditions: Sequence[tuple[str, str, Any]]) -> np.ndarray:
        """The live slots meeting every (field, op, stored value) condition."""
        mask = self.alive[: self.size].copy()
        for name, op, value in conditions:
            mask &= self.columns[name].test(op, value, self.size)
        return mask

    def distances(self, queries: np.ndarray) -> np.ndarray:
        """Float32 distances (for ranking) from each query to every slot: shape (len(queries), size)."""
        m = self.matrix[: self.size]
        if self.metric in ("cosine", "fisher_rao"):
            dots = self._prepare(queries) @ m.T
            return np.negative(dots, out=dots)  # same order as the metric; exact values come from rescoring
        if self.metric == "l2":
            return np.asarray(np.einsum("ij,ij->i", m, m)[None, :] - 2.0 * (self._prepare(queries) @ m.T))
        out = np.empty((len(queries), self.size), dtype=np.float32)
        for start in range(0, self.size, DEFAULT_L1_CHUNK):
            block = m[start : start + DEFAULT_L1_CHUNK]
            out[:, start : start + len(block)] = np.abs(block[None, :, :] - queries[:, None, :]).sum(axis=2)
        return out

    def rescore(self, rowids: Sequence[int], blobs: Sequence[bytes], query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``k`` nearest of these stored float32 rows to one query, all in float64, ties by rowid.

        No float32 step (the matrix's centring included), so a row's distance does not
        depend on which other rows are scored with it. Uses the metric only, not the matrix.
        """
        if not rowids:
            return []
        rows = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), self.dim).astype(np.float64)
        probe = np.asarray(query, dtype=np.float64)[None, :]
        exact = self._exact(self._prepare_exact(rows), self._prepare_exact(probe)[0])
        ids = np.asarray(rowids, dtype=np.int64)
        order = np.lexsort((ids, exact))[:k]
        return [(int(ids[i]), float(exact[i])) for i in order]

    def _prepare_exact(self, vectors: np.ndarray) -> np.ndarray:
        """``_prepare`` without the centring: in float64 an L2 difference loses nothing."""
        return vectors if self.metric == "l2" else self._prepare(vectors)

    def _exact(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Distances from prepared float64 ``rows`` to one prepared float64 query, by the metric's formula."""
        if self.metric == "cosine":
            norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(query)
            return np.asarray(1.0 - (rows @ query) / np.where(norms > 0, norms, 1.0))
        if self.metric == "fisher_rao":
            # rows and query hold sqrt(p). 2·arccos(Σ√p√q) equals 4·arcsin(|√p - √q| / 2) for
            # unit vectors; the chord form keeps its precision near 0, where arccos loses it.
            chord = np.sqrt(np.einsum("ij,ij->i", rows - query, rows - query))
            return np.asarray(4.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0)))
        diff = rows - query
        if self.metric == "l2":
            return np.asarray(np.sqrt(np.einsum("ij,ij->i", diff, diff)))
        return np.asarray(np.abs(diff).sum(axis=1))

    def search(self, queries: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[list[tuple[int, float]]]:
        """The ``k`` nearest (rowid, distance) per query among ``mask`` (default: all live), nearest first.

        Ranking runs in float32 over every slot; a margin of candidates is rescored in
        float64 so rounding cannot reorder the results or blur the distances. With a
        mask, the best slots overall are over-fetched in proportion to how selective the
        mask is; if enough of them pass it, the true nearest passing slots are among them
        (every passing slot outside is farther), else the passing slots are ranked alone.
        """
        queries = np.atleast_2d(queries).astype(np.float32, copy=False)
        if mask is None and self.dead:
            mask = self.alive[: self.size]
        allowed = self.size if mask is None else int(np.count_nonzero(mask))
        if not allowed or k <= 0:
            return [[] for _ in range(len(queries))]
        ranking = self.distances(queries)
        prepared = self._prepare(queries.astype(np.float64))
        want = min(k, allowed)
        margin = want * DEFAULT_RESCORE + 16
        need = min(allowed, margin)
        candidates: np.ndarray | None = None
        results: list[list[tuple[int, float]]] = []
        for qi in range(len(queries)):
            dist = ranking[qi]
            slots = None
            if mask is None:
                take = min(self.size, margin)
                slots = np.argpartition(dist, take - 1)[:take] if take < self.size else np.arange(self.size)
            else:
                take = int(margin * 2 * self.size / allowed)
                if take < self.size // 4:
                    top = np.argpartition(dist, take - 1)[:take]
                    top = top[mask[top]]
                    if len(top) >= need:
                        slots = top
                if slots is None:
                    if candidates is None:
                        candidates = np.flatnonzero(mask)
                    sub = dist[candidates]
                    take = min(len(sub), margin)
                    top = np.argpartition(sub, take - 1)[:take] if take < len(sub) else np.arange(len(sub))
                    slots = candidates[top]
            exact = self._exact(self.matrix[slots].astype(np.float64), prepared[qi])
            rowids = self.rowids[slots]
            order = np.lexsort((rowids, exact))[:want]
            results.append([(int(rowids[i]), float(exact[i])) for i in order])
        return results

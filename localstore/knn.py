"""Exact nearest-neighbour search over an in-memory copy of a vector field.

sqlite-vec's brute-force scan is exact but runs about 8x slower than a BLAS
matrix-vector product over the same float32 matrix. ``VectorCache`` keeps that
matrix in memory for one (collection, field): built from the row table on first
use, patched by every commit made through the same store object, and rebuilt
when another connection commits (SQLite's ``data_version`` tells). Results are
exact: the scoring is the metric itself, and L2 candidates are rescored with the
direct difference to undo the rounding of the ||x||² - 2x·q + ||q||² expansion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Rows of the matrix scored per step by the L1 scan (which has no BLAS form).
DEFAULT_L1_CHUNK = 8_192

#: Candidates rescored in float64 per wanted hit (plus 16), so float32 ranking stays exact.
DEFAULT_RESCORE = 2


class VectorCache:
    """An in-memory float32 matrix of one vector field, addressable by row id."""

    def __init__(self, metric: str, dim: int) -> None:
        self.metric = metric
        self.dim = dim
        self.matrix = np.zeros((0, dim), dtype=np.float32)
        self.rowids = np.zeros(0, dtype=np.int64)
        self.alive = np.zeros(0, dtype=bool)
        self.sq_norms = np.zeros(0, dtype=np.float32)
        self.size = 0
        self.dead = 0
        self.slot: dict[int, int] = {}

    # -- building and patching --------------------------------------------------------------

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        """Turn stored vectors into the form scored: unit rows for cosine, sqrt(p) for Fisher-Rao."""
        if self.metric == "cosine":
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            np.maximum(norms, np.float32(1e-30), out=norms)
            return (vectors / norms).astype(np.float32, copy=False)
        if self.metric == "fisher_rao":
            return np.sqrt(np.maximum(vectors, 0, dtype=np.float32), dtype=np.float32)
        return vectors

    def load(self, rowids: np.ndarray, blobs: Sequence[bytes]) -> None:
        """Replace the contents with these rows (stored float32 bytes)."""
        n = len(blobs)
        raw = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(n, self.dim) if n else np.zeros((0, self.dim), np.float32)
        self.matrix = np.ascontiguousarray(self._prepare(raw.astype(np.float32, copy=False)))
        self.rowids = np.asarray(rowids, dtype=np.int64)
        self.alive = np.ones(n, dtype=bool)
        self.sq_norms = np.einsum("ij,ij->i", self.matrix, self.matrix) if self.metric == "l2" else np.zeros(0, np.float32)
        self.size = n
        self.dead = 0
        self.slot = {int(r): i for i, r in enumerate(self.rowids.tolist())}

    def apply(self, changes: Sequence[tuple[int, bytes | None]]) -> None:
        """Apply committed writes in order: (rowid, stored vector bytes) or (rowid, None) for removal."""
        appended: list[tuple[int, bytes]] = []
        for rowid, blob in changes:
            slot = self.slot.pop(rowid, None)
            if slot is not None and self.alive[slot]:
                self.alive[slot] = False
                self.dead += 1
            if blob is not None:
                appended.append((rowid, blob))
        if appended:
            # A rowid written twice in one batch keeps only its last vector.
            last = {r: b for r, b in appended}
            rows = np.frombuffer(b"".join(last.values()), dtype="<f4").reshape(len(last), self.dim)
            prepared = self._prepare(rows.astype(np.float32))
            start = self.size
            self._grow(len(last))
            self.matrix[start : start + len(last)] = prepared
            self.rowids[start : start + len(last)] = list(last)
            self.alive[start : start + len(last)] = True
            if self.metric == "l2":
                self.sq_norms[start : start + len(last)] = np.einsum("ij,ij->i", prepared, prepared)
            for i, rowid in enumerate(last):
                self.slot[rowid] = start + i
            self.size += len(last)
        if self.dead > 1024 and self.dead > self.size // 4:
            self._compact()

    def _grow(self, extra: int) -> None:
        need = self.size + extra
        if need <= len(self.matrix):
            return
        capacity = max(need, int(len(self.matrix) * 1.5) + 1024)
        for name, dtype in (("matrix", np.float32), ("rowids", np.int64), ("alive", bool), ("sq_norms", np.float32)):
            old = getattr(self, name)
            shape = (capacity, self.dim) if name == "matrix" else (capacity,)
            new = np.zeros(shape, dtype=dtype)
            new[: min(len(old), self.size)] = old[: self.size]
            setattr(self, name, new)

    def _compact(self) -> None:
        keep = np.flatnonzero(self.alive[: self.size])
        self.matrix = np.ascontiguousarray(self.matrix[keep])
        self.rowids = self.rowids[keep]
        self.sq_norms = self.sq_norms[keep] if self.metric == "l2" else self.sq_norms
        self.size = len(keep)
        self.alive = np.ones(self.size, dtype=bool)
        self.dead = 0
        self.slot = {int(r): i for i, r in enumerate(self.rowids.tolist())}

    @property
    def count(self) -> int:
        """The number of live vectors."""
        return self.size - self.dead

    # -- search ---------------------------------------------------------------------------------

    def mask_for(self, allowed_rowids: np.ndarray | None) -> np.ndarray:
        """The live slots, restricted to ``allowed_rowids`` when given."""
        live = self.alive[: self.size].copy()
        if allowed_rowids is not None:
            live &= np.isin(self.rowids[: self.size], allowed_rowids, assume_unique=False)
        return live

    def distances(self, queries: np.ndarray) -> np.ndarray:
        """Distances from each query (rows of ``queries``) to every slot: shape (len(queries), size)."""
        m = self.matrix[: self.size]
        if self.metric in ("cosine", "fisher_rao"):
            q = self._prepare(queries)
            dots = q @ m.T
            if self.metric == "cosine":
                return 1.0 - dots
            return 2.0 * np.arccos(np.clip(dots, -1.0, 1.0))
        if self.metric == "l2":
            dots = queries @ m.T
            q2 = np.einsum("ij,ij->i", queries, queries)[:, None]
            sq = self.sq_norms[: self.size][None, :] - 2.0 * dots + q2
            return np.sqrt(np.maximum(sq, 0.0))
        out = np.empty((len(queries), self.size), dtype=np.float32)
        for start in range(0, self.size, DEFAULT_L1_CHUNK):
            block = m[start : start + DEFAULT_L1_CHUNK]
            out[:, start : start + len(block)] = np.abs(block[None, :, :] - queries[:, None, :]).sum(axis=2)
        return out

    def _exact(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Distances from prepared float64 ``rows`` to one prepared query, computed directly."""
        if self.metric == "cosine":
            norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(query)
            cos = (rows @ query) / np.where(norms > 0, norms, 1.0)
            return np.asarray(1.0 - cos)
        if self.metric == "fisher_rao":
            # rows and query hold sqrt(p): Σ√p√q is the Bhattacharyya coefficient.
            return np.asarray(2.0 * np.arccos(np.clip(rows @ query, -1.0, 1.0)))
        diff = rows - query
        if self.metric == "l2":
            return np.asarray(np.sqrt(np.einsum("ij,ij->i", diff, diff)))
        return np.asarray(np.abs(diff).sum(axis=1))

    def search(
        self, queries: np.ndarray, k: int, allowed_rowids: np.ndarray | None = None
    ) -> list[list[tuple[int, float]]]:
        """The ``k`` nearest (rowid, distance) per query, nearest first, ties by rowid."""
        queries = np.atleast_2d(queries).astype(np.float32, copy=False)
        mask = self.mask_for(allowed_rowids)
        candidates = np.flatnonzero(mask)
        results: list[list[tuple[int, float]]] = []
        if not len(candidates) or k <= 0:
            return [[] for _ in range(len(queries))]
        whole = len(candidates) == self.size
        dist_all = self.distances(queries)
        prepared = self._prepare(queries).astype(np.float64)
        for qi in range(len(queries)):
            dist = dist_all[qi] if whole else dist_all[qi, candidates]
            want = min(k, len(dist))
            # Rank in float32, then rescore a margin of candidates in float64 so that
            # rounding cannot reorder the results or blur the distances returned.
            take = min(len(dist), want * DEFAULT_RESCORE + 16)
            top = np.argpartition(dist, take - 1)[:take] if take < len(dist) else np.arange(len(dist))
            slots = top if whole else candidates[top]
            d = self._exact(self.matrix[slots].astype(np.float64), prepared[qi])
            rowids = self.rowids[slots]
            order = np.lexsort((rowids, d))[:want]
            results.append([(int(rowids[i]), float(d[i])) for i in order])
        return results


def as_rowid_array(rowids: Any) -> np.ndarray:
    """A sorted int64 array of row ids."""
    return np.unique(np.asarray(list(rowids), dtype=np.int64))

"""Kernel geometry kit: one row per kernel, its basin, metrics, evolution counts and lineage.

    import localstore as ls
    from localstore.kits.kernels import KernelGeometry

    kernels = KernelGeometry(ls.open("data/kernel-7.db"), dim=64, metric="fisher_rao")
    kernels.save_kernel_snapshot("k1", basin_coordinates=p, phi=0.8, kappa=64.0, regime="geometric")
    kernels.update_kernel_metrics("k1", phi=0.82, success_delta=1)
    kernels.find_similar_basins(p, k=5, where={"regime": "geometric"})
    kernels.lineage("k1")             # ancestors and descendants, cycle-safe

Collections: ``kernel_geometry`` (the fields below, names as the systems it replaces
use them) and ``kernel_lineage`` (one row per parent -> child edge, kept in step by
the kit so that descendants are found by an index lookup instead of a scan).
Timestamps are Unix seconds (UTC); datetimes and ISO 8601 strings are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import localstore as ls

from ._util import finite, now, to_epoch

COLLECTION = "kernel_geometry"
LINEAGE_COLLECTION = "kernel_lineage"
#: The regimes a kernel may be in.
REGIMES = ("linear", "geometric", "breakdown")
#: Basin dimensions the kit supports (an E8 root is 8-d; the full basin is 64-d).
DIMS = (8, 64)
METRICS = ("fisher_rao", "cosine")
#: E8 has 240 roots: primitive_root is an index 0..239.
E8_ROOTS = 240
DEFAULT_DIM = 64
DEFAULT_METRIC = "fisher_rao"

_TEXT_FIELDS = ("god_name", "domain", "element_group", "ecological_niche", "target_function", "breeding_target")
_COUNT_FIELDS = ("generation", "success_count", "failure_count")


def kernel_fields(dim: int, metric: str) -> dict[str, ls.Field | type[ls.Field]]:
    """The ``kernel_geometry`` schema for a basin of ``dim`` dimensions ranked by ``metric``."""
    return {
        "kernel_id": ls.Text(),
        "god_name": ls.Text(filter=True),
        "domain": ls.Text(filter=True),
        "primitive_root": ls.Integer(filter=True),
        "parent_kernels": ls.Json(default=[]),
        "basin_coordinates": ls.Vector(dim, metric=metric),
        "phi": ls.Real(filter=True),
        "kappa": ls.Real(filter=True),
        "regime": ls.Text(filter=True),
        "generation": ls.Integer(filter=True, default=0),
        "success_count": ls.Integer(default=0),
        "failure_count": ls.Integer(default=0),
        "element_group": ls.Text(index=True),
        "ecological_niche": ls.Text(index=True),
        "target_function": ls.Text(),
        "valence": ls.Real(),
        "breeding_target": ls.Text(),
        "spawned_at": ls.Real(index=True),
    }


@dataclass
class Lineage:
    """A kernel's relatives: ids mapped to their distance in generations (parents are 1)."""

    kernel_id: str
    ancestors: dict[str, int] = field(default_factory=dict)
    descendants: dict[str, int] = field(default_factory=dict)
    #: Ancestors named in ``parent_kernels`` that have no row in the store.
    missing: set[str] = field(default_factory=set)
    #: Whether the kernel is its own ancestor (a loop in parent_kernels). Other loops are walked safely too.
    cyclic: bool = False


class KernelGeometry:
    """The kernel geometry kit on one store. Declares (or reopens) its collections.

    ``dim`` (8 or 64) and ``metric`` (``"fisher_rao"`` or ``"cosine"``) fix the
    basin field when the collection is first declared; None reuses what the store
    holds, or 64 and ``fisher_rao`` for a new store. A value that contradicts the
    stored schema raises ``SchemaError``.
    """

    def __init__(self, store: ls.Store, *, dim: int | None = None, metric: str | None = None) -> None:
        self.store = store
        stored = store.collection(COLLECTION).fields["basin_coordinates"] if COLLECTION in store else None
        if stored is not None:
            for name, given, have in (("dim", dim, stored.dim), ("metric", metric, stored.metric)):  # type: ignore[attr-defined]
                if given is not None and given != have:
                    raise ls.SchemaError(
                        f"{store.path}: {COLLECTION}.basin_coordinates was declared with {name}={have!r}, "
                        f"not {given!r}; use another store or pass {name}={have!r}"
                    )
            dim, metric = stored.dim, stored.metric  # type: ignore[attr-defined]
        dim = DEFAULT_DIM if dim is None else dim
        metric = DEFAULT_METRIC if metric is None else metric
        if dim not in DIMS:
            raise ls.SchemaError(f"{COLLECTION}: basin dim must be one of {DIMS}, got {dim!r}")
        if metric not in METRICS:
            raise ls.SchemaError(f"{COLLECTION}: basin metric must be one of {METRICS}, got {metric!r}")
        self.dim, self.metric = dim, metric
        self.kernels = store.collection(COLLECTION, key="kernel_id", fields=kernel_fields(dim, metric))
        self.edges = store.collection(LINEAGE_COLLECTION, key="edge_id", fields={
            "edge_id": ls.Text(),                    # JSON [parent, child]
            "parent_id": ls.Text(index=True),
            "child_id": ls.Text(index=True),
        })

    # -- writes -------------------------------------------------------------------------

    def save_kernel_snapshot(
        self,
        kernel_id: str,
        *,
        basin_coordinates: Any,
        phi: float | None = None,
        kappa: float | None = None,
        regime: str | None = None,
        god_name: str | None = None,
        domain: str | None = None,
        primitive_root: int | None = None,
        parent_kernels: Iterable[str] = (),
        generation: int = 0,
        success_count: int = 0,
        failure_count: int = 0,
        element_group: str | None = None,
        ecological_niche: str | None = None,
        target_function: str | None = None,
        valence: float | None = None,
        breeding_target: str | None = None,
        spawned_at: Any = None,
    ) -> str:
        """Write the whole row of a kernel (replacing any earlier snapshot); return its id.

        ``spawned_at`` defaults to now for a new kernel and is kept for an existing one.
        """
        with self.store._all_or_nothing():
            old = self.kernels.get(kernel_id)
            if spawned_at is None:
                spawned_at = old["spawned_at"] if old is not None and old["spawned_at"] is not None else now()
            row = {
                "kernel_id": kernel_id, "basin_coordinates": basin_coordinates, "phi": phi, "kappa": kappa,
                "regime": regime, "god_name": god_name, "domain": domain, "primitive_root": primitive_root,
                "parent_kernels": parent_kernels, "generation": generation, "success_count": success_count,
                "failure_count": failure_count, "element_group": element_group,
                "ecological_niche": ecological_niche, "target_function": target_function, "valence": valence,
                "breeding_target": breeding_target, "spawned_at": spawned_at,
            }
            self._put(row, old)
        return kernel_id

    def update_kernel_metrics(
        self, kernel_id: str, /, *, success_delta: int = 0, failure_delta: int = 0, **changes: Any
    ) -> dict[str, Any]:
        """Change some fields of a kernel (read, modify, write in one transaction); return the new row.

        ``changes`` may name any field but ``kernel_id`` (typically phi, kappa, regime,
        generation, basin_coordinates); ``success_delta`` and ``failure_delta`` add to
        the counts, so concurrent writers never lose an increment.
        """
        if "kernel_id" in changes:
            raise ls.ValidationError(f"{COLLECTION}: update_kernel_metrics cannot change kernel_id")
        unknown = sorted(set(changes) - set(self.kernels.fields))
        if unknown:
            raise ls.ValidationError(
                f"{COLLECTION}: unknown field(s) {', '.join(unknown)}; fields are {', '.join(self.kernels.fields)}"
            )
        for name, delta in (("success_delta", success_delta), ("failure_delta", failure_delta)):
            if isinstance(delta, bool) or not isinstance(delta, int):
                raise ls.ValidationError(f"{COLLECTION}: {name} must be an int, got {delta!r}")
        with self.store._all_or_nothing():
            old = self.kernels.get(kernel_id)
            if old is None:
                raise ls.ValidationError(
                    f"{self.store.path}: no kernel {kernel_id!r} in {COLLECTION}; save_kernel_snapshot it first"
                )
            row = {**old, **changes}
            row["success_count"] = (row["success_count"] or 0) + success_delta
            row["failure_count"] = (row["failure_count"] or 0) + failure_delta
            self._put(row, old)
        return row

    def _put(self, row: dict[str, Any], old: dict[str, Any] | None) -> None:
        """Validate the kit's rules, then write the row and its lineage edges (inside a transaction)."""
        kid = row["kernel_id"]
        if not isinstance(kid, str) or not kid:
            raise ls.ValidationError(f"{COLLECTION}: kernel_id must be a non-empty string, got {kid!r}")
        where = f"{COLLECTION}[{kid!r}]"
        if row["regime"] is not None and row["regime"] not in REGIMES:
            raise ls.ValidationError(f"{where}.regime: expected one of {', '.join(REGIMES)}, got {row['regime']!r}")
        root = row["primitive_root"]
        if root is not None and (isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < E8_ROOTS):
            raise ls.ValidationError(f"{where}.primitive_root: expected an E8 root index 0..239, got {root!r}")
        for name in ("phi", "kappa", "valence"):
            if row[name] is not None:
                row[name] = finite(row[name], f"{where}.{name}")
        for name in _COUNT_FIELDS:
            if isinstance(row[name], bool) or not isinstance(row[name], int) or row[name] < 0:
                raise ls.ValidationError(f"{where}.{name}: expected a non-negative int, got {row[name]!r}")
        row["spawned_at"] = to_epoch(row["spawned_at"], f"{where}.spawned_at")
        parents = row["parent_kernels"]
        if isinstance(parents, str) or not isinstance(parents, Iterable):
            raise ls.ValidationError(f"{where}.parent_kernels: expected a list of kernel ids, got {parents!r}")
        parents = list(dict.fromkeys(parents))
        if not all(isinstance(p, str) and p for p in parents):
            raise ls.ValidationError(f"{where}.parent_kernels: every parent must be a non-empty string, got {parents!r}")
        row["parent_kernels"] = parents
        self.kernels.put(row)
        before = set(old["parent_kernels"] or []) if old is not None else set()
        if before != set(parents):
            self.edges.delete_many(self.edges.keys(where={"child_id": kid}))
            self.edges.put_many(
                [{"edge_id": json.dumps([p, kid]), "parent_id": p, "child_id": kid} for p in parents]
            )

    def delete(self, kernel_id: str) -> bool:
        """Delete a kernel and the edges to its parents; return whether it existed.

        Edges from it to its children stay, so its descendants keep naming it as a parent.
        """
        with self.store._all_or_nothing():
            self.edges.delete_many(self.edges.keys(where={"child_id": kernel_id}))
            return self.kernels.delete(kernel_id)

    # -- reads --------------------------------------------------------------------------

    def get(self, kernel_id: str) -> dict[str, Any] | None:
        """The kernel's row, or None."""
        return self.kernels.get(kernel_id)

    def find_similar_basins(
        self, basin: Any, k: int = 10, where: dict[str, Any] | None = None, *, exclude: Sequence[str] = ()
    ) -> list[Any]:
        """The ``k`` kernels whose basin is nearest ``basin``, as ``Hit(key, row, distance)``, nearest first.

        ``where`` may use god_name, domain, primitive_root, phi, kappa, regime and
        generation, with the operators of ``find``. ``exclude`` leaves out kernel ids
        (e.g. the query kernel itself). Distances are the basin metric's.
        """
        if exclude:
            where = dict(where or {})
            if "kernel_id" in where:
                raise ls.QueryError(f"{COLLECTION}: give kernel ids to leave out through exclude=, not where")
            hits = self.kernels.nearest("basin_coordinates", basin, k=k + len(exclude), where=where or None)
            dropped = set(exclude)
            return [h for h in hits if h.key not in dropped][:k]
        return list(self.kernels.nearest("basin_coordinates", basin, k=k, where=where))

    def children(self, kernel_id: str) -> list[str]:
        """The ids of the kernels that name this one as a parent."""
        return [e["child_id"] for e in self.edges.find(where={"parent_id": kernel_id})]

    def lineage(self, kernel_id: str, *, max_depth: int | None = None) -> Lineage:
        """The kernel's ancestors and descendants, breadth first, each at its shortest distance.

        Cycle-safe: each kernel is visited once (``cyclic`` says whether the kernel is its own ancestor).
        ``max_depth`` stops after that many generations each way (None: no limit).
        """
        if self.kernels.get(kernel_id) is None:
            raise ls.ValidationError(f"{self.store.path}: no kernel {kernel_id!r} in {COLLECTION}")
        out = Lineage(kernel_id)
        # Ancestors: follow parent_kernels, one generation per get_many.
        frontier, seen, depth = [kernel_id], {kernel_id}, 0
        while frontier and (max_depth is None or depth < max_depth):
            depth += 1
            rows = self.kernels.get_many(frontier)
            step: list[str] = []
            for kid, row in zip(frontier, rows):
                if row is None:
                    continue
                for parent in row["parent_kernels"] or []:
                    if parent in seen:
                        out.cyclic = out.cyclic or parent == kernel_id
                        continue
                    seen.add(parent)
                    out.ancestors[parent] = depth
                    step.append(parent)
            missing = [p for p, r in zip(step, self.kernels.get_many(step)) if r is None]
            out.missing.update(missing)
            frontier = step
        # Descendants: follow the edge index, one generation per query.
        frontier, seen, depth = [kernel_id], {kernel_id}, 0
        while frontier and (max_depth is None or depth < max_depth):
            depth += 1
            step = []
            for edge in self.edges.find(where={"parent_id": {"in": frontier}}):
                child = edge["child_id"]
                if child in seen:
                    out.cyclic = out.cyclic or child == kernel_id
                    continue
                seen.add(child)
                out.descendants[child] = depth
                step.append(child)
            frontier = step
        return out

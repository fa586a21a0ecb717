"""The kernel geometry kit on real stores: snapshots, metric updates, similar basins, lineage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import localstore as ls
from localstore.kits.kernels import COLLECTION, KernelGeometry


def basin(seed: int, dim: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(dim))


@pytest.fixture
def kit(store: ls.Store) -> KernelGeometry:
    return KernelGeometry(store)


def test_snapshot_round_trip_with_every_field(kit: KernelGeometry) -> None:
    kit.save_kernel_snapshot(
        "k1", basin_coordinates=basin(1), phi=0.8, kappa=64.2, regime="geometric", god_name="zeus",
        domain="sky", primitive_root=239, parent_kernels=["k0"], generation=3, success_count=2,
        failure_count=1, element_group="air", ecological_niche="apex", target_function="storm",
        valence=-0.5, breeding_target="stability", spawned_at="2026-01-02T03:04:05Z",
    )
    row = kit.get("k1")
    assert row is not None
    assert row["god_name"] == "zeus" and row["primitive_root"] == 239 and row["parent_kernels"] == ["k0"]
    assert (row["generation"], row["success_count"], row["failure_count"]) == (3, 2, 1)
    assert row["spawned_at"] == 1767323045.0
    assert row["basin_coordinates"].shape == (64,)
    assert np.allclose(row["basin_coordinates"], basin(1), atol=1e-6)
    assert set(kit.kernels.fields) >= {"element_group", "ecological_niche", "target_function", "valence",
                                       "breeding_target", "spawned_at", "kappa"}


def test_resave_keeps_spawned_at(kit: KernelGeometry) -> None:
    kit.save_kernel_snapshot("k1", basin_coordinates=basin(1), spawned_at=100.0)
    kit.save_kernel_snapshot("k1", basin_coordinates=basin(2), phi=0.3)
    assert kit.get("k1")["spawned_at"] == 100.0  # type: ignore[index]


@pytest.mark.parametrize("bad", [
    {"regime": "chaotic"}, {"primitive_root": 240}, {"primitive_root": -1}, {"primitive_root": True},
    {"phi": float("nan")}, {"parent_kernels": "k0"}, {"parent_kernels": [1]}, {"generation": -1},
    {"basin_coordinates": basin(1, 8)},
])
def test_bad_snapshots_are_refused_and_write_nothing(kit: KernelGeometry, bad: dict) -> None:
    args = {"basin_coordinates": basin(1), **bad}
    with pytest.raises(ls.ValidationError):
        kit.save_kernel_snapshot("k1", **args)
    assert kit.get("k1") is None and kit.edges.count() == 0


def test_update_metrics_is_read_modify_write(kit: KernelGeometry) -> None:
    kit.save_kernel_snapshot("k1", basin_coordinates=basin(1), phi=0.1, regime="linear", god_name="hera")
    row = kit.update_kernel_metrics("k1", phi=0.9, kappa=63.0, regime="breakdown", success_delta=2, failure_delta=1)
    assert row["phi"] == 0.9 and row["success_count"] == 2
    kit.update_kernel_metrics("k1", success_delta=1)
    stored = kit.get("k1")
    assert stored is not None
    assert (stored["phi"], stored["kappa"], stored["regime"], stored["god_name"]) == (0.9, 63.0, "breakdown", "hera")
    assert (stored["success_count"], stored["failure_count"]) == (3, 1)


def test_update_metrics_errors_leave_the_row(kit: KernelGeometry) -> None:
    kit.save_kernel_snapshot("k1", basin_coordinates=basin(1), phi=0.1)
    with pytest.raises(ls.ValidationError, match="no kernel"):
        kit.update_kernel_metrics("nope", phi=0.5)
    with pytest.raises(ls.ValidationError, match="unknown field"):
        kit.update_kernel_metrics("k1", psi=0.5)
    with pytest.raises(ls.ValidationError, match="regime"):
        kit.update_kernel_metrics("k1", phi=0.7, regime="weird")
    with pytest.raises(ls.ValidationError):
        kit.update_kernel_metrics("k1", kernel_id="k2")
    assert kit.get("k1")["phi"] == 0.1  # type: ignore[index]


@pytest.mark.parametrize("metric", ["fisher_rao", "cosine"])
@pytest.mark.parametrize("dim", [8, 64])
def test_find_similar_basins_is_exact_and_filtered(tmp_path: Path, dim: int, metric: str) -> None:
    with ls.open(tmp_path / "k.db") as store:
        kit = KernelGeometry(store, dim=dim, metric=metric)
        basins = np.random.default_rng(7).dirichlet(np.ones(dim), size=60)
        for i, b in enumerate(basins):
            kit.save_kernel_snapshot(f"k{i}", basin_coordinates=b, phi=i / 60,
                                     regime=["linear", "geometric", "breakdown"][i % 3])
        q = basins[10]
        hits = kit.find_similar_basins(q, k=5, where={"regime": "geometric", "phi": {">": 0.2}})
        assert len(hits) == 5
        assert all(h.row["regime"] == "geometric" and h.row["phi"] > 0.2 for h in hits)
        cand = [i for i in range(60) if i % 3 == 1 and i / 60 > 0.2]
        if metric == "fisher_rao":
            d = [2 * np.arccos(np.clip(np.sum(np.sqrt(q * basins[i])), -1, 1)) for i in cand]
        else:
            d = [1 - q @ basins[i] / np.linalg.norm(q) / np.linalg.norm(basins[i]) for i in cand]
        expected = [f"k{cand[j]}" for j in np.argsort(d)[:5]]
        assert [h.key for h in hits] == expected
        assert kit.find_similar_basins(q, k=1)[0].key == "k10"
        assert kit.find_similar_basins(q, k=1, exclude=["k10"])[0].key != "k10"


def test_dim_and_metric_are_checked_and_remembered(tmp_path: Path) -> None:
    with pytest.raises(ls.SchemaError):
        KernelGeometry(ls.open(tmp_path / "a.db"), dim=32)
    with pytest.raises(ls.SchemaError):
        KernelGeometry(ls.open(tmp_path / "b.db"), metric="l2")
    with ls.open(tmp_path / "c.db") as store:
        KernelGeometry(store, dim=8, metric="cosine")
    with ls.open(tmp_path / "c.db") as store:
        again = KernelGeometry(store)
        assert (again.dim, again.metric) == (8, "cosine")
        with pytest.raises(ls.SchemaError, match="dim=8"):
            KernelGeometry(store, dim=64)
        assert store.collection(COLLECTION).fields["basin_coordinates"].dim == 8  # type: ignore[attr-defined]


def test_lineage_ancestors_descendants_and_missing(kit: KernelGeometry) -> None:
    #   a   ghost
    #   |  /
    #   b       c (parents a)
    #   |  \   /
    #   d    e
    tree = {"a": [], "b": ["a", "ghost"], "c": ["a"], "d": ["b"], "e": ["b", "c"]}
    for i, (kid, parents) in enumerate(tree.items()):
        kit.save_kernel_snapshot(kid, basin_coordinates=basin(i), parent_kernels=parents)
    lin = kit.lineage("e")
    assert lin.ancestors == {"b": 1, "c": 1, "a": 2, "ghost": 2}
    assert lin.missing == {"ghost"} and lin.descendants == {} and not lin.cyclic
    lin = kit.lineage("a")
    assert lin.descendants == {"b": 1, "c": 1, "d": 2, "e": 2} and lin.ancestors == {}
    assert kit.lineage("a", max_depth=1).descendants == {"b": 1, "c": 1}
    assert sorted(kit.children("b")) == ["d", "e"]
    # Re-parenting moves the edges.
    kit.update_kernel_metrics("e", parent_kernels=["d"])
    assert kit.lineage("e").ancestors == {"d": 1, "b": 2, "a": 3, "ghost": 3}
    assert sorted(kit.children("b")) == ["d"]


def test_lineage_is_cycle_safe(kit: KernelGeometry) -> None:
    kit.save_kernel_snapshot("x", basin_coordinates=basin(1), parent_kernels=["z"])
    kit.save_kernel_snapshot("y", basin_coordinates=basin(2), parent_kernels=["x"])
    kit.save_kernel_snapshot("z", basin_coordinates=basin(3), parent_kernels=["y"])
    kit.save_kernel_snapshot("s", basin_coordinates=basin(4), parent_kernels=["s"])
    lin = kit.lineage("x")
    assert lin.cyclic and lin.ancestors == {"z": 1, "y": 2} and lin.descendants == {"y": 1, "z": 2}
    assert kit.lineage("s").cyclic and kit.lineage("s").ancestors == {}
    with pytest.raises(ls.ValidationError):
        kit.lineage("nope")


def test_delete_removes_the_kernel_and_its_parent_edges(kit: KernelGeometry) -> None:
    kit.save_kernel_snapshot("a", basin_coordinates=basin(1))
    kit.save_kernel_snapshot("b", basin_coordinates=basin(2), parent_kernels=["a"])
    assert kit.delete("b") and kit.get("b") is None
    assert kit.children("a") == [] and not kit.delete("b")


def test_writes_are_atomic_with_the_caller_transaction(kit: KernelGeometry, store: ls.Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        kit.save_kernel_snapshot("a", basin_coordinates=basin(1), parent_kernels=["p"])
        raise RuntimeError("abort")
    assert kit.get("a") is None and kit.edges.count() == 0


def test_concurrent_metric_updates_lose_no_increment(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "shared.db"
    with ls.open(path) as store:
        KernelGeometry(store).save_kernel_snapshot("k", basin_coordinates=basin(1))
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with ls.open(path) as own:  # one connection per thread, as for separate processes
                kit = KernelGeometry(own)
                for i in range(25):
                    kit.update_kernel_metrics("k", phi=i / 25, success_delta=1, failure_delta=2)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with ls.open(path) as store:
        row = KernelGeometry(store).get("k")
    assert row is not None and (row["success_count"], row["failure_count"]) == (100, 200)

"""Kernel geometry kit: kernels with 64-d basins evolve, breed, and are searched by Fisher-Rao distance.

Run: python examples/kit_kernels.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import localstore as ls
from localstore.kits.kernels import KernelGeometry


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(42)
    with ls.open(out / "kernels.db") as store:
        kernels = KernelGeometry(store, dim=64, metric="fisher_rao")  # basins are probability vectors

        # Generation 0: four founders, each on its own E8 root.
        gods = ["zeus", "hera", "athena", "apollo"]
        for i, god in enumerate(gods):
            kernels.save_kernel_snapshot(
                god, god_name=god, domain="olympus", primitive_root=i * 60,
                basin_coordinates=rng.dirichlet(np.ones(64)), phi=0.5, kappa=64.0, regime="linear",
            )
        # Two more generations: a child's basin is a mix of its parents' basins, plus noise.
        for gen in (1, 2):
            pool = kernels.kernels.keys(where={"generation": gen - 1})
            for j in range(4):
                a, b = rng.choice(pool, size=2, replace=False)
                pa, pb = kernels.get(a), kernels.get(b)
                assert pa is not None and pb is not None
                basin = 0.45 * pa["basin_coordinates"] + 0.45 * pb["basin_coordinates"] + 0.1 * rng.dirichlet(np.ones(64))
                kernels.save_kernel_snapshot(
                    f"g{gen}-{j}", god_name=str(pa["god_name"]), primitive_root=int(rng.integers(240)),
                    parent_kernels=[a, b], generation=gen, basin_coordinates=basin,
                    phi=float(rng.uniform(0.4, 0.9)), kappa=float(rng.normal(64, 2)), regime="geometric",
                )
        # Metrics change as kernels run: a read-modify-write inside one transaction.
        row = kernels.update_kernel_metrics("g2-0", phi=0.93, regime="geometric", success_delta=3)
        print(f"g2-0 now phi={row['phi']} successes={row['success_count']}")

        # Which geometric kernels sit nearest zeus's basin?
        zeus = kernels.get("zeus")
        assert zeus is not None
        for hit in kernels.find_similar_basins(zeus["basin_coordinates"], k=3, where={"regime": "geometric"}):
            print(f"near zeus: {hit.key:<6} fisher-rao {hit.distance:.3f}  phi {hit.row['phi']:.2f}")

        lin = kernels.lineage("g2-0")
        print(f"g2-0 ancestors: {lin.ancestors}")
        print(f"zeus descendants: {sorted(kernels.lineage('zeus').descendants.items())}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "kit-kernels-out"))

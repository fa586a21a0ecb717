"""Telemetry kit: a training session's 50k steps in batches, emergencies, checkpoints, queries, a JSONL import.

Run: python examples/kit_telemetry.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import localstore as ls
from localstore.kits.importers import import_path
from localstore.kits.telemetry import Telemetry


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    with ls.open(out / "telemetry.db") as store:
        tm = Telemetry(store)
        sid = tm.start_session(metadata={"model": "toy", "lr": 3e-4})

        # 50k steps, written 10k per transaction (put_many underneath).
        phi = np.clip(0.6 + 0.25 * np.sin(np.arange(50_000) / 4_000) + rng.normal(0, 0.02, 50_000), 0, 1)
        for start in range(0, 50_000, 10_000):
            tm.record_telemetry_many(sid, (
                {"step": s, "phi": float(phi[s]), "kappa_eff": 64 + float(rng.normal()), "regime": "geometric",
                 "emergency": bool(phi[s] < 0.36)}
                for s in range(start, start + 10_000)
            ))
        low = int(np.argmin(phi))
        tm.record_emergency(sid, reason="phi minimum", severity="warning", metric="phi",
                            value=float(phi[low]), threshold=0.36, step=low)

        # Checkpoints every 10k steps; the kit ranks them by phi and logs their history.
        for s in range(9_999, 50_000, 10_000):
            tm.save_checkpoint(sid, phi=float(phi[s]), kappa=64.0, regime="geometric",
                               basin_coords=rng.dirichlet(np.ones(64)),
                               state_dict={"weights": rng.normal(size=(32, 32)).astype("f4"), "step": s})
        print(f"session {sid[:8]}: {tm.end_session(sid)['total_steps']} steps")
        best = tm.get_best_checkpoint(sid)
        assert best is not None
        print(f"best checkpoint phi {best['phi']:.3f}, weights {best['state_dict']['weights'].shape}")
        print(f"pruned {len(tm.prune_checkpoints(keep=2))} checkpoints, {tm.checkpoints.count()} kept")

        # Import a JSONL file written by a system that had no database at hand (one bad line included).
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        lines = [json.dumps({"type": "session", "session_id": "offline-run"})]
        lines += [json.dumps({"step": i, "phi": 0.6, "kappa": 63.5}) for i in range(100)]
        lines[40] = '{"step": 39, "phi": '  # truncated by a crash
        (logs / "offline-run.jsonl").write_text("\n".join(lines) + "\n")
        for report in import_path(store, logs, progress=False):
            print(f"imported {report.records_added} records; skipped {[str(e) for e in report.errors]}")

        for s in tm.session_stats():
            print(f"stats {s['session_id'][:12]:<12} steps {s['total_steps']:>6} avg phi {s['avg_phi']:.3f} "
                  f"checkpoints {s['checkpoint_count']}")
        print(f"latest steps: { {k[:12]: v['step'] for k, v in tm.latest_telemetry().items()} }")
        print(f"emergencies: {tm.emergency_summary()[0]['by_severity']}")
        print(f"retention (older than 30 days): {tm.delete_telemetry_older_than(30)}")
    print(f"plot it: localstore plot {out / 'telemetry.db'} {sid} -o {out / 'session.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "kit-telemetry-out"))

"""Child processes for the sync tests: writers that hammer stores while a sync daemon runs.

Usage: python _sync_workers.py write WORKSPACE STORE WORKER_ID ROWS
Prints "ok N" on success; any exception is printed and exits 1.
"""

from __future__ import annotations

import random
import sys

import localstore as ls

FIELDS = {"id": ls.Text(), "worker": ls.Integer(), "n": ls.Integer(), "phi": ls.Real(), "v": ls.Vector(8),
          "meta": ls.Json()}


def write(folder: str, name: str, worker: int, rows: int) -> int:
    rng = random.Random(worker)
    store = ls.Workspace(folder).open(name)
    coll = store.collection("events", key="id", fields=FIELDS)
    done = 0
    while done < rows:
        n = min(rng.randint(1, 50), rows - done)
        coll.put_many([{"id": f"w{worker}-{(done + i) % (rows // 2 + 1)}", "worker": worker, "n": done + i,
                        "phi": rng.random(), "v": [rng.random() for _ in range(8)], "meta": {"i": done + i}}
                       for i in range(n)])
        done += n
        if rng.random() < 0.1:
            coll.delete(f"w{worker}-{rng.randint(0, rows // 2)}")
    store.close()
    return done


def main() -> int:
    cmd, *args = sys.argv[1:]
    if cmd == "write":
        folder, name, worker, rows = args
        print("ok", write(folder, name, int(worker), int(rows)), flush=True)
        return 0
    raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    sys.exit(main())


# -- helpers shared by the sync tests (imported, not run) -------------------------------------


def local_rows(store: ls.Store, collection: str) -> dict[str, dict[str, object]]:
    """Every row of a collection as stored (encoded values), by key as text."""
    coll = store.collection(collection)
    order = coll._order
    cols = ", ".join(f'"{n}"' for n in order)
    rows = store._run(lambda db: db.execute(f'SELECT {cols} FROM "{collection}"').fetchall(), "test read")
    return {str(r[0]): dict(zip(order, r)) for r in rows}


def central_rows(url: str, schema: str, store_id: str, collection: str) -> dict[str, dict[str, object]]:
    """The current-state rows of one store's collection in Postgres, by key, with ``_ls_deleted``."""
    import psycopg
    from localstore.sync import state_table_name
    from psycopg import sql

    with psycopg.connect(url) as conn:
        cur = conn.execute(sql.SQL("SELECT * FROM {} WHERE _ls_store = %s").format(
            sql.Identifier(schema, state_table_name(collection))), (store_id,))
        names = [d.name for d in cur.description or []]
        return {r[names.index("_ls_key")]: dict(zip(names, r)) for r in cur.fetchall()}


def same_value(spec: dict[str, object], local: object, central: object) -> bool:
    """Whether a stored local value and its Postgres column value agree (vectors within float tolerance)."""
    import json

    import numpy as np

    if local is None or central is None:
        return local is None and central is None
    if spec.get("encrypt") or spec.get("compress") or spec["type"] in ("Blob", "Array"):
        return bytes(central) == local  # type: ignore[arg-type]
    kind = spec["type"]
    if kind == "Vector":
        got = json.loads(central) if isinstance(central, str) else list(central)  # type: ignore[call-overload]
        return bool(np.allclose(np.frombuffer(local, dtype="<f4"), np.asarray(got, dtype="<f4"), rtol=1e-6, atol=0))  # type: ignore[arg-type]
    if kind == "Json":
        return json.loads(local.replace("\\u0000", "\\ufffd")) == central  # type: ignore[union-attr]
    if kind == "Boolean":
        return bool(local) == central
    if isinstance(local, str) and "\x00" in local:
        return local.replace("\x00", "\ufffd") == central  # Postgres text cannot hold NUL
    return local == central


def assert_converged(url: str, schema: str, store: ls.Store) -> None:
    """Every synced collection of ``store`` equals its rows in Postgres, field by field; deletes are tombstones;
    the central change log holds every seq of the store exactly once."""
    import psycopg
    from psycopg import sql

    from localstore import replica

    for spec in replica.collection_specs(store):
        if not spec["sync"]:
            continue
        name = spec["name"]
        # Keys are text in Postgres, where NUL becomes U+FFFD (as in every text column).
        local = {k.replace("\x00", "\ufffd") if isinstance(k, str) else k: r
                 for k, r in local_rows(store, name).items()}
        central = central_rows(url, schema, store.id, name)
        live = {k: r for k, r in central.items() if not r["_ls_deleted"]}
        assert set(live) == set(local), (store.name, name, set(live) ^ set(local))
        for key, row in local.items():
            for fname, fspec in spec["fields"].items():
                assert same_value(fspec, row[fname], live[key][fname]), (store.name, name, key, fname, row[fname],
                                                                         live[key][fname])
    last = store.changelog.last_seq()
    with psycopg.connect(url) as conn:
        n, distinct, top = conn.execute(sql.SQL(
            "SELECT count(*), count(DISTINCT seq), coalesce(max(seq), 0) FROM {} WHERE store_id = %s").format(
                sql.Identifier(schema, "changes")), (store.id,)).fetchone()  # type: ignore[misc]
    assert n == distinct == top == last, (store.name, n, distinct, top, last)
    assert store.changelog.watermark() == last

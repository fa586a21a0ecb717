"""Per-store sync status: pending changes, last sync, lag."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from psycopg import sql

from localstore.store import Store
from localstore.workspace import SUFFIX

from .central import DEFAULT_SCHEMA, Central
from .errors import SyncError
from .shipper import lag_seconds


@dataclass
class StoreStatus:
    """One store's sync position."""

    name: str
    store_id: str
    last_seq: int
    watermark: int
    pending: int
    lag_s: float  # seconds since the oldest pending change was written; 0 when none
    central_seq: int | None = None  # None when Postgres was not asked or not reachable
    last_sync: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The status as a JSON-ready dict."""
        return asdict(self)


def status(folder: str, url: str | None = None, *, schema: str = DEFAULT_SCHEMA) -> tuple[list[StoreStatus], str | None]:
    """The status of every store in ``folder`` (or of one store file); with ``url``, Postgres's side too.

    Returns the statuses and, if Postgres could not be asked, the (redacted) reason.
    """
    if os.path.isdir(folder):
        paths = sorted(os.path.join(folder, e) for e in os.listdir(folder) if e.endswith(SUFFIX) and not e.startswith("."))
    else:
        paths = [folder]
    now = time.time()
    out = []
    for path in paths:
        with Store(path, create=False) as store:
            log = store.changelog
            out.append(StoreStatus(store.name, store.id, log.last_seq(), log.watermark(), log.pending(),
                                   round(lag_seconds(store, now), 3)))
    problem = None
    if url:
        central = Central(url, schema)
        try:
            ids = [s.store_id for s in out]
            rows = central.run("reading store positions", lambda c: c.execute(
                sql.SQL("SELECT store_id::text, last_seq, last_sync FROM {} WHERE store_id::text = ANY(%s)")
                .format(central._q("stores")), (ids,)).fetchall())
            found = {sid: (seq, ts) for sid, seq, ts in rows}
            for s in out:
                if s.store_id in found:
                    seq, ts = found[s.store_id]
                    s.central_seq, s.last_sync = int(seq), ts.isoformat() if ts else None
                else:
                    s.central_seq = 0
        except SyncError as exc:
            problem = str(exc)
        finally:
            central.close()
    return out, problem

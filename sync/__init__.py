"""localstore.sync: ship every store's change log to a central Postgres, restore stores from it, pull from it.

    from localstore.sync import SyncEngine
    engine = SyncEngine(ls.Workspace("data"), "postgresql://user:pw@host/db").start()
    ...
    engine.stop()

The URL defaults to ``LOCALSTORE_POSTGRES_URL``, else ``DATABASE_URL``. Its password
is redacted from every log line, error and status output.
"""

from . import tenancy
from .batching import Backoff, Debouncer, Positions, plan
from .central import DEFAULT_SCHEMA, SCHEMA_VERSION, Central, state_table_name
from .engine import SyncEngine
from .errors import (
    AuthenticationError,
    CentralSchemaError,
    ConfigError,
    DatabaseMissingError,
    PostgresError,
    RestoreError,
    SeqConflictError,
    SyncError,
    TenancyError,
    UnreachableError,
)
from .replicate import pull, restore, subscribe
from .status import StoreStatus, status
from .url import redact, resolve_url
from .views import DEFAULT_VIEWS_SCHEMA, KIT_TABLES, create_kit_views

__all__ = [
    "DEFAULT_SCHEMA",
    "DEFAULT_VIEWS_SCHEMA",
    "KIT_TABLES",
    "SCHEMA_VERSION",
    "AuthenticationError",
    "Backoff",
    "Central",
    "CentralSchemaError",
    "ConfigError",
    "DatabaseMissingError",
    "Debouncer",
    "Positions",
    "PostgresError",
    "RestoreError",
    "SeqConflictError",
    "StoreStatus",
    "SyncEngine",
    "SyncError",
    "TenancyError",
    "UnreachableError",
    "create_kit_views",
    "plan",
    "pull",
    "redact",
    "resolve_url",
    "restore",
    "state_table_name",
    "status",
    "subscribe",
    "tenancy",
]

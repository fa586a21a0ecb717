"""The exception tree of localstore.sync: one root, ``SyncError``.

psycopg errors are wrapped at the boundary (``wrap``), with the URL's password
redacted, so no raw ``psycopg.OperationalError`` and no password reaches a user.
"""

from __future__ import annotations

import re

from .url import redact_text


class SyncError(Exception):
    """The root of every error localstore.sync raises."""


class ConfigError(SyncError):
    """The sync configuration is unusable: no URL given, or a malformed one."""


class PostgresError(SyncError):
    """Postgres refused or failed an operation; the message names the server (password redacted)."""


class AuthenticationError(PostgresError):
    """Postgres rejected the user name or password in the URL."""


class DatabaseMissingError(PostgresError):
    """The database named in the URL does not exist on the server."""


class UnreachableError(PostgresError):
    """The Postgres server could not be reached (down, wrong host or port, network); the engine retries."""


class CentralSchemaError(SyncError):
    """The central schema in Postgres is newer than this code, or cannot hold a store's data."""


class SeqConflictError(SyncError):
    """Postgres already holds changes of this store beyond the store's own last seq (a stale copy of the file)."""


class RestoreError(SyncError):
    """A store cannot be restored or pulled: unknown name, ambiguous name, or the target exists."""


class TenancyError(SyncError):
    """Tenancy cannot be set up or granted: the URL is not an admin's, a role is unfit, or setup is missing."""


def wrap(exc: BaseException, url: str, action: str) -> SyncError:
    """Turn a psycopg exception into the matching ``SyncError``, naming the server without its password."""
    if isinstance(exc, SyncError):
        return exc
    import psycopg

    where = redact_text(_target(url), url)
    detail = redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, url)
    lowered = str(exc).lower()
    doing = f" while {action}" if action else ""
    if "password authentication failed" in lowered or "no password supplied" in lowered or (
        "authentication failed" in lowered
    ):
        return AuthenticationError(
            f"Postgres at {where} rejected the credentials{doing} ({detail}); "
            "check the user name and password in the URL"
        )
    if "does not exist" in lowered and "database" in lowered:
        return DatabaseMissingError(
            f"Postgres at {where}: the database does not exist{doing} ({detail}); "
            "create it (createdb NAME) or fix the database name in the URL"
        )
    # A malformed URL fails in the client, before any server answer, so it has no SQLSTATE;
    # server refusals such as row-level security ("...security...") must not look like one.
    if (isinstance(exc, psycopg.ProgrammingError) and getattr(exc, "sqlstate", None) is None
            and re.search(r"\b(dsn|conninfo|uri|connection info|connection option)\b", lowered)):
        return ConfigError(f"the Postgres URL {where} is malformed ({detail}); "
                           "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, OSError, TimeoutError)):
        return UnreachableError(
            f"cannot reach Postgres at {where}{doing} ({detail}); is the server running and the "
            "host/port right? The changes stay queued in the stores; the engine retries"
        )
    return PostgresError(f"Postgres at {where} failed{doing}: {detail}")


def _target(url: str) -> str:
    from .url import describe

    return describe(url)

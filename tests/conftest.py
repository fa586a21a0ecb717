"""Shared fixtures: real store files under tmp_path, and the run's sentinel master key.

``MASTER_KEY`` (base64; ``MASTER_KEY_BYTES``, ``MASTER_KEY_HEX``) is one master key per
run: ``tests/secrets_sweep.py`` chooses it (``LOCALSTORE_TEST_MASTER_KEY``) and then
greps everything the run printed or wrote for it, so tests that need "a master key"
should use it (or the ``master_key`` fixture) rather than ``ls.generate_key()``.
Under the sweep, keys made by ``ls.generate_key()`` in this process are also recorded
(to ``LOCALSTORE_SWEEP_KEYS``, outside the scanned folders) and searched for.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import localstore as ls
import localstore.keys as _keys

pytest_plugins = ["pg_fixture"]

ROOT = Path(__file__).resolve().parent.parent

#: Environment variables set by tests/secrets_sweep.py: the sentinel master key (base64)
#: and the file that records every other master key made in the run.
ENV_SENTINEL_KEY = "LOCALSTORE_TEST_MASTER_KEY"
ENV_KEYS_RECORD = "LOCALSTORE_SWEEP_KEYS"
SWEEP_VARIABLES = (ENV_SENTINEL_KEY, ENV_KEYS_RECORD, "LOCALSTORE_TEST_PG_PASSWORD", "LOCALSTORE_SWEEP_DIR")


def _sentinel_key() -> bytes:
    """The run's sentinel master key: the sweep's if it set one, else a fresh random one."""
    given = os.environ.get(ENV_SENTINEL_KEY)
    if given:
        raw = base64.b64decode(given, validate=True)
        if len(raw) != 32:
            raise pytest.UsageError(f"${ENV_SENTINEL_KEY} must be a base64 master key of 32 bytes")
        return raw
    return os.urandom(32)


#: The run's sentinel master key, as raw bytes, base64 (what ``ls.open(key=...)`` takes) and hex.
MASTER_KEY_BYTES = _sentinel_key()
MASTER_KEY = base64.b64encode(MASTER_KEY_BYTES).decode("ascii")
MASTER_KEY_HEX = MASTER_KEY_BYTES.hex()


def _record_generated_keys(record: str) -> None:
    """Append every key ``ls.generate_key()`` makes in this process to ``record``, so the sweep searches for it too.

    The function is wrapped, not replaced: it still returns a fresh random key.
    """
    original = _keys.generate_key

    def generate_key() -> str:
        key = original()
        fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, key.encode("ascii") + b"\n")
        finally:
            os.close(fd)
        return key

    generate_key.__doc__ = original.__doc__
    _keys.generate_key = generate_key
    ls.generate_key = generate_key


if os.environ.get(ENV_KEYS_RECORD):
    _record_generated_keys(os.environ[ENV_KEYS_RECORD])


@pytest.fixture
def master_key() -> str:
    """The run's sentinel master key, base64-encoded (pass it as ``key=``)."""
    return MASTER_KEY


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A path for a new store file inside the test's temporary folder."""
    return tmp_path / "agent.db"


@pytest.fixture
def store(store_path: Path) -> Iterator[ls.Store]:
    """A fresh store, closed after the test."""
    s = ls.open(store_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child Python processes so they import this checkout's localstore.

    The secrets sweep's own variables are left out: children have no use for them, and
    pytest prints this dict in failure reports (in full with ``-vv``), which would be a
    hit the product did not cause.
    """
    env = {k: v for k, v in os.environ.items() if k not in SWEEP_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable

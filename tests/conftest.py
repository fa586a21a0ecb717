"""Shared fixtures: real store files under tmp_path."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import localstore as ls

pytest_plugins = ["pg_fixture"]

ROOT = Path(__file__).resolve().parent.parent


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
    """Environment for child Python processes so they import this checkout's localstore."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable

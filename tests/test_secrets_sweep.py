"""The secrets sweep (tests/secrets_sweep.py) finds a sentinel wherever a test leaks it, and never echoes it."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

from conftest import PYTHON, ROOT

SWEEP = ROOT / "tests" / "secrets_sweep.py"

LEAKY = '''
import base64, logging, os

KEY = os.environ["LOCALSTORE_TEST_MASTER_KEY"]
PASSWORD = os.environ["LOCALSTORE_TEST_PG_PASSWORD"]


def test_prints_the_key_and_passes():
    print("key:", KEY)  # captured by pytest and shown nowhere: only the JUnit file has it


def test_logs_a_url_with_the_password():
    logging.getLogger("leaky").warning("connecting to postgresql://u:%s@/db", PASSWORD)


def test_writes_a_log_file(tmp_path):
    (tmp_path / "daemon.log").write_text("key=" + base64.b64decode(KEY).hex()[:20] + "\\n")


def test_fails_showing_the_key_in_hex():
    assert base64.b64decode(KEY).hex() == "x"  # pytest shows 12 characters of each end
'''

CLEAN = '''
import os


def test_uses_the_key_quietly():
    assert len(os.environ["LOCALSTORE_TEST_MASTER_KEY"]) == 44
'''


def _sweep(folder: Path, env: dict[str, str], **sentinels: str) -> subprocess.CompletedProcess[str]:
    """Run the sweep on the test files in ``folder``, with sentinels of this test's own, never the outer run's.

    ``sentinels`` (``key=``, ``password=``) fixes them; otherwise the sweep draws its own.
    """
    env = {k: v for k, v in env.items() if not k.startswith(("LOCALSTORE_TEST_", "LOCALSTORE_SWEEP_"))}
    env.pop("LOCALSTORE_POSTGRES_URL", None)
    if "key" in sentinels:
        env["LOCALSTORE_TEST_MASTER_KEY"] = sentinels["key"]
    if "password" in sentinels:
        env["LOCALSTORE_TEST_PG_PASSWORD"] = sentinels["password"]
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # a bare pytest starts faster; the files need no plugin
    env["TMPDIR"] = str(folder)  # a kept root stays inside this test's folder
    return subprocess.run([PYTHON, str(SWEEP), "-p", "no:cacheprovider"], cwd=folder, env=env, check=False,
                          capture_output=True, text=True, timeout=300)


def _forms(key: str) -> list[str]:
    raw = base64.b64decode(key)
    return [key, base64.urlsafe_b64encode(raw).decode(), raw.hex(), raw.hex()[:12], repr(raw)[2:-1]]


def test_sweep_reports_every_leak_without_echoing_it(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """Printed, logged, written to a file and shown by a failing assert: each is a hit; the secret is never shown."""
    key = base64.b64encode(os.urandom(32)).decode()
    password = "Pw-LSSENTINEL-" + os.urandom(8).hex()
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    out = _sweep(tmp_path, subprocess_env, key=key, password=password)
    assert out.returncode == 1, out.stdout + out.stderr  # pytest's own failure code, not 0
    text = out.stdout + out.stderr
    for form in [*_forms(key), password]:
        assert form not in text
    assert "1 failed, 3 passed" in text
    # pytest shortens the hex to 12 characters at each end: enough to count as a hit.
    hits = [line for line in text.splitlines() if line.startswith("  ") and ": the sentinel" in line]
    assert any("junit.xml" in h and "master key (base64)" in h for h in hits), text  # a passing test's print
    assert any("junit.xml" in h and "Postgres password" in h for h in hits), text  # a log record
    assert any("daemon.log" in h and "master key (hex)" in h for h in hits), text  # a file under basetemp
    assert any("pytest-output.log" in h for h in hits), text  # the failing assert's report
    assert "secrets found" in text and " 0 hits" not in text


def test_clean_run_passes_and_keeps_pytest_exit_codes(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """No leak: pytest's code (0), the searched figures, no files left; no tests collected stays exit code 5."""
    (tmp_path / "test_clean.py").write_text(CLEAN)
    out = _sweep(tmp_path, subprocess_env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "; 0 hits" in out.stdout and "searched " in out.stdout
    assert not list(tmp_path.glob("ls-sweep-*"))  # the root is removed after a clean run
    (tmp_path / "test_clean.py").unlink()
    empty = _sweep(tmp_path, subprocess_env)
    assert empty.returncode == 5, empty.stdout + empty.stderr

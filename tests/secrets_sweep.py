"""Run the test suite with a sentinel master key and Postgres password, then grep everything it left for them.

Usage: python tests/secrets_sweep.py [PYTEST ARGS...]   (``make test`` runs it)

1. Chooses the sentinels: a random master key (searched for as base64, URL-safe
   base64, hex, raw bytes and Python's bytes repr) and a Postgres password
   ``Pw-LSSENTINEL-<hex>``. With an external server (``--postgres-url`` or
   ``LOCALSTORE_POSTGRES_URL``), that URL's password is the sentinel instead.
   ``tests/conftest.py`` and ``tests/pg_fixture.py`` hand them to the tests; every
   other key made by ``ls.generate_key()`` in the pytest process is recorded and
   searched for too.
2. Runs ``python -m pytest -q ARGS`` with one temporary root of its own for
   everything the suite writes (``TMPDIR``, ``--basetemp``, the embedded server's
   log) and a JUnit XML file holding the captured output and log records of every
   test, passed ones included. The console shows the output live, with the
   sentinels masked; the log file keeps it raw for the search.
3. Searches the output, every file under the root, and every file of the working
   folder that the run created or changed (``.hypothesis``, caches, results),
   except key files (a file holding exactly one key, as ``write_key_file`` makes).
   A hit prints where it was (file, offset, line, which secret in which form), never
   the secret, and the exit code is non-zero. Otherwise the exit code is pytest's
   own: 5 (no tests collected) stays a failure for ``.ci/run``.

The root is removed after a clean run and kept (mode 0700) after a hit, so the
files can be inspected: the sentinels are random and used for this run only.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: Environment variables read by tests/conftest.py and tests/pg_fixture.py.
ENV_KEY = "LOCALSTORE_TEST_MASTER_KEY"
ENV_PASSWORD = "LOCALSTORE_TEST_PG_PASSWORD"
ENV_KEYS_RECORD = "LOCALSTORE_SWEEP_KEYS"
ENV_SWEEP_DIR = "LOCALSTORE_SWEEP_DIR"

#: Characters of a key's text forms. Any 12 consecutive characters of the sentinel key's
#: forms count as a leak (pytest shortens long values to 12 characters on each side),
#: and any 16 of another recorded key's (there may be hundreds: fewer chance matches).
TOKEN = re.compile(rb"[A-Za-z0-9+/_\-]{12,}")
SENTINEL_PIECE = 12
OTHER_PIECE = 16

#: Bytes read from a file at a time (a match across two reads is still found: reads overlap).
CHUNK = 8 << 20

#: Folders of the working tree never searched: the repository and the virtual environment.
SKIP_DIRS = {".git", ".venv", "venv", "node_modules"}


@dataclass
class Secrets:
    """What to search for: literal byte strings, and pieces (12 or 16 characters) of keys' text forms."""

    literals: dict[bytes, str] = field(default_factory=dict)
    pieces: dict[int, dict[bytes, str]] = field(default_factory=dict)  # by length
    key_files: set[bytes] = field(default_factory=set)  # whole contents of a legitimate key file

    def add_key(self, raw: bytes, label: str, *, literal: bool) -> None:
        """Search for a 32-byte master key in its text forms (and as raw bytes and bytes repr if ``literal``)."""
        forms = {
            "base64": base64.b64encode(raw),
            "url-safe base64": base64.urlsafe_b64encode(raw),
            "hex": raw.hex().encode(),
            "upper-case hex": raw.hex().upper().encode(),
        }
        piece = SENTINEL_PIECE if literal else OTHER_PIECE
        by_piece = self.pieces.setdefault(piece, {})
        for form, text in forms.items():
            # Every piece, not only the first: a key cut short or wrapped still shows.
            for i in range(len(text) - piece + 1):
                by_piece.setdefault(text[i : i + piece], f"{label} ({form})")
        self.key_files.update({forms["base64"], forms["url-safe base64"], forms["hex"], raw})
        if literal:
            self.literals[raw] = f"{label} (raw bytes)"
            self.literals[repr(raw)[2:-1].encode()] = f"{label} (bytes repr)"

    def add_password(self, password: str, label: str) -> None:
        """Search for a password as it is and as a URL would carry it (percent-encoded)."""
        from urllib.parse import quote

        for form in {password, quote(password, safe=""), quote(password)}:
            self.literals[form.encode()] = label

    @property
    def longest(self) -> int:
        return max([*self.pieces, *map(len, self.literals)])


@dataclass
class Hit:
    """One place a secret was found."""

    path: str
    offset: int
    what: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}, byte {self.offset}" + (f", line {self.line}" if self.line else "")
        return f"  {where}: {self.what}"


def mask(data: bytes, found: Secrets) -> bytes:
    """The bytes with every sentinel, or any piece of one, replaced by its label (for the console copy)."""
    for literal, label in found.literals.items():
        data = data.replace(literal, f"[{label}]".encode())

    def hide(m: re.Match[bytes]) -> bytes:
        run = m.group()
        for piece, known in found.pieces.items():
            for i in range(len(run) - piece + 1):
                what = known.get(run[i : i + piece])
                if what is not None:
                    return f"[{what}]".encode()
        return run

    return TOKEN.sub(hide, data)


def scan_bytes(data: bytes, found: Secrets, base: int = 0) -> Iterator[tuple[int, str]]:
    """(offset, what) of every secret in ``data``."""
    for literal, what in found.literals.items():
        start = data.find(literal)
        while start >= 0:
            yield base + start, what
            start = data.find(literal, start + 1)
    for m in TOKEN.finditer(data):
        run = m.group()
        for piece, known in found.pieces.items():
            for i in range(len(run) - piece + 1):
                what = known.get(run[i : i + piece])
                if what is not None:
                    yield base + m.start() + i, what
                    break  # one hit per run is enough to say where


def scan_file(path: Path, found: Secrets, shown: str) -> list[Hit]:
    """Every secret in one file (read in overlapping chunks); a legitimate key file is skipped by the caller."""
    hits: dict[tuple[int, str], Hit] = {}
    overlap = max(found.longest, 64) - 1
    with open(path, "rb") as handle:
        offset = 0
        tail = b""
        while True:
            chunk = handle.read(CHUNK)
            if not chunk:
                break
            data = tail + chunk
            base = offset - len(tail)
            for at, what in scan_bytes(data, found, base):
                hits.setdefault((at, what), Hit(shown, at, what))
            offset += len(chunk)
            tail = data[-overlap:]
    out = sorted(hits.values(), key=lambda h: h.offset)
    if out and path.stat().st_size <= 64 << 20:
        text = path.read_bytes()
        for h in out:
            h.line = text.count(b"\n", 0, h.offset) + 1
    return out


def is_key_file(path: Path, found: Secrets) -> bool:
    """Whether the file holds exactly one key and nothing else (``write_key_file`` output, a raw key file)."""
    try:
        if path.stat().st_size > 200:
            return False
        data = path.read_bytes()
    except OSError:
        return False
    return data in found.key_files or data.strip() in found.key_files


def files_under(root: Path, *, skip: set[Path], newer_than: float | None = None) -> Iterator[Path]:
    """Regular files under ``root`` (not following links), optionally only those changed since a time."""
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and here / d not in skip]
        for name in files:
            path = here / name
            if path in skip:
                continue
            try:
                info = path.lstat()
            except OSError:
                continue
            if not path.is_file() or path.is_symlink():
                continue
            if newer_than is not None and max(info.st_mtime, info.st_ctime) < newer_than:
                continue
            yield path


def external_url(args: list[str]) -> str | None:
    """The ``--postgres-url`` given to pytest, else ``LOCALSTORE_POSTGRES_URL``."""
    for i, arg in enumerate(args):
        if arg == "--postgres-url" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--postgres-url="):
            return arg.split("=", 1)[1]
    return os.environ.get("LOCALSTORE_POSTGRES_URL") or None


def recorded_keys(path: Path) -> Iterable[bytes]:
    """The keys ``ls.generate_key()`` made during the run (base64, one a line)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text("ascii", "replace").split():
        try:
            raw = base64.b64decode(line, validate=True)
        except ValueError:
            continue
        if len(raw) == 32:
            out.append(raw)
    return out


def run_pytest(cmd: list[str], env: dict[str, str], log: Path, found: Secrets) -> int:
    """Run pytest, copying its output to the console (sentinels masked) and to ``log`` (as is); return its code."""
    with open(log, "wb") as raw_log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            raw_log.write(line)
            sys.stdout.buffer.write(mask(line, found))
            sys.stdout.buffer.flush()
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--sweep-keep", action="store_true", help="keep the temporary root even after a clean run")
    parser.add_argument("--sweep-help", action="help", help="show this help and exit")
    own, args = parser.parse_known_args(argv)
    started = time.time() - 2  # file times can lag the clock slightly

    root = Path(tempfile.mkdtemp(prefix="ls-sweep-"))
    os.chmod(root, 0o700)
    tmp, basetemp, logs, private = root / "tmp", root / "basetemp", root / "logs", root / "private"
    for d in (tmp, logs, private):
        d.mkdir(mode=0o700)
    found = Secrets()

    key_b64 = os.environ.get(ENV_KEY) or base64.b64encode(os.urandom(32)).decode()
    found.add_key(base64.b64decode(key_b64), "the sentinel master key", literal=True)
    url = external_url(args)
    if url:
        from localstore.sync.url import password_of

        password = password_of(url) or ""
        if not password:
            print("secrets sweep: the external Postgres URL has no password; only the master key is a sentinel")
    else:
        password = os.environ.get(ENV_PASSWORD) or f"Pw-LSSENTINEL-{secrets.token_hex(8)}"
    if password:
        found.add_password(password, "the sentinel Postgres password")

    record = private / "generated-keys"
    env = dict(os.environ)
    env.update({"TMPDIR": str(tmp), ENV_KEY: key_b64, ENV_KEYS_RECORD: str(record), ENV_SWEEP_DIR: str(logs)})
    if password and not url:
        env[ENV_PASSWORD] = password
    junit = logs / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", *args, f"--junitxml={junit}", "-o", "junit_logging=all"]
    if not any(a == "--basetemp" or a.startswith("--basetemp=") for a in args):
        cmd.append(f"--basetemp={basetemp}")
    output = logs / "pytest-output.log"
    code = run_pytest(cmd, env, output, found)

    generated = [k for k in recorded_keys(record) if k not in found.key_files]
    for i, raw in enumerate(generated):
        found.add_key(raw, f"master key #{i + 1} made by ls.generate_key()", literal=False)

    # The root (output, junit, basetemp, TMPDIR, server log) and what the run changed in the working folder.
    cwd = Path.cwd()
    targets = [(p, str(p.relative_to(root))) for p in files_under(root, skip={private})]
    targets += [(p, "./" + str(p.relative_to(cwd)))
                for p in files_under(cwd, skip={root, private}, newer_than=started)]
    hits: list[Hit] = []
    scanned = size = key_files = 0
    for path, shown in targets:
        if is_key_file(path, found):
            key_files += 1
            continue
        try:
            hits += scan_file(path, found, shown)
        except OSError:
            continue  # removed while we looked
        scanned += 1
        size += path.stat().st_size if path.exists() else 0

    print(f"\nsecrets sweep: searched {scanned} files, {size:,} bytes (pytest output, JUnit XML with every test's "
          f"captured output, {root}, and files the run changed under {cwd}) for the sentinel master key, "
          f"{len(generated)} other generated master keys"
          + (", the sentinel Postgres password" if password else "")
          + f"; {key_files} key files skipped; {len(hits)} hits")
    if hits:
        print("secrets sweep: secrets found (the files are kept in " + str(root) + "):")
        for h in hits[:200]:
            print(h)
        if len(hits) > 200:
            print(f"  ... and {len(hits) - 200} more")
        return code if code != 0 else 1
    if own.sweep_keep:
        print(f"secrets sweep: files kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

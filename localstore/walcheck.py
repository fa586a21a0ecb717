"""Find damage in a store's WAL file that SQLite would otherwise drop without a word.

SQLite checksums every WAL frame, chaining each frame's checksum from the one before.
When it rebuilds its index of the WAL (the first open after a crash, or whenever the
``-shm`` file is gone), it keeps frames only up to the first one whose checksum or
salt fails, and then only up to the last commit in that prefix. A single flipped byte
in frame N therefore silently discards frame N and every transaction committed after
it: the store opens, reads as an older state, and ``verify()`` passes.

This module reads the WAL before SQLite does and tells that case apart from the normal
ones (a crash mid-write leaves an incomplete tail; a rolled-back transaction leaves
uncommitted frames; a restarted WAL leaves frames of an older generation, with older
salts). Evidence of damage is either of:

- the stale ``-shm`` left by a crash is intact and says more frames were committed
  than the checksums now allow (this catches damage in the very last frame too);
- without a usable ``-shm``: a commit frame of the current generation lies beyond the
  first failing frame and is itself intact (its checksum holds when chained from the
  frame before it as stored), so the chain broke in the middle, not at a torn tail.

A WAL copied without its ``-shm`` whose only damage is in its final commit frame looks
exactly like a transaction torn by a crash; that case is not reported.

Checksums are computed with numpy: the recurrence SQLite runs over each pair of 32-bit
words, ``s1 += a + s2; s2 += b + s1``, is linear, so a frame's checksum is the seed
times a fixed 2x2 matrix power plus a weighted sum of its words (all modulo 2^32,
which numpy's uint32 arithmetic wraps into exactly). A 4.5 MB WAL checks in about 6 ms.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

WAL_HEADER = 32
FRAME_HEADER = 24
MAGIC_LE, MAGIC_BE = 0x377F0682, 0x377F0683
WAL_VERSION = 3007000
#: The shm byte each connection keeps a shared POSIX lock on while it has the store open (SQLite's DMS slot).
SHM_DMS_BYTE = 128
#: Frames checksummed per numpy step, to bound memory on large WALs.
CHUNK_FRAMES = 512

@dataclass(frozen=True)
class WalDamage:
    """A WAL file SQLite would truncate at a damaged frame, dropping committed transactions after it."""

    path: str
    #: The first frame (1-based) SQLite would not keep.
    frame: int
    #: Frames in the file.
    frames: int
    #: The last frame SQLite would keep as committed (0: none of the WAL).
    kept: int
    #: Committed transactions after ``kept`` that would be lost (at least this many).
    lost_commits: int
    #: How the loss was established: "shm" (the crash-time index) or "chain" (intact commits past the break).
    evidence: str

    def describe(self) -> str:
        """One sentence for an error message or a verify report."""
        where = "the WAL header" if self.frame == 0 else f"frame {self.frame} of {self.frames}"
        return (f"{self.path} is damaged at {where}: SQLite would keep only the first {self.kept} frame(s) and "
                f"silently drop {self.lost_commits} committed transaction(s) after it")


@dataclass
class _Frames:
    """The decoded headers of every whole frame in a WAL, and whether each one's checksum chains."""

    pgno: np.ndarray
    commit: np.ndarray
    salts: np.ndarray  # (F, 2) uint32
    chain_ok: np.ndarray  # checksum holds when seeded with the previous frame's stored checksum


@functools.lru_cache(maxsize=8)
def _weights(page_size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Per-pair weights (M^(P-k), flattened) and M^P for a frame of ``page_size`` (P word pairs incl. 8 header bytes)."""
    pairs = (8 + page_size) // 8
    out = np.empty((pairs, 4), dtype=np.uint32)
    cur = (1, 0, 0, 1)  # M^0, row-major
    for k in range(pairs - 1, -1, -1):
        out[k] = cur
        a, b, c, d = cur  # cur := M @ cur, M = [[1, 1], [1, 2]]
        cur = ((a + c) & 0xFFFFFFFF, (b + d) & 0xFFFFFFFF, (a + 2 * c) & 0xFFFFFFFF, (b + 2 * d) & 0xFFFFFFFF)
    return out, cur


def checksum(data: bytes, big_endian: bool, seed: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes), seeded; a plain loop for short inputs."""
    s1, s2 = seed
    words = struct.unpack((">" if big_endian else "<") + f"{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[i + 1] + s1) & 0xFFFFFFFF
    return s1, s2


def _frames(wal: bytes, page_size: int, big_endian: bool, header_cksum: tuple[int, int]) -> _Frames:
    """Decode frame headers and check each frame's checksum against its predecessor's stored one."""
    size = FRAME_HEADER + page_size
    count = (len(wal) - WAL_HEADER) // size
    raw = np.frombuffer(wal, dtype=np.uint8, count=count * size, offset=WAL_HEADER).reshape(count, size)
    head = raw[:, :FRAME_HEADER].copy().view(">u4").astype(np.uint32)  # (F, 6), always big-endian
    stored = head[:, 4:6]
    seeds = np.vstack([np.array([header_cksum], dtype=np.uint32), stored[:-1]]) if count else stored
    weights, mp = _weights(page_size)
    w = [weights[:, i] for i in range(4)]
    m = [np.full(1, x, dtype=np.uint32) for x in mp]
    dtype = ">u4" if big_endian else "<u4"
    chain_ok = np.zeros(count, dtype=bool)
    # All arithmetic in uint32: numpy wraps it modulo 2^32, which is exactly SQLite's arithmetic.
    for start in range(0, count, CHUNK_FRAMES):
        part = raw[start:start + CHUNK_FRAMES]
        body = np.concatenate([part[:, :8], part[:, FRAME_HEADER:]], axis=1)
        words = body.view(dtype).astype(np.uint32, copy=False).reshape(len(part), -1, 2)
        u1 = words[:, :, 0]
        u2 = u1 + words[:, :, 1]
        c1 = (u1 * w[0] + u2 * w[1]).sum(axis=1, dtype=np.uint32)
        c2 = (u1 * w[2] + u2 * w[3]).sum(axis=1, dtype=np.uint32)
        seed = seeds[start:start + len(part)]
        s1 = m[0] * seed[:, 0] + m[1] * seed[:, 1] + c1
        s2 = m[2] * seed[:, 0] + m[3] * seed[:, 1] + c2
        chain_ok[start:start + len(part)] = (s1 == stored[start:start + len(part), 0]) & (
            s2 == stored[start:start + len(part), 1])
    return _Frames(head[:, 0], head[:, 1], head[:, 2:4], chain_ok)


def _shm_index(shm: bytes, wal_salts: bytes) -> int | None:
    """The committed frame count from an intact crash-time ``-shm`` of this WAL generation, else None."""
    if len(shm) < 96 or shm[:48] != shm[48:96]:
        return None
    hdr = shm[:48]
    order = "<" if sys.byteorder == "little" else ">"
    version, _, _, is_init, _, _, mx_frame = struct.unpack(order + "IIIBBHI", hdr[:20])
    if version != WAL_VERSION or is_init != 1 or hdr[32:40] != wal_salts:
        return None
    if checksum(hdr[:40], big_endian=order == ">") != struct.unpack(order + "II", hdr[40:48]):
        return None
    return int(mx_frame)


def _page_size(db_header: bytes | None, wal: bytes) -> int | None:
    """The page size: from the database header, else from the WAL header if that is sane."""
    for raw in ((db_header or b"")[16:18], wal[8:12]):
        if len(raw) == 2:
            size = int.from_bytes(raw, "big")
            size = 65536 if size == 1 else size
        elif len(raw) == 4:
            size = int.from_bytes(raw, "big")
        else:
            continue
        if 512 <= size <= 65536 and size & (size - 1) == 0:
            return size
    return None


def inspect(path: str, wal: bytes, db_header: bytes | None = None, shm: bytes | None = None) -> WalDamage | None:
    """Whether SQLite would drop committed transactions from ``wal`` (the bytes of ``path``); None if not."""
    if len(wal) < WAL_HEADER:
        return None
    page_size = _page_size(db_header, wal)
    if page_size is None:
        return None
    magic, version, wal_page = struct.unpack(">III", wal[:12])
    stored_hdr = struct.unpack(">II", wal[24:32])
    # With a damaged magic the checksum byte order is unknown: take the one that chains more frames.
    orders = [magic == MAGIC_BE] if magic in (MAGIC_LE, MAGIC_BE) else [sys.byteorder == "big", sys.byteorder != "big"]
    frames, big_endian = max(((_frames(wal, page_size, b, stored_hdr), b) for b in orders),
                             key=lambda fb: int(fb[0].chain_ok.sum()))
    header_ok = (magic in (MAGIC_LE, MAGIC_BE) and version == WAL_VERSION and wal_page == page_size
                 and checksum(wal[:24], big_endian) == stored_hdr)
    count = len(frames.pgno)
    if header_ok:
        salts = np.frombuffer(wal[16:24], dtype=">u4").astype(np.uint32)
    elif count:
        salts = frames.salts[0]  # the header is gone: the frames' own generation
    else:
        return None
    usable = frames.chain_ok & (frames.salts == salts).all(axis=1) & (frames.pgno != 0)
    broken = np.flatnonzero(~usable) if header_ok else np.array([0])
    prefix = int(broken[0]) if len(broken) else count
    commits = np.flatnonzero(frames.commit[:prefix] != 0)
    kept = int(commits[-1]) + 1 if len(commits) else 0
    first_bad = 0 if not header_ok else prefix + 1
    indexed = _shm_index(shm, wal[16:24]) if shm is not None else None
    if indexed is not None:
        if kept >= indexed:
            return None
        lost = int((frames.commit[kept:min(indexed, count)] != 0).sum())
        return WalDamage(path, first_bad, count, kept, max(lost, 1), "shm")
    later = np.flatnonzero(usable[prefix:] & (frames.commit[prefix:] != 0)) if header_ok else np.flatnonzero(
        frames.chain_ok & (frames.salts == salts).all(axis=1) & (frames.commit != 0))
    if not len(later):
        return None
    return WalDamage(path, first_bad, count, kept, len(later), "chain")


# -- reading the files without breaking SQLite's locks ---------------------------------------------
#
# SQLite's locks on the -shm file are POSIX record locks, and POSIX drops every lock a
# process holds on a file when the process closes *any* descriptor of that file. So this
# module never opens and closes the -shm of a store its own process has open (any apsw
# connection to it, a Store's or a raw one; the stdlib's sqlite3 is a separate SQLite whose
# connections it cannot see): before an open it skips such a store, and ``check_live`` reads
# through SQLite's own descriptor (found in /proc/self/fd). The -wal file carries no locks.


def _own_descriptor(path: str) -> int | None:
    """A descriptor this process already has open on ``path`` (e.g. SQLite's), or None."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    target = os.path.realpath(path)
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                return int(name)
        except OSError:
            continue
    return None


def _locked_elsewhere(fd: int) -> bool:
    """Whether another process holds a lock on the shm's DMS byte, i.e. has the store open."""
    query = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, SHM_DMS_BYTE, 1, 0)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    except OSError as exc:
        return exc.errno not in (errno.EINVAL, errno.ENOLCK)
    return bool(struct.unpack("hhxxxxqqixxxx", answer)[0] != fcntl.F_UNLCK)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _inspect(path: str, db_header: bytes | None, shm: bytes | None) -> WalDamage | None:
    wal = _read(f"{path}-wal")
    if wal is None or len(wal) <= WAL_HEADER:
        return None
    return inspect(f"{path}-wal", wal, db_header, shm)


def _agreed(read: Callable[[], WalDamage | None]) -> WalDamage | None:
    """A finding only if a second read repeats it: a WAL restarted by a writer mid-read can look torn once."""
    first = read()
    return first if first is not None and read() == first else None


def check_file(path: str, db_header: bytes | None) -> WalDamage | None:
    """Check the WAL beside the store file ``path`` before SQLite opens it (None: nothing to report).

    Skipped when there is no WAL, or the store is open already, in this process or another
    (its live index is authoritative and SQLite will not rebuild it), and off Linux when a
    ``-shm`` exists (no way there to tell whether it is live).
    """
    shm_path = f"{path}-shm"
    try:
        if os.path.getsize(f"{path}-wal") <= WAL_HEADER:
            return None
    except OSError:
        return None
    if not os.path.exists(shm_path):
        return _agreed(lambda: _inspect(path, db_header, None))
    from ._sqlite import open_here, path_lock

    real = os.path.realpath(path)
    with path_lock(real):  # no thread of this process connects to the file meanwhile
        if sys.platform != "linux" or open_here(real):
            return None
        try:
            fd = os.open(shm_path, os.O_RDONLY)  # no lock of this process is on it (checked above)
        except OSError:
            return None
        try:
            if _locked_elsewhere(fd):
                return None
            # The index first: a writer appends frames before it moves the index.
            return _agreed(lambda: _inspect(path, db_header, _read_all(fd)))
        finally:
            os.close(fd)


def check_live(path: str, db_header: bytes | None) -> WalDamage | None:
    """Check an open store's WAL against its live index: a damaged frame below the committed mark.

    Readers take committed pages from WAL frames without checking their checksums, so such
    a frame serves damaged data now and is dropped at the next recovery. Frames past the
    live index are leftovers (an uncommitted or rolled-back tail) and are ignored. The index
    is read (through SQLite's own descriptor) before the WAL: a writer appends frames before
    it moves the index, and a WAL restarted in between carries salts the index no longer matches.
    """
    fd = _own_descriptor(f"{path}-shm")
    if fd is None:
        return None

    def read() -> WalDamage | None:
        shm = _read_all(fd)
        wal = _read(f"{path}-wal")
        if wal is None or len(wal) <= WAL_HEADER or _shm_index(shm, wal[16:24]) is None:
            return None
        return inspect(f"{path}-wal", wal, db_header, shm)

    return _agreed(read)

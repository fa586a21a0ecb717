"""I/O-fault sweep in SQLite's style: fail the Nth read, write, sync or lock, for N = 1, 2, ...

A shim VFS (an ``apsw.VFS`` whose files inherit from cksumvfs, so the stores keep the page
checksums they are created with by default, or from ``unix`` without it) raises an I/O
error at the Nth call of one kind, either once or on every call from the Nth on. Each
operation under test (put_many, a transaction over two collections, backup, key
rotation, dictionary training, the watermark update) runs on a fresh copy of a
prepared store for every N until a run completes without the fault being reached.
After each run the store is reopened through the normal VFS and must:

- pass ``verify()``;
- hold either exactly the state before the operation or exactly the state after it;
- hold the "after" state whenever the call returned normally;

and the caller must have seen a ``LocalStoreError`` (never a raw apsw error).

The operation opens its store with ``localstore.open(path, vfs="ls_fault")`` (its backups
inherit the VFS); the result is checked through SQLite's default VFS.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw
import numpy as np
import pytest

import localstore as ls
from localstore import checksums

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

KINDS = ("read", "write", "sync", "lock")
BASE_VFS = checksums.register() if checksums.available() else "unix"
KEY = ls.generate_key()
NEW_KEY = ls.generate_key()


class InjectedFault(apsw.IOError):
    """Marks errors the shim raised (still an apsw.IOError to SQLite)."""


class FaultVFS(apsw.VFS):
    """Pass-through VFS over ``unix`` that fails the Nth call of one kind (once, or from then on)."""

    name = "ls_fault"

    def __init__(self) -> None:
        super().__init__(self.name, BASE_VFS, makedefault=False)
        self.kind: str | None = None
        self.n = 0
        self.persistent = False
        self.calls = dict.fromkeys(KINDS, 0)
        self.fired = 0

    def arm(self, kind: str, n: int, persistent: bool) -> None:
        self.kind, self.n, self.persistent, self.fired = kind, n, persistent, 0
        self.calls = dict.fromkeys(KINDS, 0)

    def disarm(self) -> None:
        self.kind = None

    def hit(self, kind: str) -> None:
        self.calls[kind] += 1
        if self.kind != kind:
            return
        count = self.calls[kind]
        if count == self.n or (self.persistent and count > self.n):
            self.fired += 1
            raise InjectedFault(f"injected {kind} fault at call {count}")

    def xOpen(self, name: Any, flags: Any) -> FaultFile:
        return FaultFile(self, name, flags)


class FaultFile(apsw.VFSFile):
    def __init__(self, vfs: FaultVFS, name: Any, flags: Any) -> None:
        self.vfs = vfs
        super().__init__(BASE_VFS, name, flags)

    def xRead(self, amount: int, offset: int) -> bytes:
        self.vfs.hit("read")
        return super().xRead(amount, offset)

    def xWrite(self, data: Any, offset: int) -> None:
        self.vfs.hit("write")
        super().xWrite(data, offset)

    def xSync(self, flags: int) -> None:
        self.vfs.hit("sync")
        super().xSync(flags)

    def xLock(self, level: int) -> None:
        self.vfs.hit("lock")
        super().xLock(level)


@pytest.fixture(scope="module")
def vfs() -> Iterator[FaultVFS]:
    shim = FaultVFS()
    if BASE_VFS == checksums.VFS_NAME:
        checksums.declare_layered(shim.name)
    try:
        yield shim
    finally:
        shim.disarm()
        shim.unregister()


# -- the operations ---------------------------------------------------------------------------------

ITEM_FIELDS = {"k": ls.Text(), "n": ls.Integer(index=True), "body": ls.Text(), "secret": ls.Text(encrypt=True)}
NOTE_FIELDS = {"id": ls.Integer(), "text": ls.Text(compress=True)}


def item(i: int, tag: str = "") -> dict[str, Any]:
    return {"k": f"k{i}", "n": i, "body": f"row {i} {tag}" * 3, "secret": f"s{i}{tag}"}


def snapshot(path: Path, key: str = KEY) -> dict[str, Any]:
    """Everything an operation may change, read through the normal VFS; verify() must pass."""
    with ls.open(path, key=key, create=False) as store:
        report = store.verify()
        assert report.ok, f"verify failed after the fault:\n{report}"
        out: dict[str, Any] = {"key": key}
        for name in store.collections():
            coll = store.collection(name)
            out[name] = sorted((repr(k), repr(sorted(r.items()))) for k, r in ((k, coll.get(k)) for k in list(coll.keys())))
        out["changes"] = [(c.seq, c.collection, c.key, c.op) for c in store.changelog.changes(0, limit=1_000_000)]
        out["watermark"] = store.changelog.watermark()
        out["last_seq"] = store.changelog.last_seq()
        out["dicts"] = sorted(map(tuple, store._db.execute("SELECT coll, field FROM _ls_dicts").fetchall())) \
            if store._db.execute("SELECT 1 FROM sqlite_schema WHERE name='_ls_dicts'").fetchone() else []
    return out


def snapshot_any_key(path: Path) -> dict[str, Any]:
    try:
        return snapshot(path, KEY)
    except ls.WrongKeyError:
        return snapshot(path, NEW_KEY)


@dataclass
class Case:
    name: str
    prepare: Callable[[Path], None]  # builds the "before" store at path (normal VFS)
    run: Callable[[ls.Store, Path], None]  # the operation under the shim
    state: Callable[[Path], dict[str, Any]] = snapshot
    stride: int = 1  # try every stride-th N beyond the first 40 (long operations)
    expect: Callable[[dict[str, Any], dict[str, Any]], bool] = lambda before, after: True
    durability: str = "normal"


def prep_items(path: Path) -> None:
    with ls.open(path, key=KEY) as store:
        coll = store.collection("items", key="k", fields=ITEM_FIELDS)
        coll.put_many([item(i) for i in range(30)])
        store.collection("notes", key="id", fields=NOTE_FIELDS).put_many(
            [{"id": i, "text": f"note {i}"} for i in range(5)])


def run_put_many(store: ls.Store, path: Path) -> None:
    store.collection("items").put_many([item(i, "v2") for i in range(20, 50)])


def run_transaction(store: ls.Store, path: Path) -> None:
    items, notes = store.collection("items"), store.collection("notes")
    with store.transaction():
        items.put_many([item(i, "tx") for i in range(25, 40)])
        notes.put({"id": 99, "text": "written with the items"})
        items.delete("k3")
        notes.delete(2)


def prep_backup(path: Path) -> None:
    prep_items(path)
    with ls.open(path, key=KEY) as store:
        store.backup(path.parent / "backup.db")  # an older backup already at the target
        store.collection("items").put_many([item(i, "later") for i in range(30, 45)])


def run_backup(store: ls.Store, path: Path) -> None:
    store.backup(path.parent / "backup.db")


def backup_state(path: Path) -> dict[str, Any]:
    leftovers = sorted(p.name for p in path.parent.iterdir() if ".tmp-" in p.name)
    assert not leftovers, f"a failed backup left temporary files: {leftovers}"
    live = snapshot(path)
    copy = snapshot(path.parent / "backup.db")
    return {"live": live, "backup_items": copy["items"], "backup_changes": copy["changes"]}


def run_rotate(store: ls.Store, path: Path) -> None:
    store.rotate_key(NEW_KEY)


def prep_training(path: Path) -> None:
    rng = np.random.default_rng(7)
    words = ["kernel", "basin", "drift", "phi", "regime", "geometric", "collapse", "memory", "agent", "state"]
    with ls.open(path, key=KEY) as store:
        coll = store.collection("notes", key="id", fields=NOTE_FIELDS)
        rows = [{"id": i, "text": " ".join(rng.choice(words, 80)) + f" #{i}"} for i in range(1000)]
        coll.put_many(rows)  # about 480 KB: a fresh Store trains at its first compressed write


def run_training(store: ls.Store, path: Path) -> None:
    store.collection("notes").put_many([{"id": 10_000 + i, "text": f"fresh note {i} " * 20} for i in range(10)])


def prep_ack(path: Path) -> None:
    prep_items(path)


def run_ack(store: ls.Store, path: Path) -> None:
    store.changelog.ack(store.changelog.last_seq() - 3)


CASES = {
    "put_many": Case("put_many", prep_items, run_put_many),
    "put_many_full": Case("put_many_full", prep_items, run_put_many, durability="full"),
    "transaction": Case("transaction", prep_items, run_transaction),
    "transaction_full": Case("transaction_full", prep_items, run_transaction, durability="full"),
    "backup": Case("backup", prep_backup, run_backup, state=backup_state, stride=3),
    "rotate_key": Case("rotate_key", prep_items, run_rotate, state=snapshot_any_key),
    "train_dictionary": Case("train_dictionary", prep_training, run_training, stride=7,
                             expect=lambda before, after: not before["dicts"] and bool(after["dicts"])),
    "ack": Case("ack", prep_ack, run_ack),
}

#: N is tried from 1 up to this, then every ``stride``-th N, until the operation completes.
DENSE_N = 40
MAX_N = 2_000


@dataclass
class Tally:
    runs: int = 0
    faults: int = 0
    failed_before: int = 0  # an error, nothing happened
    failed_after: int = 0  # an error, but the operation is durable (e.g. a sync failed after the WAL write)
    completed: int = 0
    problems: list[str] = field(default_factory=list)  # atomicity, verify, reopening
    wrong_errors: list[str] = field(default_factory=list)  # errors that are not LocalStoreError


def one_run(vfs: FaultVFS, case: Case, template: Path, work: Path, kind: str, n: int, persistent: bool,
            before: Any, after: Any, tally: Tally) -> bool:
    """Run the operation once with the fault armed; return whether the fault was reached."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(template, work)
    path = work / "store.db"
    error: BaseException | None = None
    store = ls.open(path, key=KEY, durability=case.durability, vfs=FaultVFS.name)
    vfs.arm(kind, n, persistent)
    try:
        case.run(store, path)
    except Exception as exc:  # noqa: BLE001 (classified below)
        error = exc
    finally:
        fired = vfs.fired
        vfs.disarm()
        try:
            store.close()
        except Exception as exc:  # noqa: BLE001
            tally.problems.append(f"{case.name} {kind} N={n} persistent={persistent}: close raised {exc!r}")
    tally.runs += 1
    tally.faults += fired
    where = f"{case.name}: {kind} fault N={n} ({'persistent' if persistent else 'once'})"
    if error is not None and (not isinstance(error, ls.LocalStoreError) or isinstance(error, apsw.Error)):
        tally.wrong_errors.append(f"{where}: the caller got {type(error).__module__}.{type(error).__name__}: {error}")
    if error is not None and not fired:
        tally.problems.append(f"{where}: failed without a fault: {error!r}")
    try:
        state = case.state(path)
    except Exception as exc:  # noqa: BLE001
        tally.problems.append(f"{where}: reopening failed: {exc!r}")
        return bool(fired)
    if state == after:
        if error is None:
            tally.completed += 1
        else:
            tally.failed_after += 1
    elif state == before:
        if error is None:
            tally.problems.append(f"{where}: the call returned normally but the operation did not happen")
        else:
            tally.failed_before += 1
    else:
        tally.problems.append(f"{where}: the store is neither in the before nor the after state (error {error!r})")
    return bool(fired)


def sweep(vfs: FaultVFS, case: Case, tmp_path: Path, kinds: tuple[str, ...] = KINDS) -> Tally:
    template = tmp_path / "template"
    template.mkdir()
    case.prepare(template / "store.db")
    before = case.state(template / "store.db")
    ref = tmp_path / "reference"
    shutil.copytree(template, ref)
    with ls.open(ref / "store.db", key=KEY, durability=case.durability, vfs=FaultVFS.name) as store:
        case.run(store, ref / "store.db")
    after = case.state(ref / "store.db")
    assert after != before, f"{case.name}: the operation changed nothing"
    assert case.expect(before, after), f"{case.name}: the fault-free run did not do what the case is about"
    tally = Tally()
    for kind in kinds:
        for persistent in (False, True):
            n = 1
            while n <= MAX_N:
                reached = one_run(vfs, case, template, tmp_path / "work", kind, n, persistent, before, after, tally)
                if not reached:
                    break
                n += 1 if n < DENSE_N else case.stride
            else:
                tally.problems.append(f"{case.name}: {kind} faults still reached at N={MAX_N}")
    return tally


class RawErrorLeak(AssertionError):
    """A fault reached the caller as something other than a LocalStoreError."""


@pytest.mark.parametrize("name", CASES)
def test_io_fault_sweep(vfs: FaultVFS, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    tally = sweep(vfs, case, tmp_path)
    print(f"\n{name}: {tally.runs} runs, {tally.faults} faults injected, {tally.failed_before} failed cleanly, "
          f"{tally.failed_after} failed after becoming durable, {tally.completed} completed, "
          f"{len(tally.wrong_errors)} raw errors")
    assert tally.faults > 0 and tally.failed_before > 0, "no fault ever made the operation fail"
    assert not tally.problems, f"{len(tally.problems)} problems:\n" + "\n".join(tally.problems[:20])
    if tally.wrong_errors:
        raise RawErrorLeak(f"{len(tally.wrong_errors)} errors were not LocalStoreError:\n" + "\n".join(tally.wrong_errors[:20]))


# -- the vfs= hook itself ------------------------------------------------------------------------------


def test_vfs_argument_routes_every_file_through_the_named_vfs(vfs: FaultVFS, tmp_path: Path) -> None:
    vfs.arm("never", 0, False)  # count calls without failing any
    with ls.open(tmp_path / "plain.db", key=KEY) as store:
        store.collection("items", key="k", fields=ITEM_FIELDS).put(item(1))
    assert sum(vfs.calls.values()) == 0, "a store opened without vfs= went through the shim"
    with ls.open(tmp_path / "shim.db", key=KEY, vfs=FaultVFS.name) as store:
        assert store.vfs == FaultVFS.name
        store.collection("items", key="k", fields=ITEM_FIELDS).put(item(1))
        writes = vfs.calls["write"]
        assert writes > 0 and vfs.calls["lock"] > 0
        store.backup(tmp_path / "copy.db")
        assert vfs.calls["write"] > writes, "the backup did not go through the store's VFS"
    vfs.disarm()
    with ls.open(tmp_path / "copy.db", key=KEY) as copy:
        assert copy.collection("items").get("k1") == item(1)


@pytest.mark.parametrize("bad", ["no-such-vfs", "", 7])
def test_unknown_vfs_is_a_clear_error_and_creates_nothing(tmp_path: Path, bad: Any) -> None:
    path = tmp_path / "store.db"
    with pytest.raises(ls.StoreOpenError, match="VFS") as info:
        ls.open(path, vfs=bad)
    assert "unix" in str(info.value) or "vfs must be" in str(info.value)
    assert not path.exists()
    ws = ls.Workspace(tmp_path / "ws", vfs="no-such-vfs")
    with pytest.raises(ls.StoreOpenError, match="no-such-vfs"):
        ws.open("agent")
    assert not (tmp_path / "ws" / "agent.db").exists()


# -- a full disk -------------------------------------------------------------------------------------


def test_full_disk_is_a_clear_error_loses_nothing_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "full.db"
    with ls.open(path, key=KEY) as store:
        coll = store.collection("items", key="k", fields=ITEM_FIELDS)
        coll.put_many([item(i) for i in range(50)])
        before = snapshot_rows = {k: coll.get(k) for k in list(coll.keys())}
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages + 2}")
        big = [{"k": f"big{i}", "n": i, "body": "x" * 4000, "secret": "y" * 100} for i in range(200)]
        with pytest.raises(ls.LocalStoreError, match="disk is full") as info:
            coll.put_many(big)
        assert not isinstance(info.value, apsw.Error)
        with pytest.raises(ls.LocalStoreError, match="disk is full"), store.transaction():
            coll.put(item(1000))
            store.collection("more", key="id", fields={"id": ls.Integer(), "blob": ls.Blob()}).put(
                {"id": 1, "blob": b"z" * 50_000})
        assert {k: coll.get(k) for k in list(coll.keys())} == before
        assert store.verify().ok
        last = store.changelog.last_seq()
        # Free space: delete rows; small writes then fit again.
        store._db.execute(f"PRAGMA max_page_count={pages + 2}")
        coll.delete_many([f"k{i}" for i in range(40)])
        coll.put(item(7, "after"))
        store._db.execute("PRAGMA max_page_count=1073741823")  # the disk grows back
        coll.put_many(big)
        assert coll.count() == 10 + 1 + 200
        assert store.changelog.last_seq() == last + 40 + 1 + 200
        assert store.verify().ok
    with ls.open(path, key=KEY) as store:
        assert store.verify().ok
        assert store.collection("items").get("k7")["body"] == item(7, "after")["body"]
        assert snapshot_rows["k45"] == store.collection("items").get("k45")

"""Model-based test of stores with sync: writes, sync, writer crashes, forget, key rotation and restore.

A hypothesis state machine drives two or three stores of one workspace and the real
Postgres of the session. Each store holds one collection with a plain field, a field
encrypted under the store's data key and a field encrypted under a per-subject key
(``forget``-able). A model predicts, after every step, every store's rows as read
with its master key and, after each sync, the central current-state rows.

Size: ``LOCALSTORE_MODEL_EXAMPLES`` (default 25) examples of
``LOCALSTORE_MODEL_STEPS`` (default 30) steps.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import msgpack
import psycopg
import pytest
from _people import COLL, FIELDS, declare
from _sync_workers import local_rows
from conftest import MASTER_KEY
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from localstore.sync import SyncEngine, restore, state_table_name
from pg_fixture import PgServer
from psycopg import sql

import localstore as ls
from localstore.keys import table_exists

#: Examples and steps per example; raise them for a longer run.
EXAMPLES = int(os.environ.get("LOCALSTORE_MODEL_EXAMPLES", "25"))
STEPS = int(os.environ.get("LOCALSTORE_MODEL_STEPS", "30"))

ORDER = tuple(FIELDS)
ENCRYPTED = ("secret", "email")

pids = st.sampled_from(["a", "b", "c", "d", "e", "f"])
subjects = st.sampled_from(["ada", "bob", "cy"])
# No NUL: Postgres text columns turn it into U+FFFD (documented), which is not what this model is about.
words = st.text(alphabet="abxyz é-", max_size=8)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def rows(draw: st.DrawFn, pid: st.SearchStrategy[str] = pids) -> dict[str, Any]:
    """One full row of the collection."""
    return {
        "pid": draw(pid),
        "subj": draw(subjects),
        "name": draw(st.none() | words),
        "n": draw(st.none() | int64),
        "secret": draw(st.none() | words),
        "email": draw(st.none() | words),
    }


batches = st.lists(st.lists(rows(), min_size=1, max_size=6), min_size=1, max_size=5)


@dataclass
class Slot:
    """One store of the workspace and what the model knows about it."""

    name: str
    key: str = field(repr=False)  # the master key the store opens with now (never in a repr)
    store: ls.Store | None = None
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Rows Postgres holds for this store as of its last sync (None: never synced).
    central: dict[str, dict[str, Any]] | None = None
    central_key: str = field(default="", repr=False)  # the master key the wrapped keys in Postgres are under
    central_seq: int = 0
    #: Keys ever shipped for this store (each has a current-state row, live or a tombstone).
    shipped_keys: set[str] = field(default_factory=set)
    #: A second handle on the same file (another process, say), and the master key it was opened with.
    other: ls.Store | None = None
    other_key: str = field(default="", repr=False)
    first_seq: int = 1  # the change log holds first_seq .. last_seq (after a restore it starts past Postgres)
    last_seq: int = 0

    @property
    def coll(self) -> ls.Collection:
        assert self.store is not None
        return self.store.collection(COLL)


def forgotten_view(row: dict[str, Any]) -> dict[str, Any]:
    """The row as read once its subject's key is gone: a stored email reads as FORGOTTEN."""
    return {**row, "email": ls.FORGOTTEN if row["email"] is not None else None}


def all_changes(store: ls.Store) -> list[ls.Change]:
    """Every record of the store's change log, in seq order."""
    out: list[ls.Change] = []
    after = 0
    while True:
        batch = store.changelog.changes(after, limit=500)
        if not batch:
            return out
        out += batch
        after = batch[-1].seq


def crash_writer(path: str, key: str, batches: list[list[dict[str, Any]]], ack_fd: int) -> None:
    """In a forked child: write the batches one transaction each, acknowledging each on ``ack_fd``; never return."""
    code = 0
    try:
        store = ls.open(path, key=key)
        coll = store.collection(COLL)
        for i, batch in enumerate(batches):
            coll.put_many(batch)
            os.write(ack_fd, b"%d\n" % i)
        os.write(ack_fd, b"done\n")
        while True:  # wait to be killed, holding the store open
            time.sleep(1)
    except BaseException as exc:  # noqa: BLE001 - report it; never unwind into the parent's pytest
        os.write(ack_fd, f"error {type(exc).__name__}: {exc}\n".encode("utf-8", "replace"))
        code = 1
    finally:
        os._exit(code)


#: How often each rule ran in this process (printed by the test, to show the run exercised every rule).
RAN: Counter[str] = Counter()


class SyncMachine(RuleBasedStateMachine):
    """Stores of one workspace, a sync engine and the session's Postgres, against a model."""

    server: PgServer  # set by the test function before the run

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ls-model-"))
        self.ws_dir = self.dir / "ws"
        self.ws_dir.mkdir()
        self.schema = "m_" + uuid.uuid4().hex[:12]
        self.url = self.server.url
        self.slots: list[Slot] = []
        self.engine: SyncEngine | None = None
        self.conn: psycopg.Connection[Any] | None = None
        self.restores = 0

    # -- set-up and tear-down -------------------------------------------------------------

    @initialize(count=st.integers(2, 3))
    def open_stores(self, count: int) -> None:
        for i in range(count):
            slot = Slot(f"s{i}", MASTER_KEY)
            slot.store = ls.open(self.path(slot), key=slot.key)
            declare(slot.store)
            self.slots.append(slot)

    def teardown(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.conn is not None:
            self.conn.close()
        for slot in self.slots:
            self.close_other(slot)
            if slot.store is not None:
                slot.store.close()
        try:
            with psycopg.connect(self.server.admin_url, autocommit=True, connect_timeout=10) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, slot: Slot) -> str:
        return str(self.ws_dir / f"{slot.name}.db")

    def engine_now(self, fresh: bool) -> SyncEngine:
        if self.engine is not None and fresh:
            self.engine.close()
            self.engine = None
        if self.engine is None:
            self.engine = SyncEngine(self.ws_dir, self.url, schema=self.schema, watch=False, workers=1)
        return self.engine

    def pg(self) -> psycopg.Connection[Any]:
        """The machine's own Postgres connection for checks (autocommit: each query sees the latest commit)."""
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.url, autocommit=True)
        return self.conn

    def close_other(self, slot: Slot) -> None:
        """Close the slot's second handle, if open."""
        if slot.other is not None:
            slot.other.close()
            slot.other = None

    def release_files(self) -> None:
        """Close the engine's own connections to the store files (before a fork, or before a file goes away)."""
        if self.engine is not None:
            self.engine.close()

    def open_again(self, slot: Slot) -> None:
        assert slot.store is None
        slot.store = ls.open(self.path(slot), key=slot.key, create=False)
        assert declare(slot.store).count() == len(slot.rows)

    # -- writes ---------------------------------------------------------------------------

    @rule(i=st.integers(0, 2), row=rows())
    def put(self, i: int, row: dict[str, Any]) -> None:
        RAN["put"] += 1
        slot = self.slots[i % len(self.slots)]
        assert slot.coll.put(row) == row["pid"]
        slot.rows[row["pid"]] = dict(row)

    @rule(i=st.integers(0, 2), pid=pids, changes=st.fixed_dictionaries({}, optional={
        "subj": subjects, "name": st.none() | words, "n": st.none() | int64,
        "secret": st.none() | words, "email": st.none() | words}), new_email=st.none() | words)
    def update(self, i: int, pid: str, changes: dict[str, Any], new_email: str | None) -> None:
        """Change some fields of a row (a put of the whole row, as read, with changes); a missing key is left alone.

        Draws never depend on the model (a killed writer makes it vary between runs).
        """
        RAN["update"] += 1
        slot = self.slots[i % len(self.slots)]
        current = slot.coll.get(pid)
        assert current == slot.rows.get(pid)
        if current is None:
            return
        row = {**current, **changes}
        if row["email"] is ls.FORGOTTEN:  # a forgotten value cannot be written back
            row["email"] = new_email
        slot.coll.put(row)
        slot.rows[pid] = row

    @rule(i=st.integers(0, 2), pid=pids)
    def delete(self, i: int, pid: str) -> None:
        RAN["delete"] += 1
        slot = self.slots[i % len(self.slots)]
        assert slot.coll.delete(pid) is (pid in slot.rows)
        slot.rows.pop(pid, None)

    @rule(i=st.integers(0, 2), batch=st.lists(rows(), min_size=1, max_size=6))
    def put_many(self, i: int, batch: list[dict[str, Any]]) -> None:
        RAN["put_many"] += 1
        slot = self.slots[i % len(self.slots)]
        assert slot.coll.put_many(batch) == len(batch)
        for row in batch:
            slot.rows[row["pid"]] = dict(row)

    @rule(i=st.integers(0, 2), row=rows())
    def put_through_second_handle(self, i: int, row: dict[str, Any]) -> None:
        """Write through a second handle on the file, opened earlier with the key of that time.

        If the master key was rotated since, a value that needs a key is refused with
        ``WrongKeyError``, or written under a key the handle already holds; a new key is
        never wrapped under the old master key (the value would be unreadable with the
        new one). A row of plain values only is written.
        """
        RAN["put_through_second_handle"] += 1
        slot = self.slots[i % len(self.slots)]
        if slot.other is None:
            slot.other = ls.open(self.path(slot), key=slot.key, create=False)
            slot.other_key = slot.key
        coll = slot.other.collection(COLL)
        stale = slot.other_key != slot.key
        if stale and (row["secret"] is not None or row["email"] is not None):
            try:
                coll.put(row)
            except ls.WrongKeyError as exc:  # a LocalStoreError that says what to do, and nothing written
                assert "reopen" in str(exc)
                return
            # Written under a key this handle still holds (the rotation re-wrapped it, it did not change
            # it): the invariants then read the row through the main handle, with the new master key.
        else:
            coll.put(row)
        slot.rows[row["pid"]] = dict(row)

    def has_keys(self, slot: Slot) -> bool:
        """Whether the store has a key table yet (made with its first encrypted value)."""
        assert slot.store is not None
        return bool(slot.store._run(lambda db: table_exists(db, "_ls_keys"), "test read"))

    # -- sync -------------------------------------------------------------------------------

    @rule(fresh=st.booleans())
    def sync(self, fresh: bool) -> None:
        """One pass of the engine over the workspace, then the central rows must equal the model's."""
        RAN["sync"] += 1
        engine = self.engine_now(fresh)
        pending = sum(s.store.changelog.pending() for s in self.slots if s.store is not None)
        assert engine.sync_now() == pending
        for slot in self.slots:
            assert slot.store is not None
            log = slot.store.changelog
            slot.last_seq = log.last_seq()
            assert log.watermark() == slot.last_seq
            slot.central = {k: dict(r) for k, r in slot.rows.items()}
            slot.central_key = slot.key
            slot.central_seq = slot.last_seq
            slot.shipped_keys |= {c.key for c in all_changes(slot.store)}
            self.check_central(slot, against_local=True)

    def check_central(self, slot: Slot, *, against_local: bool) -> None:
        """Postgres holds the model's central rows of the store; the key holder decrypts them to the model's values.

        Plain fields are equal column by column; encrypted fields are ciphertext, and
        with ``against_local`` (right after a sync) byte for byte what the store holds.
        The newest central change-log record of each live key decodes, with the store's
        keys, to the model's row: a forgotten subject's values read FORGOTTEN there too.
        """
        assert slot.store is not None and slot.central is not None
        conn = self.pg()
        cur = conn.execute(sql.SQL("SELECT * FROM {} WHERE _ls_store = %s").format(
            sql.Identifier(self.schema, state_table_name(COLL))), (slot.store.id,))
        names = [d.name for d in cur.description or []]
        central = {r[names.index("_ls_key")]: dict(zip(names, r)) for r in cur.fetchall()}
        live = {k: r for k, r in central.items() if not r["_ls_deleted"]}
        assert live.keys() == slot.central.keys(), (slot.name, sorted(live), sorted(slot.central))
        assert set(central) <= slot.shipped_keys | set(slot.central)  # the rest are tombstones of shipped keys
        local = local_rows(slot.store, COLL) if against_local else {}
        for pid, expected in slot.central.items():
            got = live[pid]
            assert got["_ls_seq"] <= slot.central_seq
            for name in ("pid", "subj", "name", "n"):
                assert got[name] == expected[name], (slot.name, pid, name, got[name], expected[name])
            for name in ENCRYPTED:
                if expected[name] is None:
                    assert got[name] is None
                    continue
                assert isinstance(got[name], bytes)
                if against_local:  # ciphertext only, exactly the stored bytes
                    assert got[name] == local[pid][name], (slot.name, pid, name)
                if expected[name] is not ls.FORGOTTEN and len(expected[name]) >= 6:
                    assert expected[name].encode() not in got[name]
        newest = conn.execute(sql.SQL(
            "SELECT DISTINCT ON (key) key, op, payload FROM {} WHERE store_id = %s AND collection = %s "
            "ORDER BY key, seq DESC").format(sql.Identifier(self.schema, "changes")), (slot.store.id, COLL)).fetchall()
        last = conn.execute(sql.SQL("SELECT last_seq FROM {} WHERE store_id = %s").format(
            sql.Identifier(self.schema, "stores")), (slot.store.id,)).fetchone()
        assert last is not None and last[0] == slot.central_seq
        coll = slot.coll
        # After a restore, Postgres still holds the records from before it: only live keys are compared.
        decoded = {key: coll.decode_payload(bytes(payload)) for key, op, payload in newest if op == "put"}
        for pid, expected in slot.central.items():
            assert decoded[pid] == expected, (slot.name, pid, decoded[pid], expected)
            assert (decoded[pid]["email"] is ls.FORGOTTEN) == (expected["email"] is ls.FORGOTTEN)

    # -- crashes ----------------------------------------------------------------------------

    @rule(i=st.integers(0, 2), batches=batches, acks=st.integers(0, 5))
    def writer_killed(self, i: int, batches: list[list[dict[str, Any]]], acks: int) -> None:
        """A writer process is SIGKILLed after ``acks`` acknowledged transactions; the store is reopened from disk.

        Every acknowledged transaction is there; the one in flight is all there or absent;
        the file recovers from its WAL with no clean close.
        """
        RAN["writer_killed"] += 1
        slot = self.slots[i % len(self.slots)]
        acks = min(acks, len(batches))
        assert slot.store is not None
        slot.store.close()  # no connection to the file may cross the fork (SQLite's rule)
        slot.store = None
        self.close_other(slot)
        self.release_files()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read_fd)
            crash_writer(self.path(slot), slot.key, batches, write_fd)
        os.close(write_fd)
        got: list[bytes] = []
        try:
            with os.fdopen(read_fd, "rb") as acks_in:
                while len(got) < acks:
                    line = acks_in.readline()
                    assert line and not line.startswith(b"error"), line.decode("utf-8", "replace")
                    got.append(line)
                os.kill(pid, signal.SIGKILL)
        finally:
            if len(got) < acks:
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        if acks:  # the child wrote and was killed holding the store open: no clean close removed the WAL
            assert os.path.exists(self.path(slot) + "-wal")
        slot.store = ls.open(self.path(slot), key=slot.key, create=False)
        declare(slot.store)
        new = [c for c in all_changes(slot.store) if c.seq > slot.last_seq]
        # Which transactions landed: a prefix, at least the acknowledged ones, each whole.
        done, count = 0, 0
        while done < len(batches) and count + len(batches[done]) <= len(new):
            count += len(batches[done])
            done += 1
        assert count == len(new), f"a transaction was torn: {len(new)} records after {done} whole batches"
        assert done >= acks, (done, acks)
        for batch in batches[:done]:
            for row in batch:
                slot.rows[row["pid"]] = dict(row)

    @rule(i=st.integers(0, 2))
    def reopen(self, i: int) -> None:
        """Close and reopen a store; the old master key is refused after a rotation."""
        RAN["reopen"] += 1
        slot = self.slots[i % len(self.slots)]
        assert slot.store is not None
        has_keys = self.has_keys(slot)
        slot.store.close()
        slot.store = None
        self.close_other(slot)
        if slot.key != MASTER_KEY and has_keys:
            with pytest.raises(ls.WrongKeyError):
                ls.open(self.path(slot), key=MASTER_KEY, create=False)
        self.open_again(slot)

    # -- keys ---------------------------------------------------------------------------------

    @rule(i=st.integers(0, 2), subject=subjects)
    def forget(self, i: int, subject: str) -> None:
        RAN["forget"] += 1
        slot = self.slots[i % len(self.slots)]
        assert slot.store is not None
        slot.store.forget(subject)
        for pid, row in slot.rows.items():
            if row["subj"] == subject:
                slot.rows[pid] = forgotten_view(row)
        if slot.central is not None:  # Postgres holds ciphertext only: forget reaches it by construction
            for pid, row in slot.central.items():
                if row["subj"] == subject:
                    slot.central[pid] = forgotten_view(row)

    @rule(i=st.integers(0, 2), then_reencrypt=st.booleans())
    def rotate(self, i: int, then_reencrypt: bool) -> None:
        """Re-wrap the store's keys under a new master key, and perhaps move values onto a new data key."""
        RAN["rotate"] += 1
        slot = self.slots[i % len(self.slots)]
        assert slot.store is not None
        new_key = ls.generate_key()
        rewrapped = slot.store.rotate_key(new_key)  # not inside an assert: its rewriting would print the key
        slot.key = new_key
        assert rewrapped >= 0
        if then_reencrypt:
            slot.store.reencrypt()

    # -- restore ------------------------------------------------------------------------------

    @precondition(lambda self: any(s.central is not None for s in self.slots))
    @rule(data=st.data(), rename=st.booleans())
    def laptop_died(self, data: st.DataObject, rename: bool) -> None:
        """Lose a synced store's file and restore it from Postgres into a fresh path; keep writing there.

        Changes not yet synced are lost; subject-encrypted values read as FORGOTTEN
        (their keys never leave the store); the seq continues after what Postgres holds.
        """
        RAN["laptop_died"] += 1
        slot = data.draw(st.sampled_from([s for s in self.slots if s.central is not None]), label="slot")
        assert slot.store is not None and slot.central is not None
        store_id = slot.store.id
        slot.store.close()
        slot.store = None
        self.close_other(slot)
        self.release_files()
        for suffix in ("", "-wal", "-shm"):
            with_suffix = self.path(slot) + suffix
            if os.path.exists(with_suffix):
                os.remove(with_suffix)
        if rename:
            self.restores += 1
            slot.name = f"{slot.name.split('-')[0]}-r{self.restores}"
        slot.store = restore(self.url, store_id, self.path(slot), schema=self.schema, key=slot.central_key)
        declare(slot.store)
        slot.key = slot.central_key
        assert slot.store.id == store_id
        log = slot.store.changelog
        assert log.last_seq() == log.watermark() == slot.central_seq
        slot.rows = {k: forgotten_view(r) for k, r in slot.central.items()}
        slot.central = {k: dict(r) for k, r in slot.rows.items()}
        slot.first_seq = slot.last_seq = slot.central_seq
        slot.first_seq += 1

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def rows_match_model(self) -> None:
        for slot in self.slots:
            if slot.store is None:
                continue
            found = {r["pid"]: r for r in slot.coll.find()}
            assert found == slot.rows, (slot.name, found, slot.rows)
            for pid, row in slot.rows.items():
                for name in ENCRYPTED:  # equality alone would let FORGOTTEN pass as any falsy value
                    assert (found[pid][name] is ls.FORGOTTEN) == (row[name] is ls.FORGOTTEN)

    @invariant()
    def change_log_contiguous(self) -> None:
        """Seqs run first_seq .. last_seq with no gap; each key's newest record agrees with its presence."""
        for slot in self.slots:
            if slot.store is None:
                continue
            changes = all_changes(slot.store)
            log = slot.store.changelog
            last = log.last_seq()
            assert last >= slot.last_seq
            assert [c.seq for c in changes] == list(range(slot.first_seq, last + 1)), slot.name
            newest: dict[str, str] = {}
            for c in changes:
                newest[c.key] = c.op
            for key, op in newest.items():
                assert (op == "put") == (key in slot.rows), (slot.name, key, op)
            if slot.first_seq == 1:  # an unbroken history names every live row
                assert all(newest.get(pid) == "put" for pid in slot.rows)
            slot.last_seq = last
            assert slot.central_seq <= log.watermark() <= last

    @invariant()
    def central_matches_model(self) -> None:
        """Between syncs Postgres keeps what the last sync shipped, readable by the key holder after any step."""
        for slot in self.slots:
            if slot.store is not None and slot.central is not None:
                self.check_central(slot, against_local=False)

    @invariant()
    def verify_ok(self) -> None:
        for slot in self.slots:
            if slot.store is None:
                continue
            report = slot.store.verify()
            assert report.ok, str(report)


def machine_settings(examples: int = EXAMPLES, steps: int = STEPS) -> settings:
    """The run's size; hypothesis prints each failing example's steps (never a key: keys are not drawn)."""
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture
def machine(pg_server: PgServer) -> Iterator[type[SyncMachine]]:
    """The machine class, bound to the session's Postgres."""
    SyncMachine.server = pg_server
    yield SyncMachine


def test_model_with_sync(machine: type[SyncMachine]) -> None:
    """Random interleavings of writes, sync, writer kills, forget, rotation and restore agree with the model."""
    started = time.monotonic()
    run_state_machine_as_test(machine, settings=machine_settings())
    print(f"model: {EXAMPLES} examples x {STEPS} steps in {time.monotonic() - started:.1f}s; rules run: "
          + ", ".join(f"{name} {n}" for name, n in sorted(RAN.items())))


def test_payload_of_central_record_is_msgpack(machine: type[SyncMachine]) -> None:
    """The helper assumption of check_central: the central change log keeps the stored payload byte for byte."""
    m = machine()
    try:
        m.open_stores(2)
        m.put(0, {"pid": "a", "subj": "ada", "name": "x", "n": 1, "secret": "s", "email": "e"})
        m.sync(False)
        with psycopg.connect(m.url) as conn:
            payload = conn.execute(sql.SQL("SELECT payload FROM {} LIMIT 1").format(
                sql.Identifier(m.schema, "changes"))).fetchone()
        assert payload is not None
        values = msgpack.unpackb(bytes(payload[0]), raw=False)
        assert set(values) == set(ORDER) and isinstance(values["email"], bytes)
    finally:
        m.teardown()

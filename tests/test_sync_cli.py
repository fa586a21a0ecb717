"""The sync commands and the daemon: writers plus daemons, the watcher, status, redaction, bad configuration."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _sync_workers import assert_converged
from conftest import PYTHON, ROOT
from localstore.sync import SyncEngine
from pg_fixture import PgServer
from psycopg import sql

import localstore as ls

WORKERS = str(ROOT / "tests" / "_sync_workers.py")


def _cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "localstore", *args], check=False, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting ({timeout:.0f}s) for {what}")
        time.sleep(0.05)


def _central_seq(url: str, schema: str, store_id: str) -> int:
    try:
        with psycopg.connect(url) as conn:
            row = conn.execute(sql.SQL("SELECT last_seq FROM {} WHERE store_id = %s").format(
                sql.Identifier(schema, "stores")), (store_id,)).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0


def _store_state(path: Path) -> tuple[int, int, int]:
    with ls.open(path, create=False) as s:
        return s.changelog.last_seq(), s.changelog.watermark(), s.changelog.pending()


def test_four_writers_and_two_daemons_sharing_one_postgres(
    tmp_path: Path, pg_server: PgServer, pg_url: str, pg_schema: str, subprocess_env: dict[str, str]
) -> None:
    ws1, ws2 = tmp_path / "ws1", tmp_path / "ws2"
    ws1.mkdir()
    ws2.mkdir()
    logs = [tmp_path / "d1.log", tmp_path / "d2.log"]
    daemons: list[subprocess.Popen[bytes]] = []
    for ws, log in ((ws1, logs[0]), (ws2, logs[1])):
        with open(log, "w") as err:  # the daemon writes to its own copy of the descriptor
            daemons.append(subprocess.Popen(
                [PYTHON, "-m", "localstore", "sync", "daemon", str(ws), "--url", pg_url, "--schema", pg_schema],
                env=subprocess_env, stdout=subprocess.DEVNULL, stderr=err))
    try:
        jobs = [(ws1, "a", 1), (ws1, "a", 2), (ws1, "b", 3), (ws2, "c", 4)]  # two writers share store a
        writers = [subprocess.Popen([PYTHON, WORKERS, "write", str(ws), name, str(w), "3000"], env=subprocess_env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for ws, name, w in jobs]
        for proc in writers:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0 and out.startswith("ok 3000"), err  # the writers saw no errors
            assert "locked" not in err
        paths = [ws1 / "a.db", ws1 / "b.db", ws2 / "c.db"]
        ids = {}
        for p in paths:
            with ls.open(p, create=False) as s:
                ids[p] = (s.id, s.changelog.last_seq())
        _wait_for(lambda: all(_central_seq(pg_url, pg_schema, sid) == last for sid, last in ids.values()), 120,
                  "the daemons to ship everything")
    finally:
        for d in daemons:
            d.send_signal(signal.SIGTERM)
        codes = [d.wait(60) for d in daemons]
    assert codes == [0, 0]  # SIGTERM ends them cleanly
    for p in paths:
        with ls.open(p, create=False) as s:
            assert_converged(pg_url, pg_schema, s)
    for log in logs:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        events = {line.get("event") for line in lines}
        assert {"started", "synced", "stopped"} <= events, events
        assert pg_server.password not in log.read_text()


def test_the_watcher_picks_up_a_new_store_and_does_not_poll(tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    folder = tmp_path / "ws"
    folder.mkdir()
    engine = SyncEngine(ls.Workspace(folder), pg_url, schema=pg_schema).start()
    try:
        time.sleep(0.2)
        store = ls.Workspace(folder).open("newcomer")  # created after the engine started
        store.collection("notes", key="id", fields={"id": ls.Text(), "t": ls.Text()}).put({"id": "n1", "t": "hello"})
        sid, last = store.id, store.changelog.last_seq()
        # A generous bound, not a timing threshold: the expected pickup is well under a second.
        _wait_for(lambda: _central_seq(pg_url, pg_schema, sid) == last, 30, "the new store's write to ship")
        _wait_for(lambda: store.changelog.watermark() == last, 30, "the watermark")
        time.sleep(0.5)  # let the event of the watermark write itself settle
        before = engine.wakeups
        time.sleep(1.5)
        assert engine.wakeups == before, "the engine woke up with nothing written: it polls"
        store.collection("notes").put({"id": "n2", "t": "again"})
        _wait_for(lambda: _central_seq(pg_url, pg_schema, sid) == last + 1, 30, "the second write to ship")
        store.close()
    finally:
        engine.stop()


def test_sync_once_and_status(tmp_path: Path, pg_server: PgServer, pg_url: str, pg_schema: str,
                              subprocess_env: dict[str, str]) -> None:
    ws = ls.Workspace(tmp_path / "ws")
    for name in ("a", "b"):
        ws.open(name).collection("m", key="id", fields={"id": ls.Integer(), "x": ls.Real()}).put_many(
            [{"id": i, "x": i / 2} for i in range(100)])
    ws.close()
    env = {**subprocess_env, "LOCALSTORE_POSTGRES_URL": pg_url}
    before = _cli("sync", "status", str(tmp_path / "ws"), "--schema", pg_schema, "--json", env=env)
    assert before.returncode == 0, before.stderr
    data = json.loads(before.stdout)
    assert [s["pending"] for s in data["stores"]] == [100, 100]
    assert pg_server.password not in before.stdout and "***" in data["url"]
    once = _cli("sync", "once", str(tmp_path / "ws"), "--schema", pg_schema, env=env)
    assert once.returncode == 0, once.stderr
    assert "shipped 200 changes from 2 store(s)" in once.stdout
    after = _cli("sync", "status", str(tmp_path / "ws"), "--schema", pg_schema, env=env)
    assert after.returncode == 0 and after.stdout.count(" 0.0s") == 2, after.stdout
    assert json.loads(_cli("sync", "status", str(tmp_path / "ws"), "--schema", pg_schema, "--json",
                           env=env).stdout)["stores"][0]["central_seq"] == 100


def test_restore_command(tmp_path: Path, pg_url: str, pg_schema: str, subprocess_env: dict[str, str]) -> None:
    ws = ls.Workspace(tmp_path / "ws")
    ws.open("k7").collection("m", key="id", fields={"id": ls.Text(), "x": ls.Json()}).put({"id": "a", "x": [1]})
    ws.close()
    env = {**subprocess_env, "LOCALSTORE_POSTGRES_URL": pg_url}
    assert _cli("sync", "once", str(tmp_path / "ws"), "--schema", pg_schema, env=env).returncode == 0
    out = _cli("restore", "k7", "--from", pg_url, "--to", str(tmp_path / "back.db"), "--schema", pg_schema,
               env=subprocess_env)
    assert out.returncode == 0, out.stderr
    assert "verify: ok" in out.stdout
    with ls.open(tmp_path / "back.db", create=False) as r:
        assert r.collection("m").get("a") == {"id": "a", "x": [1]}
    again = _cli("restore", "k7", "--from", pg_url, "--to", str(tmp_path / "back.db"), "--schema", pg_schema,
                 env=subprocess_env)
    assert again.returncode == 1 and "already exists" in again.stderr


BAD = {
    "malformed": ("postgresql://ls_sync:{pw}@localhost:notaport/x", "malformed"),
    "wrong password": (None, "rejected the credentials"),
    "missing database": (None, "database does not exist"),
    "unreachable": ("postgresql://ls_sync:{pw}@/localstore_test?host=/nonexistent/socket/dir", "cannot reach"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configuration_gives_a_clear_message_and_leaves_stores_untouched(
    case: str, tmp_path: Path, pg_server: PgServer, pg_schema: str, subprocess_env: dict[str, str]
) -> None:
    template, expected = BAD[case]
    if case == "wrong password":
        if not pg_server.password:
            pytest.skip("the server's URL has no password")
        url = pg_server.url_for(password="not-" + pg_server.password)
    elif case == "missing database":
        url = pg_server.url_for(database="no_such_db")
        if url == pg_server.url:
            pytest.skip("cannot derive a missing-database URL from --postgres-url")
    else:
        assert template is not None
        url = template.format(pw=pg_server.password or "secret")
    ws = ls.Workspace(tmp_path / "ws")
    ws.open("a").collection("m", key="id", fields={"id": ls.Integer()}).put_many([{"id": i} for i in range(10)])
    ws.close()
    state = _store_state(tmp_path / "ws" / "a.db")
    for args in (["sync", "once", str(tmp_path / "ws")], ["sync", "daemon", str(tmp_path / "ws")]):
        if case == "unreachable" and args[1] == "daemon":
            continue  # an unreachable server is retried by the daemon, not fatal
        out = _cli(*args, "--url", url, "--schema", pg_schema, env=subprocess_env, timeout=60)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert expected in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert (pg_server.password or "secret") not in out.stderr + out.stdout
    out = _cli("restore", "a", "--from", url, "--to", str(tmp_path / "r.db"), env=subprocess_env, timeout=60)
    assert out.returncode == 1 and expected in out.stderr, out.stderr
    assert (pg_server.password or "secret") not in out.stderr + out.stdout
    assert not (tmp_path / "r.db").exists()
    assert _store_state(tmp_path / "ws" / "a.db") == state  # the stores are untouched


def test_no_password_in_any_output(tmp_path: Path, pg_server: PgServer, pg_url: str, pg_schema: str,
                                   subprocess_env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    if not pg_server.password:
        pytest.skip("the server's URL has no password")
    ws = ls.Workspace(tmp_path / "ws")
    ws.open("a").collection("m", key="id", fields={"id": ls.Integer()}).put_many([{"id": i} for i in range(10)])
    ws.close()
    outputs: list[str] = []
    wrong = pg_server.url_for(password=pg_server.password + "x")
    for args in (
        ["sync", "once", str(tmp_path / "ws"), "--url", pg_url],
        ["sync", "status", str(tmp_path / "ws"), "--url", pg_url],
        ["sync", "status", str(tmp_path / "ws"), "--url", pg_url, "--json"],
        ["sync", "status", str(tmp_path / "ws"), "--url", wrong, "--json"],
        ["sync", "once", str(tmp_path / "ws"), "--url", wrong],
        ["restore", "a", "--from", pg_url, "--to", str(tmp_path / "r.db")],
        ["restore", "nobody", "--from", pg_url, "--to", str(tmp_path / "r2.db")],
        ["restore", "a", "--from", wrong, "--to", str(tmp_path / "r3.db")],
    ):
        out = _cli(*args, "--schema", pg_schema, env=subprocess_env)
        outputs += [out.stdout, out.stderr]
    daemon = subprocess.Popen([PYTHON, "-m", "localstore", "sync", "daemon", str(tmp_path / "ws"), "--url", pg_url,
                               "--schema", pg_schema, "--verbose"], env=subprocess_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    daemon.send_signal(signal.SIGINT)
    dout, derr = daemon.communicate(timeout=60)
    outputs += [dout, derr]
    assert '"event": "started"' in derr
    with caplog.at_level("DEBUG", logger="localstore.sync"):
        engine = SyncEngine(ls.Workspace(tmp_path / "ws"), wrong, schema=pg_schema, watch=False)
        with pytest.raises(Exception) as info:
            engine.sync_now()
        outputs.append(str(info.value))
        outputs.append(repr(info.value))
        engine.close()
    outputs += [r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records]
    text = "\n".join(outputs)
    assert text.count(pg_server.password) == 0
    assert "***" in text


def test_a_subscriber_pulls_other_stores_writes_without_writing_itself(
    tmp_path: Path, pg_url: str, pg_schema: str
) -> None:
    folder = tmp_path / "ws"
    ws = ls.Workspace(folder)
    a, b = ws.open("a"), ws.open("b")
    fields = {"fact": ls.Text(), "value": ls.Real()}
    fa = a.collection("facts", key="fact", fields=fields)
    fb = b.collection("facts", key="fact", fields=fields)
    from localstore.sync import subscribe

    from localstore import replica

    subscribe(b, "facts")
    engine = SyncEngine(ws, pg_url, schema=pg_schema).start()
    try:
        time.sleep(0.3)
        fa.put({"fact": "pi", "value": 3.14})  # only a writes; b learns of it through Postgres
        _wait_for(lambda: fb.get("pi") is not None, 30, "b to pull a's row")
        assert replica.origin(b, "facts", "pi") == a.id
        _wait_for(lambda: a.changelog.watermark() == a.changelog.last_seq(), 30, "a's watermark")
        time.sleep(0.5)
        before = engine.wakeups
        time.sleep(1.5)
        assert engine.wakeups == before, "pulling must not keep the engine busy"
    finally:
        engine.stop()
        ws.close()

"""The sync engine's pure logic: positions, batches, backoff, debounce, URLs and field mapping. No Postgres."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from localstore.sync import ConfigError, redact, resolve_url
from localstore.sync.batching import (
    Backoff,
    Debouncer,
    Positions,
    ack_point,
    latest_flags,
    plan,
)
from localstore.sync.mapping import compatible, pg_type
from localstore.sync.url import check_url, password_of, redact_text


def test_plan_ships_after_the_watermark() -> None:
    assert plan(Positions(last_seq=10, watermark=4, central_seq=4)) == ("ship", 4)
    assert plan(Positions(last_seq=10, watermark=4, central_seq=0)) == ("ship", 4)


def test_plan_is_idle_when_everything_is_acknowledged() -> None:
    assert plan(Positions(last_seq=10, watermark=10, central_seq=10)) == ("idle", 10)
    assert plan(Positions(0, 0, 0)) == ("idle", 0)


def test_plan_acknowledges_a_lost_ack_first() -> None:
    # Postgres committed up to 8 but the watermark write never happened.
    assert plan(Positions(last_seq=10, watermark=4, central_seq=8)) == ("ack", 8)


def test_plan_refuses_a_stale_copy() -> None:
    assert plan(Positions(last_seq=5, watermark=5, central_seq=9)) == ("conflict", 9)


def test_ack_point_is_the_last_seq_and_checks_order() -> None:
    assert ack_point([5, 6, 9], 4) == 9
    assert ack_point([], 7) == 7
    with pytest.raises(ValueError):
        ack_point([5, 5], 4)
    with pytest.raises(ValueError):
        ack_point([3], 4)


@dataclass
class C:
    seq: int
    key: str
    collection: str = "c"


def test_latest_flags_mark_the_last_change_of_each_key() -> None:
    assert latest_flags(["a", "b", "a", "c", "b"]) == [False, False, True, True, True]
    assert latest_flags([1, "1", 1]) == [False, True, True]  # keys compare by value and type
    assert latest_flags([]) == []


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    b = Backoff(base=0.1, cap=2.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(12)]
    for i, d in enumerate(delays):
        ceiling = min(2.0, 0.1 * 2**i)
        assert ceiling / 2 <= d <= ceiling
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next_delay() <= 0.1


def test_debouncer_coalesces_bursts_and_bounds_the_wait() -> None:
    d = Debouncer(delay=0.05, max_delay=0.2)
    assert d.next_deadline() is None
    d.touch("a", 0.0)
    d.touch("a", 0.03)
    assert d.next_deadline() == pytest.approx(0.08)
    assert d.pop_due(0.07) == []
    assert d.pop_due(0.08) == ["a"]
    assert d.next_deadline() is None
    for t in range(100):  # a constant stream cannot postpone it past max_delay
        d.touch("b", 1.0 + t * 0.01)
    assert d.next_deadline() == pytest.approx(1.2)


def test_debouncer_schedules_retries_without_delaying_due_keys() -> None:
    d = Debouncer(delay=0.05)
    d.schedule("a", 5.0)
    d.touch("a", 1.0)
    assert d.next_deadline() == pytest.approx(1.05)
    d.schedule("a", 9.0)
    assert d.next_deadline() == pytest.approx(1.05)
    assert d.pop_due(2.0) == ["a"]


URLS = [
    "postgresql://sync:Pw-7fq2Zs9Lk@db.lan:5432/agents",
    "postgres://sync:Pw-7fq2Zs9Lk@/agents?host=/tmp/sock",
    "host=db.lan dbname=agents user=sync password=Pw-7fq2Zs9Lk",
    "postgresql://sync@db.lan/agents?password=Pw-7fq2Zs9Lk&sslmode=require",
]


@pytest.mark.parametrize("url", URLS)
def test_redaction_removes_the_password(url: str) -> None:
    assert password_of(url) == "Pw-7fq2Zs9Lk"
    assert "Pw-7fq2Zs9Lk" not in redact(url)
    assert "***" in redact(url)
    assert "Pw-7fq2Zs9Lk" not in redact_text(f"failed: {url} said Pw-7fq2Zs9Lk", url)


def test_redaction_leaves_urls_without_password_alone() -> None:
    assert redact("postgresql://sync@db.lan/agents") == "postgresql://sync@db.lan/agents"


@pytest.mark.parametrize("bad", ["", "mysql://u:p@h/db", "postgresql://u:p@h:notaport/db", "postgresql:///db",
                                 "just-a-word"])
def test_check_url_refuses_malformed_urls(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_url(bad)
    assert "p@" not in str(info.value) or "***" in str(info.value)


def test_resolve_url_prefers_argument_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCALSTORE_POSTGRES_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(ConfigError, match="LOCALSTORE_POSTGRES_URL"):
        resolve_url(None)
    monkeypatch.setenv("DATABASE_URL", "postgresql://b@h/db")
    assert resolve_url(None) == "postgresql://b@h/db"
    monkeypatch.setenv("LOCALSTORE_POSTGRES_URL", "postgresql://a@h/db")
    assert resolve_url(None) == "postgresql://a@h/db"
    assert resolve_url("postgresql://c@h/db") == "postgresql://c@h/db"


def test_field_mapping() -> None:
    assert pg_type({"type": "Text"}, True) == "text"
    assert pg_type({"type": "Integer"}, True) == "bigint"
    assert pg_type({"type": "Real"}, True) == "double precision"
    assert pg_type({"type": "Json"}, True) == "jsonb"
    assert pg_type({"type": "Vector", "dim": 8}, True) == "vector(8)"
    assert pg_type({"type": "Vector", "dim": 8}, False) == "real[]"
    assert pg_type({"type": "Text", "encrypt": True}, True) == "bytea"  # ciphertext only
    assert pg_type({"type": "Json", "compress": True}, True) == "bytea"
    assert compatible({"type": "Real"}, "double precision", True)
    assert not compatible({"type": "Real"}, "text", True)


def test_text_columns_cannot_hold_nul_so_it_is_replaced() -> None:
    from localstore.sync.mapping import converter

    assert converter({"type": "Text"}, "text")("a\x00b") == "a\ufffdb"
    assert converter({"type": "Text"}, "text")("plain") == "plain"
    assert converter({"type": "Json"}, "jsonb")('{"k":"\\u0000"}') == '{"k":"\\ufffd"}'

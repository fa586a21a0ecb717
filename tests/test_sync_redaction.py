"""Redaction and error classification edge cases of the sync package (no server needed)."""

from __future__ import annotations

import psycopg
import pytest
from localstore.sync.errors import ConfigError, PostgresError, wrap
from localstore.sync.url import redact_text


def test_a_row_level_security_refusal_is_not_called_a_malformed_url() -> None:
    url = "postgresql://tenant:s3cret-pw@db.lan/agents"
    err = wrap(psycopg.errors.InsufficientPrivilege("new row violates row-level security policy"), url, "shipping")
    assert isinstance(err, PostgresError) and not isinstance(err, ConfigError)
    assert "row-level security" in str(err) and "s3cret-pw" not in str(err)


def test_a_client_side_dsn_error_is_a_config_error() -> None:
    url = "postgresql://u:s3cret-pw@h/db?bogus_option=1"
    with pytest.raises(psycopg.ProgrammingError) as info:
        psycopg.connect(url, connect_timeout=1)
    err = wrap(info.value, url, "connecting")
    assert isinstance(err, ConfigError), repr(err)
    assert "malformed" in str(err) and "s3cret-pw" not in str(err)


@pytest.mark.parametrize("password", ["p", "ab", "xyz9"])
def test_a_short_password_is_removed_where_it_stands_alone_without_blanking_words(password: str) -> None:
    url = f"postgresql://u:{password}@h/db"
    text = f"postgresql policy failed; password was {password}, then '{password}' and ={password}"
    out = redact_text(text, url)
    assert out.startswith("postgresql policy failed"), out
    assert f" {password}," not in out and f"'{password}'" not in out and f"={password}" not in out


def test_a_long_password_is_removed_everywhere_even_inside_words() -> None:
    url = "postgresql://u:Sentinel-Pw-42@h/db"
    assert "Sentinel-Pw-42" not in redact_text("xSentinel-Pw-42y and Sentinel-Pw-42", url)

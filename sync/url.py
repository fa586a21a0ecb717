"""The Postgres URL: where it comes from, how it is checked, and how it is printed (never with its password)."""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlsplit

#: Environment variables read for the URL when none is given, in order.
URL_ENV_VARS = ("LOCALSTORE_POSTGRES_URL", "DATABASE_URL")

REDACTED = "***"

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/?#\s]*):(?P<pw>[^@/?#\s]*)@", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(?P<k>\bpassword\s*=\s*)(?P<v>'(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)


def resolve_url(url: str | None = None) -> str:
    """The URL given, else ``LOCALSTORE_POSTGRES_URL``, else ``DATABASE_URL``; raise ``ConfigError`` if none."""
    from .errors import ConfigError

    if url:
        return check_url(url)
    for name in URL_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return check_url(value)
    raise ConfigError(
        "no Postgres URL: pass one (--url postgresql://USER:PASSWORD@HOST:PORT/DB) or set "
        "LOCALSTORE_POSTGRES_URL (or DATABASE_URL)"
    )


def check_url(url: str) -> str:
    """Return ``url`` if it looks like a Postgres URL or conninfo string, else raise ``ConfigError``."""
    from .errors import ConfigError

    if not isinstance(url, str) or not url.strip():
        raise ConfigError("the Postgres URL is empty; expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    shown = redact(url)
    if "://" in url:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigError(f"the Postgres URL {shown} is malformed ({redact_text(str(exc), url)}); "
                              "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE") from None
        if parts.scheme.lower() not in ("postgres", "postgresql"):
            raise ConfigError(f"the Postgres URL {shown} has scheme {parts.scheme!r}; "
                              "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
        if not parts.hostname and not dict(parse_qsl(parts.query)).get("host"):
            raise ConfigError(f"the Postgres URL {shown} names no host; "
                              "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    else:
        import psycopg.conninfo  # importing sync already needs psycopg (central.py), so this cannot fail

        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except (psycopg.Error, UnicodeError) as exc:  # a ProgrammingError quoting the string, or a lone surrogate
            raise ConfigError(f"the Postgres URL {shown} is malformed ({redact_text(str(exc), url)}); "
                              "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE") from None
        if "=" not in url:
            raise ConfigError(f"the Postgres URL {shown} is malformed; "
                              "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    return url


def password_of(url: str) -> str | None:
    """The password in a URL or conninfo string, or None."""
    m = _USERINFO.search(url)
    if m and m.group("pw"):
        return m.group("pw")
    m = _KV_PASSWORD.search(url)
    if m:
        return m.group("v").strip("'")
    return None


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (in the user info and in any ``password=``)."""
    out = _USERINFO.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:{REDACTED}@" if m.group("pw") else m.group(0), url)
    return _KV_PASSWORD.sub(lambda m: f"{m.group('k')}{REDACTED}", out)


def redact_text(text: str, url: str | None = None) -> str:
    """``text`` with any URL password in it redacted, and the password of ``url`` removed wherever it appears."""
    out = redact(text)
    if url:
        secret = password_of(url)
        if secret:
            from urllib.parse import unquote

            for form in {secret, unquote(secret)}:
                out = _remove(out, form)
    return out


#: Passwords shorter than this are removed only where they stand alone, so that a
#: one-letter password does not blank that letter out of every word of a message.
SHORT_SECRET = 6


def _remove(text: str, secret: str) -> str:
    if len(secret) >= SHORT_SECRET:
        return text.replace(secret, REDACTED)
    return re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", REDACTED, text)


def describe(url: str) -> str:
    """A short, password-free name for the server and database, for messages."""
    return redact(url)

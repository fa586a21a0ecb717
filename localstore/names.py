"""Validation of the names users give: collections, fields and workspace stores.

Names become SQL identifiers and file names, so they are checked against a strict
pattern and always quoted; nothing a user passes is spliced raw into SQL.
"""

from __future__ import annotations

import re

from .errors import InvalidNameError

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_STORE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RESERVED_PREFIXES = ("_ls", "sqlite_")
_RESERVED_FIELDS = {"rowid", "oid", "_rowid_"}


def check_identifier(name: object, what: str) -> str:
    """Return ``name`` if it is a valid collection or field name, else raise ``InvalidNameError``."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise InvalidNameError(
            f"invalid {what} name {name!r}: use letters, digits and underscores, "
            "starting with a letter or underscore, at most 63 characters"
        )
    lowered = name.lower()
    if lowered.startswith(_RESERVED_PREFIXES) or lowered in _RESERVED_FIELDS:
        raise InvalidNameError(f"invalid {what} name {name!r}: names starting with _ls or sqlite_, and rowid/oid, are reserved")
    return name


def check_store_name(name: object) -> str:
    """Return ``name`` if it is a valid store name within a workspace, else raise ``InvalidNameError``."""
    if not isinstance(name, str) or not _STORE_NAME.fullmatch(name) or name.endswith(".db"):
        raise InvalidNameError(
            f"invalid store name {name!r}: use letters, digits, '.', '_' and '-', starting with a "
            "letter or digit, at most 128 characters, without the .db suffix"
        )
    return name

"""A virtual table derived from a collection's rows (vec0 or FTS5): created and dropped the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import apsw


class VirtualIndex:
    """Base of the derived indexes: subclasses set ``table`` and write ``ddl()``."""

    table: str

    def ddl(self) -> str:
        """The CREATE VIRTUAL TABLE IF NOT EXISTS statement."""
        raise NotImplementedError

    def create(self, db: apsw.Connection) -> None:
        """Create the table if missing."""
        db.execute(self.ddl())

    def drop(self, db: apsw.Connection) -> None:
        """Drop the table."""
        db.execute(f"DROP TABLE IF EXISTS {self.table}")

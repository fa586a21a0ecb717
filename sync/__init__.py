"""The sync engine: ships each store's change log to a central PostgreSQL.

Imported as ``localstore.sync``. It uses only localstore's public API; the engine
itself is built in the sync issue.
"""

"""Agent kits: ready collection sets and small APIs for the systems localstore replaces.

Each kit is one module, written on the public API only (``import localstore as ls``):

- ``evolution``: evolution rounds, fitness and resource metrics, selection outcomes, a program archive.
- ``profiles``: learning profiles (privacy-critical): erasure, export, TTL expiry, blind-index lookup.
- ``documents``: documents and chunks for retrieval; chunked ingest with dedupe, hybrid BM25 + vector search.
- ``sqlite_import``: import a table of an existing SQLite database into a collection
  (``localstore import-sqlite``, registered by ``import_cli``).
"""

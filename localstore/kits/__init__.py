"""Agent kits: ready collection sets and small APIs for the systems localstore replaces.

Each kit is one module, written on the public API only (``import localstore as ls``):

- ``kernels``: kernel geometry (basins, metrics, lineage).
- ``memory``: agent memories, reflections and tone shifts.
- ``telemetry``: telemetry sessions and records, emergencies, checkpoints.
- ``importers``: telemetry JSONL and emergency JSON files into the telemetry kit.
- ``evolution``: evolution rounds, fitness and resource metrics, selection outcomes, a program archive.
- ``profiles``: learning profiles (privacy-critical): erasure, export, TTL expiry, blind-index lookup.
- ``documents``: documents and chunks for retrieval; chunked ingest with dedupe, hybrid BM25 + vector search.
- ``sqlite_import``: a table of an existing SQLite database into a collection (``import_cli``: ``import-sqlite``).
- ``cli``: the kits' ``localstore`` subcommands (``import-telemetry``, ``plot``).
"""

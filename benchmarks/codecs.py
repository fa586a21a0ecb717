"""Compression and encryption: zstd vs trained dictionaries, put_many with codecs, per-field decrypt time.

Records are memory-like JSON (about 450 bytes; the text is English sentences from
standard-library docstrings). Compression ratios are measured on held-out records
(the last 10%), never on the samples a dictionary was trained on. A last section
times incompressible 64 KiB float32 arrays: the probe that stores them raw at once,
against compressing each in full first (what every value paid before the probe).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from _harness import Case, Figure, Report, english_text, is_tiny, log, measure

import localstore as ls
from localstore import dictionaries
from localstore.dictionaries import Dictionaries, FieldCompressor

KINDS = ("observation", "observation", "observation", "reflection", "plan", "dialogue", "fact")
TAGS = ("user", "goal", "tool", "memory", "error", "success", "plan", "note")
KEY = ls.generate_key()

VARIANTS: dict[str, dict[str, bool]] = {
    "plain": {},
    "compressed": {"compress": True},
    "encrypted": {"encrypt": True},
    "both": {"encrypt": True, "compress": True},
}


@dataclass(frozen=True)
class Sizes:
    """How much work each section does; ``QUICK`` runs in a few seconds."""

    records: int  # records in the corpus (ratios, put_many)
    batch: int  # rows per put_many call
    repeat: int  # timed runs per put_many case
    decode: int  # values decoded per decrypt run
    decode_repeat: int
    arrays: int  # 64 KiB float32 arrays per incompressible-array run


FULL = Sizes(records=100_000, batch=10_000, repeat=3, decode=20_000, decode_repeat=5, arrays=400)
QUICK = Sizes(records=10_000, batch=2_500, repeat=2, decode=5_000, decode_repeat=3, arrays=100)
#: ``LOCALSTORE_BENCH_TINY=1`` (smoke tests): every section runs, on sizes too small to mean anything.
TINY = Sizes(records=2_000, batch=500, repeat=1, decode=500, decode_repeat=1, arrays=8)

#: Items of float32 in each array of the incompressible section (64 KiB).
ARRAY_ITEMS = 16_384


def make_records(count: int, seed: int = 11) -> list[dict[str, Any]]:
    """``count`` memory-like records: who, what kind, when, how important, ~320 characters of English, tags."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        out.append({
            "agent": f"kernel-{rng.randrange(64)}",
            "kind": rng.choice(KINDS),
            "importance": round(rng.random(), 3),
            "ts": 1_700_000_000_000 + i * 997,
            "text": english_text(rng, 320),
            "tags": rng.sample(TAGS, rng.randint(1, 3)),
        })
    return out


def _rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": f"m{i:07d}", "record": r, "kind": r["kind"]} for i, r in enumerate(records)]


def _fields(options: dict[str, bool]) -> dict[str, Any]:
    return {"id": ls.Text(), "record": ls.Json(**options), "kind": ls.Text()}


def _remove(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass


def bench_ratios(report: Report, root: str, records: list[dict[str, Any]]) -> None:
    """Per-value zstd vs a dictionary trained by localstore vs none, on held-out records."""
    encoded = [json.dumps(r, separators=(",", ":"), ensure_ascii=False).encode() for r in records]
    cut = len(encoded) * 9 // 10
    train, held = encoded[:cut], encoded[cut:]
    raw = sum(map(len, held))
    report.params["mean_record_bytes"] = round(sum(map(len, encoded)) / len(encoded))
    store = ls.open(os.path.join(root, "ratios.db"))
    try:
        book = Dictionaries(store)
        plain = FieldCompressor(book, "memories", "record", trainable=False, itemsize=None)
        plain_bytes = sum(len(plain.compress(v)) for v in held)
        samples: list[bytes] = []
        total = 0
        for value in reversed(train):  # as the store does: the newest values, up to 100x the largest dictionary
            samples.append(value)
            total += len(value)
            if total >= 100 * dictionaries.DEFAULT_DICT_BYTES:
                break
        log(f"codecs: training a dictionary on {len(samples):,} records ({total / 1e6:.1f} MB)")
        started = time.perf_counter()
        with store.transaction():
            made = book.train("memories", "record", samples)
        train_s = time.perf_counter() - started
        assert made is not None, "training did not help: the corpus is not text-like"
        with_dict = FieldCompressor(book, "memories", "record", trainable=True, itemsize=None)
        with_dict._dict, with_dict._loaded = made, True
        with_dict._since_check = -(10**15)  # measure compression only, no retraining checks
        dict_bytes = sum(len(with_dict.compress(v)) for v in held)
        for value in held[:200]:
            assert book.decompress(with_dict.compress(value)) == value
        cases = [
            Case("compress.plain", lambda _: [plain.compress(v) for v in held], items=len(held), unit="record",
                 label="compress  zstd per value (level 3)"),
            Case("compress.dict", lambda _: [with_dict.compress(v) for v in held], items=len(held), unit="record",
                 label=f"compress  trained dictionary ({made[1] // 1024} KiB)"),
            Case("decompress.dict", lambda _: [book.decompress(c) for c in dict_frames], items=len(held),
                 unit="record", label="decompress  trained dictionary"),
        ]
        dict_frames = [with_dict.compress(v) for v in held]
        report.add(*measure(cases, 5, warmup=1, progress=f"compress x{len(held):,}"))
    finally:
        store.close()
    report.figure(Figure("ratio.none", "ratio: stored as is", 1.0, "x"))
    plain_ratio = raw / plain_bytes
    dict_ratio = raw / dict_bytes
    report.figure(Figure("ratio.zstd", "ratio: zstd per value (held-out records)", plain_ratio, "x"))
    report.figure(Figure("ratio.dict", f"ratio: trained dictionary, {made[1] // 1024} KiB (held-out)", dict_ratio, "x", ">=", 3.0))
    report.figure(Figure("ratio.dict_vs_zstd", "ratio: dictionary / plain zstd", dict_ratio / plain_ratio, "x", ">=", 2.0))
    report.figure(Figure(
        "compress.dict_rate", "compress with the dictionary (records/s)", report.timings["compress.dict"].rate,
        "records/s", ">=", 100_000,
    ))
    report.figure(Figure("train.seconds", "training the dictionary (one-off)", train_s, "s"))


def bench_put_many(report: Report, root: str, records: list[dict[str, Any]], sizes: Sizes) -> None:
    """put_many of the same rows into plain, compressed, encrypted and encrypted+compressed fields."""
    rows = _rows(records)
    counter = [0]

    def case(variant: str) -> Case:
        def setup() -> tuple[str, ls.Store, ls.Collection]:
            counter[0] += 1
            path = os.path.join(root, f"{variant}-{counter[0]}.db")
            store = ls.open(path, key=KEY)
            return path, store, store.collection("memories", key="id", fields=_fields(VARIANTS[variant]))

        def run(state: tuple[str, ls.Store, ls.Collection]) -> None:
            coll = state[2]
            for start in range(0, len(rows), sizes.batch):
                coll.put_many(rows[start : start + sizes.batch])

        def teardown(state: tuple[str, ls.Store, ls.Collection]) -> None:
            path, store, _ = state
            if variant == "compressed" and "store.compressed_bytes" not in report.params:
                _in_store_ratio(report, store, records)
            store.close()
            _remove(path)

        return Case(f"put_many.{variant}", run, setup, teardown, items=len(rows), unit="row",
                    label=f"put_many  {variant:10} (batches of {sizes.batch:,})")

    report.add(*measure([case(v) for v in VARIANTS], sizes.repeat, progress=f"put_many x{len(rows):,}"))
    for variant in ("compressed", "encrypted", "both"):
        report.speed_ratio(
            f"put_many.{variant}_vs_plain", f"put_many: {variant} / plain (rows/s)", f"put_many.{variant}", "put_many.plain",
            target_op=">=" if variant == "both" else None, target=0.5 if variant == "both" else None,
        )


def _in_store_ratio(report: Report, store: ls.Store, records: list[dict[str, Any]]) -> None:
    """What automatic training achieved inside the store: raw / stored bytes of the last 10% of rows."""
    db = store._db
    tail = len(records) // 10
    stored = db.execute(
        "SELECT sum(length(record)) FROM (SELECT record FROM memories ORDER BY rowid DESC LIMIT ?)", (tail,)
    ).fetchone()[0]
    raw = sum(len(json.dumps(r, separators=(",", ":"), ensure_ascii=False).encode()) for r in records[-tail:])
    dicts = db.execute("SELECT count(*), max(size) FROM _ls_dicts").fetchone() if db.execute(
        "SELECT 1 FROM sqlite_schema WHERE name='_ls_dicts'").fetchone() else (0, 0)
    report.params["store.compressed_bytes"] = stored
    report.params["store.dictionaries"] = dicts[0]
    report.figure(Figure(
        "ratio.in_store", f"ratio in the store after automatic training ({dicts[0]} dictionaries, last {dicts[1] or 0} B)",
        raw / stored, "x",
    ))


def bench_decrypt(report: Report, root: str, records: list[dict[str, Any]], sizes: Sizes) -> None:
    """Decoding one field value: plain JSON vs decrypt vs decrypt + decompress."""
    rows = _rows(records[: sizes.decode])
    path = os.path.join(root, "decode.db")
    store = ls.open(path, key=KEY)
    try:
        colls = {}
        for variant in ("plain", "encrypted", "both"):
            coll = store.collection(f"m_{variant}", key="id", fields=_fields(VARIANTS[variant]))
            coll.put_many(rows)
            stored = store._db.execute(f"SELECT id, record FROM m_{variant}").fetchall()
            colls[variant] = (coll, stored)
        plain_values = colls["plain"][1]
        enc_codec, enc_values = colls["encrypted"][0]._codec.fields["record"], colls["encrypted"][1]
        both_codec, both_values = colls["both"][0]._codec.fields["record"], colls["both"][1]
        cases = [
            Case("decode.plain", lambda _: [json.loads(v) for _, v in plain_values], items=len(rows), unit="field",
                 label="decode  plain Json field (json.loads)"),
            Case("decode.encrypted", lambda _: [enc_codec.decode(v, k) for k, v in enc_values], items=len(rows),
                 unit="field", label="decode  encrypted Json field"),
            Case("decode.both", lambda _: [both_codec.decode(v, k) for k, v in both_values], items=len(rows),
                 unit="field", label="decode  encrypted + compressed Json field"),
            Case("get.plain", lambda _: [colls["plain"][0].get(k) for k, _ in plain_values[:2000]], items=2000,
                 unit="get", label="get  row with a plain Json field"),
            Case("get.both", lambda _: [colls["both"][0].get(k) for k, _ in both_values[:2000]], items=2000,
                 unit="get", label="get  row with an encrypted + compressed field"),
        ]
        report.add(*measure(cases, sizes.decode_repeat, warmup=1, progress=f"decode x{len(rows):,}"))
    finally:
        store.close()
        _remove(path)
    for name in ("encrypted", "both"):
        report.figure(Figure(
            f"decrypt.{name}_us", f"decode one {'encrypted' if name == 'encrypted' else 'encrypted + compressed'} field",
            report.timings[f"decode.{name}"].per_item * 1e6, "us", "<", 50.0,
        ))
    report.cost_ratio("get.cost", "get: encrypted + compressed / plain (time)", "get.both", "get.plain")


def bench_incompressible(report: Report, root: str, sizes: Sizes) -> None:
    """64 KiB float32 arrays that zstd cannot shrink: probed and stored raw vs compressed in full first."""
    rng = np.random.default_rng(7)
    # Random bit patterns (quantised noise, hashed features): no byte plane repeats, so nothing shrinks.
    noise = [rng.integers(0, 2**32, ARRAY_ITEMS, dtype=np.uint32).view("<f4") for _ in range(sizes.arrays)]
    normal = [rng.standard_normal(ARRAY_ITEMS).astype("<f4") for _ in range(max(4, sizes.arrays // 10))]
    field = ls.Array(compress=True)
    encoded = [field.encode(a) for a in noise]
    store = ls.open(os.path.join(root, "arrays-codec.db"))
    try:
        book = Dictionaries(store)
        probed = FieldCompressor(book, "arrays", "a", trainable=False, itemsize=0)
        full = FieldCompressor(book, "arrays", "a", trainable=False, itemsize=0)
        full.probe_bytes = None  # every value compressed in full, then kept raw: the cost before the probe
        stored = [probed.compress(v) for v in encoded]
        assert all(v[:1] == b"\x04" for v in stored), "the probe did not recognise random float32 as incompressible"
        assert all(book.decompress(c) == v for c, v in zip(stored[:20], encoded))
        cases = [
            Case("encode.incompressible.probed", lambda _: [probed.compress(v) for v in encoded], items=len(encoded),
                 unit="array", label="compress  64 KiB noise array, probed (stored raw + CRC-32)"),
            Case("encode.incompressible.full", lambda _: [full.compress(v) for v in encoded], items=len(encoded),
                 unit="array", label="compress  64 KiB noise array, compressed in full first"),
            Case("decode.incompressible", lambda _: [book.decompress(c) for c in stored], items=len(stored),
                 unit="array", label="decompress  64 KiB raw array (CRC-32 checked)"),
            Case("crc32.64k", lambda _: [zlib.crc32(v) for v in encoded], items=len(encoded), unit="array",
                 label="zlib.crc32 of 64 KiB (the checksum alone)"),
        ]
        # Cheap runs (a few ms each) on a shared machine: more of them, so the medians settle.
        report.add(*measure(cases, max(7, sizes.repeat), warmup=1, progress=f"incompressible arrays x{len(encoded):,}"))
        kept = [probed.compress(field.encode(a)) for a in normal]
        normal_ratio = sum(a.nbytes for a in normal) / sum(map(len, kept))
    finally:
        store.close()
        _remove(os.path.join(root, "arrays-codec.db"))
    rows = [{"id": i, "a": a} for i, a in enumerate(noise)]
    counter = [0]

    def case(compress: bool) -> Case:
        name = "compressed" if compress else "plain"

        def setup() -> tuple[str, ls.Store, ls.Collection]:
            counter[0] += 1
            path = os.path.join(root, f"arrays-{name}-{counter[0]}.db")
            store = ls.open(path)
            return path, store, store.collection("arrays", key="id", fields={"id": ls.Integer(), "a": ls.Array(compress=compress)})

        def run(state: tuple[str, ls.Store, ls.Collection]) -> None:
            for start in range(0, len(rows), 50):
                state[2].put_many(rows[start : start + 50])

        def teardown(state: tuple[str, ls.Store, ls.Collection]) -> None:
            state[1].close()
            _remove(state[0])

        return Case(f"put_many.noise.{name}", run, setup, teardown, items=len(rows), unit="row",
                    label=f"put_many  64 KiB noise arrays, Array({'compress=True' if compress else ''})")

    report.add(*measure([case(False), case(True)], sizes.repeat, warmup=1, progress=f"put_many noise arrays x{len(rows):,}"))
    report.params["incompressible.array_bytes"] = ARRAY_ITEMS * 4
    report.figure(Figure(
        "incompressible.encode_us", "compress one 64 KiB noise array (probed, stored raw)",
        report.timings["encode.incompressible.probed"].per_item * 1e6, "us",
    ))
    report.speed_ratio(
        "incompressible.probe_speedup", "compress 64 KiB noise arrays: probed / compressed in full first (arrays/s)",
        "encode.incompressible.probed", "encode.incompressible.full", target_op=">=", target=1.5,
    )
    report.cost_ratio(
        "incompressible.put_vs_plain", "put_many 64 KiB noise arrays: Array(compress=True) / Array() (time)",
        "put_many.noise.compressed", "put_many.noise.plain",
    )
    report.figure(Figure("incompressible.stored_ratio", "noise arrays: raw / stored bytes (flag and CRC-32 included)",
                         sum(map(len, encoded)) / sum(map(len, stored)), "x"))
    report.figure(Figure("normal_f32.ratio", "normal float32 arrays still compressed: raw / stored bytes",
                         normal_ratio, "x", ">", 1.05))


def run(quick: bool = False) -> Report:
    """Run the codecs benchmark; ``quick`` shrinks every size so it finishes in a few seconds."""
    sizes = TINY if is_tiny() else QUICK if quick else FULL
    report = Report("codecs", quick, params=dict(asdict(sizes)))
    report.params["zstd_level"] = dictionaries.DEFAULT_LEVEL
    started = time.perf_counter()
    log(f"codecs: making {sizes.records:,} memory records of docstring text")
    records = make_records(sizes.records)
    with tempfile.TemporaryDirectory(prefix="localstore-bench-") as root:
        bench_ratios(report, root, records)
        bench_put_many(report, root, records, sizes)
        bench_decrypt(report, root, records, sizes)
        bench_incompressible(report, root, sizes)
    report.notes += [
        "ratios are raw bytes / stored bytes (flag and dictionary-id bytes included) on the last 10% of records",
        "put_many runs write the rows in batches, so automatic dictionary training happens inside the compressed runs",
        ("noise arrays: 64 KiB of random float32 bit patterns; 'compressed in full first' is the path every such "
         "value took before the probe (zstd level 3 on the whole byte-shuffled array, then stored raw)"),
        "targets are informational; a MISS does not fail the run",
    ]
    report.elapsed_s = time.perf_counter() - started
    return report

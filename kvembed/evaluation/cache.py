"""An on-disk embedding cache, so a table re-run or a new method recomputes nothing else.

Key: (embedder.fingerprint, prompt_name, sha256(text)). The fingerprint names the weights, the method,
its switches and templates, so two methods never share a vector and a changed switch is a miss.
Storage: one SQLite file (stdlib, safe across processes, one file to delete); a vector is a float32
blob. Texts are stored only as hashes: the cache holds no copy of the data.

`CachedEncoder.encode(texts, prompt_name)` looks every text up, sends only the missing ones (each
unique text once, longest first so batches pad little) to `embedder.encode`, stores them, and returns
the vectors in input order. A tqdm bar counts texts and shows texts/s and the ETA.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np

from kvembed.files import cache_root

# how many texts go to one embedder.encode call: large enough to batch well, small enough for the
# progress bar to move
_CHUNK = 256
# SQLite's default limit on `?` parameters per statement is 999 in older builds
_LOOKUP = 900


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class EmbeddingCache:
    """Vectors keyed by (fingerprint, prompt_name, text) in `<cache_dir>/embeddings.sqlite`."""

    def __init__(self, cache_dir: Path | str | None = None):
        self.path = Path(cache_dir if cache_dir is not None else cache_root() / "eval") / "embeddings.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS emb (fingerprint TEXT, prompt TEXT, text_sha BLOB, vec BLOB,"
            " PRIMARY KEY (fingerprint, prompt, text_sha))")
        self._db.commit()

    def get(self, fingerprint: str, prompt_name: str | None, texts: list[str]) -> dict[bytes, np.ndarray]:
        """The stored vectors among `texts`, by text key; missing texts are simply absent."""
        keys = list({text_key(t) for t in texts})
        found = {}
        for i in range(0, len(keys), _LOOKUP):
            part = keys[i:i + _LOOKUP]
            q = ("SELECT text_sha, vec FROM emb WHERE fingerprint = ? AND prompt = ? AND text_sha IN (%s)"
                 % ",".join("?" * len(part)))
            for sha, blob in self._db.execute(q, [fingerprint, prompt_name or "", *part]):
                found[sha] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put(self, fingerprint: str, prompt_name: str | None, texts: list[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        self._db.executemany(
            "INSERT OR REPLACE INTO emb VALUES (?, ?, ?, ?)",
            [(fingerprint, prompt_name or "", text_key(t), v.tobytes()) for t, v in zip(texts, vectors)])
        self._db.commit()

    def count(self, fingerprint: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM emb WHERE fingerprint = ?", (fingerprint,)).fetchone()[0]


class CachedEncoder:
    """`embedder` (anything with `.encode(texts, prompt_name=...)` and `.fingerprint`) behind a cache.

    `cache=None` computes everything (no disk). `encoded` counts the texts actually sent to the
    embedder, which is what the cache tests and the report's "texts encoded" column read.
    """

    def __init__(self, embedder, cache: EmbeddingCache | None = None, *, batch_size: int = 32,
                 show_progress_bar: bool = True):
        self.embedder = embedder
        self.cache = cache
        self.batch_size = batch_size
        self.show_progress_bar = show_progress_bar
        self.encoded = 0

    def encode(self, texts: list[str], prompt_name: str | None = None, desc: str = "encode",
               batch_size: int | None = None) -> np.ndarray:
        from tqdm.auto import tqdm

        texts = list(texts)
        if not texts:
            raise ValueError("CachedEncoder.encode got no texts; an evaluation split must not be empty")
        have = self.cache.get(self.embedder.fingerprint, prompt_name, texts) if self.cache is not None else {}
        missing = sorted({t for t in texts if text_key(t) not in have}, key=len, reverse=True)
        with tqdm(total=len(missing), unit="text", desc=f"{desc} [{prompt_name or 'raw'}]",
                  disable=not (missing and self.show_progress_bar), dynamic_ncols=True) as bar:
            for i in range(0, len(missing), _CHUNK):
                part = missing[i:i + _CHUNK]
                vecs = np.asarray(self.embedder.encode(part, prompt_name=prompt_name,
                                                       batch_size=batch_size or self.batch_size,
                                                       show_progress_bar=False), dtype=np.float32)
                if vecs.shape[0] != len(part):
                    raise RuntimeError(f"embedder.encode returned {vecs.shape[0]} vectors for {len(part)} texts")
                if self.cache is not None:
                    self.cache.put(self.embedder.fingerprint, prompt_name, part, vecs)
                have.update((text_key(t), v) for t, v in zip(part, vecs))
                self.encoded += len(part)
                bar.update(len(part))
        return np.stack([have[text_key(t)] for t in texts])  # (N, dim)

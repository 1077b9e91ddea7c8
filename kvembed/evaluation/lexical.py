"""A model-free lexical baseline: hashed bag of words (`--method lexical_bow`).

Each lower-cased word token is hashed (blake2b, fixed key, so stable across runs and machines) to one
of `dim` buckets with a +-1 sign; the vector is the L2-normalised sum. It needs no weights, runs in
milliseconds, and follows the embedder contract the evaluation uses (`encode(texts, prompt_name=...)`,
`fingerprint`, `get_embedding_dimension()`). Two uses: the floor a learned embedding should beat in
the table (it is close to TF matching), and a deterministic stand-in for the model in fast tests.
Prompts are ignored: queries and documents get the same bag.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

_WORD = re.compile(r"\w+")


class HashingBowEmbedder:
    method = "lexical_bow"
    model_name = "none"

    def __init__(self, dim: int = 512):
        self.dim = dim
        self.fingerprint = f"lexical_bow-dim{dim}-blake2b8-v1"
        # texts per prompt name sent to encode, for tests that check what was (not) recomputed
        self.seen: list[tuple[str | None, str]] = []

    def get_embedding_dimension(self) -> int:
        return self.dim

    def _vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        for word in _WORD.findall(text.lower()):
            h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            v[h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def encode(self, texts, prompt_name: str | None = None, batch_size: int = 32,
               show_progress_bar: bool | None = None, **kwargs) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        self.seen += [(prompt_name, t) for t in texts]
        return np.stack([self._vector(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

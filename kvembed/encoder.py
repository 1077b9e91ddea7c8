"""The user API: `KVEmbedder`, with the sentence-transformers `encode()` contract (STYLE item 10).

    emb = KVEmbedder.from_pretrained()                 # the default model, KV-Embedding, auto layers
    emb.encode(["a sentence", "another"])             # (2, 576) float32 numpy, L2-normalised
    emb.encode_query("where is ...?")                 # 1-D vector, with the query template

Batching: texts are prompted and tokenized in chunks, sorted by length inside a chunk (less padding),
embedded batch by batch, and put back in input order. Right padding never changes an embedding, so the
order and the company a text keeps never change its vector (tested to 1e-5 in fp32).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import warnings
from collections.abc import Iterable
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .method import KVEmbedding, collate

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
PROMPT_NAMES = (None, "query", "document")
# Sequence lengths are padded up to one of these under torch.compile, so a corpus compiles a bounded number
# of graphs (about 1.5x steps; at most 1/3 of a row is padding).
BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


class TruncationWarning(UserWarning):
    """Some texts were longer than max_length and were cut (the text, never the instruction)."""


class SurrogateWarning(UnicodeWarning):
    """Some texts held lone UTF-16 surrogates (not encodable as UTF-8) and were embedded with U+FFFD instead."""


def repair_surrogates(text: str) -> str | None:
    """`text` with surrogate pairs joined and lone surrogates replaced by U+FFFD; None when it has none.

    Python strings can hold surrogates (JSON "\\ud800", files read with errors="surrogateescape"), but the
    tokenizer only takes valid Unicode and would fail on them; one bad text must not stop a long run.
    """
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def make_method(name: str, **switches):
    """A method object by name: "kvembedding" (switches include resolved `layers`) or any baseline."""
    if name in ("kvembedding", "kv-embedding", "kv_embedding"):
        return KVEmbedding(**switches)
    from .baselines import BASELINES

    if name not in BASELINES:
        raise ValueError(f"method={name!r}: choose one of kvembedding, {', '.join(BASELINES)}")
    return BASELINES[name](**switches)


def resolve_auto_layers(loaded, id_corpus=None, verbose: bool = True) -> list[int]:
    """SPEC §1.4: the shipped selection for the default model, else the cached/computed TwoNN selection."""
    from .layer_select import format_curve, read_id_corpus, select_layers, shipped_selection

    sel = shipped_selection(loaded.fingerprint)
    if sel is None:
        corpus = id_corpus or os.environ.get("KVEMBED_ID_CORPUS")
        if corpus is None:
            raise ValueError(
                "layers='auto' needs a corpus to measure intrinsic dimension on for this model: pass "
                "id_corpus=PATH (JSONL with a 'text' field, or a text file), set KVEMBED_ID_CORPUS, or give "
                "explicit layers=[...]"
            )
        sel = select_layers(loaded.model, loaded.tokenizer, read_id_corpus(corpus), fingerprint=loaded.fingerprint)
        if verbose:
            print(format_curve(sel), file=sys.stderr)
    return list(sel.layers)


class KVEmbedder:
    def __init__(self, loaded, method, *, max_length: int | None = None, compile: bool = False):
        self.loaded = loaded
        self.model, self.tokenizer, self.args = loaded.model, loaded.tokenizer, loaded.args
        self.method = method
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        # Texts longer than this are cut (SPEC §1.1). Default: the model's trained context.
        self.max_length = int(max_length or self.args.max_position_embeddings)
        self.compiled = compile
        self._forward_model = torch.compile(self.model, dynamic=False) if compile else self.model
        if compile:
            # One graph per (length bucket); the default limit of 8 would silently fall back to eager.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._lock = threading.Lock()
        self.last_truncated: list[int] = []
        self.last_repaired: list[int] = []  # indices whose lone surrogates became U+FFFD in the last call

    @classmethod
    def from_pretrained(cls, name_or_path=None, *, method: str = "kvembedding", dtype="float32", device="cpu",
                        compile: bool = False, max_length: int | None = None, id_corpus=None, layers="auto",
                        **switches) -> "KVEmbedder":
        """Load a model (None = the default SmolLM2-135M-Instruct) and set up a method with its switches."""
        from weights_loader import load_model

        loaded = load_model(name_or_path, dtype=as_dtype(dtype), device=device)
        if method in ("kvembedding", "kv-embedding", "kv_embedding"):
            from .method import resolve_layers

            if isinstance(layers, str) and layers == "auto":
                layers = resolve_auto_layers(loaded, id_corpus)
            switches["layers"] = resolve_layers(layers, loaded.args.num_hidden_layers)
            return cls(loaded, make_method(method, **switches), max_length=max_length, compile=compile)
        if layers != "auto":
            raise ValueError(f"layers={layers!r} applies to kvembedding only, not to method={method!r}")
        return cls(loaded, make_method(method, **switches), max_length=max_length, compile=compile)

    # ------------------------------------------------------------------------------ identity

    @property
    def fingerprint(self) -> str:
        """Identifies everything an embedding depends on: weights, method, switches, templates, limits, dtype."""
        blob = json.dumps([self.loaded.fingerprint, self.method.config(), self.max_length, str(self.dtype)],
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def get_embedding_dimension(self) -> int:
        return self.args.hidden_size

    # ------------------------------------------------------------------------------ encode

    def encode(self, inputs, prompt_name: str | None = None, prompt: str | None = None, batch_size: int = 32,
               show_progress_bar: bool | None = None, convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               device=None, normalize_embeddings: bool | None = None, on_truncation: str = "warn", **kwargs):
        """Embed a string (-> 1-D) or an iterable of strings (-> (N, dim)), in input order.

        prompt_name   None/"document" (the document template) or "query" (the query template)
        prompt        a template with a {text} slot for this call only (a plain prefix is read as
                      prefix + "{text}", as sentence-transformers does)
        on_truncation "warn" (default; indices also in `self.last_truncated`), "raise", or "ignore"
        """
        if kwargs:
            raise TypeError(f"encode() got unsupported option(s) {sorted(kwargs)}; see KVEmbedder.encode's docstring")
        if prompt_name not in PROMPT_NAMES:
            raise ValueError(f"prompt_name={prompt_name!r}: choose None, 'query' or 'document'")
        if on_truncation not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_truncation={on_truncation!r}: choose 'warn', 'raise' or 'ignore'")
        if device is not None and torch.device(device) != self.device:
            raise ValueError(f"device={device!r} differs from the model's {self.device}; load with device=...")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        normalize = self._normalize_flag(normalize_embeddings)
        single = isinstance(inputs, str)
        if single:
            inputs = [inputs]
        elif inputs is None or not isinstance(inputs, Iterable):
            raise TypeError(f"inputs must be a string or an iterable of strings, got {type(inputs).__name__}")

        method = self.method
        if prompt is not None:
            method = self._with_prompt(prompt)
        with self._lock:
            out, truncated, repaired = self._encode_all(iter(inputs), method, prompt_name, batch_size,
                                                         show_progress_bar)
            self.last_truncated, self.last_repaired = truncated, repaired
        if repaired:
            warnings.warn(f"{len(repaired)} text(s) held lone surrogates (invalid Unicode), embedded with U+FFFD in "
                          f"their place; indices: {repaired[:10]}{' ...' if len(repaired) > 10 else ''}",
                          SurrogateWarning, stacklevel=2)
        if truncated:
            msg = (f"{len(truncated)} text(s) were longer than max_length={self.max_length} tokens and were cut "
                   f"(the text, not the instruction); indices: {truncated[:10]}{' ...' if len(truncated) > 10 else ''}")
            if on_truncation == "raise":
                raise ValueError(msg + "; pass on_truncation='warn' to accept, or raise max_length")
            if on_truncation == "warn":
                warnings.warn(msg, TruncationWarning, stacklevel=2)
        if normalize and not method_normalizes(method):
            out = F.normalize(out, dim=-1)
        if single:
            out = out[0]
        if convert_to_tensor:
            return out
        return out.numpy() if convert_to_numpy else list(out)

    def encode_query(self, inputs, **kwargs):
        return self.encode(inputs, prompt_name="query", **kwargs)

    def encode_document(self, inputs, **kwargs):
        return self.encode(inputs, prompt_name="document", **kwargs)

    def similarity(self, a, b):
        """Cosine similarity matrix (N, M) between two sets of embeddings (numpy in, numpy out; torch likewise)."""
        is_np = isinstance(a, np.ndarray)
        ta, tb = torch.as_tensor(np.asarray(a) if is_np else a), torch.as_tensor(np.asarray(b) if is_np else b)
        ta, tb = torch.atleast_2d(ta).float(), torch.atleast_2d(tb).float()
        sim = F.normalize(ta, dim=-1) @ F.normalize(tb, dim=-1).T
        return sim.numpy() if is_np else sim

    # ------------------------------------------------------------------------------ internals

    def _normalize_flag(self, normalize_embeddings: bool | None) -> bool:
        if normalize_embeddings is None:
            return method_normalizes(self.method)
        if not normalize_embeddings and method_normalizes(self.method):
            raise ValueError("normalize_embeddings=False, but this embedder's method normalises: "
                             "load it with normalize=False instead")
        return bool(normalize_embeddings)

    def _with_prompt(self, prompt: str):
        import copy

        template = prompt if "{text}" in prompt else prompt + "{text}"
        if not hasattr(self.method, "template"):
            raise ValueError(f"method {self.method.name!r} has fixed prompts; prompt= is not supported for it")
        m = copy.copy(self.method)
        m.template = m.query_template = template
        return m

    def _collate(self, seqs):
        pad_to = None
        if self.compiled:
            longest = max(len(s) for s in seqs)
            pad_to = next((b for b in BUCKETS if b >= longest), longest)
        return collate(seqs, self.device, pad_to=pad_to)

    def _encode_all(self, it, method, prompt_name, batch_size, show_progress_bar):
        from tqdm.auto import tqdm

        chunk_size = batch_size * 32  # bounds memory for huge or endless inputs
        results: list[Tensor] = []
        truncated: list[int] = []
        repaired: list[int] = []
        bar = None
        start = 0
        while True:
            chunk = list(islice(it, chunk_size))
            if not chunk:
                break
            for i, t in enumerate(chunk):
                if not isinstance(t, str):
                    raise TypeError(f"inputs[{start + i}] is {type(t).__name__}, not str; every item must be a string")
                fixed = repair_surrogates(t)
                if fixed is not None:
                    chunk[i] = fixed
                    repaired.append(start + i)
            if bar is None and (show_progress_bar or (show_progress_bar is None and len(chunk) >= chunk_size
                                                      and sys.stderr.isatty())):
                bar = tqdm(desc=f"kvembed {method.name}", unit="text", total=None)
            views = [method.prepare(self.tokenizer, t, prompt_name, self.max_length) for t in chunk]
            truncated += [start + i for i, v in enumerate(views) if any(e.truncated for e in v)]
            order = sorted(range(len(chunk)), key=lambda i: -sum(len(e.ids) for e in views[i]))
            out = torch.empty(len(chunk), self.get_embedding_dimension())
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                with torch.inference_mode():
                    e = method.embed(self._forward_model, [views[i] for i in idx], self._collate).float().cpu()
                bad = ~torch.isfinite(e).all(-1)
                if bad.any():
                    where = sorted(start + idx[j] for j in bad.nonzero().flatten().tolist())  # input order
                    raise FloatingPointError(f"non-finite embedding (NaN or inf) for input index(es) {where}; "
                                             f"try dtype='float32' or check the weights")
                out[idx] = e
                if bar is not None:
                    bar.update(len(idx))
            results.append(out)
            start += len(chunk)
        if bar is not None:
            bar.close()
        if not results:
            return torch.empty(0, self.get_embedding_dimension()), truncated, repaired
        return torch.cat(results), truncated, repaired


def method_normalizes(method) -> bool:
    return bool(getattr(method, "normalize", True))

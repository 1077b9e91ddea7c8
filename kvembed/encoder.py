"""The user API: `KVEmbedder`, with sentence-transformers' `encode()` contract (STYLE item 10).

    emb = KVEmbedder.from_pretrained()                 # the default model, KV-Embedding, auto layers
    emb.encode(["a sentence", "another"])             # (2, 576) float32 numpy, L2-normalised
    emb.encode_query("where is ...?")                 # 1-D vector, with the query template

Every argument of `SentenceTransformer.encode` that makes sense for a pooled embedder has its meaning there
(`normalize_embeddings=False` returns the pooled vector itself, `device=` moves the model, `prompts` /
`prompt_name` / `default_prompt_name`, `truncate_dim`, `precision`); one that cannot apply raises and says what
to do instead. `kvembed.to_sentence_transformer` hands out a real `SentenceTransformer` (kvembed/st.py).

Batching: texts are prompted and tokenized in chunks, sorted by length inside a chunk (less padding),
embedded batch by batch, and put back in input order. Right padding never changes an embedding, so the
order and the company a text keeps never change its vector (tested in fp32).
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import timeit
import warnings
from collections.abc import Iterator, Mapping, Sequence, Set
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .baselines import METHODS
from .method import collate, resolve_layers
from .switches import SwitchError, check, check_choice, check_int

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
METHOD_ALIASES = {"kv-embedding": "kvembedding", "kv_embedding": "kvembedding"}
SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
# Sequence lengths are padded up to one of these under torch.compile, so a corpus compiles a bounded number
# of graphs (about 1.5x steps; at most 1/3 of a row is padding).
BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


class TruncationWarning(UserWarning):
    """Some texts were longer than max_length and were cut (the text, never the instruction)."""


class SurrogateWarning(UnicodeWarning):
    """Some texts held lone UTF-16 surrogates (not encodable as UTF-8) and were embedded with U+FFFD instead."""


class TruncationError(ValueError):
    """A text was longer than max_length and on_truncation="raise" was asked for."""


class PrecisionWarning(UserWarning):
    """The requested low-precision dtype runs much slower than float32 on this machine."""


def repair_surrogates(text: str) -> str | None:
    """`text` with surrogate pairs joined and lone surrogates replaced by U+FFFD; None when it has none.

    Python strings can hold surrogates (JSON "\\ud800", files read with errors="surrogateescape"), but the
    tokenizer only takes valid Unicode and would fail on them; one bad text must not stop a long run.
    """
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device) -> torch.device:
    """A device torch knows and this machine has, or a ValueError saying which exist."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device name: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device={device!r}: no CUDA GPU is visible on this machine (torch {torch.__version__}); "
                             "use device='cpu'")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device={device!r}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"device={device!r}: kvembed runs on cpu or cuda")
    return dev


def method_name(name: str) -> str:
    return check_choice("method", METHOD_ALIASES.get(name, name), METHODS)


def low_precision_slowdown(dtype: torch.dtype, device: torch.device) -> float | None:
    """How many times slower a (512 x 1024) @ (1024 x 1024) matmul runs in `dtype` than in float32 here; None
    off the CPU or for float32. Measured, because a CPU flag list does not say what the kernels do."""
    if dtype == torch.float32 or torch.device(device).type != "cpu":
        return None
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    times = []
    for dt in (torch.float32, dtype):
        x, y = a.to(dt), b.to(dt)
        x @ y  # warm-up
        times.append(timeit.timeit(lambda: x @ y, number=3))
    return times[1] / times[0]


def as_texts(inputs) -> tuple[list | Iterator, bool]:
    """(texts or an iterator over them, whether one string was given); anything unordered or 2-D is refused."""
    if isinstance(inputs, str):
        return [inputs], True
    kind = type(inputs).__name__
    if isinstance(inputs, Mapping) or hasattr(inputs, "columns"):
        raise TypeError(f"inputs is a {kind}: encoding it would embed its keys or column names, not its texts; "
                        "pass the texts themselves, e.g. list(d.values()) or df['text'].tolist()")
    if isinstance(inputs, Set):
        raise TypeError(f"inputs is a {kind}, which has no order, so the rows could not be matched to the vectors; "
                        "pass a list (e.g. sorted(s))")
    ndim = getattr(inputs, "ndim", None)
    if ndim is not None:  # numpy arrays, pandas Series, tensors
        if ndim != 1:
            raise TypeError(f"inputs is a {ndim}-D {kind}; pass a 1-D array or list of strings")
        return list(inputs.tolist() if hasattr(inputs, "tolist") else inputs), False
    if isinstance(inputs, Sequence) and not isinstance(inputs, (bytes, bytearray)):
        return list(inputs), False
    if isinstance(inputs, Iterator):
        return inputs, False  # a generator: read chunk by chunk, never all at once
    raise TypeError(f"inputs must be a string or an ordered sequence of strings (a list/tuple, a 1-D array or "
                    f"Series, or an iterator); got {kind}")


class KVEmbedder:
    """Texts in, vectors out: a loaded model, one method (KV-Embedding or a baseline) and sentence-transformers'
    encode contract. Build it with `from_pretrained`."""

    # What from_pretrained loaded: a local path made absolute, a named model or hub id as given, None for the default
    # model. kvembed.st saves it, so that a saved SentenceTransformer finds the same weights again.
    name_or_path: str | None = None

    def __init__(self, loaded, method, *, max_length: int | None = None, compile: bool = False,
                 prompts: dict | None = None, default_prompt_name: str | None = None,
                 truncate_dim: int | None = None, similarity_fn_name: str = "cosine"):
        self.loaded = loaded
        self.model, self.tokenizer, self.args = loaded.model, loaded.tokenizer, loaded.args
        self.method = method
        self.dtype = next(self.model.parameters()).dtype
        # Texts longer than this are cut (SPEC §1.1). Default: the model's trained context.
        self.max_seq_length = max_length if max_length is not None else self.args.max_position_embeddings
        self.compiled = compile
        self._forward_model = torch.compile(self.model, dynamic=False) if compile else self.model
        if compile:
            # One graph per (length bucket); the default limit of 8 would silently fall back to eager.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # prompt name -> template ({text} slot), as sentence-transformers' `prompts` (a plain prefix p means p{text})
        own = {"query": method.query_template, "document": method.template} if hasattr(method, "template") else {}
        self.custom_prompts = {k: template_of(v) for k, v in (prompts or {}).items()}
        self.prompts = {**own, **self.custom_prompts}
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name={default_prompt_name!r} is not among the prompts "
                             f"{sorted(self.prompts)}")
        self.default_prompt_name = default_prompt_name
        self.truncate_dim = self._check_truncate_dim(truncate_dim)
        self.similarity_fn_name = similarity_fn_name
        self._lock = threading.Lock()
        self.last_truncated: list[int] = []
        self.last_repaired: list[int] = []  # indices whose lone surrogates became U+FFFD in the last call

    @classmethod
    def from_pretrained(cls, name_or_path=None, *, method: str = "kvembedding", dtype="float32", device="cpu",
                        compile: bool = False, max_length: int | None = None, id_corpus=None,
                        prompts: dict | None = None, default_prompt_name: str | None = None,
                        truncate_dim: int | None = None, **switches) -> "KVEmbedder":
        """Load a model (None = the default SmolLM2-135M-Instruct) and set up a method with its switches
        (kvembed/switches.py; `layers="auto"` is resolved here: the shipped selection, else TwoNN on id_corpus)."""
        from weights_loader import load_model

        name = method_name(method)
        switches = check(name, switches)
        if id_corpus is not None and name != "kvembedding":
            raise SwitchError(f"id_corpus is for kvembedding's layers='auto', not for method={name!r}")
        dtype, device = as_dtype(dtype), check_device(device)
        loaded = load_model(name_or_path, dtype=dtype, device=device)
        slowdown = low_precision_slowdown(dtype, device)
        if slowdown is not None and slowdown > 2:
            warnings.warn(f"{dtype} matrix products run {slowdown:.1f}x slower than float32 on this CPU (no native "
                          f"support); dtype='float32' will be faster here", PrecisionWarning, stacklevel=2)
        if name == "kvembedding":
            layers = switches.get("layers", "auto")
            if layers == "auto":
                from .selections import auto_layers

                layers = auto_layers(loaded, id_corpus)
            switches["layers"] = resolve_layers(layers, loaded.args.num_hidden_layers)
        emb = cls(loaded, METHODS[name](**switches), max_length=max_length, compile=compile, prompts=prompts,
                  default_prompt_name=default_prompt_name, truncate_dim=truncate_dim)
        if name_or_path is not None:
            local = Path(name_or_path).expanduser()
            emb.name_or_path = str(local.resolve()) if local.exists() else str(name_or_path)
        return emb

    # ------------------------------------------------------------------------------ identity

    @property
    def fingerprint(self) -> str:
        """Identifies everything an embedding depends on: weights, method, switches, templates, limits, dtype."""
        parts = [self.loaded.fingerprint, self.method.config(), self.max_seq_length, str(self.dtype)]
        if self.custom_prompts or self.truncate_dim:  # only when set, so the default fingerprint stays put
            parts.append({"prompts": self.custom_prompts, "truncate_dim": self.truncate_dim})
        blob = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_seq_length={value!r}: a positive number of tokens")
        self._max_seq_length = value

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def get_embedding_dimension(self) -> int:
        return self.truncate_dim or self.args.hidden_size

    get_sentence_embedding_dimension = get_embedding_dimension

    def _check_truncate_dim(self, truncate_dim):
        if truncate_dim is None:
            return None
        if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or not 0 < truncate_dim:
            raise ValueError(f"truncate_dim={truncate_dim!r}: a positive number of dimensions")
        return min(truncate_dim, self.args.hidden_size)

    # ------------------------------------------------------------------------------ encode

    def encode(self, inputs=None, prompt_name: str | None = None, prompt: str | None = None, batch_size: int = 32,
               show_progress_bar: bool | None = None, output_value: str | None = "sentence_embedding",
               precision: str = "float32", convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               device=None, normalize_embeddings: bool | None = None, truncate_dim: int | None = None,
               pool=None, chunk_size: int | None = None, on_truncation: str = "warn", *, sentences=None, **kwargs):
        """Embed a string (-> 1-D) or an ordered sequence of strings (-> (N, dim)), in input order.

        prompt_name           a key of `self.prompts` ("query", "document", or your own); None: default_prompt_name,
                              else the document template
        prompt                a template with a {text} slot for this call only (a plain prefix p means p + text)
        normalize_embeddings  None: the method's `normalize` switch; False: the pooled vector itself
        truncate_dim          keep the first dimensions (before normalising, as sentence-transformers does)
        precision             float32, or int8/uint8/binary/ubinary through sentence-transformers' quantizer
        device                move the model there first (as sentence-transformers does)
        on_truncation         "warn" (default; indices also in `self.last_truncated`), "raise", or "ignore"
        """
        if sentences is not None:  # sentence-transformers < 5 called the first argument `sentences`
            if inputs is not None:
                raise TypeError("encode() got both inputs and sentences; pass one")
            inputs = sentences
        if kwargs:
            raise TypeError(f"encode() got unsupported option(s) {sorted(kwargs)}; see KVEmbedder.encode's docstring")
        if output_value != "sentence_embedding":
            raise ValueError(f"output_value={output_value!r}: {self.method.name} gives one pooled vector per text; "
                             "token states come from the decoder itself (kvembed.model.Decoder, output_hidden_states)")
        if pool is not None or chunk_size is not None:
            raise ValueError("pool/chunk_size: multi-process encoding is sentence-transformers' own; use "
                             "kvembed.to_sentence_transformer(...) and its start_multi_process_pool(), or "
                             "`kvembed embed-corpus` under torchrun")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
        if on_truncation not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_truncation={on_truncation!r}: choose 'warn', 'raise' or 'ignore'")
        check_int("batch_size", batch_size, minimum=1)
        if normalize_embeddings is not None and not isinstance(normalize_embeddings, bool):
            raise TypeError(f"normalize_embeddings={normalize_embeddings!r}: pass True, False or None")
        normalize = self.method.normalize if normalize_embeddings is None else normalize_embeddings
        dim = self._check_truncate_dim(truncate_dim) or self.truncate_dim
        method, name = self._method_for(prompt_name, prompt)
        texts, single = as_texts(inputs)

        device = None if device is None else check_device(device)
        with self._lock:
            if device is not None and device != self.device:
                self.model.to(device)
            out, truncated, repaired = self._encode_all(iter(texts), method, name, batch_size, show_progress_bar)
            self.last_truncated, self.last_repaired = truncated, repaired
        if repaired:
            warnings.warn(f"{len(repaired)} text(s) held lone surrogates (invalid Unicode), embedded with U+FFFD in "
                          f"their place; indices: {repaired[:10]}{' ...' if len(repaired) > 10 else ''}",
                          SurrogateWarning, stacklevel=2)
        if truncated:
            msg = (f"{len(truncated)} text(s) were longer than max_length={self.max_seq_length} tokens and were cut "
                   f"(the text, not the instruction); indices: {truncated[:10]}{' ...' if len(truncated) > 10 else ''}")
            if on_truncation == "raise":
                raise TruncationError(msg + "; pass on_truncation='warn' to accept, or raise max_length")
            if on_truncation == "warn":
                warnings.warn(msg, TruncationWarning, stacklevel=2)
        out = out[:, :dim]  # dim None: every dimension
        if normalize:
            out = F.normalize(out, dim=-1)
        if precision != "float32":
            out = torch.from_numpy(quantize(out.numpy(), precision))
        if single:
            out = out[0]
        if convert_to_tensor:
            return out
        return out.numpy() if convert_to_numpy else list(out)

    def encode_query(self, inputs=None, **kwargs):
        return self.encode(inputs, prompt_name="query", **kwargs)

    def encode_document(self, inputs=None, **kwargs):
        return self.encode(inputs, prompt_name="document", **kwargs)

    def similarity(self, a, b):
        """(N, M) scores between two sets of embeddings by `similarity_fn_name` (distances are negated, so higher
        is closer, as sentence-transformers does); numpy in, numpy out; torch likewise."""
        return self._scores(a, b, pairwise=False)

    def similarity_pairwise(self, a, b):
        """(N,) scores between row i of a and row i of b."""
        return self._scores(a, b, pairwise=True)

    # ------------------------------------------------------------------------------ internals

    def _scores(self, a, b, pairwise: bool):
        fn = self.similarity_fn_name
        if fn not in SIMILARITIES:
            raise ValueError(f"similarity_fn_name={fn!r}: choose one of {', '.join(SIMILARITIES)}")
        is_np = isinstance(a, np.ndarray)
        ta, tb = (torch.atleast_2d(torch.as_tensor(np.asarray(x) if is_np else x)).float() for x in (a, b))
        if fn == "cosine":
            s = F.cosine_similarity(ta, tb, dim=-1) if pairwise else F.normalize(ta, dim=-1) @ F.normalize(tb, dim=-1).T
        elif fn == "dot":
            s = (ta * tb).sum(-1) if pairwise else ta @ tb.T
        else:
            p = 2 if fn == "euclidean" else 1
            s = -((ta - tb).norm(p=p, dim=-1) if pairwise else torch.cdist(ta, tb, p=p))
        return s.numpy() if is_np else s

    def _method_for(self, prompt_name: str | None, prompt: str | None):
        """The method object and prompt name this call runs: a per-call prompt is a new method, never a change."""
        if prompt is not None:
            return self.method.with_template(template_of(prompt)), None
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None or (name in ("query", "document") and name not in self.custom_prompts):
            return self.method, name  # the method's own templates (MetaEOL: its fixed prompts)
        if name not in self.prompts:
            raise ValueError(f"prompt_name={name!r} is not among the prompts {sorted(self.prompts)}; add it with "
                             "prompts={...} or pass prompt=")
        return self.method.with_template(self.prompts[name]), None

    def _encode_all(self, it, method, prompt_name, batch_size, show_progress_bar):
        from tqdm.auto import tqdm

        chunk_size = batch_size * 32  # bounds memory for huge or endless inputs
        collate_fn = partial(bucket_collate, device=self.device, compiled=self.compiled)
        results = [torch.empty(0, self.args.hidden_size)]
        truncated: list[int] = []
        repaired: list[int] = []
        bar = None
        start = 0
        for chunk in iter(lambda: list(islice(it, chunk_size)), []):  # stops when islice gives []
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
            views = [method.prepare(self.tokenizer, t, prompt_name, self.max_seq_length) for t in chunk]
            truncated += [start + i for i, v in enumerate(views) if any(e.truncated for e in v)]
            order = sorted(range(len(chunk)), key=lambda i: -sum(len(e.ids) for e in views[i]))
            out = torch.empty(len(chunk), self.args.hidden_size)
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                with torch.inference_mode():
                    e = method.embed(self._forward_model, [views[i] for i in idx], collate_fn, normalize=False)
                e = e.float().cpu()
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
        return torch.cat(results), truncated, repaired


def bucket_collate(views, device, compiled: bool):
    """`collate` on `device`; under torch.compile, padded up to the next of BUCKETS (a bounded set of graphs)."""
    pad_to = None
    if compiled:
        longest = max(len(v.ids) for v in views)
        pad_to = next((b for b in BUCKETS if b >= longest), longest)
    return collate(views, device, pad_to=pad_to)


def template_of(prompt: str) -> str:
    """A prompt as a template: kept when it has a {text} slot, else a prefix (sentence-transformers' meaning)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt={prompt!r}: a string")
    return prompt if "{text}" in prompt else prompt + "{text}"


def quantize(embeddings: np.ndarray, precision: str) -> np.ndarray:
    """sentence-transformers' own quantizer (its calibration: the ranges of these embeddings)."""
    try:
        from sentence_transformers.quantization import quantize_embeddings
    except ImportError:
        raise ImportError(f"precision={precision!r} uses sentence-transformers' quantizer: "
                          "pip install 'kvembed[st]'") from None
    return quantize_embeddings(embeddings, precision=precision)

"""Layer selections on disk: the ones shipped with the package, and a cache of computed ones (SPEC §1.4).

    auto_layers(loaded, id_corpus)   what `layers="auto"` means for a loaded model: its shipped selection
                                     (the named models, on the shared id_corpus, N = 1000, seed 0), else the
                                     cached or freshly computed TwoNN selection on the user's corpus
    cached_selection(...)            kvembed.layer_select.select_layers behind a JSON cache under
                                     $KVEMBED_CACHE/layer_select, keyed by everything the result depends on

The computation itself is kvembed/layer_select.py (pure); this module only reads and writes files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .files import atomic_write, cache_root, read_texts
from .layer_select import LayerSelection, corpus_sha256, format_curve, select_layers
from .method import DOCUMENT_TEMPLATE

CACHE_VERSION = 2  # 2: TwoNN on unique points (duplicates no longer neighbours); bump on any change of result
SHIPPED_DIR = Path(__file__).parent / "data"  # <model>_layers.json, one per named model


class CorpusError(ValueError):
    """The corpus for layer selection is missing or unreadable."""


def shipped_selection(fingerprint: str) -> LayerSelection | None:
    shipped = [LayerSelection.from_dict(json.loads(p.read_text())) for p in sorted(SHIPPED_DIR.glob("*_layers.json"))]
    return next((s for s in shipped if s.fingerprint == fingerprint), None)


def cache_key(fingerprint: str, corpus_sha: str, n_texts: int, seed: int, template: str, max_length: int) -> str:
    """Everything the result depends on besides the code (batch size does not: batches never change a row)."""
    fields = [CACHE_VERSION, fingerprint, corpus_sha, n_texts, seed, template, max_length]
    return hashlib.sha256(json.dumps(fields).encode("utf-8")).hexdigest()[:32]


def cached_selection(model, tokenizer, texts: Sequence[str], *, fingerprint: str, n: int = 1000, seed: int = 0,
                     template: str = DOCUMENT_TEMPLATE, max_length: int = 512, batch_size: int = 32,
                     cache_dir: str | Path | None = None) -> LayerSelection:
    """`select_layers`, cached as JSON in `cache_dir` (default <cache root>/layer_select)."""
    texts = list(texts)
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "layer_select"
    n_texts = min(n, len(texts))
    sha = corpus_sha256(texts)
    path = folder / f"{cache_key(fingerprint, sha, n_texts, seed, template, max_length)}.json"
    if path.is_file():
        try:
            sel = LayerSelection.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            print(f"kvembed: ignoring unreadable layer-selection cache {path} ({e}); recomputing", file=sys.stderr)
        else:  # never return another model's layers (a key collision or a hand-edited file)
            if (sel.fingerprint, sel.corpus_sha256, sel.n_texts, sel.seed) == (fingerprint, sha, n_texts, seed):
                return sel
    sel = select_layers(model, tokenizer, texts, n=n, seed=seed, template=template, fingerprint=fingerprint,
                        batch_size=batch_size, max_length=max_length)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(sel.to_dict(), indent=1), fsync=False)
    except OSError as e:  # a read-only cache loses only the memo
        print(f"kvembed: could not cache the layer selection in {path.parent} ({e.strerror or e})", file=sys.stderr)
    return sel


def read_corpus(path: str | os.PathLike) -> list[str]:
    """The texts of a corpus file (.jsonl with a "text" field per object, or a text file, one per line)."""
    if not Path(path).is_file():
        raise CorpusError(f"corpus {path} does not exist (or is not a file); give a .jsonl file with a \"text\" "
                          "field per line, or a .txt file with one text per line")
    return read_texts(path, "text", hint="fix the corpus file").texts


def auto_layers(loaded, id_corpus=None) -> list[int]:
    sel = shipped_selection(loaded.fingerprint)
    if sel is None:
        corpus = id_corpus or os.environ.get("KVEMBED_ID_CORPUS")
        if corpus is None:
            raise CorpusError(
                f"layers='auto' needs a corpus to measure intrinsic dimension on, and none is shipped for this "
                f"model (fingerprint {loaded.fingerprint}): pass id_corpus=PATH (JSONL with a 'text' field, or a "
                "text file), set KVEMBED_ID_CORPUS, or give explicit layers=[...]"
            )
        sel = cached_selection(loaded.model, loaded.tokenizer, read_corpus(corpus), fingerprint=loaded.fingerprint)
        print(format_curve(sel), file=sys.stderr)
    return list(sel.layers)

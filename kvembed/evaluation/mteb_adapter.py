"""kvembed as an mteb 2.x model: `KVEmbeddingMTEB(embedder)` runs under `mteb.evaluate` or a task's `evaluate`.

mteb 2.x hands `encode` a torch DataLoader whose batches are dicts with a `"text"` list (for a corpus,
mteb has already joined title and body into `"text"`), plus the task's metadata and a `prompt_type`:
`PromptType.query` for retrieval/reranking queries, `PromptType.document` for their documents, `None`
for symmetric tasks (STS, classification, clustering, pair classification). We map
query -> prompt_name "query" and everything else -> "document", as SPEC §1 asks (symmetric tasks use the
document template).

`mteb_model_meta` must be a real `ModelMeta`: mteb 2.2x replaces a model without one by an empty meta
(`no_model_name/available`), and may then try to load that name. Ours names the weights and the method,
carries the embedder's fingerprint as the revision and the switches in `experiment_kwargs`, and sets
cosine similarity (embeddings are compared by cosine everywhere in kvembed).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from .cache import CachedEncoder, EmbeddingCache


def prompt_name_for(prompt_type) -> str:
    return "query" if prompt_type is not None and PromptType(prompt_type) == PromptType.query else "document"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "model"


def describe(embedder, name: str | None = None, method: str | None = None, switches: dict | None = None):
    """(model name, method name, switches, re-routed layers) of an embedder: what the mteb name and metadata and
    a report's row are made of.

    A KVEmbedder names itself (the folder it loaded and its method's config); other embedders (the lexical
    floor, test doubles) give what they have. Never an object's repr: that changes from run to run. The layers
    are as the method reports them ("n/a" for methods without re-routing)."""
    m = getattr(embedder, "method", None)
    config = m.config() if hasattr(m, "config") else {}
    loaded = getattr(embedder, "loaded", None)
    model = name or (loaded.path.name if loaded is not None else getattr(embedder, "model_name", None)) or "model"
    method = method or config.get("method") or (m if isinstance(m, str) else "kvembedding")
    layers = getattr(m, "layers", None)
    layers = "n/a" if layers is None or callable(layers) else ",".join(map(str, layers)) or "none"
    return model, method, {**{k: v for k, v in config.items() if k != "method"}, **(switches or {})}, layers


class KVEmbeddingMTEB(AbsEncoder):
    """An mteb encoder around a kvembed embedder (`KVEmbedder` or anything with the same encode/fingerprint).

    Vectors go through `CachedEncoder`, so with a `cache` only texts never embedded by this
    fingerprint and prompt are computed.
    """

    def __init__(self, embedder, *, cache: EmbeddingCache | None = None, batch_size: int = 32,
                 show_progress_bar: bool = True, name: str | None = None, method: str | None = None,
                 switches: dict | None = None):
        self.model = embedder
        self.encoder = CachedEncoder(embedder, cache, batch_size=batch_size, show_progress_bar=show_progress_bar)
        model, method, config, _ = describe(embedder, name, method, switches)
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            # mteb wants "organization/model"; the method is part of the name so results folders keep methods apart,
            # and the fingerprint (weights + method + switches + limits) is the revision: stable from run to run.
            name=f"kvembed/{_slug(model)}__{_slug(method)}",
            revision=str(embedder.fingerprint)[:40],
            embed_dim=embedder.get_embedding_dimension() if hasattr(embedder, "get_embedding_dimension") else None,
            framework=["PyTorch"],
            similarity_fn_name=ScoringFunction.COSINE,
            use_instructions=True,
            open_weights=True,
            languages=["eng-Latn"],
            training_datasets=set(),
            experiment_kwargs={"method": method, **{k: json.dumps(v) if not isinstance(v, str) else v
                                                    for k, v in config.items()}},
        ))
        # prompt names seen per call, in order: (task name, split, prompt_name); tests and logs read it
        self.calls: list[tuple[str, str, str]] = []

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        texts: list[str] = []
        for batch in inputs:
            if "text" not in batch:
                raise ValueError(f"{task_metadata.name}: kvembed embeds text only; batch keys are {sorted(batch)}")
            texts.extend(batch["text"])
        prompt_name = prompt_name_for(prompt_type)
        self.calls.append((task_metadata.name, hf_split, prompt_name))
        short = task_metadata.name.removeprefix("kvembed-local-")
        # mteb passes its encode_kwargs on: its batch_size is honoured, anything else is mteb's own business
        vectors = self.encoder.encode(texts, prompt_name, desc=f"{short}/{hf_split}",
                                      batch_size=kwargs.get("batch_size"))
        self.last_vectors = vectors  # the clustering interval re-runs k-means on them (runners.per_row)
        return vectors

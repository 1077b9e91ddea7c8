"""kvembed: training-free text embeddings from frozen decoder-only LLMs by KV re-routing (KV-Embedding).

The names below are imported on first use, so that `import kvembed.model` (or `weights_loader`, which
imports `kvembed.config`) does not pull in the user API: the floors of the package stay separate.
"""

__version__ = "0.2.0"

_LAZY = {
    "KVEmbedder": ("kvembed.encoder", "KVEmbedder"),
    "SWITCHES": ("kvembed.switches", "SWITCHES"),
    "load_corpus_embeddings": ("kvembed.scale.manifest", "load_corpus_embeddings"),
    "to_sentence_transformer": ("kvembed.st", "to_sentence_transformer"),
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'kvembed' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])

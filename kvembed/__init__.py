"""kvembed: training-free text embeddings from frozen decoder-only LLMs by KV re-routing (KV-Embedding)."""

from .encoder import KVEmbedder

__version__ = "0.1.0"


def load_corpus_embeddings(outdir):
    """ids and a memory-mapped (N, dim) matrix in input order, from `kvembed embed-corpus` output."""
    from .corpus import load_corpus_embeddings as _load

    return _load(outdir)


__all__ = ["KVEmbedder", "load_corpus_embeddings", "__version__"]

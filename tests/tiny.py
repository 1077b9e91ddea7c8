"""Tiny random checkpoints of the four families, written the way the hub ships them.

Tests never touch the network: every checkpoint is built here with `transformers` (the parity oracle),
saved with `save_pretrained` as config.json + safetensors, and given a byte-level BPE tokenizer.json
trained with `tokenizers` on a few sentences.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

# Small enough to run in milliseconds, large enough to exercise GQA (Hq = 2 * Hkv) and several layers.
BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# One entry per case the parity tests must cover (issue: engine). Each is (model_type, overrides).
CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama3_rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
        },
    ),
    "llama_mha_bias": ("llama", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
    "mistral_window": ("mistral", {"sliding_window": 5, "head_dim": 16}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    # Qwen3-0.6B style: head_dim * heads (4 * 24 = 96) != hidden_size (64).
    "qwen3": ("qwen3", {"head_dim": 24}),
}

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Context: a cat sat on the mat. Compress the Context in one word:",
    "Query: where is the station? Compress the Query in one word:",
    "Numbers 0123456789 and symbols !@#$%^&*()",
    "def f(x):\n    return x * 2  # code",
]


def hf_config(name: str):
    """A transformers config object for CONFIGS[name]."""
    import transformers

    model_type, overrides = CONFIGS[name]
    kw = copy.deepcopy(BASE)
    kw.update(copy.deepcopy(overrides))
    cls = transformers.AutoConfig.for_model(model_type).__class__
    return cls(**kw)


def hf_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised transformers model (eval mode) for CONFIGS[name]."""
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(name)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Default init has std 0.02: too small to make attention patterns (and prefix effects) visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
            else:  # norm weights and biases: move them off their init so a missed one shows
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def make_tokenizer(vocab_size: int = BASE["vocab_size"]):
    """A byte-level BPE tokenizer (every string encodes, no <unk>) that prepends <s>, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 8,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def write_checkpoint(folder: Path, name: str, seed: int = 0, dtype: torch.dtype = torch.float32, max_shard_size=None):
    """Save CONFIGS[name] as a hub-style folder; returns (folder, the transformers model in fp32)."""
    folder = Path(folder)
    model = hf_model(name, seed)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(folder, **kw)
    model.float()
    make_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return folder, model

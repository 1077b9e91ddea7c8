"""What the benchmarks run: the default model's real weights, or random weights with real models' shapes; the
transformers twin on the same tensors; token inputs (random ids, or real texts cut to spread lengths).

Random weights are enough for timing (no kernel's speed depends on the values) and are the only option where
real weights cannot travel (the GPU machine). They are built on the meta device and materialised on the target
device directly, so a 7B-shaped model never passes through host memory.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvembed.config import ModelArgs
from kvembed.model import Decoder

# config.json shapes of real checkpoints (values as published with each model; only what ModelArgs and
# transformers read). Random weights in these shapes stand in for the real ones.
CONFIGS = {
    # HuggingFaceTB/SmolLM2-135M-Instruct: the default model (SPEC §3)
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
    # Qwen/Qwen3-0.6B: head_dim 128 with a 1024-wide residual (Hq * D != C), q/k norm
    "qwen3-0.6b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
    ),
    # meta-llama/Llama-3.2-1B: llama3 RoPE scaling
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    ),
    # Qwen/Qwen3-4B: 36 layers, 32/8 heads of 128, no sliding window (use_sliding_window false)
    "qwen3-4b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=151643, eos_token_id=151645,
    ),
    # mistralai/Mistral-7B-v0.1: 32/8 heads of 128, every layer through a 4096-token sliding window, untied
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
}


def heads(name: str) -> tuple[int, int, int]:
    """(Hq, Hkv, D) of one attention layer of a named shape."""
    c = CONFIGS[name]
    return c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]


@dataclass
class BenchModel:
    label: str  # e.g. "smollm2-135m" (real weights) or "mistral-7b-shaped" (random)
    model: Decoder = field(repr=False)
    config: dict = field(repr=False)  # config.json as a dict: what the transformers twin is built from
    layers: tuple[int, ...]  # re-routed layers
    tokenizer: object = field(default=None, repr=False)

    @property
    def args(self) -> ModelArgs:
        return self.model.args


def middle_window(L: int) -> tuple[int, ...]:
    """A window as wide as SPEC §1.4's (m .. m + max(1, L // 10)) at the middle layer: 4 layers of 30.

    The re-routing's cost depends on how many layers are re-routed, not on which, so benchmarks need no ID
    selection (the default model's shipped one is 27-29: three layers, one fewer than the rule's width).
    """
    m = L // 2
    return tuple(range(m, min(L, m + max(1, L // 10) + 1)))


def load(name: str, dtype: torch.dtype, device: torch.device, layers: tuple[int, ...] | None = None) -> BenchModel:
    """`default`: the default model's real weights (weights_loader); a CONFIGS name: random weights, that shape."""
    if name == "default":
        from weights_loader import load_model

        loaded = load_model(None, dtype=dtype, device=device)
        model, config, label, tok = loaded.model, dict(loaded.config), "smollm2-135m", loaded.tokenizer
    elif name in CONFIGS:
        model, config, label, tok = random_model(CONFIGS[name], dtype, device), dict(CONFIGS[name]), None, None
        label = f"{name}-shaped"
    else:
        raise SystemExit(f"--model {name!r}: use 'default' or one of {', '.join(CONFIGS)}")
    return BenchModel(label, model, config, layers or middle_window(model.args.num_hidden_layers), tok)


def random_model(cfg: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Decoder:
    """A Decoder with std-0.02 normal weights (HF's init scale), norms 1, biases 0, built straight on `device`."""
    args = ModelArgs.from_hf_config(cfg)
    with torch.device("meta"):
        model = Decoder(args)
    model = model.to(dtype=dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def hf_twin(bm: BenchModel, attn: str = "sdpa"):
    """transformers' base model (no lm_head) for bm's config, holding bm's own parameter tensors.

    Built on the meta device and handed our tensors with assign=True: the same weights, no second copy. The
    rotary module is rebuilt on the model's device, because its inv_freq is computed, not loaded.
    """
    import transformers

    cfg = dict(bm.config)
    model_type = cfg.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    hf_cfg.use_cache = False
    with torch.device("meta"):
        hf = transformers.AutoModel.from_config(hf_cfg, attn_implementation=attn)
    device = next(bm.model.parameters()).device
    hf.rotary_emb = type(hf.rotary_emb)(config=hf.config).to(device)  # inv_freq computed on the CPU in fp32, as HF does
    hf.load_state_dict(bm.model.state_dict(), strict=True, assign=True)
    return hf.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------- FLOPs


def nonembed_params(model: Decoder) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed_tokens"))


def visible_pairs(T: int, window: int | None) -> int:
    """(query, key) pairs a causal row set of length T attends to: T(T+1)/2, fewer under a sliding window."""
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def model_flops(model: Decoder, B: int, T: int) -> float:
    """Useful FLOPs of one forward over B x T tokens: 2 x non-embedding params x tokens + causal QK^T and PV.

    Counted the same for every engine (pads included: both engines compute them); work an engine spends on
    masked-out pairs is not counted, so it shows as a lower fraction of the peak.
    """
    a = model.args
    pairs = 0
    for t in a.layer_types:
        pairs += visible_pairs(T, a.sliding_window if t == "sliding_attention" else None)
    return 2.0 * nonembed_params(model) * B * T + 4.0 * a.num_attention_heads * a.head_dim * B * pairs


# ------------------------------------------------------------------------------------------ inputs


def random_ids(B: int, T: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g).tolist()


def spread_lengths(n: int, lo: int, hi: int) -> list[int]:
    """n lengths evenly spread over lo..hi (both ends included), in a fixed shuffled order: a mixed batch."""
    lengths = [round(lo + i * (hi - lo) / max(1, n - 1)) for i in range(n)]
    random.Random(0).shuffle(lengths)
    return lengths


def random_mixed(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in spread_lengths(n, lo, hi)]


DATA_FILES = ("bbc_news_clustering/test.jsonl", "brown_genres/test.jsonl")


def package_root() -> Path:
    """The folder holding the kvembed package: the checkout in a source tree, site-packages when installed."""
    import kvembed

    return Path(kvembed.__file__).resolve().parent.parent


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $KVEMBED_DATA, else ../shared/data (from the current folder, then from the checkout)."""
    tries = [Path(explicit)] if explicit else [
        *([Path(os.environ["KVEMBED_DATA"])] if os.environ.get("KVEMBED_DATA") else []),
        Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data",
        package_root().parent / "shared" / "data",
    ]
    for d in tries:
        if all((d / f).is_file() for f in DATA_FILES):
            return d
    raise SystemExit(f"the data pack ({', '.join(DATA_FILES)}) is not in any of {[str(d) for d in tries]}; "
                     "pass --data-dir or set $KVEMBED_DATA")


def text_mixed(tokenizer, n: int, lo: int, hi: int, directory: Path, per_file: int = 250) -> list[list[int]]:
    """n real texts (BBC News and Brown corpus test splits), tokenized, cut to lengths spread over lo..hi.

    Each length takes the shortest unused text that is at least that long (so most rows are one text, cut);
    where none is left, consecutive texts are joined. Rows come in spread_lengths' mixed order.
    """
    texts = []
    for f in DATA_FILES:
        with open(directory / f, encoding="utf-8") as fh:
            for _, line in zip(range(per_file), fh):
                texts.append(json.loads(line)["text"])
    pool = sorted((e.ids for e in tokenizer.encode_batch(texts)), key=len)
    rows = {}
    for L in sorted(set(spread_lengths(n, lo, hi)), reverse=True):
        fits = [i for i, ids in enumerate(pool) if len(ids) >= L]
        if fits:
            ids = pool.pop(fits[0])
        else:
            ids = []
            while len(ids) < L and pool:
                ids += pool.pop()
        if len(ids) < L:
            raise SystemExit(f"the data pack has too few tokens for a {L}-token row")
        rows[L] = ids[:L]
    return [rows[L] for L in spread_lengths(n, lo, hi)]

"""ModelArgs: the decoder's hyper-parameters, read from a Hugging Face config.json.

Field names are spelled as in config.json so that a reader can check one against the other. Keys we do
not use are dropped; keys that would change the computation in a way we do not implement raise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# The keys each RoPE scaling type reads ("default" is no scaling at all).
ROPE_SCALING_KEYS = {"default": (), "linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


class ConfigError(ValueError):
    """config.json is missing a key, has a contradictory one, or asks for something we do not implement."""


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    # Architecture family: decides q/k/v bias (qwen2) and per-head q/k RMSNorm (qwen3).
    model_type: str
    # Rows of embed_tokens.
    vocab_size: int
    # Residual stream width C.
    hidden_size: int
    # Width of the SwiGLU MLP's gate/up projections.
    intermediate_size: int
    # Number of decoder layers L.
    num_hidden_layers: int
    # Query heads Hq.
    num_attention_heads: int
    # Key/value heads Hkv (GQA when < Hq).
    num_key_value_heads: int
    # Per-head width D. Read from config.json when present: Qwen3 has Hq * D != C.
    head_dim: int
    # Epsilon inside every RMSNorm.
    rms_norm_eps: float
    # RoPE base frequency.
    rope_theta: float
    # RoPE frequency scaling: None, or {"rope_type": "linear"|"llama3", "factor": ..., ...}.
    rope_scaling: dict | None
    # Longest position the model was trained for (informational; used as the default context limit).
    max_position_embeddings: int
    # lm_head shares embed_tokens (we never use lm_head, but loaders need to know which keys to expect).
    tie_word_embeddings: bool
    # Bias on q/k/v projections (always on for qwen2; llama's `attention_bias` also puts one on o_proj).
    qkv_bias: bool
    # Bias on o_proj (llama `attention_bias`).
    o_bias: bool
    # Bias on the MLP projections (llama `mlp_bias`).
    mlp_bias: bool
    # Per-head RMSNorm on q and k before RoPE (qwen3).
    qk_norm: bool
    # Keys further back than this many positions are invisible (mistral; qwen2/3 with use_sliding_window).
    sliding_window: int | None
    # Per-layer "full_attention" / "sliding_attention"; length L.
    layer_types: tuple[str, ...]
    # Token ids, informational (the tokenizer decides what it adds).
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type={model_type!r} is not supported; "
                f"supported model types are {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def positive(key: str, value: Any = None) -> int:
            """`value`, or else the required cfg[key], as a positive int."""
            value = cfg.get(key) if value is None else value
            if value is None:
                raise ConfigError(f"config.json ({model_type}): required key {key!r} is missing")
            n = _as(int, key, value)
            if n <= 0:
                raise ConfigError(f"config.json: {key}={value!r} must be a positive integer")
            return n

        hidden_size = positive("hidden_size")
        n_heads = positive("num_attention_heads")
        # Llama-1/2 era configs omit num_key_value_heads: that means plain multi-head attention.
        n_kv = positive("num_key_value_heads", cfg.get("num_key_value_heads") or n_heads)
        if n_heads % n_kv:
            raise ConfigError(
                f"config.json: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}"
            )
        # head_dim is read, never derived, when present (Qwen3-0.6B: 1024 wide, 16 heads, head_dim 128).
        if cfg.get("head_dim") is None and hidden_size % n_heads:
            raise ConfigError(
                f"config.json: no head_dim and hidden_size={hidden_size} is not divisible by "
                f"num_attention_heads={n_heads}"
            )
        head_dim = positive("head_dim") if cfg.get("head_dim") is not None else hidden_size // n_heads
        if head_dim % 2:
            raise ConfigError(f"config.json: head_dim={head_dim} must be even for rotary embeddings")

        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json: hidden_act={act!r} is not supported (only 'silu')")

        rope_theta, rope_scaling = _fold_rope(cfg)
        n_layers = positive("num_hidden_layers")
        sliding_window, layer_types = _fold_sliding_window(cfg, model_type, n_layers)

        attention_bias = bool(cfg.get("attention_bias") or False)
        return cls(
            model_type=model_type,
            vocab_size=positive("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=positive("intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=_as(float, "rms_norm_eps", cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=positive("max_position_embeddings", cfg.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and never an o_proj bias; Llama's attention_bias covers all four.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias") or False),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            layer_types=layer_types,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layer_types": list(self.layer_types)}


def _as(kind, key: str, value):
    """int()/float() of a config value, as a ConfigError naming the key."""
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError  # int() would quietly accept True or truncate 2.5
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config.json: {key}={value!r} is not a valid {kind.__name__}") from None


def _fold_rope(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """One place for the three spellings: legacy `rope_theta` + `rope_scaling`, and newer `rope_parameters`."""
    theta = cfg.get("rope_theta")
    if cfg.get("rope_parameters") is not None:
        # transformers >= 5 writes {"rope_type", "rope_theta", <scaling keys>} in one dict.
        scaling = dict(cfg["rope_parameters"])
        theta = scaling.pop("rope_theta", theta)
    else:
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None
    if scaling is not None:
        # Old configs spell it "type"; "default" means no scaling at all.
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_SCALING_KEYS:
            raise ConfigError(
                f"config.json: rope_type={rope_type!r} is not supported; "
                f"supported rope types are {', '.join(ROPE_SCALING_KEYS)}"
            )
        need = ROPE_SCALING_KEYS[rope_type]
        missing = [k for k in need if scaling.get(k) is None]
        if missing:
            raise ConfigError(f"config.json: rope scaling {rope_type!r} is missing {', '.join(missing)}")
        scaling = {"rope_type": rope_type, **{k: scaling[k] for k in need}} if need else None
    return _as(float, "rope_theta", 10000.0 if theta is None else theta), scaling


def _fold_sliding_window(cfg: dict[str, Any], model_type: str, n_layers: int) -> tuple[int | None, tuple[str, ...]]:
    """Which layers attend through a sliding window, and how wide it is."""
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None  # Qwen configs carry a sliding_window value even when it is switched off
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        first = n_layers if window is None else 0  # the first layer that slides: none without a window, else all
        if window is not None and model_type in ("qwen2", "qwen3"):
            # transformers: layers at index >= max_window_layers slide.
            first = _as(int, "max_window_layers", cfg.get("max_window_layers", n_layers))
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    layer_types = tuple(layer_types)
    if len(layer_types) != n_layers:
        raise ConfigError(f"config.json: layer_types has {len(layer_types)} entries but num_hidden_layers={n_layers}")
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ConfigError(f"config.json: layer_types has unsupported entries {sorted(unknown)}")
    if model_type == "llama":
        # transformers' Llama has no sliding window and ignores sliding_window and layer_types (some converters
        # write them): a llama config that carries them must not change what the model computes.
        return None, ("full_attention",) * n_layers
    if "sliding_attention" in layer_types and window is None:
        raise ConfigError("config.json: layer_types asks for sliding_attention but sliding_window is not set")
    return (_as(int, "sliding_window", window) if "sliding_attention" in layer_types else None), layer_types

"""The decoder: Llama, Mistral, Qwen2 and Qwen3, written once, with per-layer K/V out and a prefix in.

Notation
    B    batch size (rows, right-padded)
    T    tokens per row
    P    injected prefix slots (KV-Embedding uses P = 1)
    C    residual width (hidden_size)
    Hq   query heads            Hkv  key/value heads (GQA: Hq = n_rep * Hkv)
    D    head_dim               L    decoder layers

Module names equal the Hugging Face checkpoint names without the leading `model.` (embed_tokens,
layers.N.self_attn.q_proj, mlp.gate_proj, input_layernorm, norm), so loading is a table, not a remap.
There is no lm_head: an embedder never predicts a token.

The four families differ in three places only (SPEC §3): Qwen2 has q/k/v bias, Qwen3 RMS-normalises each
q/k head before RoPE, Mistral (and some Qwen layers) attend through a sliding window.

Everything the method needs goes through one object, an `Intervention`, handed to `Decoder.forward`:
`prefix(layer, qkv)` may return key/value slots to prepend in that layer's attention, `edit(layer, h)` may
rewrite the residual stream before a layer. The decoder itself knows nothing about KV-Embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # The variance is taken in fp32 and the result cast back to x's dtype *before* the weight multiply,
        # exactly as transformers does: in bf16 the other order gives visibly different hidden states.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


# ---------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Rotary inverse frequencies (D/2,) in fp32, with the config's linear or Llama-3 scaling applied."""
    D = args.head_dim
    # device="cpu" explicitly: a Decoder built under `with torch.device("meta")` still needs real frequencies.
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # Llama-3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles at integer `positions` (...,) -> (..., D), always in fp32."""
    angles = positions.float()[..., None] * inv_freq  # (..., D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., D): rotate-half layout pairs i with i + D/2
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., T, D) by the angles in cos/sin (T, D) or broadcastable; computed in x's dtype like HF."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def unapply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The inverse rotation: R(-θ) x. Used to bring a captured post-RoPE key back to position 0."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos - rotate_half(x) * sin


# ----------------------------------------------------------------------------------------- attention


@dataclass
class Prefix:
    """Key/value slots prepended to one layer's attention.

    k, v:  (B, Hkv, P, D), repeated to the query heads like every other key.
    mask:  additive logits for the prefix columns, 4-D and broadcastable to (B, Hq, T, P): the bias b, or
           -inf to hide a slot. KV-Embedding's `unrotated` mode puts the whole prefix logit here (with a zero key).
    """

    k: Tensor
    v: Tensor
    mask: Tensor


def _with_prefix(k: Tensor, v: Tensor, mask: Tensor, prefix: Prefix | None):
    """Concatenate the prefix on the key axis and its logits on the mask's key axis: one mask [prefix | real]."""
    if prefix is None:
        return k, v, mask
    B, _, T, _ = mask.shape
    k = torch.cat((prefix.k.to(k.dtype), k), dim=2)  # (B, Hkv, P+T, D)
    v = torch.cat((prefix.v.to(v.dtype), v), dim=2)  # (B, Hkv, P+T, D)
    P = prefix.k.shape[2]
    pmask = prefix.mask.to(mask.dtype)  # (B|1, 1|Hq, T|1, P)
    heads = pmask.shape[1]
    pmask = pmask.expand(B, heads, T, P)
    mask = torch.cat((pmask, mask.expand(B, heads, T, mask.shape[-1])), dim=-1)  # (B, 1|Hq, T, P+T)
    return k, v, mask


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, prefix: Prefix | None = None) -> Tensor:
    """Scaled dot-product attention with an optional injected prefix, in one fused SDPA call.

    q (B, Hq, T, D); k, v (B, Hkv, T, D); mask additive (B, 1, T, T) with 0 where visible and -inf elsewhere.
    Returns (B, Hq, T, D).
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    k, v, mask = _with_prefix(k, v, mask, prefix)
    # SDPA's GQA path (enable_gqa) repeats heads inside the kernel, without materialising (B, Hq, T, D) copies.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hq != Hkv)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, prefix: Prefix | None = None) -> Tensor:
    """The same computation written out, with an explicit fp32 softmax: the twin the fast path is tested against."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k, v, mask = _with_prefix(k, v, mask, prefix)
    k = k.repeat_interleave(Hq // Hkv, dim=1).float()  # (B, Hq, P+T, D)
    v = v.repeat_interleave(Hq // Hkv, dim=1).float()
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask.float()  # (B, Hq, T, P+T)
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


def build_mask(attention_mask: Tensor, dtype: torch.dtype, causal: bool = True, window: int | None = None) -> Tensor:
    """Additive mask (B, 1, T, T): query i sees key j iff j is a real token, j <= i (causal) and i - j < window.

    Right padding means a padded query row still sees the real keys before it, so no row is all -inf
    (which would make SDPA return NaN); padded rows are never pooled.
    """
    B, T = attention_mask.shape
    i = torch.arange(T, device=attention_mask.device)
    visible = attention_mask.bool()[:, None, None, :].expand(B, 1, T, T)  # key padding
    if causal:
        visible = visible & (i[None, :] <= i[:, None])
    if window is not None:
        visible = visible & (i[:, None] - i[None, :] < window)
    return torch.zeros(B, 1, T, T, dtype=dtype, device=attention_mask.device).masked_fill(~visible, float("-inf"))


@dataclass
class QKV:
    """What one attention layer computed, handed to Intervention.prefix. All (B, H, T, D)."""

    q_pre: Tensor  # queries before RoPE (after Qwen3's q_norm)
    k_pre: Tensor  # keys before RoPE (after Qwen3's k_norm)
    q: Tensor  # queries after RoPE
    k: Tensor  # keys after RoPE
    v: Tensor
    cos: Tensor  # (T, D) the rotation used, fp32
    sin: Tensor


class Intervention:
    """A change to the forward pass, as data: the default changes nothing (the plain model)."""

    def prefix(self, layer: int, qkv: QKV) -> Prefix | None:
        return None

    def edit(self, layer: int, h: Tensor) -> Tensor:
        return h


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        C, Hq, Hkv, D = args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = Hq, Hkv, D
        self.q_proj = nn.Linear(C, Hq * D, bias=args.qkv_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=args.qkv_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=args.qkv_bias)
        self.o_proj = nn.Linear(Hq * D, C, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(D, args.rms_norm_eps)
            self.k_norm = RMSNorm(D, args.rms_norm_eps)
        self.qk_norm = args.qk_norm

    def forward(self, x, cos, sin, mask, layer: int, intervention: Intervention | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, Hq, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q_pre, k_pre = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q_pre, cos, sin), apply_rope(k_pre, cos, sin)
        prefix = None
        if intervention is not None:
            prefix = intervention.prefix(layer, QKV(q_pre, k_pre, q, k, v, cos, sin))
        out = attention(q, k, v, mask, prefix)  # (B, Hq, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, Hq*D)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        C, I, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(C, I, bias=bias)
        self.up_proj = nn.Linear(C, I, bias=bias)
        self.down_proj = nn.Linear(I, C, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.sliding = args.layer_types[layer] == "sliding_attention"
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, intervention):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, self.layer, intervention)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


@dataclass
class DecoderOutput:
    hidden: Tensor  # (B, T, C) after the final RMSNorm: what embeddings pool
    layer_outputs: list[Tensor] | None  # L x (B, T, C), each layer's raw output (before the final norm)
    kv: list[tuple[Tensor, Tensor]] | None  # L x (k, v), post-RoPE, (B, Hkv, T, D)


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # Not a buffer: it is derived from the config, so it never appears in (or is missing from) a state dict
        # and survives building on the meta device.
        self._inv_freq = rope_inv_freq(args)

    def rope(self, T: int, device) -> tuple[Tensor, Tensor]:
        """cos, sin (T, D) fp32 for positions 0..T-1, the same for every row (right padding)."""
        return rope_cos_sin(self._inv_freq.to(device), torch.arange(T, device=device))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        intervention: Intervention | None = None,
        causal: bool = True,
        output_hidden_states: bool = False,
        output_kv: bool = False,
    ) -> DecoderOutput:
        B, T = input_ids.shape
        h = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rope(T, h.device)
        full = build_mask(attention_mask, h.dtype, causal)
        window = self.args.sliding_window
        sliding = build_mask(attention_mask, h.dtype, causal, window) if window is not None else full
        layer_outputs, kv = [], []
        for block in self.layers:
            if intervention is not None:
                h = intervention.edit(block.layer, h)
            h, k, v = block(h, cos, sin, sliding if block.sliding else full, intervention)
            if output_hidden_states:
                layer_outputs.append(h)
            if output_kv:
                kv.append((k, v))
        return DecoderOutput(
            hidden=self.norm(h),
            layer_outputs=layer_outputs if output_hidden_states else None,
            kv=kv if output_kv else None,
        )

"""The decoder: Llama, Mistral, Qwen2 and Qwen3, written once, with per-layer K/V out and a prefix in.

Notation
    B    batch size (rows, right-padded)
    T    tokens per row
    P    injected prefix slots (KV-Embedding uses P = 1)
    S    shared past tokens, run once for every row (baselines.shared_forward)
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
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


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


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (..., T, D) by the angles in cos/sin (T, D) or broadcastable; computed in x's dtype like HF.

    x * cos + rotate_half(x) * sin, written half by half: the very same products and sums (bit for bit), with
    half the (..., T, D) temporaries of the one-line form, which were the forward's memory peak at T = 8192.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]  # rope_cos_sin repeats the angles: both halves share them
    first = x1 * c
    first -= x2 * s  # rotate_half(x) = (-x2, x1)
    second = x2 * c
    second += x1 * s
    return torch.cat((first, second), dim=-1)


# ----------------------------------------------------------------------------------------- attention
#
# Right padding is what makes the hot path mask-free: row b's real tokens are 0..last[b] and its pads come
# after them, so a causal real query (i <= last[b]) never reaches a pad key. `is_causal=True` alone is then
# exact for every real row; a pad row attends causally to whatever precedes it (finite, never pooled, never
# seen by a real row). A mask is built only where the math needs one, as bool, at that point:
#   - a sliding window shorter than the sequence (Mistral; some Qwen layers);
#   - no causal mask at all (the `bidirectional` baseline): then pads must be hidden from every row.


@dataclass
class Prefix:
    """One key/value slot prepended to a layer's attention (KV-Embedding's slot 0), visible to every query row.

    Its logit for query row i is   (q_i . k + q2_i . k2) * scale + bias,   scale = 1/sqrt(D):

    k, v    (B, Hkv, 1, D)  the slot's key, seen by the layer's (post-RoPE) queries, and its value
    bias    float           added after scaling; -inf hides the slot, which is then exactly no prefix
    q2, k2  (B, Hq, T, D) and (B, Hkv, 1, D), or None: a second query/key pair, for a logit the post-RoPE
            queries cannot express with one shared key (`unrotated`: pre-RoPE q . pre-RoPE k, with k = 0)
    """

    k: Tensor
    v: Tensor
    bias: float = 0.0
    q2: Tensor | None = None
    k2: Tensor | None = None

    def extra_logit(self) -> Tensor:
        """The logit terms besides q . k: `bias`, plus q2 . k2 * scale; (B, Hq, T, 1), or (1, 1, 1, 1) without q2."""
        bias = torch.tensor(self.bias, dtype=torch.float32, device=self.k.device).view(1, 1, 1, 1)
        if self.q2 is None:
            return bias
        n_rep = self.q2.shape[1] // self.k2.shape[1]
        k2 = self.k2.float().repeat_interleave(n_rep, dim=1)  # (B, Hq, 1, D)
        return self.q2.float() @ k2.transpose(-1, -2) / math.sqrt(self.q2.shape[-1]) + bias


def visible(T: int, device, *, causal: bool = True, window: int | None = None, key_padding: Tensor | None = None,
            prefix: bool = False) -> Tensor | None:
    """Bool mask, True where query i may read key j: (1|B, 1, T', T'), T' = T + prefix; None when none is needed.

    window       key j is visible iff i - j < window (as transformers); None, or >= T, is no window
    key_padding  (B, T) 1 on real tokens; hides pad keys when the attention is not causal (a causal real row
                 never reaches one). A pad row keeps its own key, so no row is ever empty: every output is
                 finite, and a NaN in a pad row cannot reach a real row through the next layer.
    prefix       slot 0 is visible to every row; token t is then at index t + 1
    """
    window = None if window is not None and window >= T else window
    key_padding = None if causal else key_padding
    if window is None and key_padding is None:
        return None  # `is_causal` (or nothing) is exact, with or without a prefix in slot 0
    n = T + int(prefix)
    i = torch.arange(n, device=device)
    ok = torch.ones(n, n, dtype=torch.bool, device=device)
    if causal:
        ok &= i[None, :] <= i[:, None]
    if window is not None:
        ok &= (i[:, None] - i[None, :]) < window
    ok = ok[None, None]  # (1, 1, n, n)
    if key_padding is not None:
        keys = key_padding.bool()
        if prefix:
            keys = F.pad(keys, (1, 0), value=True)  # the slot is never padding
        ok = ok & (keys[:, None, None, :] | torch.eye(n, dtype=torch.bool, device=device))  # (B, 1, n, n)
    if prefix:
        ok[..., 0] = True  # the slot stays visible whatever the window says
    return ok


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: int | None = None,
              key_padding: Tensor | None = None, prefix: Prefix | None = None,
              past: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Scaled dot-product attention with an optional prefix slot, in one fused SDPA call and no dense mask.

    q (B, Hq, T, D); k, v (B, Hkv, T, D) -> (B, Hq, T, D). Masks: see `visible` (None on the hot path).

    The prefix rides inside the same causal call by an exact construction (docs/attention.md draws it):
      - a dummy query row is put first, so under the ordinary top-left `is_causal` mask real row i (now i + 1)
        sees exactly [slot, k_0 .. k_i], and the dummy row sees the slot alone (its output is dropped);
      - the bias travels on one extra head-dim channel: queries carry 1 there, the slot's key bias / scale,
        real keys 0; with the scale passed explicitly, q' . k' * scale = q . k * scale + bias on the slot
        and q . k * scale elsewhere. `unrotated` adds D channels for q2 . k2 the same way;
      - the channels are padded with zeros (which add nothing to any dot product) to what the device's fused
        kernels take (`WIDTH_ALIGN`: D + 1 on the CPU, a multiple of 8 on CUDA), and v gets the same width so
        one kernel serves q, k and v.

    `past` (pk, pv), each (1|B, Hkv, S, D): the post-RoPE keys and values of S earlier tokens that every row
    shares (a common instruction, computed once: baselines.shared_forward). S zero query rows go first, so under the
    same top-left `is_causal` mask real row i (now S + i) sees all S past keys and k_0 .. k_i, as if the past
    were its own first tokens; the dummy rows' outputs are dropped. Causal attention without a slot only.
    """
    Hq, Hkv, T, D = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D)
    gqa = Hq != Hkv  # SDPA repeats KV heads inside the kernel, without materialising (B, Hq, T, D) copies
    S = 0
    if past is not None:
        if prefix is not None or not causal:
            raise ValueError("a shared past goes with causal attention and no prefix slot")
        S = past[0].shape[2]
        q = F.pad(q, (0, 0, S, 0))  # (B, Hq, S + T, D): the S dummy rows
        k, v = with_past(k, v, past)  # (B, Hkv, S + T, D)
    if prefix is not None and prefix.bias == float("-inf"):
        prefix = None  # exp(-inf) = 0: the slot would get exactly zero weight
    P = int(prefix is not None)
    if P:
        q, k, v = with_slot(q, k, v, prefix, scale)  # (B, H, 1 + T, E)
    mask = visible(S + T, q.device, causal=causal, window=window, key_padding=key_padding, prefix=bool(P))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                         enable_gqa=gqa)  # (B, Hq, S + P + T, E), with S = 0 when P = 1
    return out[:, :, S + P:, :D]


# Head widths the fused kernels take: CUDA's flash and memory-efficient kernels want multiples of 8; the CPU flash
# kernel takes any width, and every width from 65 to 72 costs it about the same (docs/performance.md), so D + 1.
WIDTH_ALIGN = {"cuda": 8}  # other devices: 1


def with_slot(q: Tensor, k: Tensor, v: Tensor, prefix: Prefix, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v with the dummy row / slot 0 prepended and the bias (and q2 . k2) channels appended, width E."""
    D = q.shape[-1]
    extra = 0 if prefix.q2 is None else D
    align = WIDTH_ALIGN.get(q.device.type, 1)
    E = -(-(D + extra + 1) // align) * align  # D + extra + the bias channel, rounded up to what the kernel takes
    if extra:
        q = torch.cat((q, prefix.q2.to(q.dtype)), dim=-1)  # (B, Hq, T, 2D)
    # One pad per tensor adds the zero channels on the right and the zero row 0 on top: (B, H, T + 1, E).
    qx, kx, vx = (F.pad(t, (0, E - t.shape[-1], 1, 0)) for t in (q, k, v))
    qx[..., D + extra] = 1.0  # every row's bias channel, the dummy row's included
    kx[:, :, :1, :D] = prefix.k.to(k.dtype)
    if extra:
        kx[:, :, :1, D:D + extra] = prefix.k2.to(k.dtype)
    kx[:, :, 0, D + extra] = prefix.bias / scale
    vx[:, :, :1, :D] = prefix.v.to(v.dtype)
    return qx, kx, vx


def with_past(k: Tensor, v: Tensor, past: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """k, v (B, Hkv, T, D) with the shared past's keys and values (1|B, Hkv, S, D) in front of every row."""
    return tuple(torch.cat((p.to(t.dtype).expand(t.shape[0], -1, -1, -1), t), dim=2) for p, t in zip(past, (k, v)))


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: int | None = None,
                        key_padding: Tensor | None = None, prefix: Prefix | None = None,
                        past: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The same computation from its definition, explicit logits and an fp32 softmax: the fast path's twin."""
    B, Hq, T, D = q.shape
    n_rep = Hq // k.shape[1]
    if past is not None:  # earlier tokens: their keys come first, and row i sits at position S + i
        k, v = with_past(k, v, past)
    S = k.shape[2] - T
    qf = q.float()
    kf = k.float().repeat_interleave(n_rep, dim=1)  # (B, Hq, S + T, D)
    vf = v.float().repeat_interleave(n_rep, dim=1)
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(D)  # (B, Hq, T, S + T)
    i, j = torch.arange(S, S + T, device=q.device)[:, None], torch.arange(S + T, device=q.device)[None, :]
    ok = (j <= i) if causal else torch.ones(T, S + T, dtype=torch.bool, device=q.device)
    if window is not None:
        ok = ok & (i - j < window)
    if key_padding is not None and not causal:
        keys = F.pad(key_padding.bool(), (S, 0), value=True)  # (B, S + T): past tokens are never padding
        ok = ok & (keys[:, None, None, :] | (i == j))  # pad keys hidden; a pad row keeps itself
    scores = scores.masked_fill(~ok, float("-inf"))
    if prefix is not None:
        pk = prefix.k.float().repeat_interleave(n_rep, dim=1)  # (B, Hq, 1, D)
        slot = qf @ pk.transpose(-1, -2) / math.sqrt(D) + prefix.extra_logit()  # (B, Hq, T, 1)
        scores = torch.cat((slot, scores), dim=-1)  # (B, Hq, T, 1 + T)
        vf = torch.cat((prefix.v.float().repeat_interleave(n_rep, dim=1), vf), dim=2)  # (B, Hq, 1 + T, D)
    return (scores.softmax(dim=-1) @ vf).to(q.dtype)


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

    def forward(self, x, cos, sin, masks: dict, layer: int, intervention: Intervention | None, past=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, Hq, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q_pre, k_pre = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q_pre, cos, sin), apply_rope(k_pre, cos, sin)
        prefix = None if intervention is None else intervention.prefix(layer, QKV(q_pre, k_pre, q, k, v, cos, sin))
        del q_pre, k_pre  # the prefix keeps what it needs: free the rest before the attention's own peak
        out = attention(q, k, v, prefix=prefix, past=past, **masks)  # (B, Hq, T, D)
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
        # The MLP is the widest tensor of a layer (three (B, T, I) at once): past MLP_CHUNK tokens it runs on
        # row blocks, which is exact (every row is independent) and keeps memory linear in T with a small slope.
        B, T, C = x.shape
        if B * T <= MLP_CHUNK:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        rows = x.reshape(B * T, C)  # (B*T, C)
        out = torch.cat([self.forward(r[None])[0] for r in rows.split(MLP_CHUNK)])  # (B*T, C)
        return out.view(B, T, C)


# Tokens per MLP block (see MLP.forward): 3 x 1024 x I floats of temporaries, about 19 MiB for SmolLM2.
MLP_CHUNK = 1024


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.sliding = args.layer_types[layer] == "sliding_attention"
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, masks: dict, intervention, past=None):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, masks, self.layer, intervention, past)
        h = x + a
        del a  # free the attention output before the MLP runs (memory grows with T: every (T, C) counts)
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

    def rope(self, T: int, device, start: int = 0) -> tuple[Tensor, Tensor]:
        """cos, sin (T, D) fp32 for positions start..start+T-1, the same for every row (right padding)."""
        return rope_cos_sin(self._inv_freq.to(device), torch.arange(start, start + T, device=device))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        intervention: Intervention | None = None,
        causal: bool = True,
        output_hidden_states: bool = False,
        output_kv: bool = False,
        past: list[tuple[Tensor, Tensor]] | None = None,
    ) -> DecoderOutput:
        """`past`: L x (k, v) (1|B, Hkv, S, D), the `kv` of an earlier run over S tokens that precede every row
        (baselines.shared_forward); the rows then sit at positions S..S+T-1 and attend to those tokens too."""
        if past is not None and intervention is not None:
            raise ValueError("past is for the plain causal forward: an intervention indexes whole rows")
        B, T = input_ids.shape
        h = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rope(T, h.device, start=0 if past is None else past[0][0].shape[2])
        # Causal attention needs no mask under right padding (see `visible`); without causality, pads are hidden.
        masks = dict(causal=causal, key_padding=None if causal else attention_mask)
        sliding = dict(masks, window=self.args.sliding_window)
        layer_outputs, kv = [], []
        for block in self.layers:
            if intervention is not None:
                h = intervention.edit(block.layer, h)
            h, k, v = block(h, cos, sin, sliding if block.sliding else masks, intervention,
                            None if past is None else past[block.layer])
            if output_hidden_states:
                layer_outputs.append(h)
            if output_kv:
                kv.append((k, v))
        return DecoderOutput(self.norm(h), layer_outputs if output_hidden_states else None, kv if output_kv else None)

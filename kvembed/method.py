"""KV-Embedding (Tang & Yang, arXiv 2601.01046): prompt, re-routing, pooling — SPEC §1, step by step.

Notation as in model.py: B rows, T tokens (right-padded), Hq/Hkv heads, D head_dim, C width, L layers.
`last[b] = attention_mask[b].sum() - 1` is the final real token of row b: the prompt's last token.

    §1.1 prompt      DOCUMENT_TEMPLATE / QUERY_TEMPLATE, tokenized once; `encode_text` cuts the text, never
                     the instruction after it
    §1.2 re-routing  `ReRouting.prefix`: in each selected layer, the final token's own key/value become slot 0
                     of that layer's attention, visible to every row, with logit bias b
    §1.3 pooling     `pool`: (mean over real tokens + final token) / 2 of the final-norm states, then L2
    §1.4 layers      kvembed.layer_select (TwoNN intrinsic dimension)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import QKV, Decoder, Intervention, Prefix, unapply_rope

# §1.1 The final token is asked to summarise the text instead of predicting the next word.
DOCUMENT_TEMPLATE = '"Context: {text}" Compress the Context in one word:'
QUERY_TEMPLATE = '"Query: {text}" Compress the Query in one word:'
RAW_TEMPLATE = "{text}"  # template "none": the text alone

ROPE_MODES = ("rotated", "position0", "unrotated")
POOLINGS = ("hybrid", "mean", "last")


def check_template(template: str) -> str:
    if not isinstance(template, str) or "{text}" not in template:
        raise ValueError(f"template {template!r} must be a string with a {{text}} slot, e.g. {DOCUMENT_TEMPLATE!r}")
    return template


def fill(template: str, text: str) -> str:
    # str.replace, not str.format: texts and templates may contain other braces.
    return template.replace("{text}", text)


# ------------------------------------------------------------------------------- §1.1 tokenization


@dataclass
class Encoded:
    """One prompted text, tokenized: what the batcher sorts and pads."""

    ids: list[int]
    truncated: bool = False  # True when the text was cut to fit max_length (the instruction never is)
    offsets: list[tuple[int, int]] = field(default_factory=list)  # character span of each token in `prompt`
    prompt: str = ""


def encode_text(tokenizer, text: str, template: str, max_length: int | None) -> Encoded:
    """Tokenize `template` filled with `text` once, with the tokenizer's special-token rules.

    Too long: cut the *text* (at a token boundary of the text alone) and re-tokenize, so the final token is
    always the template's last token. Never returns more than max_length ids.
    """
    prompt = fill(template, text)
    enc = tokenizer.encode(prompt, add_special_tokens=True)
    if max_length is None or len(enc.ids) <= max_length:
        return Encoded(enc.ids, False, enc.offsets, prompt)
    bare = tokenizer.encode(fill(template, ""), add_special_tokens=True)
    if len(bare.ids) >= max_length:
        raise ValueError(
            f"the template alone is {len(bare.ids)} tokens, which leaves no room for text within "
            f"max_length={max_length}; use a shorter template or a larger max_length"
        )
    text_offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    copies = max(1, template.count("{text}"))
    keep = len(text_offsets) - math.ceil((len(enc.ids) - max_length) / copies)
    while keep > 0:
        # A cut can merge differently at the seam, so re-tokenize and step back until it fits.
        prompt = fill(template, text[: text_offsets[keep - 1][1]])
        enc = tokenizer.encode(prompt, add_special_tokens=True)
        if len(enc.ids) <= max_length:
            return Encoded(enc.ids, True, enc.offsets, prompt)
        keep -= max(1, math.ceil((len(enc.ids) - max_length) / copies))
    prompt = fill(template, "")
    return Encoded(bare.ids, True, bare.offsets, prompt)


@dataclass
class Batch:
    input_ids: Tensor  # (B, T) long, right-padded
    attention_mask: Tensor  # (B, T) long, 1 on real tokens
    truncated: list[bool] | None = None  # per row: was the text cut to fit max_length

    @property
    def last(self) -> Tensor:
        """(B,) index of each row's final real token."""
        return self.attention_mask.sum(-1) - 1


def collate(seqs: list[list[int]], device=None, pad_to: int | None = None, pad_id: int = 0) -> Batch:
    """Right-pad to the longest row (or to `pad_to`, a compile bucket). Positions stay 0..T-1 in every row."""
    T = max(pad_to or 0, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return Batch(ids.to(device), mask.to(device))


def tokenize_batch(tokenizer, texts: list[str], template: str, max_length: int | None, device=None) -> Batch:
    """Prompt, tokenize and pad a list of texts (no sorting: rows stay in the given order)."""
    encoded = [encode_text(tokenizer, t, template, max_length) for t in texts]
    batch = collate([e.ids for e in encoded], device)
    batch.truncated = [e.truncated for e in encoded]
    return batch


# -------------------------------------------------------------------------------- §1.2 re-routing


def gather_last(x: Tensor, last: Tensor) -> Tensor:
    """x[b, :, last[b]] for every row, kept as a slot axis: (B, H, T, D) -> (B, H, 1, D)."""
    B, H, _, D = x.shape
    return x.gather(2, last.view(B, 1, 1, 1).expand(B, H, 1, D))


@dataclass
class ReRouting(Intervention):
    """In each selected layer, prepend the final real token's key/value as slot 0 (SPEC §1.2).

    layers     selected layer indices
    bias       added to slot 0's logit after the 1/sqrt(D) scaling (-inf hides the slot: no re-routing)
    rope_mode  rotated: the key as computed, i.e. rotated at its own position last[b]
               position0: the pre-RoPE key (= re-rotated to position 0), seen by row i at distance i
               unrotated: logit = q_pre . k_pre / sqrt(D), no position at all
    last       (B,) final real token of each row
    captured   passes=2 only: {layer: (k, v)} of the final token from a plain first pass, each (B, Hkv, 1, D),
               k post-RoPE. With passes=1 the slot comes from the same layer of the same pass.
    """

    layers: frozenset[int]
    bias: float
    rope_mode: str
    last: Tensor
    captured: dict[int, tuple[Tensor, Tensor]] | None = None

    def prefix(self, layer: int, qkv: QKV) -> Prefix | None:
        if layer not in self.layers:
            return None
        if self.captured is None:
            # Row last[b] of k, v depends only on this layer's input, so no second pass is needed.
            k_rot, v = gather_last(qkv.k, self.last), gather_last(qkv.v, self.last)  # (B, Hkv, 1, D)
            k_pre = gather_last(qkv.k_pre, self.last)
        else:
            k_rot, v = self.captured[layer]
            # Undo the rotation at last[b]: RoPE at position 0 is the identity, so this is the pre-RoPE key.
            cos, sin = qkv.cos[self.last][:, None, None], qkv.sin[self.last][:, None, None]  # (B, 1, 1, D)
            k_pre = unapply_rope(k_rot, cos, sin)
        if self.rope_mode == "rotated":
            return Prefix(k_rot, v, self.bias)
        if self.rope_mode == "position0":
            return Prefix(k_pre, v, self.bias)
        # unrotated: every row sees the slot at distance 0, i.e. logit q_pre[i] . k_pre / sqrt(D). No single key
        # gives that to all rotated queries, so the slot's key is zero and the logit comes from the pre-RoPE pair.
        return Prefix(torch.zeros_like(k_pre), v, self.bias, q2=qkv.q_pre, k2=k_pre)


def capture_final_kv(model: Decoder, batch: Batch, layers) -> dict[int, tuple[Tensor, Tensor]]:
    """passes=2, first pass: a plain causal forward; keep each selected layer's final-token K/V."""
    out = model(batch.input_ids, batch.attention_mask, output_kv=True)
    last = batch.last
    return {l: (gather_last(out.kv[l][0], last), gather_last(out.kv[l][1], last)) for l in layers}


# ---------------------------------------------------------------------------------- §1.3 pooling


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str = "hybrid", normalize: bool = True) -> Tensor:
    """(B, T, C) final-norm states -> (B, C) fp32: mean over real tokens, final token, or their average."""
    h = hidden.float()
    mask = attention_mask.to(h.dtype)[..., None]  # (B, T, 1)
    mean = (h * mask).sum(1) / mask.sum(1)  # prompt tokens included, padding excluded
    final = h[torch.arange(h.shape[0], device=h.device), attention_mask.sum(-1) - 1]  # (B, C)
    if pooling == "hybrid":
        e = (mean + final) / 2
    elif pooling == "mean":
        e = mean
    elif pooling == "last":
        e = final
    else:
        raise ValueError(f"pooling={pooling!r}: choose one of {', '.join(POOLINGS)}")
    return F.normalize(e, dim=-1) if normalize else e


# ------------------------------------------------------------------------------ the whole method


def resolve_layers(layers, n_layers: int) -> tuple[int, ...]:
    """`"none"` / `"all"` / an explicit list -> sorted layer indices ("auto" is resolved by the caller)."""
    if isinstance(layers, str):
        if layers == "none":
            return ()
        if layers == "all":
            return tuple(range(n_layers))
        raise ValueError(f"layers={layers!r}: use 'auto', 'none', 'all' or a list of layer indices")
    out = sorted({int(l) for l in layers})
    bad = [l for l in out if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has layers 0..{n_layers - 1}")
    return tuple(out)


def kv_embed(
    model: Decoder,
    batch: Batch,
    layers: tuple[int, ...],
    *,
    bias: float = 1.0,
    rope_mode: str = "rotated",
    passes: int = 1,
    pooling: str = "hybrid",
    normalize: bool = True,
) -> Tensor:
    """KV-Embedding of a prompted, padded batch: (B, C) fp32."""
    if rope_mode not in ROPE_MODES:
        raise ValueError(f"rope_mode={rope_mode!r}: choose one of {', '.join(ROPE_MODES)}")
    if passes not in (1, 2):
        raise ValueError(f"passes={passes!r}: choose 1 (same-layer) or 2 (capture, then inject)")
    captured = capture_final_kv(model, batch, layers) if passes == 2 and layers else None
    plan = ReRouting(frozenset(layers), float(bias), rope_mode, batch.last, captured) if layers else None
    out = model(batch.input_ids, batch.attention_mask, intervention=plan)
    return pool(out.hidden, batch.attention_mask, pooling, normalize)


# --------------------------------------------------------------------------- as a named method


class Templated:
    """A method with a document and a query template and one token view per text (`template`,
    `query_template` set by the subclass): KVEmbedding and the single-prompt baselines."""

    def prepare(self, tokenizer, text: str, prompt_name: str | None, max_length: int | None) -> list[Encoded]:
        template = self.query_template if prompt_name == "query" else self.template
        return [encode_text(tokenizer, text, template, max_length)]


class KVEmbedding(Templated):
    """The method as the encoder sees it: texts -> token views (`prepare`), padded views -> vectors (`embed`).

    Every method (baselines.py too) has this shape, so all of them share one batcher, one decoder and one
    set of kernels. `layers` must already be resolved to indices ("auto" is resolved by the encoder).
    """

    name = "kvembedding"

    def __init__(self, layers=(), *, bias: float = 1.0, rope_mode: str = "rotated", passes: int = 1,
                 pooling: str = "hybrid", normalize: bool = True, template: str | None = None,
                 query_template: str | None = None):
        if rope_mode not in ROPE_MODES:
            raise ValueError(f"rope_mode={rope_mode!r}: choose one of {', '.join(ROPE_MODES)}")
        if passes not in (1, 2):
            raise ValueError(f"passes={passes!r}: choose 1 (same-layer) or 2 (capture, then inject)")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: choose one of {', '.join(POOLINGS)}")
        self.layers = tuple(layers)
        self.bias, self.rope_mode, self.passes = float(bias), rope_mode, passes
        self.pooling, self.normalize = pooling, normalize
        # template "none" means the raw text, for documents and queries alike.
        if template == "none":
            template = query_template = RAW_TEMPLATE
        self.template = check_template(template or DOCUMENT_TEMPLATE)
        self.query_template = check_template(query_template or (template or QUERY_TEMPLATE))

    def config(self) -> dict:
        """Everything that changes the output: goes into the embedder's fingerprint and the golden files."""
        return dict(method=self.name, layers=list(self.layers), bias=self.bias, rope_mode=self.rope_mode,
                    passes=self.passes, pooling=self.pooling, normalize=self.normalize,
                    template=self.template, query_template=self.query_template)

    def embed(self, model: Decoder, views: list[list[Encoded]], collate_fn) -> Tensor:
        batch = collate_fn([v[0].ids for v in views])
        return kv_embed(model, batch, self.layers, bias=self.bias, rope_mode=self.rope_mode,
                        passes=self.passes, pooling=self.pooling, normalize=self.normalize)

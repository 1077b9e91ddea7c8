"""KV-Embedding (Tang & Yang, arXiv 2601.01046): prompt, re-routing, pooling — SPEC §1, step by step.

Notation as in model.py: B rows, T tokens (right-padded), Hq/Hkv heads, D head_dim, C width, L layers.
`last[b] = attention_mask[b].sum() - 1` is the final real token of row b: the prompt's last token.

    §1.1 prompt      DOCUMENT_TEMPLATE / QUERY_TEMPLATE, tokenized once; `encode_text` cuts the text, never
                     the instruction after it
    §1.2 re-routing  `ReRouting.prefix`: in each selected layer, the final token's own key/value become slot 0
                     of that layer's attention, visible to every row, with logit bias b
    §1.3 pooling     `pool`: (mean over real tokens + final token) / 2 of the final-norm states, then L2
    §1.4 layers      kvembed.layer_select (TwoNN intrinsic dimension)

`Method` is the contract every method keeps (KV-Embedding here, the baselines in baselines.py): an immutable
value whose fields are its switches (kvembed/switches.py), turning texts into token views (`prepare`) and
padded views into vectors (`embed`), so that all methods share one batcher, one decoder and one set of kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import QKV, Decoder, Intervention, Prefix, apply_rope
from .switches import POOLINGS, SWITCHES, SwitchError, check_choice, check_template

# §1.1 The final token is asked to summarise the text instead of predicting the next word.
DOCUMENT_TEMPLATE = '"Context: {text}" Compress the Context in one word:'
QUERY_TEMPLATE = '"Query: {text}" Compress the Query in one word:'
RAW_TEMPLATE = "{text}"  # template "none": the text alone


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
    # [start, end) token indices of the text itself (its last copy, for templates that repeat it): what
    # `pooling="text"` averages. Empty text: the final token, so the vector still has a direction.
    span: tuple[int, int] = (0, 0)


@functools.cache  # per tokenizer object: tokenizers.Tokenizer hashes and compares by identity
def longest_token(tokenizer) -> int:
    """An upper bound on the characters one token covers: its vocabulary string's length (byte-level BPE spells
    each byte as one character, so this bounds UTF-8 characters too). Memoised per tokenizer."""
    return max(map(len, tokenizer.get_vocab(with_added_tokens=True)))


def encode_text(tokenizer, text: str, template: str, max_length: int | None) -> Encoded:
    """Tokenize `template` filled with `text` once, with the tokenizer's special-token rules.

    Too long: cut the *text* (at a token boundary of the text alone) and re-tokenize, so the final token is
    always the template's last token. Never returns more than max_length ids. A text far longer than
    max_length could ever hold is first cut by characters (max_length tokens cover at most
    max_length x the longest token's characters), so a 50 MB line is never tokenized whole.
    """
    cut_first = False
    if max_length is not None:
        bound = 2 * (max_length + 8) * longest_token(tokenizer)  # 2x: normalisers may shorten what they read
        if len(text) > bound:
            text, cut_first = text[:bound], True
    prompt = fill(template, text)
    enc = tokenizer.encode(prompt, add_special_tokens=True)
    if max_length is None or len(enc.ids) <= max_length:
        return _encoded(enc, cut_first, prompt, template)
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
            return _encoded(enc, True, prompt, template)
        keep -= max(1, math.ceil((len(enc.ids) - max_length) / copies))
    return _encoded(bare, True, fill(template, ""), template)


def _encoded(enc, truncated: bool, prompt: str, template: str) -> Encoded:
    return Encoded(enc.ids, truncated, enc.offsets, prompt, text_span(enc.offsets, prompt, template))


def text_span(offsets: list[tuple[int, int]], prompt: str, template: str) -> tuple[int, int]:
    """Token indices [start, end) of the last `{text}` copy in `prompt`, from the tokens' character offsets.

    Every token that overlaps the copy's characters is in (a byte-level BPE may merge `"` with the text's first
    letter: the token is taken, so no character of the text is left out); special tokens (empty offsets) never
    are. Every copy is cut equally on truncation, so the prompt's length tells how much text is left.
    """
    pieces = template.split("{text}")
    copies = len(pieces) - 1
    n = (len(prompt) - sum(map(len, pieces))) // max(copies, 1)
    start_char = sum(len(p) for p in pieces[:-1]) + n * (copies - 1)
    end_char = start_char + n
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end_char and b > start_char]
    return (inside[0], inside[-1] + 1) if inside else (len(offsets) - 1, len(offsets))


@dataclass
class Batch:
    input_ids: Tensor  # (B, T) long, right-padded
    attention_mask: Tensor  # (B, T) long, 1 on real tokens
    span: Tensor | None = None  # (B, 2) long: each row's text span (Encoded.span), for pooling="text"

    @property
    def last(self) -> Tensor:
        """(B,) index of each row's final real token."""
        return self.attention_mask.sum(-1) - 1


def collate(seqs: list, device=None, pad_to: int | None = None, pad_id: int = 0) -> Batch:
    """Right-pad token views (Encoded, or bare id lists) to the longest row (or to `pad_to`, a compile bucket).

    Right padding is the one padding kvembed uses: positions stay 0..T-1 in every row, and causal attention
    needs no mask for it (model.py). A row with no token at all cannot be pooled and is refused.
    """
    ids = [s.ids if isinstance(s, Encoded) else list(s) for s in seqs]
    if any(len(s) == 0 for s in ids):
        raise ValueError("a token view is empty (the tokenizer produced no token): nothing to pool")
    T = max(pad_to or 0, max(map(len, ids)))
    # Row by row from tensors: building the padded rows as Python lists first is 2.5x slower at 32 x 8k.
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(ids), T), dtype=torch.long)  # (B, T)
    for i, s in enumerate(ids):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    span = torch.tensor([s.span for s in seqs], dtype=torch.long) if isinstance(seqs[0], Encoded) else None  # (B, 2)
    return Batch(input_ids.to(device), mask.to(device), None if span is None else span.to(device))


def tokenize_batch(tokenizer, texts: list[str], template: str, max_length: int | None, device=None) -> Batch:
    """Prompt, tokenize and pad a list of texts (no sorting: rows stay in the given order)."""
    return collate([encode_text(tokenizer, t, template, max_length) for t in texts], device)


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
            k_pre = apply_rope(k_rot, cos, -sin)  # R(-θ) is R(θ) with sin negated
        if self.rope_mode != "unrotated":
            return Prefix(k_rot if self.rope_mode == "rotated" else k_pre, v, self.bias)
        # unrotated: every row sees the slot at distance 0, i.e. logit q_pre[i] . k_pre / sqrt(D). No single key
        # gives that to all rotated queries, so the slot's key is zero and the logit comes from the pre-RoPE pair.
        return Prefix(torch.zeros_like(k_pre), v, self.bias, q2=qkv.q_pre, k2=k_pre)


def capture_final_kv(model: Decoder, batch: Batch, layers) -> dict[int, tuple[Tensor, Tensor]]:
    """passes=2, first pass: a plain causal forward; keep each selected layer's final-token K/V."""
    out = model(batch.input_ids, batch.attention_mask, output_kv=True)
    last = batch.last
    return {l: (gather_last(out.kv[l][0], last), gather_last(out.kv[l][1], last)) for l in layers}


# ---------------------------------------------------------------------------------- §1.3 pooling


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str = "hybrid", normalize: bool = True,
         span: Tensor | None = None) -> Tensor:
    """(B, T, C) final-norm states -> (B, C) fp32.

    hybrid = (mean over real tokens + final token) / 2 (SPEC §1.3), mean, last, or text: the mean over each
    row's `span` (B, 2) only, the text's own tokens without template or special tokens.
    """
    check_choice("pooling", pooling, POOLINGS)
    h = hidden.float()
    B, T, _ = h.shape
    final = h[torch.arange(B, device=h.device), attention_mask.sum(-1) - 1]  # (B, C)
    if pooling == "last":
        e = final
    elif pooling in ("mean", "hybrid"):
        mask = attention_mask.to(h.dtype)[..., None]  # (B, T, 1)
        mean = (h * mask).sum(1) / mask.sum(1)  # prompt tokens included, padding excluded
        e = mean if pooling == "mean" else (mean + final) / 2
    else:  # text
        if span is None:
            raise ValueError("pooling='text' needs each row's text span (collate token views, not bare ids)")
        t = torch.arange(T, device=h.device)
        inside = ((t >= span[:, :1]) & (t < span[:, 1:])).to(h.dtype)[..., None]  # (B, T, 1)
        e = (h * inside).sum(1) / inside.sum(1)
    return F.normalize(e, dim=-1) if normalize else e


# ------------------------------------------------------------------------------ the whole method


def resolve_layers(layers, n_layers: int) -> tuple[int, ...]:
    """`"none"` / `"all"` / an explicit list -> sorted layer indices ("auto" is resolved by the caller)."""
    if isinstance(layers, str):
        if layers == "none":
            return ()
        if layers == "all":
            return tuple(range(n_layers))
        raise SwitchError(f"layers={layers!r}: use 'auto', 'none', 'all' or a list of layer indices")
    out = tuple(sorted(set(layers)))
    bad = [l for l in out if not 0 <= l < n_layers]
    if bad:
        raise SwitchError(f"layers {bad} out of range: this model has layers 0..{n_layers - 1}")
    return out


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
    SWITCHES["rope_mode"].check("rope_mode", rope_mode)
    SWITCHES["passes"].check("passes", passes)
    captured = capture_final_kv(model, batch, layers) if passes == 2 and layers else None
    plan = ReRouting(frozenset(layers), float(bias), rope_mode, batch.last, captured) if layers else None
    out = model(batch.input_ids, batch.attention_mask, intervention=plan)
    return pool(out.hidden, batch.attention_mask, pooling, normalize, batch.span)


# ------------------------------------------------------------------------------ the method contract


@dataclass(frozen=True)
class Method:
    """What every embedding method is: an immutable value whose fields are its switches.

    prepare(tokenizer, text, prompt_name, max_length) -> list[Encoded]
        one or more token views of one text (MetaEOL: one per prompt); prompt_name None/"document"/"query"
    embed(model, views, collate, normalize=None) -> (B, C) float32
        the vectors of B texts' views; normalize=None follows the `normalize` switch (the encoder passes False
        and normalises itself, so that encode(normalize_embeddings=False) can return the pooled vector)
    config() -> dict
        everything that changes the output: the embedder's fingerprint, golden files and mteb metadata read it
    with_template(template) -> Method
        a new method for a per-call prompt (never a mutation of this one)
    """

    name: ClassVar[str] = ""
    normalize: bool = field(default=True, kw_only=True)

    def config(self) -> dict:
        # JSON-ready (tuples become lists), so configs hash the same however they were made
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"method": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}

    def with_template(self, template: str) -> "Method":
        raise SwitchError(f"method {self.name!r} has fixed prompts; a per-call prompt cannot replace them")

    def prepare(self, tokenizer, text: str, prompt_name: str | None, max_length: int | None) -> list[Encoded]:
        raise NotImplementedError

    def embed(self, model: Decoder, views: list[list[Encoded]], collate_fn, normalize: bool | None = None) -> Tensor:
        raise NotImplementedError

    def _normalize(self, normalize: bool | None) -> bool:
        return self.normalize if normalize is None else normalize

    def check_switches(self, *names: str) -> None:
        # by the switch table's checks: a method built directly has not been through the encoder's switches.check
        for name in names:
            set_field(self, name, SWITCHES[name].check(name, getattr(self, name)))


@dataclass(frozen=True)
class Templated(Method):
    """A method with a document and a query template and one token view per text.

    template / query_template: None = the class's DEFAULT_* (resolved at construction, so `config()` shows the
    strings in use); "none" = the raw text for both; "kvembedding" = KV-Embedding's two prompts (so a baseline
    can run with the same prompt); a query_template left out follows an explicit template.
    """

    DEFAULT_TEMPLATE: ClassVar[str] = RAW_TEMPLATE
    DEFAULT_QUERY_TEMPLATE: ClassVar[str | None] = None  # None: queries use the document template (symmetric)
    POOLINGS: ClassVar[tuple[str, ...]] = POOLINGS

    template: str | None = field(default=None, kw_only=True)
    query_template: str | None = field(default=None, kw_only=True)

    def __post_init__(self):
        template, query = self.template, self.query_template
        if template == "none":
            template = query = RAW_TEMPLATE
        elif template == "kvembedding":
            template, query = DOCUMENT_TEMPLATE, query or QUERY_TEMPLATE
        elif template is not None and query is None:
            query = template
        set_field(self, "template", self.check_template(template or self.DEFAULT_TEMPLATE))
        set_field(self, "query_template",
                  self.check_template(query or self.DEFAULT_QUERY_TEMPLATE or self.template))
        check_choice(f"{self.name} pooling", self.pooling, self.POOLINGS)  # every templated method has one

    def check_template(self, template: str) -> str:
        return check_template(template)

    def with_template(self, template: str) -> "Templated":
        return dataclasses.replace(self, template=template, query_template=template)

    def prepare(self, tokenizer, text: str, prompt_name: str | None, max_length: int | None) -> list[Encoded]:
        template = self.query_template if prompt_name == "query" else self.template
        return [encode_text(tokenizer, text, template, max_length)]


def set_field(obj, name: str, value) -> None:
    """Resolve a frozen dataclass field in __post_init__ (the one place a method is ever written to)."""
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class KVEmbedding(Templated):
    """KV-Embedding as a method: the SPEC §1 switches, defaults as in the SPEC.

    `layers` must already be resolved to indices ("auto" is resolved by the encoder, which has the model).
    """

    name: ClassVar[str] = "kvembedding"
    DEFAULT_TEMPLATE: ClassVar[str] = DOCUMENT_TEMPLATE
    DEFAULT_QUERY_TEMPLATE: ClassVar[str] = QUERY_TEMPLATE

    layers: tuple[int, ...] = ()
    bias: float = 1.0
    rope_mode: str = "rotated"
    passes: int = 1
    pooling: str = "hybrid"

    def __post_init__(self):
        super().__post_init__()
        set_field(self, "layers", tuple(self.layers))
        self.check_switches("bias", "rope_mode", "passes")

    def embed(self, model: Decoder, views: list[list[Encoded]], collate_fn, normalize: bool | None = None) -> Tensor:
        batch = collate_fn([v[0] for v in views])
        return kv_embed(model, batch, self.layers, bias=self.bias, rope_mode=self.rope_mode, passes=self.passes,
                        pooling=self.pooling, normalize=self._normalize(normalize))

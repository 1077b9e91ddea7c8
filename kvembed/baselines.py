"""The other training-free embedding methods (SPEC §2), on the same decoder, tokens and kernels.

Each baseline has KVEmbedding's shape (method.py): `name`, `config()`, `prepare(tokenizer, text, prompt_name,
max_length) -> list[Encoded]` (one or more token views of a text) and `embed(model, views, collate_fn) -> (B, C)`.
Notation as in model.py: B texts, T tokens (right-padded), C width, L layers; `last[b]` = final real token.

    mean, last         raw text; mean / final-token pooling
    prompteol          Jiang et al. 2023: `This sentence : "{text}" means in one word:"`, final token
    metaeol            Lei et al., ACL 2024: 8 meta-task prompts, final token of each, averaged
    echo               Springer et al. 2024: the text twice, mean over the second copy's tokens only
    token_prepending   Fu et al., ACL 2025: PromptEOL with a placeholder before the text whose state, in
                       layers 1..k, is overwritten by the previous layer's final-token state
    bidirectional      the KV-Embedding prompt with the causal mask removed, hybrid pooling, no re-routing
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .method import (DOCUMENT_TEMPLATE, POOLINGS, QUERY_TEMPLATE, RAW_TEMPLATE, Encoded, Templated,
                     check_template, encode_text, pool)
from .model import Decoder, Intervention


def check_pooling(pooling: str, allowed=POOLINGS) -> str:
    if pooling not in allowed:
        raise ValueError(f"pooling={pooling!r}: choose one of {', '.join(allowed)}")
    return pooling


@dataclass
class Marked(Encoded):
    """An Encoded view with a token span [start, end) the method needs: echo's second copy, TP's placeholder."""

    span: tuple[int, int] = (0, 0)


# ------------------------------------------------------------------ one prompt, one pass, one pool


class Prompted(Templated):
    """A template, one forward pass, `method.pool`: the shape shared by mean, last, prompteol, bidirectional."""

    name = ""
    default_template = RAW_TEMPLATE
    default_query_template: str | None = None  # None: queries use the document template (a symmetric method)
    default_pooling = "last"
    causal = True

    def __init__(self, *, pooling: str | None = None, normalize: bool = True, template: str | None = None,
                 query_template: str | None = None):
        self.pooling = check_pooling(pooling or self.default_pooling)
        self.normalize = bool(normalize)
        if template == "none":  # as in KVEmbedding: the raw text, for documents and queries alike
            template = query_template = RAW_TEMPLATE
        self.template = check_template(template or self.default_template)
        self.query_template = check_template(query_template or self.default_query_template or self.template)

    def config(self) -> dict:
        return dict(method=self.name, pooling=self.pooling, normalize=self.normalize, causal=self.causal,
                    template=self.template, query_template=self.query_template)

    def embed(self, model: Decoder, views: list[list[Encoded]], collate_fn) -> Tensor:
        batch = collate_fn([v[0].ids for v in views])
        out = model(batch.input_ids, batch.attention_mask, causal=self.causal)
        return pool(out.hidden, batch.attention_mask, self.pooling, self.normalize)


class Mean(Prompted):
    name = "mean"
    default_pooling = "mean"


class Last(Prompted):
    name = "last"
    default_pooling = "last"


# Jiang et al. 2023 (PromptEOL); the open quote at the end is part of their prompt: the next token would be
# the one word.
PROMPTEOL_TEMPLATE = 'This sentence : "{text}" means in one word:"'


class PromptEOL(Prompted):
    name = "prompteol"
    default_template = PROMPTEOL_TEMPLATE


class Bidirectional(Prompted):
    """KV-Embedding's prompt and hybrid pooling with every token seeing every other: the paper reports this hurts."""

    name = "bidirectional"
    default_template = DOCUMENT_TEMPLATE
    default_query_template = QUERY_TEMPLATE
    default_pooling = "hybrid"
    causal = False


# ------------------------------------------------------------------------------------- MetaEOL

# The 8 meta-task prompts of Lei et al. (ACL 2024), verbatim from the authors' evaluation script (their slot
# `*sent 0*` is our `{text}`): text classification, sentiment, paraphrase, information extraction, two each.
METAEOL_TEMPLATES = (
    "In this task, you're presented with a text excerpt. Your task is to categorize the excerpt into a broad "
    "category such as 'Education', 'Technology', 'Health', 'Business', 'Environment', 'Politics', or 'Culture'. "
    "These categories help in organizing content for better accessibility and targeting. For this task, this "
    'sentence : "{text}" should be classified under one general category in one word:"',
    "In this task, you're given a statement and you need to determine whether it's presenting an 'Opinion' or a "
    "'Fact'. This distinction is vital for information verification, educational purposes, and content analysis. "
    'For this task, this sentence : "{text}" discriminates between opinion and fact in one word:"',
    "In this task, you're given a review from an online platform. Your task is to generate a rating for the "
    "product based on the review on a scale of 1-5, where 1 means 'extremely negative' and 5 means 'extremely "
    "positive'. For this task, this sentence : \"{text}\" reflects the sentiment in one word:\"",
    "In this task, you're reading a personal diary entry. Your task is to identify the predominant emotion "
    "expressed, such as joy, sadness, anger, fear, or love. For this task, this sentence : \"{text}\" conveys "
    "the emotion in one word:\"",
    "In this task, you're presented with two sentences. Your task is to assess whether the sentences convey the "
    "same meaning. Use 'identical', 'similar', 'different', or 'unrelated' to describe the relationship. To "
    'enhance the performance of this task, this sentence : "{text}" means in one word:"',
    "In this task, you're given a sentence and a phrase. Your task is to determine if the phrase can be a "
    "contextual synonym within the given sentence. Options include 'yes', 'no', or 'partially'. To enhance the "
    'performance of this task, this sentence : "{text}" means in one word:"',
    "In this task, you're examining a news article. Your task is to extract the most critical fact from the "
    'article. For this task, this sentence : "{text}" encapsulates the key fact in one word:"',
    "In this task, you're reviewing a scientific abstract. Your task is to identify the main entities (e.g., "
    "proteins, diseases) and their relations (e.g., causes, treats). For this task, this sentence : \"{text}\" "
    "highlights the primary entity or relation in one word:\"",
)


class MetaEOL:
    """One view per meta-task prompt; the final-token states of the views are averaged, then normalised.

    No `template` attribute on purpose: the prompts are the method, so a per-call prompt cannot replace them.
    """

    name = "metaeol"

    def __init__(self, *, pooling: str = "last", normalize: bool = True, templates=None):
        self.pooling = check_pooling(pooling)
        self.normalize = bool(normalize)
        self.templates = tuple(check_template(t) for t in (templates or METAEOL_TEMPLATES))

    def config(self) -> dict:
        return dict(method=self.name, pooling=self.pooling, normalize=self.normalize, templates=list(self.templates))

    def prepare(self, tokenizer, text: str, prompt_name: str | None, max_length: int | None) -> list[Encoded]:
        return [encode_text(tokenizer, text, t, max_length) for t in self.templates]

    def embed(self, model: Decoder, views: list[list[Encoded]], collate_fn) -> Tensor:
        B, P = len(views), len(self.templates)
        if any(len(v) != P for v in views):
            raise ValueError(f"metaeol expects {P} views per text (one per prompt), got {[len(v) for v in views]}")
        batch = collate_fn([e.ids for v in views for e in v])  # B*P rows, text-major
        out = model(batch.input_ids, batch.attention_mask)
        e = pool(out.hidden, batch.attention_mask, self.pooling, normalize=False)  # (B*P, C)
        # The authors average the raw states; normalising each prompt first would weigh them differently.
        e = e.view(B, P, -1).mean(1)  # (B, C)
        return F.normalize(e, dim=-1) if self.normalize else e


# ---------------------------------------------------------------------------------------- Echo

# jakespringer/echo-embeddings' templates, without its explicit <s> (our tokenizers add their own special
# tokens) and without its trailing `{</s>}` piece (our prompts never append an end-of-sequence token).
ECHO_DOCUMENT_TEMPLATE = "Document:{text}\nDocument again:{text}"
ECHO_QUERY_TEMPLATE = "Query:{text}\nQuery again:{text}"


def last_copy_span(enc: Encoded, template: str) -> tuple[int, int]:
    """Token indices [start, end) of the last `{text}` copy in `enc.prompt`, from the character offsets.

    The reference tokenizes each template piece separately, so its pooled tokens are exactly the text's own.
    We tokenize the prompt once (SPEC §1.1), so a token may straddle the seam (byte-level BPE can merge `:"`);
    every token that overlaps the copy's characters is taken, so no character of the text is left out. Where
    nothing straddles (the usual case) this is the reference's span exactly.
    """
    pieces = template.split("{text}")
    copies = len(pieces) - 1
    # encode_text may have cut the text: every copy is cut equally, so the prompt's length tells how much is left.
    n = (len(enc.prompt) - sum(len(p) for p in pieces)) // copies
    start_char = sum(len(p) for p in pieces[:-1]) + n * (copies - 1)
    end_char = start_char + n
    inside = [i for i, (a, b) in enumerate(enc.offsets) if b > a and a < end_char and b > start_char]
    if not inside:
        # Empty (or entirely cut) text: the reference would pool nothing and return zeros; the final token is a
        # usable vector instead of one with no direction.
        return len(enc.ids) - 1, len(enc.ids)
    return inside[0], inside[-1] + 1


class Echo:
    """The text twice; mean (or last) over the tokens of the second copy, which has read the whole first copy."""

    name = "echo"

    def __init__(self, *, pooling: str = "mean", normalize: bool = True, template: str | None = None,
                 query_template: str | None = None):
        self.pooling = check_pooling(pooling, ("mean", "last"))
        self.normalize = bool(normalize)
        self.template = self.check(template or ECHO_DOCUMENT_TEMPLATE)
        self.query_template = self.check(query_template or (template or ECHO_QUERY_TEMPLATE))

    @staticmethod
    def check(template: str) -> str:
        check_template(template)
        if template.count("{text}") < 2:
            raise ValueError(f"echo template {template!r} must repeat the text: it needs {{text}} at least twice, "
                             f"e.g. {ECHO_DOCUMENT_TEMPLATE!r}")
        return template

    def config(self) -> dict:
        return dict(method=self.name, pooling=self.pooling, normalize=self.normalize,
                    template=self.template, query_template=self.query_template)

    def prepare(self, tokenizer, text: str, prompt_name: str | None, max_length: int | None) -> list[Encoded]:
        # Checked here too: the encoder's per-call `prompt=` replaces the template after construction.
        template = self.check(self.query_template if prompt_name == "query" else self.template)
        enc = encode_text(tokenizer, text, template, max_length)
        return [Marked(enc.ids, enc.truncated, enc.offsets, enc.prompt, last_copy_span(enc, template))]

    def embed(self, model: Decoder, views: list[list[Encoded]], collate_fn) -> Tensor:
        batch = collate_fn([v[0].ids for v in views])
        h = model(batch.input_ids, batch.attention_mask).hidden.float()  # (B, T, C)
        B, T, _ = h.shape
        span = torch.tensor([v[0].span for v in views], device=h.device)  # (B, 2)
        if self.pooling == "mean":
            t = torch.arange(T, device=h.device)
            inside = ((t >= span[:, :1]) & (t < span[:, 1:])).to(h.dtype)[..., None]  # (B, T, 1)
            e = (h * inside).sum(1) / inside.sum(1)
        else:
            e = h[torch.arange(B, device=h.device), span[:, 1] - 1]
        return F.normalize(e, dim=-1) if self.normalize else e


# ---------------------------------------------------------------------------------- Token Prepending

# The authors' PromptEOL variant: a new token <PST> just before the quoted text.
PST = "<PST>"
TP_TEMPLATE = 'This sentence : <PST> "{text}" means in one word:"'


@dataclass
class Prepending(Intervention):
    """Before layer 0 the placeholder holds a fixed random vector; before layers 1..k, the final token's state.

    pst, last  (B,) the placeholder's and the final real token's index in each row
    seed_vec   (C,) the placeholder's input embedding
    """

    pst: Tensor
    last: Tensor
    k: int
    seed_vec: Tensor

    def edit(self, layer: int, h: Tensor) -> Tensor:
        if layer > self.k:
            return h
        B, T, _ = h.shape
        if layer == 0:
            src = self.seed_vec.to(h.dtype).expand(B, -1)  # (B, C)
        else:
            src = h[torch.arange(B, device=h.device), self.last]  # (B, C): layer-1 output at the final token
        at = (torch.arange(T, device=h.device)[None, :] == self.pst[:, None])[..., None]  # (B, T, 1)
        return torch.where(at, src[:, None, :], h)  # out of place: h may be the embedding table's output


class TokenPrepending:
    """Fu et al. (ACL 2025), as in the authors' code (fuyuchenIfyw/token_prepending):

    - `<PST>` is added to the tokenizer as a new token, so the text around it is tokenized in two segments
      (how added tokens split input). Our decoder's embedding table is fixed, so the placeholder's id is
      replaced by 0 and its input embedding is written by `edit(0, h)`: the authors initialise the new row
      with an unseeded `torch.randn(C)`; we use a seeded one (`placeholder_seed`) so runs repeat. Its scale
      does not matter: layer 0 sees it through RMSNorm only, and layer 1 overwrites it.
    - before decoder layer l, 1 <= l <= k, the placeholder's residual state becomes the final token's
      (their tp_starting_index 1, tp_exiting_index k + 1). Default k = 6: their Llama-2-7B PromptEOL setting
      (32 layers); k >= L - 1 means every layer after the first.
    - they pool the final token of an intermediate layer ("early exit": hidden_states[-2] for most models).
      Here `exit_layer=None` pools the final-norm states like every other method; `exit_layer=l` pools the raw
      output of decoder layer l (python indexing; their hidden_states[-2] is exit_layer=-2).
    """

    name = "token_prepending"

    def __init__(self, *, k: int = 6, exit_layer: int | None = None, pooling: str = "last", normalize: bool = True,
                 template: str | None = None, placeholder_seed: int = 0):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r}: token_prepending needs k >= 1 (the placeholder is overwritten in layers 1..k)")
        self.k = k
        self.exit_layer = None if exit_layer is None else int(exit_layer)
        self.pooling = check_pooling(pooling)
        self.normalize = bool(normalize)
        self.template = self.check(template or TP_TEMPLATE)
        self.placeholder_seed = int(placeholder_seed)
        self._tokenizers: dict[int, tuple[object, object, int]] = {}  # id(tokenizer) -> (it, copy with <PST>, id)

    @property
    def query_template(self) -> str:
        return self.template  # symmetric; a property so the encoder's per-call prompt= sets one template

    @query_template.setter
    def query_template(self, value: str) -> None:
        self.template = value

    @staticmethod
    def check(template: str) -> str:
        check_template(template)
        if PST not in template or template.index(PST) > template.index("{text}"):
            raise ValueError(f"token_prepending template {template!r} needs the placeholder {PST} before {{text}}, "
                             f"e.g. {TP_TEMPLATE!r}")
        return template

    def config(self) -> dict:
        return dict(method=self.name, k=self.k, exit_layer=self.exit_layer, pooling=self.pooling,
                    normalize=self.normalize, template=self.template, placeholder_seed=self.placeholder_seed)

    def with_placeholder(self, tokenizer):
        """A copy of the tokenizer with <PST> added (made once per tokenizer) and <PST>'s id in it."""
        key = id(tokenizer)
        if key not in self._tokenizers or self._tokenizers[key][0] is not tokenizer:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_str(tokenizer.to_str())
            tok.add_tokens([PST])
            self._tokenizers[key] = (tokenizer, tok, tok.token_to_id(PST))
        return self._tokenizers[key][1:]

    def prepare(self, tokenizer, text: str, prompt_name: str | None, max_length: int | None) -> list[Encoded]:
        template = self.check(self.template)
        tok, pst_id = self.with_placeholder(tokenizer)
        enc = encode_text(tok, text, template, max_length)
        # The template's <PST> comes before the text, so the first match is it. Every match (a text may spell
        # "<PST>" too) gets id 0, which is in every embedding table; only the first is overwritten.
        pos = enc.ids.index(pst_id)
        ids = [0 if i == pst_id else i for i in enc.ids]
        return [Marked(ids, enc.truncated, enc.offsets, enc.prompt, (pos, pos + 1))]

    def embed(self, model: Decoder, views: list[list[Encoded]], collate_fn) -> Tensor:
        batch = collate_fn([v[0].ids for v in views])
        w = model.embed_tokens.weight
        g = torch.Generator().manual_seed(self.placeholder_seed)
        seed_vec = torch.randn(w.shape[1], generator=g).to(w.device)  # (C,), drawn on the CPU: same on any device
        pst = torch.tensor([v[0].span[0] for v in views], device=batch.input_ids.device)
        plan = Prepending(pst, batch.last, self.k, seed_vec)
        early = self.exit_layer is not None
        out = model(batch.input_ids, batch.attention_mask, intervention=plan, output_hidden_states=early)
        hidden = out.layer_outputs[self.exit_layer] if early else out.hidden
        return pool(hidden, batch.attention_mask, self.pooling, self.normalize)


BASELINES: dict[str, type] = {
    cls.name: cls for cls in (Mean, Last, PromptEOL, MetaEOL, Echo, TokenPrepending, Bidirectional)
}

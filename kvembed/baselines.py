"""The other training-free embedding methods (SPEC §2), on the same decoder, tokens and kernels.

Each is a `Method` (method.py's contract). Notation as in model.py: B texts, T tokens (right-padded), C width,
L layers. docs/baselines.md lists, for each, the authors' reference code and what we match: template, clean-up,
special tokens, the tokens and the layer pooled.

    mean, last         raw text; mean / final-token pooling
    prompteol          Jiang et al. 2023: `This sentence : "{text}" means in one word:"`, final token
    metaeol            Lei et al., ACL 2024: 8 meta-task prompts, final token of each, averaged
    echo               Springer et al. 2024: the text twice, mean over the second copy's tokens only
    token_prepending   Fu et al., ACL 2025: PromptEOL with a placeholder before the text whose state, in
                       layers 1..k, is overwritten by the previous layer's final-token state; an early layer pooled
    bidirectional      the causal mask removed (key padding kept), mean over the text's tokens (LLM2Vec)
PromptEOL, MetaEOL and Token Prepending clean the text up first, as their reference scripts do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .method import Encoded, KVEmbedding, Method, Templated, encode_text, pool, set_field
from .model import Decoder, Intervention
from .switches import POOLINGS, SwitchError, check_choice, check_template


def clean_text(text: str) -> str:
    """The reference scripts' clean-up before filling the prompt, in their order (kongds/scaling_sentemb
    evaluation.py l.198-200; the same lines in MetaEOL's and Token Prepending's): a final '.' unless the text
    ends in . ? " or '; every double quote becomes a single one (it would close the template's quote); a final
    '?' becomes '.'."""
    if text and text[-1] not in ".?\"'":
        text += "."
    text = text.replace('"', "'")
    if text and text[-1] == "?":
        text = text[:-1] + "."
    return text


# ---------------------------------------------------------------------- rows that share a beginning

# A long instruction before the text (MetaEOL's prompts: 32-68 tokens) is the same tokens in every row of a batch;
# below this many shared tokens the extra one-row pass costs about what it saves.
SHARED_MIN_TOKENS = 16


def shared_length(input_ids: Tensor, attention_mask: Tensor) -> int:
    """How many first tokens every row has in common, leaving each row at least one token of its own."""
    limit = max(int(attention_mask.sum(-1).min()) - 1, 0)
    differs = (input_ids[:, :limit] != input_ids[:1, :limit]).any(0)  # (limit,)
    return int(differs.int().argmax()) if differs.any() else limit


def shared_forward(model: Decoder, input_ids: Tensor, attention_mask: Tensor, causal: bool = True) -> Tensor:
    """`model(input_ids, attention_mask, causal=causal).hidden` (B, T, C), with the S first tokens that all rows
    share run once.

    The shared tokens go through the decoder as one row; their per-layer keys and values are the rest's `past`
    (model.attention), and their states are copied into every row. Causal attention makes this the same
    computation: a token's state depends on the tokens before it only. It saves about S / T of the work. Not for
    KV-Embedding, whose slot (the final token) is read by every token, the instruction's included, nor without
    causality (every token reads the rows' own tokens), nor under torch.compile, where every new S would be a new
    graph.
    """
    B = input_ids.shape[0]
    compiled = hasattr(model, "_orig_mod")  # torch.compile's wrapper keeps the module there
    S = shared_length(input_ids, attention_mask) if causal and not compiled else 0
    if B < 2 or S < SHARED_MIN_TOKENS:
        return model(input_ids, attention_mask, causal=causal).hidden
    head = model(input_ids[:1, :S], attention_mask[:1, :S], output_kv=True)
    rest = model(input_ids[:, S:], attention_mask[:, S:], past=head.kv).hidden  # (B, T - S, C)
    return torch.cat((head.hidden.expand(B, -1, -1), rest), dim=1)  # (B, T, C)


# ------------------------------------------------------------------ one prompt, one pass, one pool


@dataclass(frozen=True)
class Prompted(Templated):
    """A template, one forward pass, `method.pool`: mean, last, prompteol, bidirectional."""

    CAUSAL: ClassVar[bool] = True

    pooling: str = "last"

    def embed(self, model: Decoder, views: list[list[Encoded]], collate_fn, normalize: bool | None = None) -> Tensor:
        batch = collate_fn([v[0] for v in views])
        hidden = shared_forward(model, batch.input_ids, batch.attention_mask, causal=self.CAUSAL)
        return pool(hidden, batch.attention_mask, self.pooling, self._normalize(normalize), batch.span)


@dataclass(frozen=True)
class Cleaned(Prompted):
    """A prompted method whose reference code cleans the text up before filling its template (`cleanup`)."""

    cleanup: bool = True

    def prepare(self, tokenizer, text: str, prompt_name: str | None, max_length: int | None) -> list[Encoded]:
        return super().prepare(tokenizer, clean_text(text) if self.cleanup else text, prompt_name, max_length)


@dataclass(frozen=True)
class Mean(Prompted):
    name: ClassVar[str] = "mean"
    pooling: str = "mean"


@dataclass(frozen=True)
class Last(Prompted):
    name: ClassVar[str] = "last"


# Jiang et al. 2023 (PromptEOL); the open quote at the end is part of their prompt: the next token would be
# the one word.
PROMPTEOL_TEMPLATE = 'This sentence : "{text}" means in one word:"'


@dataclass(frozen=True)
class PromptEOL(Cleaned):
    name: ClassVar[str] = "prompteol"
    DEFAULT_TEMPLATE: ClassVar[str] = PROMPTEOL_TEMPLATE


@dataclass(frozen=True)
class Bidirectional(Prompted):
    """Every token sees every other (pads hidden): the paper reports that removing the causal mask hurts.

    As LLM2Vec (McGill-NLP/llm2vec, llm2vec.py) embeds without training: the raw text, mean over the text's own
    tokens (`embed_mask` with `skip_instruction`). Our earlier form is a switch set: KV-Embedding's two templates
    (`template=`, `query_template=`) with `pooling="hybrid"` (docs/baselines.md)."""

    name: ClassVar[str] = "bidirectional"
    CAUSAL: ClassVar[bool] = False
    pooling: str = "text"


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


@dataclass(frozen=True)
class MetaEOL(Method):
    """One view per meta-task prompt; the final-token states of the views are averaged (raw, as the authors do:
    normalising each prompt first would weigh them differently), then normalised.

    The prompts are the method, so there is no template switch and a per-call prompt cannot replace them.
    """

    name: ClassVar[str] = "metaeol"
    TEMPLATES: ClassVar[tuple[str, ...]] = METAEOL_TEMPLATES

    pooling: str = "last"
    cleanup: bool = True

    def __post_init__(self):
        check_choice("metaeol pooling", self.pooling, POOLINGS)

    def config(self) -> dict:
        return {**super().config(), "templates": list(self.TEMPLATES)}  # the prompts change the output too

    def prepare(self, tokenizer, text: str, prompt_name: str | None, max_length: int | None) -> list[Encoded]:
        text = clean_text(text) if self.cleanup else text
        return [encode_text(tokenizer, text, t, max_length) for t in self.TEMPLATES]

    def embed(self, model: Decoder, views: list[list[Encoded]], collate_fn, normalize: bool | None = None) -> Tensor:
        P = len(self.TEMPLATES)
        if any(len(v) != P for v in views):
            raise ValueError(f"metaeol expects {P} views per text (one per prompt), got {[len(v) for v in views]}")
        e = 0
        for p in range(P):  # one batch per prompt: its rows share the prompt's instruction, run once
            batch = collate_fn([v[p] for v in views])
            hidden = shared_forward(model, batch.input_ids, batch.attention_mask)
            e = e + pool(hidden, batch.attention_mask, self.pooling, False, batch.span)  # (B, C)
        e = e / P
        return torch.nn.functional.normalize(e, dim=-1) if self._normalize(normalize) else e


# ---------------------------------------------------------------------------------------- Echo

# The paper's training-free template (Springer et al. 2024, §3; the exact punctuation from the author's answer in
# jakespringer/echo-embeddings issue #8): one space after each colon, a '.' after the first copy, no final period.
ECHO_PAPER_TEMPLATE = "Rewrite the following paragraph: {text}. The rewritten paragraph: {text}"
# The repository's templates (made for its fine-tuned model), as we used to run them: without its explicit <s>
# (our tokenizers add their own), its </s> piece and its query Instruct line, tokenized as one string.
ECHO_DOCUMENT_TEMPLATE = "Document:{text}\nDocument again:{text}"
ECHO_QUERY_TEMPLATE = "Query:{text}\nQuery again:{text}"
ECHO_TEMPLATES = {"paper": (ECHO_PAPER_TEMPLATE, ECHO_PAPER_TEMPLATE),
                  "repo": (ECHO_DOCUMENT_TEMPLATE, ECHO_QUERY_TEMPLATE)}


@dataclass(frozen=True)
class Echo(Templated):
    """The text twice; pooled over the second copy (pooling "text": its mean, "last": its final token), which
    has read the whole first copy. template "paper" (the zero-shot one) or "repo", or any string with two
    {text} slots."""

    name: ClassVar[str] = "echo"
    POOLINGS: ClassVar[tuple[str, ...]] = ("text", "last")

    template: str | None = "paper"
    pooling: str = "text"

    def __post_init__(self):
        if self.template in ECHO_TEMPLATES:
            document, query = ECHO_TEMPLATES[self.template]
            set_field(self, "template", document)
            set_field(self, "query_template", self.query_template or query)
        super().__post_init__()

    def check_template(self, template: str) -> str:
        check_template(template)
        if template.count("{text}") < 2:
            raise SwitchError(f"echo template {template!r} must repeat the text: it needs {{text}} at least twice, "
                              f"e.g. {ECHO_PAPER_TEMPLATE!r} (or template='paper' / 'repo')")
        return template

    def embed(self, model: Decoder, views: list[list[Encoded]], collate_fn, normalize: bool | None = None) -> Tensor:
        batch = collate_fn([v[0] for v in views])
        h = shared_forward(model, batch.input_ids, batch.attention_mask)  # (B, T, C)
        span = batch.span  # (B, 2)
        if self.pooling == "last":  # the copy's final token, not the prompt's: a span of one token
            span = torch.stack((span[:, 1] - 1, span[:, 1]), dim=-1)
        return pool(h, batch.attention_mask, "text", self._normalize(normalize), span)


# ---------------------------------------------------------------------------------- Token Prepending

# The authors' PromptEOL variant: a new token <PST> just before the quoted text.
PST = "<PST>"
TP_TEMPLATE = 'This sentence : <PST> "{text}" means in one word:"'


@dataclass
class Placed(Encoded):
    pst: int = 0  # the placeholder's token index


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


@dataclass(frozen=True)
class TokenPrepending(Cleaned):
    """Fu et al. (ACL 2025), as in the authors' code (fuyuchenIfyw/token_prepending):

    - `<PST>` is added to the tokenizer as a new token, so the text around it is tokenized in two segments
      (how added tokens split input). Our decoder's embedding table is fixed, so the placeholder's id is
      replaced by 0 and its input embedding is written by `edit(0, h)`: the authors initialise the new row
      with an unseeded `torch.randn(C)`; we use a seeded one (`placeholder_seed`) so runs repeat.
    - before decoder layer l, 1 <= l <= k (`prepend_layers`), the placeholder's residual state becomes the
      final token's (their tp_starting_index 1, tp_exiting_index k + 1).
    - `exit_layer`: the layer whose raw output (no final norm) is pooled, python indexing over the L layer
      outputs; their `output_layer: -2` indexes HF hidden_states, whose [0] is the embeddings, so it is our -2
      too. "final" pools the final-norm states like every other method.
    """

    name: ClassVar[str] = "token_prepending"
    DEFAULT_TEMPLATE: ClassVar[str] = TP_TEMPLATE

    prepend_layers: int = 6
    exit_layer: int | str = -2
    placeholder_seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.check_switches("prepend_layers", "exit_layer")

    def check_template(self, template: str) -> str:
        check_template(template)
        if PST not in template or template.index(PST) > template.index("{text}"):
            raise SwitchError(f"token_prepending template {template!r} needs the placeholder {PST} before {{text}}, "
                              f"e.g. {TP_TEMPLATE!r}")
        return template

    def prepare(self, tokenizer, text: str, prompt_name: str | None, max_length: int | None) -> list[Encoded]:
        tok, pst_id = with_placeholder(tokenizer)
        enc = super().prepare(tok, text, prompt_name, max_length)[0]
        # The template's <PST> comes before the text, so the first match is it. Every match (a text may spell
        # "<PST>" too) gets id 0, which is in every embedding table; only the first is overwritten.
        ids = [0 if i == pst_id else i for i in enc.ids]
        return [Placed(ids, enc.truncated, enc.offsets, enc.prompt, enc.span, pst=enc.ids.index(pst_id))]

    def embed(self, model: Decoder, views: list[list[Encoded]], collate_fn, normalize: bool | None = None) -> Tensor:
        batch = collate_fn([v[0] for v in views])
        n_layers = len(model.layers)
        if self.exit_layer != "final" and not -n_layers <= self.exit_layer < n_layers:
            raise SwitchError(f"exit_layer={self.exit_layer}: this model has layers 0..{n_layers - 1}")
        w = model.embed_tokens.weight
        g = torch.Generator().manual_seed(self.placeholder_seed)
        seed_vec = torch.randn(w.shape[1], generator=g).to(w.device)  # (C,), drawn on the CPU: same on any device
        pst = torch.tensor([v[0].pst for v in views], device=batch.input_ids.device)
        plan = Prepending(pst, batch.last, self.prepend_layers, seed_vec)
        early = self.exit_layer != "final"
        out = model(batch.input_ids, batch.attention_mask, intervention=plan, output_hidden_states=early)
        hidden = out.layer_outputs[self.exit_layer] if early else out.hidden
        return pool(hidden, batch.attention_mask, self.pooling, self._normalize(normalize), batch.span)


@functools.cache  # per tokenizer object: tokenizers.Tokenizer hashes and compares by identity
def with_placeholder(tokenizer):
    """A copy of the tokenizer with <PST> added (made once per tokenizer) and <PST>'s id in it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.add_tokens([PST])
    return tok, tok.token_to_id(PST)


BASELINES: dict[str, type] = {
    cls.name: cls for cls in (Mean, Last, PromptEOL, MetaEOL, Echo, TokenPrepending, Bidirectional)
}
# Every method by name, KV-Embedding first.
METHODS: dict[str, type] = {KVEmbedding.name: KVEmbedding, **BASELINES}

"""A `tokenizers.Tokenizer` rebuilt from a GGUF file's metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and special ids
as metadata keys (`tokenizer.ggml.*`). We rebuild the same tokenizer that transformers builds from those
keys (`AutoTokenizer.from_pretrained(folder, gguf_file=...)`), so that both give identical ids:

    tokenizer.ggml.model = "gpt2"   byte-level BPE: vocab + merges, GPT-2's byte-level pre-tokenizer, or the
                                    split regex named by `tokenizer.ggml.pre` (llama3, qwen2, ...)
    tokenizer.ggml.model = "llama"  sentencepiece-style BPE: "▁" for spaces (prepended to the first word),
                                    byte fallback, merges from the file or recovered from token scores

Special tokens, as transformers does them:
  - CONTROL tokens (type 3; in a byte-level vocabulary only those spelled in the byte alphabet) and the
    tokens named by the bos/eos/unk/pad ids are added as special tokens; USER_DEFINED tokens (type 4) as
    plain added tokens. Both are matched whole in the text instead of being cut into pieces.
  - BOS is prepended iff `tokenizer.ggml.add_bos_token` (default: true for "llama", false for "gpt2");
    EOS is appended iff `tokenizer.ggml.add_eos_token`.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from weights_loader.errors import WeightsError


# llama.cpp's token types (llama_token_type).
CONTROL, USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` -> the regex that splits text before BPE, the way that vocabulary's merges were learned.
# Copied from transformers' GGUF tokenizer mapping so both tokenizers split identically; a name missing
# here keeps GPT-2's own byte-level split, as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (byte-level BPE vocabularies are written in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]  # spelled chr(256), chr(257), ... in byte order
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def tokenizer_from_gguf(meta: dict, source: str = "<gguf>") -> Tokenizer:
    """The tokenizer described by `meta` (GGUF key -> value); `source` names the file in errors."""
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise WeightsError(f"{source}: no tokenizer.ggml.tokens in the GGUF metadata; this file carries no tokenizer")
    if kind == "gpt2":
        if "tokenizer.ggml.merges" not in meta:  # byte-level BPE has no scores to recover merges from
            raise WeightsError(f"{source}: a 'gpt2' (byte-level BPE) tokenizer needs tokenizer.ggml.merges, and this "
                               "file has none; re-convert the model with a current llama.cpp")
        tok, defaults = _byte_level_bpe(meta), ["<|endoftext|>"]
    elif kind == "llama":
        tok, defaults = _sentencepiece_bpe(meta, source), ["<unk>", "<s>", "</s>"]
    else:
        raise WeightsError(
            f"{source}: tokenizer.ggml.model={kind!r} is not supported; supported tokenizer models are 'gpt2' "
            "(byte-level BPE) and 'llama' (sentencepiece BPE)"
        )
    _add_special_tokens(tok, meta, byte_level=kind == "gpt2", class_defaults=defaults)
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    _set_post_processor(tok, meta, add_bos_default=kind == "llama")
    return tok


def _byte_level_bpe(meta: dict) -> Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token outside the byte alphabet (llama.cpp sometimes stores raw text) is respelled byte by byte,
    # so that it can be reached by merges; a later duplicate wins, as in a dict built in file order.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(meta["tokenizer.ggml.tokens"])
    }
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(meta, vocab), dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict, source: str) -> Tokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" not in meta and "tokenizer.ggml.scores" not in meta:
        raise WeightsError(f"{source}: a 'llama' tokenizer needs tokenizer.ggml.merges or tokenizer.ggml.scores")
    scores = None if "tokenizer.ggml.merges" in meta else dict(zip(tokens, meta["tokenizer.ggml.scores"]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(meta, vocab, scores), fuse_unk=True, byte_fallback=True))
    # "first": sentencepiece puts "▁" before the first word only (transformers' non-legacy Llama tokenizer).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    return tok


def _merges(meta: dict, vocab: dict[str, int], scores: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """The merges the file lists, or (sentencepiece files without them) the ones its scores imply."""
    if "tokenizer.ggml.merges" in meta:
        return [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    # Every split of a token into two vocabulary pieces is a merge, ranked by the token's score (best
    # first), ties broken by piece lengths -- transformers' `generate_merges`, which ids must match.
    merges = []
    for token, score in scores.items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _special_id_tokens(meta: dict) -> dict[str, str]:
    """bos/eos/unk/pad -> the token string their ids name, for the ids the file sets."""
    tokens = meta["tokenizer.ggml.tokens"]
    named = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is not None and 0 <= int(index) < len(tokens):
            named[name] = tokens[int(index)]
    return named


def _add_special_tokens(tok: Tokenizer, meta: dict, *, byte_level: bool, class_defaults: list[str]) -> None:
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or ()
    spelled = set(bytes_to_unicode().values()) if byte_level else None
    # In a byte-level vocabulary every real token is spelled in the byte alphabet; a CONTROL token that is
    # not is a mislabel, and adding it would grow the vocabulary past the embedding table.
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL and (spelled is None or set(t) <= spelled)]
    vocab = tok.get_vocab()
    # transformers' tokenizer classes also register their own default special tokens and the bos/eos/unk/pad
    # the file names; we take those that exist in the vocabulary (no new ids past the embedding table).
    named = [t for t in class_defaults + list(_special_id_tokens(meta).values()) if t in vocab]
    specials = list(dict.fromkeys(control + named))
    if specials:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab and t not in specials]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _set_post_processor(tok: Tokenizer, meta: dict, *, add_bos_default: bool) -> None:
    named = _special_id_tokens(meta)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and "bos" in named
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos" in named
    bos, eos = named.get("bos"), named.get("eos")
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

"""load_model: a name or path in, a frozen Decoder + tokenizer + config out.

    resolve the name (hub.py)  ->  config.json -> ModelArgs  ->  Decoder on the meta device
    ->  read tensors, map names (PREFIX, DROPPED_*), check keys and shapes  ->  load_state_dict(strict, assign)
    ->  eval, no grad, to device

Building on `meta` allocates nothing, and `assign=True` makes the checkpoint's own tensors the parameters,
so a model is held in memory once. The Decoder's RoPE frequencies are computed on the CPU from the config
when it is built (not a buffer), so nothing else needs materialising after the meta build.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvembed.config import ConfigError, ModelArgs
from kvembed.model import Decoder

from .checkpoint import (
    CONFIG_FILE,
    FLOAT_DTYPES,
    fingerprint,
    model_files,
    read_config,
    read_safetensors,
    read_tokenizer,
    weight_map,
)
from .errors import CheckpointMismatchError, InvalidConfigError
from .hub import resolve_model_path
from .model_cache import named_model_path
from .named_models import SMOLLM2

# How checkpoint keys become Decoder keys. *ForCausalLM checkpoints put the decoder under "model."; bare
# *Model checkpoints do not, and load as is. lm_head is never used for embeddings (tied models do not even
# store it), and old checkpoints carry RoPE inv_freq buffers that the Decoder computes from the config.
PREFIX = "model."
DROPPED_KEYS = ("lm_head.weight",)
DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class LoadedModel:
    # The frozen decoder (eval mode, requires_grad False) on the requested device and dtype.
    model: Decoder = field(repr=False)
    # tokenizers.Tokenizer from tokenizer.json (or rebuilt from GGUF metadata).
    tokenizer: object = field(repr=False)
    # The hyper-parameters the decoder was built from.
    args: ModelArgs
    # config.json as read (HF key names), for anything ModelArgs does not keep.
    config: dict = field(repr=False)
    # The resolved folder (or .gguf file) the model was read from.
    path: Path
    # 16 hex digits identifying the bytes of config, weights and tokenizer (see checkpoint.fingerprint).
    fingerprint: str


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a model by local folder, .gguf file, named model (named_models.py) or hub id (cache first); None
    loads the default model.

    `cache_dir` overrides the hub cache location (default: $HF_HUB_CACHE, $HF_HOME/hub, huggingface_hub's own);
    named models live under $KVEMBED_CACHE.
    """
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"load_model: dtype={dtype!r} is not supported; use torch.float32, torch.bfloat16 or torch.float16"
        )
    if name_or_path is None:
        path = named_model_path(SMOLLM2)
    else:
        path = resolve_model_path(name_or_path, revision, cache_dir=cache_dir)

    if path.is_file():  # resolve_model_path only lets .gguf files through
        from .gguf_reader import load_gguf

        config, state, tokenizer = load_gguf(path)
        state = {k: v.to(dtype) for k, v in state.items()}  # load_gguf's tensors are float32
        sources = dict.fromkeys(state, path)
        fp = fingerprint([path], path.parent)
        args = _model_args(config, f"{path} (GGUF metadata)")
    else:
        config = read_config(path)
        # Parse the config before reading gigabytes of weights, so a bad config fails fast.
        args = _model_args(config, str(path / CONFIG_FILE))
        sources = weight_map(path)
        state = read_safetensors(path, dtype)
        tokenizer = read_tokenizer(path)
        fp = fingerprint(model_files(path), path)

    model = build_decoder(args, state, sources, str(path))  # config vs weights first: the deeper mismatch
    # Every id the tokenizer can produce must have a row in embed_tokens: caught here, not mid-corpus.
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > args.vocab_size:
        raise CheckpointMismatchError(
            f"{path}: the tokenizer has {n} tokens but the embedding table has {args.vocab_size} rows "
            f"(config.json vocab_size); ids {args.vocab_size}..{n - 1} would have no embedding. The tokenizer does "
            f"not belong to these weights: re-download the model's tokenizer.json"
        )
    model = model.to(device).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, args=args, config=config, path=path, fingerprint=fp)


def _model_args(config: dict, where: str) -> ModelArgs:
    try:
        return ModelArgs.from_hf_config(config)
    except ConfigError as e:
        # ConfigError messages start with "config.json"; put the full path in its place.
        text = str(e)
        text = where + text.removeprefix("config.json") if text.startswith("config.json") else f"{where}: {text}"
        raise InvalidConfigError(f"{text}. Fix the file or re-download the model") from e


def build_decoder(args: ModelArgs, state: dict[str, torch.Tensor], sources: dict[str, Path], where: str) -> Decoder:
    """A Decoder whose parameters are the tensors of `state` (checkpoint keys), after checking keys and shapes.

    `sources` maps each checkpoint key to the file it came from, so that errors can name it.
    """
    with torch.device("meta"):
        model = Decoder(args)
    expected = model.state_dict()  # meta tensors: shapes only, nothing allocated

    mapped: dict[str, str] = {}  # Decoder key -> checkpoint key
    for key in state:
        if key in DROPPED_KEYS or key.endswith(DROPPED_SUFFIXES):  # never used by the embedder (the table above)
            continue
        new = key.removeprefix(PREFIX)
        if new in mapped:
            raise CheckpointMismatchError(
                f"{sources.get(key, where)}: keys {mapped[new]!r} and {key!r} both map to {new!r}; "
                f"the checkpoint mixes prefixed and bare names: re-save it with one naming"
            )
        mapped[new] = key
    # A tied checkpoint may store the shared matrix only under lm_head.
    if args.tie_word_embeddings and "embed_tokens.weight" not in mapped and "lm_head.weight" in state:
        mapped["embed_tokens.weight"] = "lm_head.weight"

    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} missing key(s): {_few([PREFIX + k for k in missing])}"] if missing else []
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected key(s): {_few([mapped[k] for k in unexpected])} "
                f"(the first in {sources.get(mapped[unexpected[0]], where)})"
            )
        raise CheckpointMismatchError(
            f"{where}: the tensors do not match the {args.model_type} model described by its config "
            f"({args.num_hidden_layers} layers): {'; '.join(parts)}. Check that config.json belongs to these "
            f"weights (model_type, num_hidden_layers, attention_bias, tie_word_embeddings) or re-download the model"
        )
    for new, key in mapped.items():
        got, want = tuple(state[key].shape), tuple(expected[new].shape)
        if got != want:
            raise CheckpointMismatchError(
                f"{sources.get(key, where)}: tensor {key!r} has shape {list(got)} but the model built from "
                f"config.json expects {list(want)}; the config and the weights disagree: check the folder or "
                f"re-download the model"
            )

    # strict + assign: every parameter is now a checkpoint tensor; the Decoder has no buffers left on meta.
    model.load_state_dict({new: state[key] for new, key in mapped.items()}, strict=True, assign=True)
    return model


def _few(keys: list[str], show: int = 5) -> str:
    """The first `show` keys, then "... and N more"."""
    shown = ", ".join(repr(k) for k in keys[:show])
    return shown + (f", ... and {len(keys) - show} more" if len(keys) > show else "")

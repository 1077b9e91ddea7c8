"""Read a GGUF (llama.cpp) file into a config.json dict, float32 HF-named tensors and a tokenizer.

    config, tensors, tokenizer = load_gguf("model.gguf")

What llama.cpp's converter changed, and what we undo here:
  - names:   `blk.N.attn_q.weight` instead of `model.layers.N.self_attn.q_proj.weight` (table `_NAMES`);
  - values:  tensors may be block-quantized (Q4_1, Q8_0, ...); `gguf.quants.dequantize` turns them back
             into float32 (lossy: we get the quantized model's weights, not the original ones);
  - layout:  GGUF lists dimensions fastest-first (ne[0] = columns), but `GGUFReader` already presents
             the data as a C-ordered numpy array of shape (rows, ..., cols), which is HF's (out, in);
  - llama Q/K rows: for `general.architecture == "llama"` the converter permuted the rows of q_proj and
             k_proj within each head from rotate-half order to interleaved-pair order (its RoPE rotates
             adjacent pairs); `unpermute_qk` restores HF's order. qwen2/qwen3 files are not permuted;
  - config:  hyper-parameters live in metadata keys `{arch}.*`; `gguf_config` rebuilds config.json.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants
from tokenizers import Tokenizer

from weights_loader.errors import CorruptFileError, WeightsError
from weights_loader.gguf_tokenizer import tokenizer_from_gguf

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# GGUF tensor name (after `blk.N.`) -> HF name (after `model.layers.N.`). Suffix `.weight`/`.bias` is kept.
_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",  # qwen3
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Tensors outside the blocks.
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP = re.compile(r"^(\w+)\.(weight|bias)$")


def load_gguf(path, *, keep_lm_head: bool = True) -> tuple[dict, dict[str, torch.Tensor], Tokenizer]:
    """(config.json dict, {HF name: float32 tensor}, tokenizer) from a llama/qwen2/qwen3 GGUF file.

    Tensor names carry the `model.` prefix as in HF checkpoints; `lm_head.weight` is present only when the
    file has an untied `output.weight` (then `config["tie_word_embeddings"]` is False) and `keep_lm_head`:
    an embedder never uses it, so a converter can skip dequantizing it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError/struct errors on a truncated or foreign file
        raise CorruptFileError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                               "re-download or re-convert it") from e
    meta = {k: f.contents() for k, f in reader.fields.items()}  # GGUF key -> str, int, float, bool or a list
    config = gguf_config(meta, [t.name for t in reader.tensors], path)
    tensors = {}
    for t in reader.tensors:
        hf_name = hf_tensor_name(t.name, path)
        if hf_name is None or (hf_name == "lm_head.weight" and not keep_lm_head):  # rope_freqs: in the config
            continue
        w = torch.from_numpy(np.array(_dequantize(t, path), dtype=np.float32))  # a copy: F32 data is a read-only view of the file
        if config["model_type"] == "llama" and re.search(r"\.self_attn\.[qk]_proj\.", hf_name):
            heads = config["num_attention_heads"] if ".q_proj." in hf_name else config["num_key_value_heads"]
            w = unpermute_qk(w, heads)
        tensors[hf_name] = w
    _check_shapes(config, tensors, path)
    return config, tensors, tokenizer_from_gguf(meta, str(path))


def hf_tensor_name(gguf_name: str, path: Path | str = "<gguf>") -> str | None:
    """The HF checkpoint name for a GGUF tensor name; None for tensors we fold into the config."""
    if m := _BLOCK.match(gguf_name):
        layer, leaf, kind = m.groups()
        if leaf in _NAMES:
            return f"model.layers.{layer}.{_NAMES[leaf]}.{kind}"
    elif m := _TOP.match(gguf_name):
        leaf, kind = m.groups()
        if leaf in _TOP_NAMES:
            return f"{_TOP_NAMES[leaf]}.{kind}"
        if leaf == "rope_freqs":
            return None
    raise WeightsError(f"{path}: tensor {gguf_name!r} has no HF equivalent in our table (weights_loader/gguf_reader.py _NAMES)")


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)` on q_proj/k_proj rows (weight or bias).

    The converter did `w.reshape(H, 2, D/2, ...).swapaxes(1, 2)`: within a head, HF row `half * D/2 + j`
    (rotate-half order) became row `2 * j + half` (adjacent pairs). The inverse reads the rows as
    (H, D/2, 2) and swaps back, exactly as transformers' GGUF loader (`_reverse_permute_weights`) does.
    `n_heads` is Hq for q_proj, Hkv for k_proj.
    """
    d_half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, d_half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()  # (H*D, ...)


def _dequantize(t, path: Path) -> np.ndarray:
    """The tensor as float32 numpy, in HF layout (rows, cols)."""
    qtype = GGMLQuantizationType(t.tensor_type)
    if qtype == GGMLQuantizationType.F64:
        return np.asarray(t.data, dtype=np.float64).astype(np.float32)
    if qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) and qtype not in gguf_quants._type_traits:
        raise WeightsError(
            f"{path}: tensor {t.name!r} has type {qtype.name}, which this gguf package cannot dequantize "
            "(supported: F32, F16, F64, BF16 and the block types of gguf.quants, e.g. Q4_0, Q4_1, Q8_0, Q4_K, Q6_K); "
            "re-quantize the model to one of those"
        )
    try:
        w = gguf_quants.dequantize(t.data, qtype)
    except (NotImplementedError, gguf_quants.QuantError, ValueError) as e:
        raise WeightsError(f"{path}: tensor {t.name!r} of type {qtype.name} could not be dequantized: {e}") from e
    return w.astype(np.float32, copy=False)


def _meta_float(value) -> float:
    """A float32 metadata value as the decimal it was written from (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def gguf_config(meta: dict, tensor_names: list[str], path: Path | str = "<gguf>") -> dict:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise WeightsError(
            f"{path}: general.architecture={arch!r} is not supported; supported GGUF architectures are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (llama also covers Mistral files)"
        )

    def need(key: str):
        if f"{arch}.{key}" not in meta:
            raise WeightsError(f"{path}: metadata key {arch}.{key} is missing; the file is incomplete")
        return meta[f"{arch}.{key}"]

    cfg = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        # llama.cpp writes Mistral files as "llama"; without a sliding window the two are the same network.
        "model_type": arch,
        "hidden_size": int(need("embedding_length")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": int(need("attention.head_count")),
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", need("attention.head_count"))),
        "rms_norm_eps": _meta_float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _meta_float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    # head_dim is read, never derived, when the file states it (Qwen3: Hq * D != C).
    if f"{arch}.attention.key_length" in meta:
        cfg["head_dim"] = int(meta[f"{arch}.attention.key_length"])
    elif arch == "llama" and f"{arch}.rope.dimension_count" in meta:
        cfg["head_dim"] = int(meta[f"{arch}.rope.dimension_count"])
    if arch == "qwen2":
        cfg["attention_bias"] = True
    if "tokenizer.ggml.tokens" in meta:
        cfg["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    if f"{arch}.vocab_size" in meta:
        cfg["vocab_size"] = int(meta[f"{arch}.vocab_size"])
    if "vocab_size" not in cfg:
        raise WeightsError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens says the vocabulary size")
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            cfg[hf_key] = int(meta[f"tokenizer.ggml.{key}"])
    cfg["rope_scaling"] = _rope_scaling(meta, arch, tensor_names, path)
    return cfg


def _rope_scaling(meta: dict, arch: str, tensor_names: list[str], path) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp stores Llama-3 scaling as a per-frequency factor tensor, not as parameters.
        raise WeightsError(
            f"{path}: the file carries rope_freqs.weight (Llama-3 style RoPE scaling), whose parameters a GGUF "
            "does not state; load this model from its HF safetensors folder instead"
        )
    if kind in ("none", None):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _meta_float(meta[f"{arch}.rope.scaling.factor"])}
    raise WeightsError(f"{path}: {arch}.rope.scaling.type={kind!r} is not supported (supported: none, linear)")


def _check_shapes(cfg: dict, tensors: dict[str, torch.Tensor], path) -> None:
    """Catch a config/tensor mismatch here, naming the tensor, rather than deep inside load_state_dict."""
    c, v = cfg["hidden_size"], cfg["vocab_size"]
    d = cfg.get("head_dim", c // cfg["num_attention_heads"])
    expect = {"model.embed_tokens.weight": (v, c)}
    for i in range(cfg["num_hidden_layers"]):
        expect[f"model.layers.{i}.self_attn.q_proj.weight"] = (cfg["num_attention_heads"] * d, c)
        expect[f"model.layers.{i}.self_attn.k_proj.weight"] = (cfg["num_key_value_heads"] * d, c)
        expect[f"model.layers.{i}.mlp.gate_proj.weight"] = (cfg["intermediate_size"], c)
    for name, shape in expect.items():
        if name not in tensors:
            raise WeightsError(f"{path}: tensor for {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise WeightsError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the metadata implies {shape}")

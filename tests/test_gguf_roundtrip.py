"""GGUF round trips: tiny random HF models written as GGUF the way llama.cpp's converter writes them, read back.

The writer below is an independent re-statement of llama.cpp's convert_hf_to_gguf for these architectures:
HF names -> GGUF names, llama Q/K rows permuted with llama.cpp's own `permute`, 2-D weights quantized with
`gguf.quants.quantize`, 1-D norms and biases kept F32, and a gpt2-style tokenizer in the metadata.

Tolerances (per block of 32 consecutive weights in a row, amax = max |w| in the block; the scale d is stored
as fp16, relative error <= 2^-11):
  F32   exact.
  F16   |err| <= 2^-11 |w| + 2^-25 (round to nearest in fp16, the 2^-25 covers fp16 subnormals).
  Q8_0  d = amax / 127, q = round(w / d): |err| <= d / 2 + 127 d 2^-11 (rounding + fp16 scale)  < 0.57 d.
  Q4_1  d = (max - min) / 15, q = round((w - min) / d) in 0..15: |err| <= d / 2 + 15 d 2^-11 + |min| 2^-11
        (rounding + fp16 scale + fp16 offset); we assert <= 0.51 d + 2^-10 amax.
A Q/K permutation left in place moves whole rows, an error of the order of the weights themselves (0.2 here),
far above every bound, so these tests fail if the un-permutation is wrong.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

from tests import tiny
from tests.tolerance import assert_close, decoder_drift, norm_gain, unit_roundoff
from weights_loader.errors import WeightsError
from weights_loader.gguf_reader import load_gguf, unpermute_qk

HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{HF_TO_GGUF[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def tokenizer_metadata():
    """tokens / types / merges of the tiny byte-level BPE, as llama.cpp stores a gpt2-style tokenizer."""
    tok = tiny.make_tokenizer()
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    specials = {a["content"] for a in j["added_tokens"]}
    types = [3 if t in specials else 1 for t in tokens]  # 3 CONTROL, 1 NORMAL
    merges = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    return tok, tokens, types, merges


def write_gguf(path, name: str, qtype: Q, *, arch: str | None = None, seed: int = 0, add_bos: bool = True,
               embd_as_q8_1: bool = False):
    """Write tiny.CONFIGS[name] as a GGUF; returns the HF model (fp32) it came from."""
    model = tiny.hf_model(name, seed)
    cfg = model.config
    arch = arch or cfg.model_type
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(hq)
    w.add_head_count_kv(hkv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    if getattr(cfg, "head_dim", None) and arch == "qwen3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.hidden_size // hq)
    _, tokens, types, merges = tokenizer_metadata()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.detach().numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in hf:
            a = llamacpp_permute(a, hq, hq)
        elif arch == "llama" and ".k_proj." in hf:
            a = llamacpp_permute(a, hq, hkv)
        if embd_as_q8_1 and hf == "model.embed_tokens.weight":
            w.add_tensor(gguf_name(hf), np.zeros(quants.quant_shape_to_byte_shape(a.shape, Q.Q8_1), np.uint8), raw_dtype=Q.Q8_1)
        elif a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(hf), np.ascontiguousarray(a))
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(hf), a.astype(np.float16))
        else:
            w.add_tensor(gguf_name(hf), quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


U16 = unit_roundoff(torch.float16)  # 2^-11


def bound(ref: torch.Tensor, qtype: Q) -> torch.Tensor:
    """Per-element error bound for `ref` stored as `qtype` (see the module docstring)."""
    if qtype == Q.F32:
        return torch.zeros_like(ref)
    if qtype == Q.F16:
        return ref.abs() * U16 + 2.0**-25
    blocks = ref.reshape(*ref.shape[:-1], -1, 32)  # (rows, cols/32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    if qtype == Q.Q8_0:
        b = 0.57 * amax / 127
    else:  # Q4_1
        d = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
        b = 0.51 * d + amax * 2 * U16
    return b.expand_as(blocks).reshape(ref.shape)


CASES = [("llama", Q.F32), ("llama", Q.F16), ("llama", Q.Q8_0), ("llama", Q.Q4_1),
         ("qwen2", Q.F32), ("qwen2", Q.Q8_0), ("qwen2", Q.Q4_1), ("qwen3", Q.Q8_0)]


@pytest.mark.parametrize("name,qtype", CASES, ids=[f"{n}-{q.name}" for n, q in CASES])
def test_gguf_weights_roundtrip(tmp_path, name, qtype):
    model = write_gguf(tmp_path / "m.gguf", name, qtype)
    config, tensors, _ = load_gguf(tmp_path / "m.gguf")
    ref = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and config["tie_word_embeddings"])}
    assert set(tensors) == set(ref)
    worst = 0.0
    for k, want in ref.items():
        got = tensors[k]
        assert got.dtype == torch.float32 and got.shape == want.shape, k
        q = Q.F32 if want.ndim == 1 else qtype  # norms and biases stay F32, as llama.cpp writes them
        if q == Q.F32:
            assert torch.equal(got, want), k
            continue
        err = (got - want).abs()
        assert (err <= bound(want, q)).all(), f"{k}: max err {err.max():.3g} exceeds the {q.name} bound"
        worst = max(worst, err.max().item())
    # The quantized cases really were lossy (so the bound was exercised, not vacuous).
    assert (worst > 0) == (qtype != Q.F32)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_gguf_config_rebuilt(tmp_path, name):
    model = write_gguf(tmp_path / "m.gguf", name, Q.F32)
    config, _, _ = load_gguf(tmp_path / "m.gguf")
    hf = model.config
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert config[key] == getattr(hf, key), key
    # GGUF stores the eps as float32: one rounding of the float64 value, at most u relative.
    assert_close(config["rms_norm_eps"], hf.rms_norm_eps, unit_roundoff(torch.float32), "rms_norm_eps")
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    if name == "qwen3":
        assert config["head_dim"] == 24  # from attention.key_length, not hidden_size / heads (= 16)
    if name == "llama":
        assert config["head_dim"] == 16


def test_gguf_llama_forward_matches_transformers(tmp_path):
    """End to end through load_model: wrong Q/K order would change RoPE's pairs and the hidden states."""
    from weights_loader import load_model

    model = write_gguf(tmp_path / "m.gguf", "llama", Q.F32)
    loaded = load_model(tmp_path / "m.gguf")
    ids = torch.tensor([[1, 5, 9, 33, 70, 200, 7, 3]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = loaded.model(ids, mask, output_hidden_states=True)
        ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    # fp32, same weights: SDPA vs eager softmax and other matmul blocking reorder the sums, in every layer;
    # then the final RMSNorm's per-row rescale.
    tol = decoder_drift(loaded.args, ids.shape[1], gain=norm_gain(out.layer_outputs[-1]))
    assert_close(out.hidden, ref, tol, "GGUF-loaded vs transformers")


def test_unpermute_inverts_llamacpp_permute():
    w = torch.randn(3 * 2 * 8, 5)  # 3 KV heads of D = 16
    for n_head, n_kv in ((3, 3), (6, 3)):
        permuted = torch.from_numpy(llamacpp_permute(w.numpy(), n_head, n_kv))
        assert not torch.equal(permuted, w)
        assert torch.equal(unpermute_qk(permuted, n_kv), w)


@pytest.mark.parametrize("add_bos", [True, False])
def test_gguf_gpt2_tokenizer(tmp_path, add_bos):
    tok, *_ = tokenizer_metadata()
    write_gguf(tmp_path / "m.gguf", "qwen2", Q.F32, add_bos=add_bos)
    _, _, ours = load_gguf(tmp_path / "m.gguf")
    texts = tiny.CORPUS + ["", "  two  spaces", "é ü 你好 🙂", "<s> inside </s> text"]
    for text in texts:
        want = tok.encode(text).ids  # the tiny tokenizer prepends <s> (id 1)
        if not add_bos:
            want = want[1:]
        assert ours.encode(text).ids == want, text


def test_gguf_tokenizers_match_transformers(tmp_path):
    """Both tokenizer kinds against transformers' own GGUF tokenizer conversion."""
    import transformers  # a test dependency (pyproject [test]): the oracle
    write_gguf(tmp_path / "gpt2.gguf", "llama", Q.F32, add_bos=True)
    write_sentencepiece_gguf(tmp_path / "spm.gguf")
    texts = ["Hello world", " leading space", "a  b   c", "abc\nabd\tx", "ünïcödé 你好 🙂", "<s>abc</s>", ""]
    for file in ("gpt2.gguf", "spm.gguf"):
        _, _, ours = load_gguf(tmp_path / file)
        ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=file)
        for text in texts:
            assert ours.encode(text).ids == ref(text)["input_ids"], (file, text)


def write_sentencepiece_gguf(path):
    """A tiny 'llama' (sentencepiece BPE) vocabulary with scores and no merges, byte fallback tokens."""
    pieces = ["▁", "a", "b", "c", "d", "x", "▁a", "ab", "▁ab", "abc", "▁abc", "bc", "cd", "▁x", "\t"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # 2 UNKNOWN, 3 CONTROL, 6 BYTE, 1 NORMAL
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(0)  # a tokenizer-only file: no layers to fill
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_quant_type_is_named(tmp_path):
    # Q8_1 is a valid GGUF type (blocks of 32 values) that gguf.quants cannot dequantize.
    write_gguf(tmp_path / "bad.gguf", "llama", Q.F32, embd_as_q8_1=True)
    with pytest.raises(WeightsError, match=r"bad\.gguf.*token_embd\.weight.*Q8_1"):
        load_gguf(tmp_path / "bad.gguf")


def test_unsupported_architecture_is_named(tmp_path):
    write_gguf(tmp_path / "m.gguf", "llama", Q.F32, arch="falcon")
    with pytest.raises(WeightsError, match=r"m\.gguf.*general\.architecture='falcon'.*llama, qwen2, qwen3"):
        load_gguf(tmp_path / "m.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(WeightsError, match=r"junk\.gguf.*not a readable GGUF"):
        load_gguf(path)

"""Loader round trips: checkpoints written by transformers load into a Decoder holding exactly the same tensors.

Every comparison is exact (torch.equal): loading copies or casts bytes, it never computes. Where the load dtype
differs from the saved one, the reference is the transformers tensor cast the same way (one rounding, the same
on both sides).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import tiny
from tests.tolerance import assert_close, decoder_drift, norm_gain
from weights_loader import LoadedModel, load_model
from weights_loader import checkpoint
from weights_loader import load as load_module


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # The fingerprint memo goes to a per-test cache, never the user's.
    monkeypatch.setenv("KVEMBED_CACHE", str(tmp_path / "kvcache"))


def _hf_decoder_state(hf_model) -> dict[str, torch.Tensor]:
    """transformers' decoder tensors under Decoder names (no "model.", no lm_head)."""
    return {k.removeprefix("model."): v for k, v in hf_model.state_dict().items() if k.startswith("model.")}


# (tiny config, dtype saved, max_shard_size, dtype loaded)
CASES = [
    ("llama", torch.float32, None, torch.float32),
    ("llama", torch.float32, "20KB", torch.float32),  # sharded
    ("llama_tied", torch.bfloat16, None, torch.bfloat16),
    ("llama_tied", torch.bfloat16, "20KB", torch.float32),  # bf16 -> fp32 is exact
    ("qwen2", torch.float16, None, torch.float16),  # tied, q/k/v bias
    ("qwen2", torch.float16, None, torch.float32),
    ("qwen3", torch.float32, "20KB", torch.bfloat16),  # q/k norm, head_dim != C / Hq; fp32 -> bf16 rounds once
    ("mistral_window", torch.float32, None, torch.float32),
    ("llama_mha_bias", torch.bfloat16, None, torch.float16),  # o_proj and mlp biases
]


@pytest.mark.parametrize("name,saved,shard,loaded", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_round_trip_equals_transformers_tensors(tmp_path, name, saved, shard, loaded):
    folder, hf = tiny.write_checkpoint(tmp_path / "ckpt", name, dtype=saved, max_shard_size=shard)
    if shard is not None:
        shards = sorted(folder.glob("model-*-of-*.safetensors"))
        assert len(shards) >= 2 and (folder / "model.safetensors.index.json").is_file()
        assert not (folder / "model.safetensors").exists()
    untied = not hf.config.tie_word_embeddings
    assert ("lm_head.weight" in checkpoint.read_safetensors(folder)) == untied  # the dropped key is really there

    out = load_model(folder, dtype=loaded)
    assert isinstance(out, LoadedModel) and out.path == folder and out.args.model_type == hf.config.model_type
    want = _hf_decoder_state(hf)
    got = out.model.state_dict()
    assert set(got) == set(want)
    for key, ref in want.items():
        t = got[key]
        assert t.dtype == loaded and t.device.type == "cpu", key
        # hf holds the saved values in fp32 (write_checkpoint rounds through `saved` then back), so one cast
        # to `loaded` reproduces exactly what the loader must have produced.
        assert torch.equal(t, ref.to(loaded)), key
    assert not out.model.training
    assert not any(p.requires_grad for p in out.model.parameters())
    assert out.config == json.loads((folder / "config.json").read_text())


def test_loaded_model_runs_like_transformers(tmp_path):
    # End to end: tokenizer + decoder from the folder reproduce transformers' final hidden states (fp32, the
    # same math: SDPA vs eager softmax and other matmul blocking reorder the sums in every layer, then the final
    # RMSNorm's per-row rescale).
    folder, hf = tiny.write_checkpoint(tmp_path / "ckpt", "qwen2")
    out = load_model(folder)
    ids = torch.tensor([out.tokenizer.encode(tiny.CORPUS[0]).ids])
    assert ids[0, 0].item() == 1  # the tokenizer.json's post-processor (<s>) came through
    mask = torch.ones_like(ids)
    ref = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = out.model(ids, mask, output_hidden_states=True)
    tol = decoder_drift(out.args, ids.shape[1], gain=norm_gain(got.layer_outputs[-1]))
    assert_close(got.hidden, ref, tol, "loaded vs transformers")


def test_dropped_keys_rotary_inv_freq(tmp_path):
    # Old checkpoints store RoPE inv_freq per layer; the table drops them (the Decoder computes RoPE from config).
    folder, hf = tiny.write_checkpoint(tmp_path / "ckpt", "llama")
    path = folder / "model.safetensors"
    state = load_file(path)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, path, metadata={"format": "pt"})
    out = load_model(folder)
    assert torch.equal(out.model.layers[0].self_attn.q_proj.weight, hf.model.layers[0].self_attn.q_proj.weight)


def test_tied_checkpoint_storing_only_lm_head(tmp_path):
    # Some tied checkpoints keep the shared matrix under lm_head only; it becomes embed_tokens.
    folder, hf = tiny.write_checkpoint(tmp_path / "ckpt", "llama_tied")
    path = folder / "model.safetensors"
    state = load_file(path)
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    save_file(state, path, metadata={"format": "pt"})
    out = load_model(folder)
    assert torch.equal(out.model.embed_tokens.weight, hf.model.embed_tokens.weight)


def test_gguf_path_and_default_model_dispatch(tmp_path, monkeypatch):
    # A .gguf path goes to gguf_reader.load_gguf (imported lazily) and None to named_model_path(SMOLLM2), the
    # default model; stand-ins return a tiny checkpoint so this checks the dispatch, not the GGUF format.
    folder, hf = tiny.write_checkpoint(tmp_path / "ckpt", "llama")
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    calls = []

    def load_gguf(path):
        calls.append(Path(path))
        return checkpoint.read_config(folder), checkpoint.read_safetensors(folder), checkpoint.read_tokenizer(folder)

    monkeypatch.setitem(sys.modules, "weights_loader.gguf_reader", types.SimpleNamespace(load_gguf=load_gguf))
    monkeypatch.setattr(load_module, "named_model_path", lambda model: folder)
    out = load_model(gguf, dtype=torch.bfloat16)
    assert calls == [gguf] and out.path == gguf
    assert out.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(out.model.norm.weight, hf.model.norm.weight.bfloat16())
    assert out.fingerprint == checkpoint.fingerprint([gguf], tmp_path)  # the .gguf bytes identify the model
    default = load_model(None)
    assert default.path == folder and default.fingerprint == load_model(folder).fingerprint


# ---------------------------------------------------------------------------------------------- fingerprint


def _flip_one_weight_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data, so the file stays a valid safetensors file
    path.write_bytes(bytes(data))


def test_fingerprint_stable_and_content_addressed(tmp_path):
    folder, _ = tiny.write_checkpoint(tmp_path / "a", "llama", max_shard_size="20KB")
    fp = load_model(folder).fingerprint
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert load_model(folder).fingerprint == fp
    copy = Path(shutil.copytree(folder, tmp_path / "b"))
    assert load_model(copy).fingerprint == fp  # bytes, not location, decide it

    shard = sorted(copy.glob("model-*.safetensors"))[-1]
    _flip_one_weight_byte(shard)
    changed = load_model(copy)
    assert changed.fingerprint != fp
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_model(folder).fingerprint not in (fp, changed.fingerprint)


def test_fingerprint_memo_skips_rehash_and_notices_changes(tmp_path, monkeypatch):
    folder, _ = tiny.write_checkpoint(tmp_path / "ckpt", "llama")
    hashed = []
    real_hash = checkpoint._hash_file
    monkeypatch.setattr(checkpoint, "_hash_file", lambda p: hashed.append(p.name) or real_hash(p))
    # The files were just written, so by default they are "racy" and never memoised; pretend they are old.
    monkeypatch.setattr(checkpoint, "RACY_SECONDS", -1.0)
    fp = load_model(folder).fingerprint
    assert sorted(hashed) == ["config.json", "model.safetensors", "tokenizer.json"]
    hashed.clear()
    assert load_model(folder).fingerprint == fp and hashed == []  # second load: no file read for hashing

    weights = folder / "model.safetensors"
    st = weights.stat()
    _flip_one_weight_byte(weights)
    # Same size; a new mtime (set explicitly: two writes may share a coarse timestamp tick).
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert load_model(folder).fingerprint != fp and hashed == ["model.safetensors"]


def test_fingerprint_racy_files_are_not_memoised(tmp_path, monkeypatch):
    # A file modified within the window is re-hashed every time, so a same-size rewrite within one timestamp
    # tick cannot reuse a stale hash. (A wide window makes "just written" independent of machine load.)
    monkeypatch.setattr(checkpoint, "RACY_SECONDS", 3600.0)
    folder, _ = tiny.write_checkpoint(tmp_path / "ckpt", "llama")
    fp = load_model(folder).fingerprint
    assert not (tmp_path / "kvcache" / "file_sha256.json").exists()
    _flip_one_weight_byte(folder / "model.safetensors")
    assert load_model(folder).fingerprint != fp


def test_fingerprint_survives_a_damaged_memo(tmp_path):
    folder, _ = tiny.write_checkpoint(tmp_path / "ckpt", "llama")
    fp = load_model(folder).fingerprint
    (tmp_path / "kvcache").mkdir(exist_ok=True)
    (tmp_path / "kvcache" / "file_sha256.json").write_text("{not json")
    assert load_model(folder).fingerprint == fp

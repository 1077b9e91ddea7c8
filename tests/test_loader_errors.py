"""Bad checkpoints: every failure raises a WeightsError whose message names the file and the key, and says
what to do. Each test damages a fresh copy of one tiny checkpoint in exactly one way.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvembed.config import ConfigError
from tests import tiny
from weights_loader import (
    CheckpointMismatchError,
    CorruptFileError,
    InvalidConfigError,
    WeightsError,
    load_model,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVEMBED_CACHE", str(tmp_path / "kvcache"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One single-file and one sharded llama checkpoint, never modified (tests copy them)."""
    root = tmp_path_factory.mktemp("pristine")
    single, _ = tiny.write_checkpoint(root / "single", "llama")
    sharded, _ = tiny.write_checkpoint(root / "sharded", "llama", max_shard_size="20KB")
    return {"single": single, "sharded": sharded}


@pytest.fixture
def single(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine["single"], tmp_path / "single"))


@pytest.fixture
def sharded(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine["sharded"], tmp_path / "sharded"))


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_with_header(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _rewrite(path: Path, edit) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def _config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _message(folder: Path, kind=WeightsError) -> str:
    with pytest.raises(kind) as err:
        load_model(folder)
    return str(err.value)


# ---------------------------------------------------------------------------------------------- missing files


def test_missing_config(single):
    (single / "config.json").unlink()
    msg = _message(single)
    assert str(single / "config.json") in msg and "not found" in msg


def test_config_not_json(single):
    (single / "config.json").write_text('{"model_type": "llama",')
    msg = _message(single, CorruptFileError)
    assert str(single / "config.json") in msg and "re-download" in msg


def test_missing_weights(single):
    (single / "model.safetensors").unlink()
    msg = _message(single)
    assert str(single) in msg and "model.safetensors" in msg and "model.safetensors.index.json" in msg


def test_only_pytorch_bin_weights(single):
    (single / "model.safetensors").rename(single / "pytorch_model.bin")
    msg = _message(single)
    assert "pytorch_model.bin" in msg and "safe_serialization" in msg


def test_missing_tokenizer(single):
    (single / "tokenizer.json").unlink()
    msg = _message(single)
    assert str(single / "tokenizer.json") in msg and "not found" in msg


def test_shard_listed_but_missing(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    key = next(k for k, s in index["weight_map"].items() if s == shard)
    (sharded / shard).unlink()
    msg = _message(sharded)
    assert str(sharded / shard) in msg and repr(key) in msg and "does not exist" in msg


def test_index_points_key_at_wrong_shard(sharded):
    path = sharded / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    key = "model.norm.weight"
    right = index["weight_map"][key]
    wrong = next(s for s in sorted(set(index["weight_map"].values())) if s != right)
    index["weight_map"][key] = wrong
    path.write_text(json.dumps(index))
    msg = _message(sharded, CheckpointMismatchError)
    # Reported from whichever of the two shards is read first: the one missing the key or the one with an extra.
    assert repr(key) in msg and (str(sharded / wrong) in msg or str(sharded / right) in msg)


def test_index_without_weight_map(sharded):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    msg = _message(sharded, CorruptFileError)
    assert "model.safetensors.index.json" in msg and "'weight_map'" in msg



@pytest.mark.parametrize("text, what", [("[1, 2]", "expected a JSON object, got list"),
                                        ('{"weight_map": {', "not valid JSON")])
def test_index_that_is_not_a_json_object(sharded, text, what):
    (sharded / "model.safetensors.index.json").write_text(text)
    msg = _message(sharded, CorruptFileError)
    assert str(sharded / "model.safetensors.index.json") in msg and what in msg and "re-download" in msg

# ---------------------------------------------------------------------------------------------- corrupt files


def test_truncated_safetensors(single):
    path = single / "model.safetensors"
    header, body = _header(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    path.write_bytes(path.read_bytes()[:-100])  # cut into the last tensor's data
    msg = _message(single, CorruptFileError)
    assert str(path) in msg and repr(last) in msg and "truncated" in msg and "re-download the file" in msg


def test_truncated_inside_header(single):
    path = single / "model.safetensors"
    path.write_bytes(path.read_bytes()[:500])
    msg = _message(single, CorruptFileError)
    assert str(path) in msg and "header claims" in msg and "re-download the file" in msg


def test_garbage_header(single):
    path = single / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = bytes(range(256)) * (n // 256) + b"\xff" * (n % 256)
    path.write_bytes(bytes(data))
    msg = _message(single, CorruptFileError)
    assert str(path) in msg and "garbage" in msg and "re-download the file" in msg


def test_header_lies_about_sizes(single):
    path = single / "model.safetensors"
    header, body = _header(path)
    key = "model.layers.1.mlp.up_proj.weight"
    start, end = header[key]["data_offsets"]
    header[key]["shape"] = [header[key]["shape"][0] + 1, header[key]["shape"][1]]  # offsets now too short
    _write_with_header(path, header, body)
    msg = _message(single, CorruptFileError)
    assert str(path) in msg and repr(key) in msg and "lies" in msg and f"[{start}, {end}]" in msg


def test_header_offsets_overlap(single):
    path = single / "model.safetensors"
    header, body = _header(path)
    key = "model.layers.0.input_layernorm.weight"  # 64 floats = 256 bytes
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start - 4, end - 4]  # right size, wrong place
    _write_with_header(path, header, body)
    msg = _message(single, CorruptFileError)
    assert str(path) in msg and "overlap" in msg and repr(key) in msg


# ---------------------------------------------------------------------------------------------- mismatches


def test_wrong_shape(single):
    key = "model.layers.2.mlp.up_proj.weight"
    _rewrite(single / "model.safetensors", lambda s: s.__setitem__(key, s[key][:95].contiguous()))
    msg = _message(single, CheckpointMismatchError)
    assert str(single / "model.safetensors") in msg and repr(key) in msg
    assert "[95, 64]" in msg and "[96, 64]" in msg


def test_wrong_shape_names_its_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    key = "model.layers.3.self_attn.k_proj.weight"
    shard = sharded / index["weight_map"][key]
    _rewrite(shard, lambda s: s.__setitem__(key, torch.zeros(32, 63)))
    msg = _message(sharded, CheckpointMismatchError)
    assert str(shard) in msg and repr(key) in msg and "[32, 63]" in msg and "[32, 64]" in msg


def test_missing_key(single):
    key = "model.layers.1.post_attention_layernorm.weight"
    _rewrite(single / "model.safetensors", lambda s: s.pop(key))
    msg = _message(single, CheckpointMismatchError)
    assert str(single) in msg and "1 missing key(s)" in msg and repr(key) in msg and "unexpected" not in msg


def test_unexpected_key(single):
    key = "model.layers.0.self_attn.q_proj.bias"  # llama without attention_bias has none
    _rewrite(single / "model.safetensors", lambda s: s.__setitem__(key, torch.zeros(64)))
    msg = _message(single, CheckpointMismatchError)
    assert "1 unexpected key(s)" in msg and repr(key) in msg and str(single / "model.safetensors") in msg


def test_config_with_fewer_layers_lists_a_few_unexpected_keys_with_count(single):
    _config(single, lambda c: c.__setitem__("num_hidden_layers", 2))
    msg = _message(single, CheckpointMismatchError)
    # 2 surplus layers x 9 tensors each; 5 listed, the rest counted.
    assert "18 unexpected key(s)" in msg and "... and 13 more" in msg and "'model.layers.2." in msg
    assert "num_hidden_layers" in msg


def test_integer_tensor(single):
    key = "model.norm.weight"
    _rewrite(single / "model.safetensors", lambda s: s.__setitem__(key, torch.ones(64, dtype=torch.int32)))
    msg = _message(single, CheckpointMismatchError)
    assert str(single / "model.safetensors") in msg and repr(key) in msg and "torch.int32" in msg


# ---------------------------------------------------------------------------------------------- config.json


def test_config_missing_required_key(single):
    _config(single, lambda c: c.pop("hidden_size"))
    with pytest.raises(InvalidConfigError) as err:
        load_model(single)
    assert isinstance(err.value, ConfigError)  # callers catching the config module's error still catch it
    msg = str(err.value)
    assert str(single / "config.json") in msg and "'hidden_size'" in msg and "re-download" in msg


def test_unsupported_model_type(single):
    _config(single, lambda c: c.__setitem__("model_type", "gpt2"))
    msg = _message(single, InvalidConfigError)
    assert str(single / "config.json") in msg and "'gpt2'" in msg
    assert all(t in msg for t in ("llama", "mistral", "qwen2", "qwen3"))


def test_bad_config_fails_before_reading_weights(single):
    # A broken config must not cost a read of the weights: make the weights unreadable too and check
    # that the config error is the one reported.
    _config(single, lambda c: c.pop("vocab_size"))
    (single / "model.safetensors").write_bytes(b"\x00" * 4)
    msg = _message(single, InvalidConfigError)
    assert "'vocab_size'" in msg


def test_unsupported_load_dtype(single):
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        load_model(single, dtype=torch.int8)

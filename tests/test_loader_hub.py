"""Name resolution: local folders, .gguf files, and hub ids through a Hugging Face cache, all offline.

The cache is written by hand in the layout huggingface_hub documents (and `scan_cache_dir` reads back):
    <cache>/models--<org>--<name>/blobs/<sha256>                      file contents
    <cache>/models--<org>--<name>/snapshots/<commit>/<file> -> ../../blobs/<sha256>
    <cache>/models--<org>--<name>/refs/main                           the commit hash
huggingface_hub has no API that fills a cache without a server, so this is the honest way to build one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from tests import tiny
from weights_loader import ModelNotFoundError, load_model, resolve_model_path
from weights_loader.hub import ALLOW_PATTERNS

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/tiny-llama"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KVEMBED_CACHE", str(tmp_path / "kvcache"))
    for var in ("HF_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder, hf = tiny.write_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", "llama", max_shard_size="40KB")
    return folder, hf


def write_hub_cache(cache: Path, repo_id: str, src: Path, commit: str = COMMIT) -> Path:
    """Put every file of `src` into `cache` as the snapshot `commit` of `repo_id` (ref main); returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, checkpoint) -> tuple[Path, Path]:
    cache = tmp_path / "hf" / "hub"
    snapshot = write_hub_cache(cache, REPO, checkpoint[0])
    return cache, snapshot


def test_hand_written_cache_is_what_huggingface_hub_reads(cache, checkpoint):
    root, _ = cache
    info = huggingface_hub.scan_cache_dir(root)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    (rev,) = repo.revisions
    assert rev.commit_hash == COMMIT and rev.refs == frozenset({"main"})
    assert {f.file_name for f in rev.files} == {p.name for p in checkpoint[0].iterdir()}


def _check_loaded(out, snapshot: Path, checkpoint) -> None:
    folder, hf = checkpoint
    assert out.path == snapshot
    assert torch.equal(out.model.layers[3].mlp.down_proj.weight, hf.model.layers[3].mlp.down_proj.weight)
    assert torch.equal(out.model.embed_tokens.weight, hf.model.embed_tokens.weight)
    # Content-addressed: the symlinked snapshot and the original folder hold the same bytes.
    assert out.fingerprint == load_model(folder).fingerprint


def test_hub_id_from_cache_offline_via_hf_hub_cache(cache, checkpoint, monkeypatch):
    root, snapshot = cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    _check_loaded(load_model(REPO), snapshot, checkpoint)


def test_hub_id_from_cache_offline_via_hf_home(cache, checkpoint, monkeypatch):
    root, snapshot = cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(root.parent))  # the cache is $HF_HOME/hub
    _check_loaded(load_model(REPO), snapshot, checkpoint)


def test_hub_id_with_explicit_cache_dir_and_revision(cache, checkpoint, monkeypatch, tmp_path):
    root, snapshot = cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))  # the argument wins over the environment
    _check_loaded(load_model(REPO, revision=COMMIT, cache_dir=root), snapshot, checkpoint)
    assert resolve_model_path(REPO, "main", cache_dir=root) == snapshot
    with pytest.raises(ModelNotFoundError, match="revision 'v2'"):
        resolve_model_path(REPO, "v2", cache_dir=root)


def test_hub_id_not_in_cache_offline(cache, monkeypatch):
    root, _ = cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    with pytest.raises(ModelNotFoundError) as err:
        load_model("org/not-there")
    msg = str(err.value)
    assert f"'org/not-there' is not a local folder and not in the hub cache at {root}" in msg
    assert "HF_HOME" in msg and "check the name" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_cache_is_tried_before_the_network(cache, checkpoint, monkeypatch):
    # Online mode, but the cache holds the model: exactly one, cache-only, lookup.
    root, snapshot = cache
    calls = []
    real = huggingface_hub.snapshot_download

    def spy(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    assert resolve_model_path(REPO, cache_dir=root) == snapshot
    assert [c["local_files_only"] for c in calls] == [True]
    assert calls[0]["allow_patterns"] == ALLOW_PATTERNS and calls[0]["cache_dir"] == str(root)


def test_download_only_after_a_cache_miss(tmp_path, checkpoint, monkeypatch):
    # A stand-in for the network: the cache-only lookup misses, the download "returns" a folder.
    folder, _ = checkpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # explicit: huggingface_hub may have read a 1 at import
    calls = []

    def fake(*, repo_id, revision, cache_dir, allow_patterns, local_files_only=False):
        calls.append(local_files_only)
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert load_model(REPO, cache_dir=tmp_path / "empty").path == folder
    assert calls == [True, False]


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    def fake(*, local_files_only=False, **kw):
        raise LocalEntryNotFoundError("cache miss" if local_files_only else "connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path(REPO, cache_dir=tmp_path / "empty")
    msg = str(err.value)
    assert "not in the hub cache at" in msg and "downloading it failed" in msg and "connection refused" in msg


def test_local_paths(tmp_path, checkpoint, monkeypatch):
    folder, _ = checkpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path(folder) == folder
    # A relative folder spelled like a hub id is local when it exists.
    local = tmp_path / "org" / "tiny-llama"
    shutil.copytree(folder, local)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(REPO) == Path(REPO)
    assert load_model(REPO).path == Path(REPO)

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_path(str(gguf)) == gguf
    with pytest.raises(ModelNotFoundError, match="no such folder or file"):
        resolve_model_path("./missing-model")
    with pytest.raises(ModelNotFoundError, match="no such folder or file"):
        resolve_model_path(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFoundError, match="is a file but not a .gguf"):
        resolve_model_path(local / "config.json")

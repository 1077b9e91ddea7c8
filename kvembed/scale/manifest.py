"""What an OUTDIR promises: the run config (`run.json`), the final assembly and `manifest.json`, the reader.

    run.json        written before any part: model fingerprint, method, input checksum, part and batch
                    size. A rerun into the same OUTDIR must agree on its key fields or it is refused,
                    so a directory never mixes parts of two models, methods or inputs.
    embeddings.npy  float32 (N, dim), all parts in input order (one file, so readers can memory-map it)
    ids.json        the N ids, in input order
    manifest.json   written last by rank 0: every part with its row range and checksums, the two files
                    above with theirs, skipped input lines, count, dim, dtype. Present = complete.

Everything here is a function of (input, model, method, part size, batch size) and nothing else — no
times, ranks or host names — so the bytes are the same whatever the number of ranks. Timings go to
`summary.json`, which is a log, not output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from kvembed.files import atomic_write, read_json, sha256_bytes, sha256_file, tmp_name
from kvembed.scale.parts import finished_record, json_bytes, load_part, n_parts, part_range

FORMAT = "kvembed-corpus/1"
# Fields of run.json that must match for a rerun to reuse parts. The rest ("method" as typed on the
# command line, the input's file name) is informational: `--bias 1.0` and the default give one fingerprint.
KEY_FIELDS = ("format", "fingerprint", "dtype", "prompt_name", "input_sha256", "id_field", "text_field",
              "skip_bad_lines", "part_size", "batch_size", "dim")


class OutdirError(RuntimeError):
    """OUTDIR belongs to another run, or is incomplete or damaged."""


def run_key(config: dict) -> str:
    return sha256_bytes(json_bytes({k: config.get(k) for k in KEY_FIELDS}))


def check_or_claim(outdir: Path, config: dict, *, write: bool) -> None:
    """Refuse if OUTDIR's run.json disagrees with `config`; if absent and `write`, create it."""
    path = outdir / "run.json"
    if path.is_file():
        old = read_json(path, OutdirError, f"delete {outdir} (or use a new OUTDIR) to start over")
        diff = [k for k in KEY_FIELDS if old.get(k) != config.get(k)]
        if diff:
            lines = "\n".join(f"  {k}: OUTDIR has {old.get(k)!r}, this run has {config.get(k)!r}" for k in diff)
            raise OutdirError(
                f"{outdir} holds a run with a different configuration:\n{lines}\n"
                "Use a new OUTDIR, or delete this one to start over; parts of two runs are never mixed."
            )
    elif write:
        atomic_write(path, json_bytes(config))


def assemble(outdir: Path, config: dict, n_rows: int) -> dict:
    """Stream every finished part into embeddings.npy and ids.json, then commit manifest.json.
    Raises OutdirError naming the first part that is missing or does not verify."""
    key, size, dim = run_key(config), config["part_size"], config["dim"]
    records, all_ids = [], []
    tmp = tmp_name(outdir / "embeddings.npy")
    # open_memmap writes the .npy header and maps the body: parts are copied in without holding N x dim.
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_rows, dim))
    for k in range(n_parts(n_rows, size)):
        start, end = part_range(k, size, n_rows)
        rec = finished_record(outdir, k, start, end, key, verify=False)  # load_part checks the sha256 itself
        if rec is None:
            raise OutdirError(f"{outdir}: part {k} (rows {start}..{end - 1}) is not finished; rerun to compute it")
        matrix, ids = load_part(outdir, rec)
        if matrix.shape != (end - start, dim) or len(ids) != end - start:
            raise OutdirError(f"{outdir / rec['file']}: shape {matrix.shape}, expected {(end - start, dim)}")
        out[start:end] = matrix
        all_ids.extend(ids)
        records.append({k2: v for k2, v in rec.items() if k2 != "run_key"})
    out.flush()
    del out
    emb_sha = sha256_file(tmp)
    os.replace(tmp, outdir / "embeddings.npy")
    ids_data = json_bytes(all_ids)
    atomic_write(outdir / "ids.json", ids_data)
    manifest = dict(config)
    manifest.update(
        complete=True,
        count=n_rows,
        dtype="float32",
        truncated=sum(r.get("truncated", 0) for r in records),
        run_key=key,
        parts=records,
        embeddings={"file": "embeddings.npy", "shape": [n_rows, dim], "sha256": emb_sha},
        ids={"file": "ids.json", "sha256": sha256_bytes(ids_data)},
    )
    atomic_write(outdir / "manifest.json", json_bytes(manifest))
    return manifest


def read_manifest(outdir) -> dict:
    path = Path(outdir) / "manifest.json"
    if not path.is_file():
        raise OutdirError(
            f"{path}: not found — the embedding run into {outdir} has not finished; rerun the same "
            "`kvembed embed-corpus` command to resume it"
        )
    manifest = read_json(path, OutdirError, "rerun the same `kvembed embed-corpus` command to rebuild it")
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise OutdirError(f"{path}: not a complete {FORMAT} manifest (format={manifest.get('format')!r})")
    return manifest


def intact(outdir: Path, key: str) -> bool:
    """manifest.json is complete and of the run `key`, and embeddings.npy and ids.json match its sha256."""
    try:
        manifest = read_manifest(outdir)
        if manifest.get("run_key") != key:  # checked first: no hashing for another run's manifest
            return False
        listed_files(outdir, manifest)  # raises when a file is missing or its sha256 moved
    except OutdirError:
        return False
    return True


def listed_files(outdir, manifest: dict, verify: bool = True) -> tuple[Path, Path]:
    """embeddings.npy and ids.json as `manifest` lists them: present and, with `verify`, of its sha256."""
    paths = Path(outdir) / manifest["embeddings"]["file"], Path(outdir) / manifest["ids"]["file"]
    for path, entry in zip(paths, (manifest["embeddings"], manifest["ids"])):
        if not path.is_file():
            raise OutdirError(f"{path}: listed in manifest.json but missing")
        if verify and sha256_file(path) != entry["sha256"]:
            raise OutdirError(f"{path}: sha256 differs from manifest.json (file changed or damaged)")
    return paths


def load_corpus_embeddings(outdir, *, verify: bool = True) -> tuple[list, np.ndarray]:
    """(ids, matrix) of a finished `embed-corpus` run, in input order. `matrix` is a read-only np.memmap
    of OUTDIR/embeddings.npy, float32 (N, dim): rows are read from disk as they are touched.
    verify (default) first checks the sha256 of both files against the manifest, which reads them once (about
    1 s per GB here, docs/scale-out.md); verify=False skips that for a folder you trust."""
    manifest = read_manifest(outdir)
    emb_path, ids_path = listed_files(outdir, manifest, verify)
    ids = json.loads(ids_path.read_text(encoding="utf-8"))
    matrix = np.load(emb_path, mmap_mode="r")
    expected = (manifest["count"], manifest["dim"])
    if matrix.shape != expected or matrix.dtype != np.float32 or len(ids) != manifest["count"]:
        raise OutdirError(
            f"{emb_path}: {matrix.dtype} {matrix.shape} with {len(ids)} ids; manifest.json says float32 {expected}"
        )
    return ids, matrix

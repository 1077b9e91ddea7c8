"""Fixed-size parts of the output, written so that a crash never leaves a half part that looks finished.

Part k holds input rows [k * P, min((k + 1) * P, N)) — defined on the input order, never on the number of
ranks, so the files are the same whoever computed them. Part k is three files in OUTDIR:

    part-0000k.npy        float32 (rows, dim) embeddings, in input order
    part-0000k.ids.json   the rows' ids, a JSON list
    part-0000k.json       the commit record: row range, dim, sha256 of both files above, run key

Each file is written under a temporary name and moved into place with `os.replace` (atomic on POSIX),
and the commit record goes last: a part is finished exactly when its record exists, belongs to this
run (same run key and row range) and both checksums verify. Anything else is recomputed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from kvembed.files import TMP_MARK, atomic_write, sha256_bytes, sha256_file


def part_stem(k: int) -> str:
    return f"part-{k:05d}"


def n_parts(n_rows: int, part_size: int) -> int:
    return (n_rows + part_size - 1) // part_size


def part_range(k: int, part_size: int, n_rows: int) -> tuple[int, int]:
    return k * part_size, min((k + 1) * part_size, n_rows)


def json_bytes(obj) -> bytes:
    # Sorted keys and fixed separators: the same object always gives the same bytes (and checksum).
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def remove_stale_tmp(outdir: Path) -> int:
    """Delete temporary files left by a killed writer and return how many. Call only while no rank is writing."""
    stale = [p for p in outdir.iterdir() if TMP_MARK in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def write_part(outdir: Path, k: int, start: int, ids: list, matrix: np.ndarray, run_key: str, *,
               truncated: int = 0) -> None:
    """Commit part k (rows [start, start + len(ids))); `matrix` is (len(ids), dim), as embed_part checked.
    `truncated`: how many of its texts were cut to the model's max_length (the text is cut, never the instruction)."""
    stem = part_stem(k)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(matrix, dtype=np.float32), allow_pickle=False)
    npy, ids_data = buf.getvalue(), json_bytes(ids)
    record = {
        "part": k,
        "start": start,
        "end": start + len(ids),
        "dim": int(matrix.shape[1]),
        "file": f"{stem}.npy",
        "sha256": sha256_bytes(npy),
        "ids_file": f"{stem}.ids.json",
        "ids_sha256": sha256_bytes(ids_data),
        "run_key": run_key,
        "truncated": int(truncated),
    }
    atomic_write(outdir / record["file"], npy)
    atomic_write(outdir / record["ids_file"], ids_data)
    atomic_write(outdir / f"{stem}.json", json_bytes(record))  # last: the commit point


def finished_record(outdir: Path, k: int, start: int, end: int, run_key: str, *, verify: bool = True) -> dict | None:
    """Part k's record if the part is finished for this run, else None (it must be recomputed)."""
    try:
        rec = json.loads((outdir / f"{part_stem(k)}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or unreadable: not finished
    if not rec or rec.get("run_key") != run_key or (rec.get("start"), rec.get("end")) != (start, end):
        return None
    if verify:
        for name, key in (("file", "sha256"), ("ids_file", "ids_sha256")):
            path = outdir / str(rec.get(name))
            if not path.is_file() or sha256_file(path) != rec.get(key):
                return None
    return rec


def load_part(outdir: Path, rec: dict) -> tuple[np.ndarray, list]:
    """Embeddings and ids of a finished part, checked against its record (one read of each file)."""
    npy = (outdir / rec["file"]).read_bytes()
    ids_data = (outdir / rec["ids_file"]).read_bytes()
    if sha256_bytes(npy) != rec["sha256"] or sha256_bytes(ids_data) != rec["ids_sha256"]:
        raise RuntimeError(
            f"{outdir / rec['file']}: checksum differs from {part_stem(rec['part'])}.json (file changed after it "
            "was written); delete the part's three files and rerun to recompute it"
        )
    return np.load(io.BytesIO(npy), allow_pickle=False), json.loads(ids_data)

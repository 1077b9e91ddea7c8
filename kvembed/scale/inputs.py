"""The input of `kvembed embed-corpus`: a JSON-lines file, one `{"id": ..., "text": ...}` object per line.

Notation: a *line* is a line of the file, numbered from 1 as an editor shows it; a *row* is a line that
holds a text to embed. Blank lines are not rows (a trailing newline is common). Rows are numbered 0..N-1
in file order, and that numbering is the output order.

One pass over the file validates every line, hashes the bytes and records the byte offset of each row,
so a rank later reads only the rows of its own parts (8 bytes per row stay in memory, not the texts).
Every rank makes the same pass, so every rank sees the same rows and stops on the same bad line.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from kvembed.files import json_object


class InputError(ValueError):
    """A line of the input JSONL cannot be turned into (id, text)."""


@dataclass(frozen=True)
class InputIndex:
    path: Path
    # Field holding each row's id (missing -> the row's line number).
    id_field: str
    text_field: str
    # (N,) int64: byte offset where row i's line starts.
    offsets: np.ndarray
    # (N,) int64: line number (1-based) of row i.
    line_numbers: np.ndarray
    # Lines left out under skip_bad: [{"line": n, "error": "..."}], in file order.
    skipped: list = field(default_factory=list)
    # sha256 of the whole file, so a rerun can tell that the input changed under it.
    sha256: str = ""
    # rows whose id repeats an earlier row's: {"count", "examples"}, {} when ids are unique
    duplicates: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets)


def parse_line(raw: bytes, line_no: int, id_field: str, text_field: str):
    """(id, text) of one line, or InputError saying what is wrong with it."""
    try:
        obj = json_object(raw, {text_field: str})
    except ValueError as e:
        raise InputError(f"line {line_no}: {e}") from None
    # A missing id is the line number: stable, unique, and what a user finds in an editor.
    rid = obj.get(id_field, line_no)
    # bool is an int subclass, but True as an id is almost surely a wrong --id-field.
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise InputError(f"line {line_no}: field {id_field!r} must be a string or an integer, got {rid!r}")
    return rid, obj[text_field]


def scan_jsonl(path, *, id_field: str = "id", text_field: str = "text", skip_bad: bool = False) -> InputIndex:
    """Validate every line of `path` and index its rows. A bad line raises InputError naming the file and
    line, unless skip_bad, which leaves it out and lists it in `skipped` (and so in the manifest)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such input file")
    digest = hashlib.sha256()
    offsets, line_numbers, skipped, id_keys = [], [], [], []
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            digest.update(raw)
            # A BOM starts the file, not its first line (as in files.iter_lines): then a lone BOM is a blank line.
            if (raw.removeprefix(codecs.BOM_UTF8) if line_no == 1 else raw).strip():
                try:
                    rid, _ = parse_line(raw, line_no, id_field, text_field)
                    offsets.append(offset)
                    line_numbers.append(line_no)
                    id_keys.append(id_key(rid))
                except InputError as e:
                    if not skip_bad:
                        raise InputError(f"{path}: {e} (name the fields with --text-field and --id-field if theirs "
                                         "differ, or pass --skip-bad-lines to leave such lines out)") from None
                    skipped.append({"line": line_no, "error": str(e)})
            offset += len(raw)
    index = InputIndex(
        path=path,
        id_field=id_field,
        text_field=text_field,
        offsets=np.asarray(offsets, dtype=np.int64),
        line_numbers=np.asarray(line_numbers, dtype=np.int64),
        skipped=skipped,
        sha256=digest.hexdigest(),
    )
    return replace(index, duplicates=find_duplicates(index, np.asarray(id_keys, dtype=np.uint64)))


def id_key(rid) -> int:
    """64 bits of a row's id (as JSON, so the id 1 and the id "1" differ): 8 bytes a row, not the id itself."""
    return int.from_bytes(hashlib.blake2b(json.dumps(rid).encode(), digest_size=8).digest(), "little")


def find_duplicates(index: InputIndex, keys: np.ndarray) -> dict:
    """{"count": rows that repeat an earlier id, "examples": [{"id", "line"}, ...]} or {} when ids are unique.
    `keys`: (N,) uint64 id_key of each row of `index`."""
    order = np.argsort(keys, kind="stable")  # stable: among equal ids, file order
    repeat = np.zeros(len(keys), dtype=bool)
    repeat[order[1:]] = keys[order[1:]] == keys[order[:-1]]
    if not repeat.any():
        return {}
    examples = [{"id": read_rows(index, row, row + 1)[0][0], "line": int(index.line_numbers[row])}
                for row in np.flatnonzero(repeat)[:5].tolist()]
    return {"count": int(repeat.sum()), "examples": examples}


def read_rows(index: InputIndex, start: int, end: int) -> tuple[list, list[str]]:
    """ids and texts of rows [start, end), read from the file by offset."""
    rows = []
    with open(index.path, "rb") as f:
        for row in range(start, end):
            f.seek(int(index.offsets[row]))
            rows.append(parse_line(f.readline(), int(index.line_numbers[row]), index.id_field, index.text_field))
    return [rid for rid, _ in rows], [text for _, text in rows]

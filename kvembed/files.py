"""File plumbing shared by every floor: the cache folder, hashing, atomic writes, reading texts.

Standard library only (no torch), so that `weights_loader` and the face can both import it without pulling
in the model or the user API.

    cache_root()               $KVEMBED_CACHE, else ~/.cache/kvembed: models, layer selections, eval cache
    sha256_file / sha256_bytes hex digests
    atomic_write(path, data)   the file is absent, old, or complete: never half-written
    atomic_output(path)        the same, for writers that stream (np.save, json lines)
    read_texts(path, ...)      a .txt (one text per line) or .jsonl (a field per object), with line numbers
    json_object(line, fields)  one JSON-lines line as an object holding `fields`, or a ValueError saying why not
    read_json(path, error, ..) one JSON object, or `error` naming the file, what is wrong and what to do

Reading rules, the same for every command: the suffix decides the format, case-insensitively (`.JSONL` is
JSON lines); a UTF-8 byte-order mark is dropped; `\\n`, `\\r\\n` and a lone `\\r` all end a line; invalid
UTF-8 is an error naming the line. In a text file every line is a text, a blank one too (an empty text
embeds like any other); in JSON lines a blank line holds no object and is skipped (its number is kept).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

CACHE_ENV = "KVEMBED_CACHE"
TMP_MARK = ".tmp-"


class TextFileError(ValueError):
    """A text or JSONL input cannot be read as asked: the message names the file and the line."""


def cache_root() -> Path:
    """kvembed's cache folder: $KVEMBED_CACHE, else ~/.cache/kvembed (never inside the installed package)."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/kvembed").expanduser()


# ------------------------------------------------------------------------------------------ hashing


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ atomic writes


def tmp_name(path: Path) -> Path:
    """A temporary sibling of `path`, unique per process, that `remove_stale_tmp`-style sweeps recognise."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True, encoding: str | None = None):
    """Open a temporary sibling of `path` for writing; on success it replaces `path`, on failure it is removed.

    `os.replace` is atomic on POSIX, so a reader (or a crash) sees the old file or the whole new one. Without
    fsync, a power loss after the rename can leave the new name pointing at empty blocks.
    """
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = True) -> None:
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_output(path, "wb", fsync=fsync) as f:
        f.write(data)


# ------------------------------------------------------------------------------------- reading texts


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError, advice: str = "fix the file") -> dict:
    """The JSON object in `path` (UTF-8). Not JSON, or not an object: `error`, naming the file, what is wrong and
    `advice`. A missing file stays the caller's to explain (what it is for, where it should come from)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); {advice}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}; {advice}")
    return obj


def json_object(line: str | bytes, fields: dict) -> dict:
    """The JSON object on one line (str, or bytes as json.loads takes them) holding each of `fields` (name -> type or
    tuple of types; a bool is never an int here), else a ValueError saying what is wrong (callers add file and line)."""
    try:
        obj = json.loads(line)
    except ValueError as e:  # json.JSONDecodeError, or UnicodeDecodeError for bytes
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for name, types in fields.items():
        if name not in obj:
            raise ValueError(f"no {name!r} field (fields: {sorted(obj)[:8]})")
        if isinstance(obj[name], bool) or not isinstance(obj[name], types):
            wanted = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise ValueError(f"{name!r} is {type(obj[name]).__name__}, not {wanted}")
    return obj


def iter_lines(path: str | os.PathLike):
    """(line number from 1, the line without its end, or its UnicodeDecodeError if it is not UTF-8) for every
    line of `path`, by the reading rules above."""
    data = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    # Split on \r\n, \r and \n only: a lone \r ends a line (old Mac files would otherwise be one giant text), and
    # str.splitlines would also split on \x0b, \x1c, U+2028 ... inside texts.
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line does not start another
    for n, raw in enumerate(lines, start=1):
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, e


@dataclass
class Texts:
    """What `read_texts` found: texts in file order, the line each came from, and the lines left out."""

    texts: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    # (line number, reason) of unreadable lines left out under skip_bad
    skipped: list[tuple[int, str]] = field(default_factory=list)
    # each text's `id_field` value in JSON lines (None when absent, and for text files)
    ids: list = field(default_factory=list)


def is_jsonl(path: str | os.PathLike) -> bool:
    """Whether `read_texts` reads `path` as JSON lines (its suffix, in any case); otherwise one text per line."""
    return Path(path).suffix.lower() in (".jsonl", ".ndjson")


def read_texts(path: str | os.PathLike, field_name: str = "text", *, skip_bad: bool = False,
               hint: str = "fix it or pass --skip-bad-lines", id_field: str | None = None) -> Texts:
    """Texts of a `.jsonl` file (the string `field_name` of each object) or a text file (one text per line).

    A `.json` file is refused (an array is not one text per line: convert it to JSON lines). A bad line
    raises TextFileError naming file and line, unless `skip_bad`, which leaves it out and records it.
    """
    p = Path(path)
    if not p.is_file():
        raise TextFileError(f"input file {p} does not exist (or is not a file)")
    if p.suffix.lower() == ".json":
        raise TextFileError(f"{p}: a .json file is not read as texts (an array is not one text per line); "
                            "write one JSON object per line to a .jsonl file, or one text per line to a .txt file")
    jsonl = is_jsonl(p)
    out = Texts()
    for n, line in iter_lines(p):
        try:
            if isinstance(line, UnicodeDecodeError):
                raise ValueError(f"invalid UTF-8 ({line.reason} at byte {line.start})")
            if jsonl and not line.strip():
                continue
            obj = json_object(line, {field_name: str}) if jsonl else {field_name: line}
        except ValueError as e:
            if not skip_bad:
                raise TextFileError(f"{p}:{n}: unreadable line ({e}); {hint}") from None
            out.skipped.append((n, str(e)))
            continue
        out.texts.append(obj[field_name])
        out.lines.append(n)
        out.ids.append(obj.get(id_field) if jsonl and id_field else None)
    return out

"""The evaluation data pack on disk: task descriptions, splits, and honest subsets.

Layout (see `<data-dir>/README.md`): one folder per task with a `task.json`
(`name`, `type`, `main_score`, `splits: {split: rows}`) and one JSON-lines file per split.
Retrieval keeps `corpus.jsonl`, `queries.jsonl` and `qrels.jsonl` instead (the qrels are the test split).

`--max-rows N` keeps N rows of every split a task uses, chosen by `random.Random(seed).sample` over
row indices (seed 0 unless told) and then put back in file order, so a subset is the same on every
machine and a larger N is not a superset of a smaller one. What a "row" is depends on the type:
a pair (sts, pair_classification), a text (classification, clustering), a query with all its
candidates (reranking), a query with its qrels (retrieval, whose corpus is always kept whole so that
nDCG@10 still ranks the full collection). A classification task's train pool is never cut: mteb draws
8 rows per label from it in each of its 10 experiments and embeds only those, so cutting it would change
the protocol (labels with no example), not bound the cost.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from kvembed.files import iter_lines, json_object, read_json

TASK_TYPES = ("sts", "classification", "clustering", "pair_classification", "reranking", "retrieval")

# The metric each type reports in the table, spelled as mteb 2.x returns it (reranking in mteb 2.x
# is retrieval over each query's candidates; its MAP over all candidates is `map_at_1000`).
MAIN_SCORES = {
    "sts": "cosine_spearman",
    "classification": "accuracy",
    "clustering": "v_measure",
    "pair_classification": "max_ap",
    "reranking": "map_at_1000",
    "retrieval": "ndcg_at_10",
}


class TaskDataError(ValueError):
    """A task folder, split or row that does not match the data pack's format."""


@dataclass(frozen=True)
class TaskSpec:
    # folder name, e.g. "stsb"
    name: str
    # one of TASK_TYPES
    type: str
    # split name -> row count announced by task.json (queries for retrieval)
    splits: dict
    # the task folder
    path: Path
    # main score as spelled in task.json ("map" for reranking); MAIN_SCORES says how mteb spells it
    main_score: str
    # retrieval only: the corpus and qrels sizes task.json announces (checked on loading)
    corpus_size: int | None = None
    qrels: int | None = None

    @property
    def mteb_main_score(self) -> str:
        return MAIN_SCORES[self.type]


def default_data_dir() -> Path:
    """`$KVEMBED_DATA` when set, else the first existing shared/data beside the checkout, in or above the cwd."""
    env = os.environ.get("KVEMBED_DATA")
    if env:
        return Path(env)
    # parents[3]: the folder holding the source checkout, when kvembed runs from one (an installed wheel has none)
    for root in (Path(__file__).resolve().parents[3], Path.cwd(), Path.cwd().parent):
        if (root / "shared" / "data").is_dir():
            return root / "shared" / "data"
    raise TaskDataError("no data pack found: pass --data-dir or set $KVEMBED_DATA to the folder that holds the "
                        "task folders (stsb/, banking77/, ...)")


# The fields every row of a type must carry, and their Python types.
FIELDS = {
    "sts": {"sentence1": str, "sentence2": str, "score": (int, float)},
    "pair_classification": {"sentence1": str, "sentence2": str, "label": int},
    "classification": {"text": str, "label": (str, int)},
    "clustering": {"text": str, "label": (str, int)},
    "reranking": {"query": str, "positive": list, "negative": list},
    "corpus": {"id": str, "text": str},
    "queries": {"id": str, "text": str},
    "qrels": {"query_id": str, "doc_id": str, "relevance": int},
}


def _read_jsonl(path: Path, kind: str, announced: int | None = None) -> list[dict]:
    """Every `kind` row of a JSON-lines file, each carrying FIELDS[kind] (the error names file:line and kind);
    with `announced`, there must be that many (a task is never scored on fewer rows than it announces)."""
    if not path.is_file():
        raise TaskDataError(f"{path}: file not found; check --data-dir (or $KVEMBED_DATA) and the task's splits")
    rows = []
    for i, line in iter_lines(path):
        if isinstance(line, UnicodeDecodeError):
            raise TaskDataError(f"{path}:{i}: invalid UTF-8 ({line.reason})")
        if line.strip():
            try:
                rows.append(json_object(line, FIELDS[kind]))
            except ValueError as e:
                raise TaskDataError(f"{path}:{i}: {kind} row: {e}") from None
    if announced is not None and len(rows) != announced:
        raise TaskDataError(f"{path}: {len(rows)} rows, but task.json announces {announced}; the file is incomplete "
                            "or task.json is wrong")
    return rows


def load_spec(folder: Path) -> TaskSpec:
    meta_path = Path(folder) / "task.json"
    if not meta_path.is_file():
        raise TaskDataError(f"{meta_path}: no task.json; a task folder needs one (see the data README)")
    meta = read_json(meta_path, TaskDataError)
    for key in ("name", "type", "splits"):
        if key not in meta:
            raise TaskDataError(f"{meta_path}: key '{key}' is missing")
    kind = str(meta["type"]).strip().lower()  # "STS" and "sts" are one type; an unknown one is an error, not a skip
    if kind not in TASK_TYPES + ("unlabelled_corpus",):
        raise TaskDataError(f"{meta_path}: type {meta['type']!r} is not one of {', '.join(TASK_TYPES)}")
    if not isinstance(meta["splits"], dict) or not all(isinstance(n, int) for n in meta["splits"].values()):
        raise TaskDataError(f"{meta_path}: 'splits' must map split names to row counts")
    return TaskSpec(name=meta["name"], type=kind, splits=dict(meta["splits"]), path=Path(folder),
                    main_score=meta.get("main_score") or "", corpus_size=meta.get("corpus_size"),
                    qrels=meta.get("qrels"))


def list_tasks(data_dir: Path | str | None = None) -> list[TaskSpec]:
    """Every evaluation task of the pack, sorted by type then name (the unlabelled corpus is left out)."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if not data_dir.is_dir():
        raise TaskDataError(f"{data_dir}: data folder not found; pass --data-dir or set $KVEMBED_DATA")
    specs = [load_spec(p) for p in sorted(data_dir.iterdir()) if (p / "task.json").is_file()]
    return sorted((s for s in specs if s.type in TASK_TYPES), key=lambda s: (TASK_TYPES.index(s.type), s.name))


def select_tasks(names: str | list[str], data_dir: Path | str | None = None) -> list[TaskSpec]:
    """`"all"`, a comma-separated string or a list of task names (or type names, e.g. `sts`)."""
    specs = list_tasks(data_dir)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names == ["all"]:
        return specs
    picked = []
    for n in names:
        hits = [s for s in specs if s.name == n or s.type == n]
        if not hits:
            known = ", ".join(s.name for s in specs)
            raise TaskDataError(f"unknown task '{n}'; known tasks: {known} (or a type: {', '.join(TASK_TYPES)})")
        picked += [s for s in hits if s not in picked]
    return picked


def sample_indices(n: int, max_rows: int | None, seed: int = 0) -> list[int]:
    """Indices of a seeded subset of `max_rows` rows out of n, in file order (all rows when None)."""
    if max_rows is None or max_rows >= n:
        return list(range(n))
    if max_rows <= 0:
        raise TaskDataError(f"--max-rows must be positive, got {max_rows}")
    return sorted(random.Random(seed).sample(range(n), max_rows))


def load_split(spec: TaskSpec, split: str, max_rows: int | None = None, seed: int = 0) -> list[dict]:
    """Rows of one split (sts, classification, clustering, pair_classification, reranking)."""
    if spec.type == "retrieval":
        raise TaskDataError(f"{spec.name}: a retrieval task is loaded with load_retrieval, not load_split")
    if split not in spec.splits:
        raise TaskDataError(f"{spec.name}: no split '{split}'; it has {', '.join(spec.splits)}")
    rows = _read_jsonl(spec.path / f"{split}.jsonl", spec.type, spec.splits[split])
    return [rows[i] for i in sample_indices(len(rows), max_rows, seed)]


def load_retrieval(spec: TaskSpec, max_rows: int | None = None, seed: int = 0) -> tuple[list, list, list]:
    """(corpus, queries, qrels) rows; max_rows samples queries, the corpus stays whole."""
    corpus = _read_jsonl(spec.path / "corpus.jsonl", "corpus", spec.corpus_size)
    queries = _read_jsonl(spec.path / "queries.jsonl", "queries", spec.splits.get("test"))
    qrels = _read_jsonl(spec.path / "qrels.jsonl", "qrels", spec.qrels)
    queries = [queries[i] for i in sample_indices(len(queries), max_rows, seed)]
    kept = {q["id"] for q in queries}
    return corpus, queries, [r for r in qrels if r["query_id"] in kept]


class TextCap:
    """Cut a text to its first `n` tokens (of the model's tokenizer, no special tokens), the same for every method,
    so a long document costs at most n tokens plus the method's prompt; counts what it cut."""

    def __init__(self, tokenizer, n: int):
        self.tokenizer, self.n, self.cut = tokenizer, n, 0

    def __call__(self, text: str) -> str:
        if len(text) <= self.n:  # a token covers at least one character
            return text
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        if len(offsets) <= self.n:
            return text
        self.cut += 1
        return text[: offsets[self.n - 1][1]]

"""Run methods over tasks: one mteb-scored result per (method, task), with timing and cache counts.

`evaluate_task` builds the in-memory mteb task (mteb_tasks.py) and calls the task's own
`evaluate`, so the score is mteb's. `run_method` loops over tasks for one embedder (`make_embedder`);
a `Table` of such runs is what report.py writes.

Splits: `test` is for reporting only. A task without the requested split (e.g. Banking77 or the
clustering sets under `--split validation`) is skipped and says so; it never falls back to test.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cache import EmbeddingCache
from .mteb_adapter import KVEmbeddingMTEB, describe
from .intervals import SIMILARITIES, interval
from .mteb_tasks import build_task
from .tasks import TaskSpec, TextCap, default_data_dir

log = logging.getLogger(__name__)


@dataclass
class TaskResult:
    task: str
    type: str
    split: str
    main_score: str
    # None when the task was skipped (reason in `note`)
    score: float | None
    rows: int = 0
    wall_s: float = 0.0
    texts_encoded: int = 0
    scores: dict = field(default_factory=dict)
    note: str = ""
    # what the score is computed from, per unit (intervals.py): intervals can be recomputed from the JSON alone
    per_row: dict = field(default_factory=dict)
    # the 95% interval of `score` (intervals.interval)
    interval: dict = field(default_factory=dict)


@dataclass
class MethodRun:
    label: str
    method: str
    switches: dict
    fingerprint: str
    layers: str
    results: list
    wall_s: float = 0.0


@dataclass
class Table:
    model: str
    dtype: str
    split: str
    max_rows: int | None
    seed: int
    command: str
    runs: list
    wall_s: float = 0.0
    kind: str = "eval"
    task_rows: dict = field(default_factory=dict)
    max_text_tokens: int | None = None


def make_embedder(model: str | None, method: str, switches: dict | None = None, *, dtype: str = "float32",
                  device: str = "cpu", data_dir=None, id_corpus=None):
    """A kvembed embedder for (model, method, switches); `lexical_bow` needs no model.

    KV-Embedding's `layers="auto"` measures intrinsic dimension on the data pack's unlabelled
    `id_corpus` (train texts only, never an evaluation split) unless the model ships a selection.
    """
    if method == "lexical_bow":
        if switches:
            raise ValueError(f"method 'lexical_bow' takes no switches, got {sorted(switches)}")
        from .lexical import HashingBowEmbedder
        return HashingBowEmbedder()
    from kvembed.encoder import KVEmbedder

    id_corpus = id_corpus or Path(data_dir or default_data_dir()) / "id_corpus" / "train.jsonl"
    extra = {"id_corpus": str(id_corpus)} if method == "kvembedding" and Path(id_corpus).is_file() else {}
    return KVEmbedder.from_pretrained(model, method=method, dtype=dtype, device=device, **extra, **(switches or {}))


def _clean(scores: dict) -> dict:
    """Top-level numeric scores only (mteb also returns per-experiment lists), as plain floats."""
    return {k: float(v) for k, v in scores.items()
            if (isinstance(v, (int, float)) and not isinstance(v, bool))
            or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0)}


def _rows(task) -> int:
    """Rows of the scored split (pairs, texts, or queries)."""
    split = task.metadata.eval_splits[0]
    data = task.dataset
    if "default" in data and isinstance(data["default"], dict):
        return len(data["default"][split]["queries"])
    ds = data[split]
    return len(ds[0]["sentences"]) if "sentences" in ds.column_names else len(ds)


def evaluate_task(adapter: KVEmbeddingMTEB, spec: TaskSpec, split: str = "test", *, max_rows: int | None = None,
                  seed: int = 0, cut=None) -> TaskResult:
    """Score one task with mteb's protocol; `split` is the reported split (classification trains on train)."""
    main = spec.mteb_main_score
    if spec.type == "retrieval" and split != "test" or spec.type != "retrieval" and split not in spec.splits:
        return TaskResult(spec.name, spec.type, split, main, None, note=f"no '{split}' split")
    task = build_task(spec, split, max_rows, seed, cut)
    before = adapter.encoder.encoded
    t0 = time.perf_counter()
    # A prediction folder makes mteb hand its per-row predictions to the task, which keeps them in memory.
    scores = task.evaluate(adapter, split, encode_kwargs={"batch_size": adapter.encoder.batch_size,
                                                          "show_progress_bar": False},
                           prediction_folder=Path("unused"))["default"]
    wall = time.perf_counter() - t0
    score = float(scores[main])
    if math.isnan(score):
        log.warning("%s/%s: mteb returned NaN for %s", spec.name, split, main)
    rows = per_row(spec.type, task, split, scores, adapter)
    return TaskResult(spec.name, spec.type, split, main, score, rows=_rows(task), wall_s=round(wall, 3),
                      texts_encoded=adapter.encoder.encoded - before, scores=_clean(scores), per_row=rows,
                      interval=asdict(interval(spec.type, rows)))


# pytrec_eval's per-query name of each retrieval-type main score
PER_QUERY_METRIC = {"retrieval": "ndcg_cut_10", "reranking": "map_cut_1000"}


def kmeans_restarts(vectors, labels, n: int = 50) -> list[float]:
    """V-measure of mteb's clustering (MiniBatchKMeans, k = #labels, batch 500, n_init auto) under seeds 0..n-1."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import v_measure_score

    k = len(set(labels))
    return [float(v_measure_score(labels, MiniBatchKMeans(n_clusters=k, batch_size=500, n_init="auto",
                                                         random_state=seed).fit(vectors).labels_))
            for seed in range(n)]


def per_row(kind: str, task, split: str, scores: dict, adapter: KVEmbeddingMTEB) -> dict:
    """What `scores` is computed from, per unit, as plain lists (see intervals.py); clustering re-runs k-means on
    the vectors the adapter returned last."""
    if kind in PER_QUERY_METRIC:
        qids = sorted(task.per_query)  # by id, so that two methods' lists pair up
        return {"query_ids": qids, "per_query": [float(task.per_query[q][PER_QUERY_METRIC[kind]]) for q in qids]}
    if kind == "classification":
        return {"per_experiment": [float(e["accuracy"]) for e in scores["scores_per_experiment"]]}
    data = task.dataset[split]
    if kind == "clustering":
        labels = list(data[0]["labels"])
        return {"cluster": [int(c) for c in task.predictions[0]], "label": labels,
                "per_restart": kmeans_restarts(adapter.last_vectors, labels)}
    preds = task.predictions
    if kind == "sts":
        return {"cosine": [float(x) for x in preds["cosine_scores"]], "gold": [float(x) for x in data["score"]]}
    if kind == "pair_classification":
        out = {name: [float(x) for x in preds[name]] for name in SIMILARITIES if name in preds}
        return {**out, "label": [int(x) for x in data["label"]]}
    raise ValueError(f"no per-row data for task type {kind!r}")


def run_method(embedder, specs: list[TaskSpec], *, split: str = "test", max_rows: int | None = None, seed: int = 0,
               cache: EmbeddingCache | None = None, batch_size: int = 32, show_progress_bar: bool = True,
               label: str | None = None, method: str | None = None, switches: dict | None = None,
               model_name: str | None = None, task_rows: dict | None = None,
               max_text_tokens: int | None = None) -> MethodRun:
    """Every task for one embedder. `task_rows` overrides `max_rows` per task name; `max_text_tokens` cuts every
    text to its first N tokens before any prompt (the same cut for every method of one model)."""
    _, described, _, layers = describe(embedder)
    method = method or described
    tokenizer = getattr(embedder, "tokenizer", None)
    cut = TextCap(tokenizer, max_text_tokens) if max_text_tokens and tokenizer is not None else None
    adapter = KVEmbeddingMTEB(embedder, cache=cache, batch_size=batch_size, show_progress_bar=show_progress_bar,
                              name=model_name, method=method, switches=switches)
    t0 = time.perf_counter()
    results = []
    for spec in specs:
        rows = (task_rows or {}).get(spec.name, max_rows)
        r = evaluate_task(adapter, spec, split, max_rows=rows, seed=seed, cut=cut)
        shown = "skipped (" + r.note + ")" if r.score is None else f"{r.main_score}={r.score:.4f}"
        log.info("%s %s/%s %s rows=%d encoded=%d %.1fs", label or method, spec.name, split, shown, r.rows,
                 r.texts_encoded, r.wall_s)
        results.append(r)
    return MethodRun(label or method, method, dict(switches or {}), embedder.fingerprint, layers, results,
                     round(time.perf_counter() - t0, 3))


def type_averages(run: MethodRun) -> dict:
    """Mean main score per task type, then over all scored tasks ("avg")."""
    scored = [r for r in run.results if r.score is not None]
    by_type: dict[str, list[float]] = {}
    for r in scored:
        by_type.setdefault(r.type, []).append(r.score)
    out = {t: sum(v) / len(v) for t, v in by_type.items()}
    if scored:
        out["avg"] = sum(r.score for r in scored) / len(scored)
    return out

"""Our local tasks as in-memory mteb 2.x task objects, so mteb's own task classes score them.

Nothing here computes a metric: each builder fills an mteb `AbsTask*` subclass with rows read from the
data pack (tasks.py) and marks it loaded, the way mteb's own mock tasks do, so no hub access happens.
mteb then runs its protocol unchanged:

| our type            | mteb class (module)                                  | what mteb does                                  |
|---------------------|------------------------------------------------------|-------------------------------------------------|
| sts                 | AbsTaskSTS (abstasks/sts.py)                         | AnySTSEvaluator, Spearman of cosine             |
| classification      | AbsTaskClassification (abstasks/classification.py)   | LogisticRegression(max_iter=100), 10 experiments of 8 samples per label, mean accuracy |
| clustering          | AbsTaskClusteringLegacy (abstasks/clustering_legacy.py) | ClusteringEvaluator: MiniBatchKMeans, k = #labels, V-measure |
| pair_classification | AbsTaskPairClassification                            | PairClassificationEvaluator, AP max over similarity functions |
| reranking           | AbsTaskRetrieval with `top_ranked` (mteb 2.x reranking) | each query ranks only its own candidates; MAP (`map_at_1000`) |
| retrieval           | AbsTaskRetrieval                                     | full-corpus search, nDCG@10 (pytrec_eval)      |

Clustering uses the legacy class on purpose: it clusters the whole split once with k = #labels, the
protocol the data README and SPEC name; `AbsTaskClustering` ("fast") would embed only 4% of a split and
bootstrap, which is meant for corpora far larger than ours.

Labels are mapped to integer ids (sorted label names) as MTEB's own datasets store them; sklearn's
average precision, which mteb computes for binary classification, refuses string labels.
"""

from __future__ import annotations

from datasets import Dataset
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering_legacy import AbsTaskClusteringLegacy
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

from .tasks import TaskDataError, TaskSpec, load_retrieval, load_split

MTEB_TYPES = {
    "sts": "STS",
    "classification": "Classification",
    "clustering": "Clustering",
    "pair_classification": "PairClassification",
    "reranking": "Reranking",
    "retrieval": "Retrieval",
}


def _metadata(spec: TaskSpec, split: str) -> TaskMetadata:
    return TaskMetadata(
        name=f"kvembed-local-{spec.name}",
        type=MTEB_TYPES[spec.type],
        main_score=spec.mteb_main_score,
        description=f"Local copy of {spec.name} read from {spec.path}.",
        reference="https://github.com/embeddings-benchmark/mteb",
        dataset={"path": str(spec.path), "revision": "local"},
        category="t2t",
        eval_splits=[split],
        eval_langs=["eng-Latn"],
        date=("2000-01-01", "2000-01-01"),
        dialect=["Written"],
        domains=[],
        task_subtypes=[],
        license="not specified",
        annotations_creators="derived",
        modalities=["text"],
        sample_creation="found",
        bibtex_citation="",
    )


class _Local:
    """Mixin: an mteb task whose data is handed over at construction instead of fetched."""

    def __init__(self, metadata: TaskMetadata, dataset):
        self.metadata = metadata
        super().__init__()
        self.dataset = dataset
        self.data_loaded = True

    def load_data(self, *args, **kwargs) -> None:  # the data is already in memory
        return None

    def _save_task_predictions(self, predictions, model, prediction_folder, hf_split, hf_subset) -> None:
        # Kept in memory, never written: the per-row data the intervals are computed from (runners.per_row).
        self.predictions = predictions


class LocalSTS(_Local, AbsTaskSTS):
    min_score = 0
    max_score = 5


class LocalClassification(_Local, AbsTaskClassification):
    pass


class LocalClustering(_Local, AbsTaskClusteringLegacy):
    pass


class LocalPairClassification(_Local, AbsTaskPairClassification):
    label_column_name = "label"


class LocalRetrieval(_Local, AbsTaskRetrieval):
    def task_specific_scores(self, scores, qrels, results, hf_split, hf_subset) -> dict:
        # mteb's per-query metrics (pytrec_eval), kept for the interval over queries
        self.per_query = scores
        return {}


def cut_row(row: dict, cut) -> dict:
    """The row with every text field (and reranking's candidate lists) passed through `cut`."""
    out = {k: cut(v) if k in ("text", "sentence1", "sentence2", "query") else v for k, v in row.items()}
    for k in ("positive", "negative"):
        if k in row:
            out[k] = [cut(t) for t in row[k]]
    return out


def _retrieval_task(meta: TaskMetadata, split: str, corpus: list[dict], queries: list[dict], relevant: dict,
                    top_ranked: dict | None) -> LocalRetrieval:
    """Retrieval, or mteb 2.x reranking when `top_ranked` lists each query's own candidates."""
    data = RetrievalSplitData(corpus=Dataset.from_list(corpus), queries=Dataset.from_list(queries),
                              relevant_docs=relevant, top_ranked=top_ranked)
    return LocalRetrieval(meta, {"default": {split: data}})


def _label_ids(*splits: list[dict]) -> dict:
    return {name: i for i, name in enumerate(sorted({str(r["label"]) for rows in splits for r in rows}))}


def build_task(spec: TaskSpec, split: str, max_rows: int | None = None, seed: int = 0, cut=None):
    """An mteb task object for `spec`, scored on `split`, with `max_rows` rows per split used.

    `cut(text) -> text` (e.g. `tasks.TextCap`) shortens every text the same way for every method, before any prompt."""
    cut = cut or (lambda t: t)
    if spec.type == "retrieval":
        if split != "test":
            raise TaskDataError(f"{spec.name}: retrieval qrels exist for the test split only, not '{split}'")
        corpus, queries, qrels = load_retrieval(spec, max_rows, seed)
        corpus = [{"id": d["id"], "title": d.get("title") or "", "text": cut(d["text"])} for d in corpus]
        queries = [{"id": q["id"], "text": cut(q["text"])} for q in queries]
        relevant: dict[str, dict[str, int]] = {q["id"]: {} for q in queries}
        for r in qrels:
            relevant[r["query_id"]][r["doc_id"]] = int(r["relevance"])
        return _retrieval_task(_metadata(spec, split), split, corpus, queries, relevant, None)

    rows = [cut_row(r, cut) for r in load_split(spec, split, max_rows, seed)]
    if not rows:
        raise TaskDataError(f"{spec.name}/{split}: no rows")
    meta = _metadata(spec, split)

    if spec.type in ("sts", "pair_classification"):
        gold, as_type, cls = (("score", float, LocalSTS) if spec.type == "sts"
                              else ("label", int, LocalPairClassification))
        ds = Dataset.from_dict({"sentence1": [r["sentence1"] for r in rows],
                                "sentence2": [r["sentence2"] for r in rows],
                                gold: [as_type(r[gold]) for r in rows]})
        return cls(meta, {split: ds})

    if spec.type == "classification":
        if split == "train":
            raise TaskDataError(f"{spec.name}: the classifier trains on 'train'; score another split")
        # the train pool is never cut to max_rows (tasks.py says why: mteb embeds only the rows it draws)
        train = [cut_row(r, cut) for r in load_split(spec, "train")]
        ids = _label_ids(train, rows)
        ds = {s: Dataset.from_dict({"text": [r["text"] for r in rs], "label": [ids[str(r["label"])] for r in rs]})
              for s, rs in (("train", train), (split, rows))}
        return LocalClassification(meta, ds)

    if spec.type == "clustering":
        ids = _label_ids(rows)
        # one row = one clustering set (mteb's legacy layout); the whole split is one set
        ds = Dataset.from_dict({"sentences": [[r["text"] for r in rows]],
                                "labels": [[ids[str(r["label"])] for r in rows]]})
        return LocalClustering(meta, {split: ds})

    if spec.type == "reranking":
        corpus, relevant, top_ranked = [], {}, {}
        for i, r in enumerate(rows):
            qid = f"q{i}"
            cands = [(t, 1) for t in r["positive"]] + [(t, 0) for t in r["negative"]]
            ids = [f"{qid}-d{j}" for j in range(len(cands))]
            corpus += [{"id": d, "title": "", "text": t} for d, (t, _) in zip(ids, cands)]
            relevant[qid] = {d: rel for d, (_, rel) in zip(ids, cands)}
            top_ranked[qid] = ids
        queries = [{"id": f"q{i}", "text": r["query"]} for i, r in enumerate(rows)]
        return _retrieval_task(meta, split, corpus, queries, relevant, top_ranked)

    raise TaskDataError(f"{spec.name}: unknown task type '{spec.type}'")

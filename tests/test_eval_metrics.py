"""Scores on hand-made data with answers worked out by hand, through the runner's own path.

Each test writes a tiny task in the data pack's format to tmp_path, gives every text a chosen vector
(`VectorTable`), and scores it with `evaluate_task`, i.e. our loader -> in-memory mteb task -> mteb's
evaluator, exactly as `kvembed eval` does. Only the rank order of similarities matters to Spearman,
AP, MAP and nDCG, so the expected values are exact rationals/logs, and the scores are float64 arithmetic on
ranks and counts: EXACT covers that float64 rounding only (the bound is not about the metrics at all).
Retrieval and reranking scores are reported rounded to 5 decimals by mteb: half a unit of the 5th place more.
"""

import json
import math

import numpy as np
import pytest

from kvembed.evaluation.mteb_adapter import KVEmbeddingMTEB
from kvembed.evaluation.runners import evaluate_task
from kvembed.evaluation.tasks import load_spec
from tests.tolerance import assert_close, drift

# Sums over at most 12 items and a division or log after them, in float64 (~3e-15 relative).
EXACT = drift(np.float64, terms=12, depth=2)
HALF_5TH = 0.5e-5  # a score rounded to 5 decimals is off by at most this


class VectorTable:
    """An embedder that returns a fixed vector per text and records the prompt name of each call."""

    method = "table"

    def __init__(self, vectors: dict):
        self.vectors = {t: np.asarray(v, dtype=np.float32) for t, v in vectors.items()}
        self.fingerprint = "vector-table"
        self.prompts = {}

    def encode(self, texts, prompt_name=None, **kwargs):
        for t in texts:
            self.prompts[t] = prompt_name
        return np.stack([self.vectors[t] for t in texts])


def unit(angle_cos: float) -> list:
    """A 2-d unit vector whose cosine with e1 is `angle_cos` (angles in [0, pi/2] keep every distance monotone)."""
    return [angle_cos, math.sqrt(1 - angle_cos ** 2)]


def write_task(root, name, type_, splits: dict, **files):
    folder = root / name
    folder.mkdir(parents=True)
    counts = {s: len(rows) for s, rows in splits.items()}
    for fname, rows in files.items():
        counts.setdefault("test", len(files.get("queries", [])))
        splits[fname] = rows
    for s, rows in splits.items():
        (folder / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.json").write_text(json.dumps({"name": name, "type": type_, "main_score": "", "splits": counts}))
    return load_spec(folder)


def score(spec, table, split="test"):
    adapter = KVEmbeddingMTEB(table, show_progress_bar=False)
    return evaluate_task(adapter, spec, split)


def test_sts_cosine_spearman_known_values(tmp_path):
    # gold ranks 1,2,3,4; cosine ranks 1,3,2,4 -> rho = 1 - 6*(0+1+1+0)/(4*(16-1)) = 0.8
    cosines = [0.1, 0.5, 0.3, 0.9]
    rows = [{"sentence1": f"a{i}", "sentence2": f"b{i}", "score": float(i)} for i in range(4)]
    vecs = {f"a{i}": [1.0, 0.0] for i in range(4)} | {f"b{i}": unit(c) for i, c in enumerate(cosines)}
    table = VectorTable(vecs)
    r = score(write_task(tmp_path, "sts", "sts", {"test": rows}), table)
    assert r.main_score == "cosine_spearman"
    assert_close(r.score, 0.8, EXACT, "spearman")
    # STS is symmetric: both sides get the document prompt
    assert set(table.prompts.values()) == {"document"}

    monotone = {f"a{i}": [1.0, 0.0] for i in range(4)} | {f"b{i}": unit(c) for i, c in enumerate([0.1, 0.2, 0.3, 0.4])}
    assert_close(score(load_spec(tmp_path / "sts"), VectorTable(monotone)).score, 1.0, EXACT, "monotone spearman")


def test_pair_classification_max_ap_known_value(tmp_path):
    # ranked by similarity: labels 1,0,1,0 -> AP = (1/1 + 2/3) / 2 = 5/6; unit vectors at angles in
    # [0, pi/2] rank the same under cosine, dot, euclidean and manhattan, so the max is 5/6 too
    cosines, labels = [0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]
    rows = [{"sentence1": f"a{i}", "sentence2": f"b{i}", "label": y} for i, y in enumerate(labels)]
    vecs = {f"a{i}": [1.0, 0.0] for i in range(4)} | {f"b{i}": unit(c) for i, c in enumerate(cosines)}
    r = score(write_task(tmp_path, "pc", "pair_classification", {"test": rows}), VectorTable(vecs))
    assert r.main_score == "max_ap"
    assert_close(r.score, 5 / 6, EXACT, "max_ap")
    assert_close(r.scores["cosine_ap"], 5 / 6, EXACT, "cosine_ap")


def test_reranking_map_known_value(tmp_path):
    # q0 ranks P,N,P,N -> AP = (1 + 2/3)/2 = 5/6; q1 ranks N,P,N -> AP = 1/2; MAP = (5/6 + 1/2)/2 = 2/3
    rows = [{"query": "q0", "positive": ["p0a", "p0b"], "negative": ["n0a", "n0b"]},
            {"query": "q1", "positive": ["p1"], "negative": ["n1a", "n1b"]}]
    cos = {"p0a": 0.9, "n0a": 0.8, "p0b": 0.7, "n0b": 0.6, "n1a": 0.9, "p1": 0.5, "n1b": 0.2}
    vecs = {"q0": [1.0, 0.0], "q1": [1.0, 0.0]} | {t: unit(c) for t, c in cos.items()}
    table = VectorTable(vecs)
    r = score(write_task(tmp_path, "rr", "reranking", {"test": rows}), table)
    assert r.main_score == "map_at_1000"
    # mteb rounds retrieval-family scores to 5 decimals
    assert abs(r.score - 2 / 3) <= HALF_5TH + EXACT
    assert table.prompts["q0"] == "query" and table.prompts["p0a"] == "document"


def test_retrieval_ndcg_at_10_known_values(tmp_path):
    # every query embeds to e1, so all share one ranking: d0, d1, ..., d11 (decreasing cosine).
    # q1: d1 (gain 1) at rank 2 -> 1/log2(3)
    # q2: d0 (gain 2) rank 1, d2 (gain 1) rank 3 -> (2 + 1/log2(4)) / (2 + 1/log2(3))   (trec_eval: linear gain)
    # q3: d10 (gain 1) at rank 11 -> outside the top 10 -> 0
    corpus = [{"id": f"d{i}", "title": "", "text": f"doc{i}"} for i in range(12)]
    queries = [{"id": f"q{i}", "text": f"query{i}"} for i in (1, 2, 3)]
    qrels = [{"query_id": "q1", "doc_id": "d1", "relevance": 1},
             {"query_id": "q2", "doc_id": "d0", "relevance": 2}, {"query_id": "q2", "doc_id": "d2", "relevance": 1},
             {"query_id": "q3", "doc_id": "d10", "relevance": 1}]
    vecs = {f"query{i}": [1.0, 0.0] for i in (1, 2, 3)} | {f"doc{i}": unit(0.95 - 0.05 * i) for i in range(12)}
    spec = write_task(tmp_path, "ir", "retrieval", {}, corpus=corpus, queries=queries, qrels=qrels)
    table = VectorTable(vecs)
    r = score(spec, table)
    expected = (1 / math.log2(3) + (2 + 1 / math.log2(4)) / (2 + 1 / math.log2(3)) + 0.0) / 3
    assert r.main_score == "ndcg_at_10"
    # mteb rounds retrieval scores to 5 decimals
    assert abs(r.score - expected) <= HALF_5TH + EXACT
    assert table.prompts["query1"] == "query" and table.prompts["doc3"] == "document"


def _v_measure_by_hand(true, pred):
    """Rosenberg & Hirschberg (2007): harmonic mean of homogeneity and completeness, natural logs."""
    n = len(true)

    def entropy(xs):
        return -sum(c / n * math.log(c / n) for c in (xs.count(x) for x in set(xs)))

    def cond_entropy(a, b):  # H(a | b)
        return -sum(sum(1 for x, y in zip(a, b) if (x, y) == (u, v)) / n
                    * math.log(sum(1 for x, y in zip(a, b) if (x, y) == (u, v)) / sum(1 for y in b if y == v))
                    for u in set(a) for v in set(b) if any((x, y) == (u, v) for x, y in zip(a, b)))

    h = 1 - cond_entropy(true, pred) / entropy(true)
    c = 1 - cond_entropy(pred, true) / entropy(pred)
    return 2 * h * c / (h + c)


def test_clustering_v_measure_known_values(tmp_path):
    rng = np.random.default_rng(0)
    labels = ["x"] * 4 + ["y"] * 4 + ["z"] * 4
    rows = [{"text": f"t{i}", "label": y} for i, y in enumerate(labels)]
    spec = write_task(tmp_path, "cl", "clustering", {"test": rows})
    centers = {"x": [1, 0, 0], "y": [0, 1, 0], "z": [0, 0, 1]}
    tight = {f"t{i}": np.array(centers[y]) + 1e-3 * rng.standard_normal(3) for i, y in enumerate(labels)}
    assert_close(score(spec, VectorTable(tight)).score, 1.0, EXACT, "v-measure, separated")
    # every text the same vector: one cluster found, nothing explained -> 0
    assert_close(score(spec, VectorTable({f"t{i}": [1.0, 0, 0] for i in range(12)})).score, 0.0, EXACT, "one cluster")

    # labels a,a,b,b but the third text sits with the a's: k=2 can only split {t0,t1,t2} | {t3}
    rows = [{"text": f"u{i}", "label": y} for i, y in enumerate("aabb")]
    spec = write_task(tmp_path, "cl2", "clustering", {"test": rows})
    vecs = {"u0": [1, 0], "u1": [1, 0], "u2": [1, 0], "u3": [0, 1]}
    expected = _v_measure_by_hand(list("aabb"), [0, 0, 0, 1])
    assert abs(expected - 0.3437) <= 0.5e-4  # the hand formula itself, against the paper value (4 decimals)
    assert_close(score(spec, VectorTable(vecs)).score, expected, EXACT, "v-measure, one misplaced")


def test_classification_accuracy_known_values(tmp_path):
    rng = np.random.default_rng(0)
    train = [{"text": f"tr{i}", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    test = [{"text": f"te{i}", "label": "pos" if i % 2 else "neg"} for i in range(10)]
    spec = write_task(tmp_path, "clf", "classification", {"train": train, "test": test})
    where = {"pos": np.array([3.0, 0.0]), "neg": np.array([-3.0, 0.0])}
    vecs = {r["text"]: where[r["label"]] + 0.1 * rng.standard_normal(2) for r in train + test}
    r = score(spec, VectorTable(vecs))
    assert r.main_score == "accuracy" and r.score == 1.0  # 10 of 10: exact
    # test texts placed on the other class's side: every prediction wrong
    swapped = dict(vecs) | {r["text"]: -where[r["label"]] for r in test}
    assert score(spec, VectorTable(swapped)).score == 0.0  # 0 of 10: exact


def test_classification_refuses_scoring_train(tmp_path):
    rows = [{"text": f"t{i}", "label": str(i % 2)} for i in range(4)]
    spec = write_task(tmp_path, "clf", "classification", {"train": rows, "test": rows})
    with pytest.raises(ValueError, match="trains on 'train'"):
        score(spec, VectorTable({}), split="train")

"""Intervals (kvembed/evaluation/intervals.py): known answers, pairing, and the statistic = mteb's own score.

Known answers: the t interval of 1..5 is worked by hand; the bootstrap interval of a mean of n standard normal
draws must match the normal-theory interval mean +- 1.96 / sqrt(n) to within the bootstrap's own error (with
B = 1000 resamples the 2.5% quantile of the resampled mean has a standard error of about 3% of the half-width,
so 15% is five of them).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from kvembed.evaluation.intervals import interval, paired_interval, statistic, t_interval
from kvembed.evaluation.mteb_adapter import KVEmbeddingMTEB
from kvembed.evaluation.runners import evaluate_task
from tests.test_eval_metrics import write_task
from tests.tolerance import assert_close, drift

EXACT = drift(np.float64, terms=2000, depth=2)


def test_t_interval_worked_by_hand():
    iv = t_interval([1, 2, 3, 4, 5])
    # s = sqrt(2.5) = 1.58114, t_{0.975, 4} = 2.776445, half = 2.776445 * 1.58114 / sqrt(5) = 1.963243
    assert iv.point == 3.0 and abs((iv.hi - iv.lo) / 2 - 1.963243) < 1e-6
    assert abs(iv.lo - (3 - 1.963243)) < 1e-6 and abs(iv.hi - (3 + 1.963243)) < 1e-6


def test_bootstrap_of_a_mean_matches_the_normal_interval():
    rng = np.random.default_rng(3)
    n = 2000
    x = rng.standard_normal(n)
    iv = interval("retrieval", {"per_query": x.tolist()})
    want = 1.96 * x.std(ddof=1) / math.sqrt(n)
    assert abs(iv.point - x.mean()) < 1e-12
    half = (iv.hi - iv.lo) / 2
    assert abs(half - want) <= 0.15 * want, (half, want)
    assert iv.lo < iv.point < iv.hi


def test_paired_differences_cancel_shared_noise():
    rng = np.random.default_rng(4)
    a = rng.standard_normal(500)
    same = paired_interval("retrieval", {"per_query": a.tolist()}, {"per_query": a.tolist()})
    assert (same.point, same.lo, same.hi) == (0.0, 0.0, 0.0)
    shifted = paired_interval("retrieval", {"per_query": (a + 0.25).tolist()}, {"per_query": a.tolist()})
    assert_close([shifted.point, shifted.lo, shifted.hi], [0.25] * 3, EXACT, "a constant shift, paired")
    assert shifted.excludes_zero()
    # Unpaired, the same shift is buried in the spread of either mean.
    alone = interval("retrieval", {"per_query": a.tolist()})
    assert alone.hi - alone.lo > 10 * (shifted.hi - shifted.lo)
    # Classification pairs experiment by experiment.
    d = paired_interval("classification", {"per_experiment": [0.5, 0.6, 0.7]}, {"per_experiment": [0.4, 0.5, 0.6]})
    assert_close([d.point, d.lo, d.hi], [0.1, 0.1, 0.1], EXACT, "classification, constant gap")
    # Clustering pairs k-means seed by seed: the same restarts shifted by 0.1 are 0.1 apart, exactly.
    a_clu = {"cluster": [0, 0, 1, 1], "label": [0, 0, 1, 1], "per_restart": [1.0, 0.7, 0.9, 0.8]}
    b_clu = {"cluster": [0, 1, 0, 1], "label": [0, 0, 1, 1], "per_restart": [0.9, 0.6, 0.8, 0.7]}
    d = paired_interval("clustering", a_clu, b_clu)
    assert d.point == 1.0 and abs(d.lo - 0.1) < 1e-12 and abs(d.hi - 0.1) < 1e-12
    with pytest.raises(ValueError, match="different units"):
        paired_interval("sts", {"cosine": [0.1, 0.2], "gold": [1, 2]}, {"cosine": [0.1], "gold": [1]})


# ---------------------------------------------------------- the statistic on all units is mteb's own score


class RandomTable:
    """A fixed random vector per text (seeded by the text), as an embedder."""

    method = "random"
    fingerprint = "random-table"

    def encode(self, texts, prompt_name=None, **kwargs):
        out = []
        for t in texts:
            g = np.random.default_rng(zlib.crc32(t.encode()))  # stable across processes, unlike hash()
            out.append(g.standard_normal(8).astype(np.float32))
        return np.stack(out)


def tasks(root):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(400)]
    n = 60
    yield write_task(root, "sts", "sts", {"test": [
        {"sentence1": words[i], "sentence2": words[i + 100], "score": float(rng.uniform(0, 5))} for i in range(n)]})
    yield write_task(root, "pair", "pair_classification", {"test": [
        {"sentence1": words[i], "sentence2": words[i + 100], "label": int(rng.integers(0, 2))} for i in range(n)]})
    yield write_task(root, "clu", "clustering", {"test": [
        {"text": words[i], "label": f"c{i % 3}"} for i in range(n)]})
    yield write_task(root, "cls", "classification", {
        "train": [{"text": words[200 + i], "label": f"c{i % 3}"} for i in range(60)],
        "test": [{"text": words[i], "label": f"c{i % 3}"} for i in range(n)]})
    yield write_task(root, "rr", "reranking", {"test": [
        {"query": words[300 + i], "positive": [words[i]], "negative": [words[i + 1], words[i + 2]]} for i in range(20)]})
    corpus = [{"id": f"d{i}", "title": "", "text": words[i]} for i in range(40)]
    queries = [{"id": f"q{i}", "text": words[300 + i]} for i in range(15)]
    qrels = [{"query_id": f"q{i}", "doc_id": f"d{i}", "relevance": 1} for i in range(15)]
    yield write_task(root, "ret", "retrieval", {}, corpus=corpus, queries=queries, qrels=qrels)


def test_the_statistic_on_every_unit_is_mtebs_score(tmp_path):
    adapter = KVEmbeddingMTEB(RandomTable(), show_progress_bar=False)
    seen = set()
    for spec in tasks(tmp_path):
        r = evaluate_task(adapter, spec, "test")
        seen.add(r.type)
        # mteb rounds retrieval-type scores to 5 decimals; the rest is float64 on at most n items
        tol = 0.5e-5 if r.type in ("retrieval", "reranking") else EXACT
        assert abs(statistic(r.type, r.per_row) - r.score) <= tol, (r.type, statistic(r.type, r.per_row), r.score)
        assert r.interval["lo"] <= r.score <= r.interval["hi"], (r.type, r.interval)
        if r.type == "clustering":  # the restarts replay mteb's k-means: seed 42 is mteb's own run, exactly
            assert len(r.per_row["per_restart"]) == 50 and r.per_row["per_restart"][42] == r.score
    assert seen == {"sts", "pair_classification", "clustering", "classification", "reranking", "retrieval"}

"""95% intervals for every score, and for paired differences between two methods (docs/evaluation.md).

Each task type keeps, per row, what its score is computed from (`rows`, written to the results JSON so that
intervals can be recomputed without embedding anything again), and its interval is resampled over the unit
the score averages over:

    type                 rows (per unit)                                     unit resampled
    sts                  cosine of the pair, gold score                     pairs      (Spearman)
    pair_classification  the pair's score under each similarity, label      pairs      (max over similarities of AP)
    reranking            AP of the query's candidate list                   queries    (mean)
    retrieval            nDCG@10 of the query                               queries    (mean)
    clustering           V-measure of k-means under 50 seeds                k-means restarts (where 95% of runs land)
    classification       accuracy of each of mteb's 10 experiments          experiments (t interval)

Bootstrap: B resamples with replacement, the 2.5% and 97.5% percentiles of the statistic. Classification has
10 values only, so a t interval (mean +- t_{0.975, n-1} s / sqrt(n)) replaces the bootstrap. Clustering is not
bootstrapped over documents: a resample repeats documents, and a repeated document always agrees with itself,
which inflates V-measure (on Brown the whole bootstrap distribution lay above the estimate); its interval is the
2.5% and 97.5% percentiles of mteb's k-means re-run under 50 seeds on the same vectors, i.e. where one run lands.
A paired difference (method A - method B on the same task) resamples the *same* units for both, differences the
same experiments (mteb seeds its train subsets, so experiment i is the same draw for every method), or the same
k-means seeds: shared noise cancels, which is what makes a one-point difference measurable.

Every statistic here equals mteb's own number on the full sample (tests/test_eval_intervals.py checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_BOOT = 1000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    point: float
    lo: float
    hi: float

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0


# ------------------------------------------------------------------------------------ the statistics


def statistic(kind: str, rows: dict, idx: np.ndarray | None = None) -> float:
    """The task's main score on the units `idx` (all units when None), from its per-row data."""
    take = (lambda a: np.asarray(a)) if idx is None else (lambda a: np.asarray(a)[idx])
    if kind == "sts":
        from scipy.stats import spearmanr

        return float(spearmanr(take(rows["cosine"]), take(rows["gold"])).statistic)
    if kind == "pair_classification":
        from sklearn.metrics import average_precision_score

        labels = take(rows["label"])
        # mteb's max_ap: the best AP over its similarity functions (distances ranked the other way round)
        return max(float(average_precision_score(labels, -take(rows[name]) if name.endswith("_distances")
                                                 else take(rows[name])))
                   for name in SIMILARITIES if name in rows)
    if kind in ("reranking", "retrieval"):
        return float(np.mean(take(rows["per_query"])))
    if kind == "clustering":
        from sklearn.metrics import v_measure_score

        return float(v_measure_score(take(rows["label"]), take(rows["cluster"])))
    if kind == "classification":
        return float(np.mean(take(rows["per_experiment"])))
    raise ValueError(f"no statistic for task type {kind!r}")


# mteb's pair-classification scores (higher = more similar, except the *_distances)
SIMILARITIES = ("similarity_scores", "cosine_scores", "manhattan_distances", "euclidean_distances", "dot_scores")


def n_units(kind: str, rows: dict) -> int:
    key = {"sts": "gold", "pair_classification": "label", "reranking": "per_query", "retrieval": "per_query",
           "clustering": "label", "classification": "per_experiment"}[kind]
    return len(rows[key])


# ------------------------------------------------------------------------------------ the intervals


def t_interval(values, level: float = LEVEL) -> Interval:
    """mean +- t_{(1+level)/2, n-1} * s / sqrt(n) (s with n - 1 in the denominator)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    n, mean = len(v), float(v.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan)
    half = float(t.ppf((1 + level) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half)


def resamples(n: int, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """(n_boot, n) unit indices drawn with replacement; the same for every method, so resamples pair up."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile(point: float, draws: np.ndarray, level: float = LEVEL) -> Interval:
    draws = draws[np.isfinite(draws)]
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Interval(point, float(lo), float(hi))


def interval(kind: str, rows: dict, *, n_boot: int = N_BOOT, seed: int = SEED) -> Interval:
    """The 95% interval of one method's score on one task."""
    if kind == "classification":
        return t_interval(rows["per_experiment"])
    if kind == "clustering":
        return percentile(statistic(kind, rows), np.asarray(rows["per_restart"]))
    draws = np.array([statistic(kind, rows, idx) for idx in resamples(n_units(kind, rows), n_boot, seed)])
    return percentile(statistic(kind, rows), draws)


def paired_interval(kind: str, rows_a: dict, rows_b: dict, *, n_boot: int = N_BOOT, seed: int = SEED) -> Interval:
    """The 95% interval of score(A) - score(B) on the same task, resampling the same units for both."""
    n = n_units(kind, rows_a)
    if n != n_units(kind, rows_b):
        raise ValueError(f"paired {kind}: the two methods were scored on different units ({n} vs "
                         f"{n_units(kind, rows_b)}); run both on the same rows")
    if kind == "classification":
        return t_interval(np.asarray(rows_a["per_experiment"]) - np.asarray(rows_b["per_experiment"]))
    if kind == "clustering":
        return percentile(statistic(kind, rows_a) - statistic(kind, rows_b),
                          np.asarray(rows_a["per_restart"]) - np.asarray(rows_b["per_restart"]))
    draws = np.array([statistic(kind, rows_a, idx) - statistic(kind, rows_b, idx)
                      for idx in resamples(n, n_boot, seed)])
    return percentile(statistic(kind, rows_a) - statistic(kind, rows_b), draws)

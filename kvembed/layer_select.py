"""Automatic layer selection by intrinsic dimensionality (SPEC §1.4): TwoNN and the ID window.

Notation: N texts (points), L decoder layers, C residual width. `states` is (N, L, C): the final-token
hidden state of every prompted text at the output of every layer of the plain (unmodified) model.

    ids[l]  = TwoNN(states[:, l])                        one intrinsic dimension per layer
    skip    = floor(0.2 L)                               early layers are never chosen
    m       = skip + argmin(ids[skip:])                  ties -> the earliest layer
    layers  = m .. min(L - 1, m + max(1, floor(L / 10)))

The selection is a pure function of (model weights, corpus, N, seed, template, max_length); it is
cached on disk as JSON under that key, and `format_curve` prints the curve so a user sees why.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

# SPEC §1.1 default document template (also the one for symmetric tasks); kvembed.method owns the live copy.
DOCUMENT_TEMPLATE = '"Context: {text}" Compress the Context in one word:'
SKIP_FRACTION = 0.2  # floor(0.2 L) early layers are skipped
FIT_FRACTION_NUM, FIT_FRACTION_DEN = 9, 10  # TwoNN fits on the smallest 90% of mu
CACHE_VERSION = 1  # bump when anything that changes a cached result changes
SHIPPED = Path(__file__).parent / "data" / "smollm2_135m_layers.json"


# ----------------------------------------------------------------------------------------------- TwoNN


def nearest_two(points: np.ndarray, chunk: int = 128, n_candidates: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 distances (r1, r2) from each row to its first and second nearest other row.

    Two stages, so that N=1000 x C=4096 stays fast (BLAS) and memory bounded (`chunk` rows at a time):
    the Gram trick |x|^2 + |y|^2 - 2 x.y ranks the neighbours, then the `n_candidates` best are re-measured
    by direct differencing. The Gram form cancels catastrophically when a distance is tiny next to the norms
    (it can return 1e-8 for a duplicate, or a negative number), which would corrupt exactly the small r1
    that TwoNN divides by; differencing is exact (0 for duplicates). Ranking errors from the Gram stage are
    ~1e-16 * |x|^2, far below any gap between the 2nd and the 9th neighbour. Rows are centred by the caller
    (`twonn`) so that |x|^2, and hence that error, is as small as possible.
    """
    x = np.ascontiguousarray(points, dtype=np.float64)
    n = len(x)
    k = min(n - 1, n_candidates)
    sq = np.einsum("nc,nc->n", x, x)  # (N,)
    r = np.empty((n, 2))
    for s in range(0, n, chunk):
        xb = x[s : s + chunk]  # (b, C)
        b = len(xb)
        d2 = sq[s : s + b, None] + sq[None, :] - 2.0 * (xb @ x.T)  # (b, N), approximate squared distances
        d2[np.arange(b), np.arange(s, s + b)] = np.inf  # a point is never its own neighbour (by index, not value)
        cand = np.argpartition(d2, k - 1, axis=1)[:, :k]  # (b, k) unordered k nearest
        exact = np.sqrt(((xb[:, None, :] - x[cand]) ** 2).sum(-1))  # (b, k, C) -> (b, k)
        exact.sort(axis=1)
        r[s : s + b] = exact[:, :2]
    return r[:, 0], r[:, 1]


def twonn(points: np.ndarray) -> float:
    """Intrinsic dimension of a point cloud (N, C) by TwoNN (Facco et al., Sci. Rep. 2017), as SPEC §1.4.

    Convention (that of the Facco group's own code, DADApy `compute_id_2NN`): after dropping points with
    r1 = 0, n is the number of points left; mu = r2 / r1 sorted ascending; F_i = i / n for i = 1..n (so the
    largest kept F is 0.9 and -log(1 - F) stays finite); the slope through the origin of -log(1 - F_i)
    against log(mu_i) is fitted by least squares on the first floor(0.9 n) of them. (scikit-dimension uses
    i = 0..n-1 instead; at n = 1000 the two differ by well under 1%.)
    """
    x = np.asarray(points)
    if x.ndim != 2:
        raise ValueError(f"twonn: points must be 2-D (N, C), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("twonn: points contain NaN or inf; check the model's hidden states (dtype overflow?)")
    x = x.astype(np.float64)
    n_distinct = len(np.unique(x, axis=0)) if len(x) >= 3 else len(x)
    if n_distinct < 3:
        raise ValueError(
            f"twonn: need at least 3 distinct points, got {n_distinct} distinct of {len(x)}; "
            "use a larger or more varied corpus"
        )
    r1, r2 = nearest_two(x - x.mean(0))
    keep = r1 > 0  # duplicates: mu is undefined
    mu = np.sort(r2[keep] / r1[keep])
    n = len(mu)
    n_fit = n * FIT_FRACTION_NUM // FIT_FRACTION_DEN
    log_mu = np.log(mu[:n_fit])
    y = -np.log1p(-np.arange(1, n_fit + 1) / n)
    denom = float(log_mu @ log_mu)
    if n_fit < 1 or denom == 0.0:
        raise ValueError(
            f"twonn: the fit is degenerate ({n} points after dropping duplicates, {n_fit} fitted, "
            "all with mu = r2/r1 = 1); use more points"
        )
    return float(log_mu @ y / denom)


def id_curve(points_per_layer: np.ndarray | Sequence[np.ndarray]) -> list[float]:
    """TwoNN of every layer: `points_per_layer` is (N, L, C) as `collect_final_token_states` returns, or a
    sequence of L arrays (N, C)."""
    if isinstance(points_per_layer, np.ndarray):
        if points_per_layer.ndim != 3:
            raise ValueError(f"id_curve: expected an (N, L, C) array, got shape {points_per_layer.shape}")
        layers = [points_per_layer[:, l] for l in range(points_per_layer.shape[1])]
    else:
        layers = list(points_per_layer)
    return [twonn(p) for p in layers]


# ------------------------------------------------------------------------------------------ the window


def window_rule(ids: Sequence[float], n_layers: int) -> tuple[int, int, list[int]]:
    """(skip, m, layers) of SPEC §1.4; `select_window` returns only the layers."""
    if len(ids) != n_layers or n_layers < 1:
        raise ValueError(f"select_window: got {len(ids)} ids for n_layers={n_layers}; need one ID per layer")
    ids = np.asarray(ids, dtype=np.float64)
    skip = int(SKIP_FRACTION * n_layers + 1e-9)  # floor(0.2 L); the epsilon guards 0.2*L just under an integer
    rest = ids[skip:]
    if not np.all(np.isfinite(rest)):
        bad = [skip + i for i in np.flatnonzero(~np.isfinite(rest))]
        raise ValueError(f"select_window: ID of layer(s) {bad} is not finite; cannot pick a minimum")
    m = skip + int(np.argmin(rest))  # np.argmin returns the first of equal minima
    width = max(1, n_layers // 10)
    return skip, m, list(range(m, min(n_layers - 1, m + width) + 1))


def select_window(ids: Sequence[float], n_layers: int) -> list[int]:
    """The selected layers: m .. min(L-1, m + max(1, floor(L/10))), m = argmin of ids after skipping floor(0.2 L)."""
    return window_rule(ids, n_layers)[2]


# ------------------------------------------------------------------------------------- model states


def _tokenize_batch(tokenizer, texts, template, max_length):
    from kvembed.method import tokenize_batch

    return tokenize_batch(tokenizer, texts, template, max_length)


@torch.no_grad()
def collect_final_token_states(model, tokenizer, texts: Sequence[str], template: str | None = DOCUMENT_TEMPLATE,
                               batch_size: int = 32, max_length: int = 512) -> np.ndarray:
    """(N, L, C) float32: `layer_outputs[l][b, last[b]]` of the plain model for every prompted text, in input order.

    Texts are batched in order of length (less padding; batch composition never changes a row, SPEC §1
    right padding), then put back in input order.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("collect_final_token_states: no texts")
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: np.ndarray | None = None
    for s in range(0, len(texts), batch_size):
        idx = order[s : s + batch_size]
        enc = _tokenize_batch(tokenizer, [texts[i] for i in idx], template, max_length)
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        res = model(ids, mask, output_hidden_states=True)
        last = mask.sum(-1) - 1  # (B,) index of the final real token under right padding
        rows = torch.arange(len(idx), device=device)
        h = torch.stack([lo[rows, last] for lo in res.layer_outputs], dim=1)  # L x (B, C) -> (B, L, C)
        if out is None:
            out = np.empty((len(texts), h.shape[1], h.shape[2]), dtype=np.float32)
        out[idx] = h.float().cpu().numpy()
    return out

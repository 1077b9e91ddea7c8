"""Automatic layer selection by intrinsic dimensionality (SPEC §1.4): TwoNN and the ID window.

Notation: N texts (points), L decoder layers, C residual width. `states` is (N, L, C): the final-token
hidden state of every prompted text at the output of every layer of the plain (unmodified) model.

    ids[l]  = TwoNN(states[:, l])                        one intrinsic dimension per layer
    skip    = floor(0.2 L)                               early layers are never chosen
    m       = skip + argmin(ids[skip:])                  ties -> the earliest layer
    layers  = m .. min(L - 1, m + max(1, floor(L / 10)))

The selection is a pure function of (model weights, corpus, N, seed, template, max_length), computed here
from tensors and texts only; kvembed/selections.py caches it on disk and holds the shipped ones, and
`format_curve` renders the curve so that a user sees why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Sequence

import numpy as np
import torch

# SPEC §1.4 runs the texts in the document prompt.
from kvembed.method import DOCUMENT_TEMPLATE, check_template, tokenize_batch

SKIP_FRACTION = 0.2  # floor(0.2 L) early layers are skipped
FIT_FRACTION_NUM, FIT_FRACTION_DEN = 9, 10  # TwoNN fits on the smallest 90% of mu


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
    # One copy of each point: a duplicate has r1 = 0 (mu undefined), and a point that kept its duplicates as
    # neighbours would see r1 = r2 and mu = 1 for *other* points too, biasing the fit upward.
    x = np.unique(x.astype(np.float64), axis=0)
    if len(x) < 3:
        raise ValueError(f"twonn: need at least 3 distinct points, got {len(x)}; use a larger or more varied corpus")
    r1, r2 = nearest_two(x - x.mean(0))
    mu = np.sort(r2 / r1)
    n = len(mu)
    n_fit = n * FIT_FRACTION_NUM // FIT_FRACTION_DEN
    log_mu = np.log(mu[:n_fit])
    y = -np.log1p(-np.arange(1, n_fit + 1) / n)
    denom = float(log_mu @ log_mu)
    if denom == 0.0:  # n >= 3, so n_fit >= 2
        raise ValueError(f"twonn: the fit is degenerate ({n} points after dropping duplicates, {n_fit} fitted, "
                         "all with mu = r2/r1 = 1); use more points")
    return float(log_mu @ y / denom)


def id_curve(states: np.ndarray) -> list[float]:
    """TwoNN of every layer: `states` is (N, L, C) as `collect_final_token_states` returns."""
    if states.ndim != 3:
        raise ValueError(f"id_curve: expected an (N, L, C) array, got shape {states.shape}")
    return [twonn(states[:, l]) for l in range(states.shape[1])]


# ------------------------------------------------------------------------------------------ the window


def window_rule(ids: Sequence[float], n_layers: int) -> tuple[int, int, list[int]]:
    """(skip, m, layers) of SPEC §1.4, as in the module docstring: the selected layers are the third."""
    if len(ids) != n_layers or n_layers < 1:
        raise ValueError(f"window_rule: got {len(ids)} ids for n_layers={n_layers}; need one ID per layer")
    ids = np.asarray(ids, dtype=np.float64)
    skip = int(SKIP_FRACTION * n_layers + 1e-9)  # floor(0.2 L); the epsilon guards 0.2*L just under an integer
    rest = ids[skip:]
    if not np.all(np.isfinite(rest)):
        bad = [skip + int(i) for i in np.flatnonzero(~np.isfinite(rest))]
        raise ValueError(f"window_rule: ID of layer(s) {bad} is not finite; cannot pick a minimum")
    m = skip + int(np.argmin(rest))  # np.argmin returns the first of equal minima
    width = max(1, n_layers // 10)
    return skip, m, list(range(m, min(n_layers - 1, m + width) + 1))


# ------------------------------------------------------------------------------------- model states


@torch.no_grad()
def collect_final_token_states(model, tokenizer, texts: Sequence[str], template: str = DOCUMENT_TEMPLATE,
                               batch_size: int = 32, max_length: int = 512) -> np.ndarray:
    """(N, L, C) float32: `layer_outputs[l][b, last[b]]` of the plain model for every prompted text, in input order.

    Texts are batched in order of length (less padding; batch composition never changes a row, SPEC §1
    right padding), then put back in input order.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("collect_final_token_states: no texts")
    check_template(template)
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: np.ndarray | None = None
    for s in range(0, len(texts), batch_size):
        idx = order[s : s + batch_size]
        batch = tokenize_batch(tokenizer, [texts[i] for i in idx], template, max_length, device)
        res = model(batch.input_ids, batch.attention_mask, output_hidden_states=True)
        last = batch.last  # (B,) attention_mask.sum(-1) - 1: the final real token under right padding
        rows = torch.arange(len(idx), device=device)
        h = torch.stack([lo[rows, last] for lo in res.layer_outputs], dim=1)  # L x (B, C) -> (B, L, C)
        if out is None:
            out = np.empty((len(texts), h.shape[1], h.shape[2]), dtype=np.float32)
        out[idx] = h.float().cpu().numpy()
    return out


# ------------------------------------------------------------------------------------ the selection


@dataclasses.dataclass(frozen=True)
class LayerSelection:
    # Selected layers, ascending (0-based).
    layers: list[int]
    # TwoNN intrinsic dimension of the final-token states at the output of each layer; length L.
    ids: list[float]
    # floor(0.2 L): layers 0..skip-1 were not candidates.
    skip: int
    # The layer of minimum ID after the skip; layers[0].
    m: int
    # Texts actually used: min(N, corpus size).
    n_texts: int
    # sha256 of the whole corpus the sample was drawn from (see `corpus_sha256`).
    corpus_sha256: str
    # Seed of the sample.
    seed: int
    # Identity of the model weights (LoadedModel.fingerprint); None when the caller gave none.
    fingerprint: str | None
    # Prompt template the texts were wrapped in (RAW_TEMPLATE "{text}": raw text).
    template: str = DOCUMENT_TEMPLATE
    # Token budget per text (the text is cut, never the instruction).
    max_length: int = 512

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSelection":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(d) - {"template", "max_length"}
        if missing:
            raise ValueError(f"layer selection record lacks {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def corpus_sha256(texts: Sequence[str]) -> str:
    """sha256 of the corpus as a compact UTF-8 JSON list: unambiguous for texts with newlines, order-sensitive."""
    blob = json.dumps(list(texts), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def sample_texts(texts: Sequence[str], n: int, seed: int) -> list[str]:
    """n texts drawn without replacement by numpy's PCG64 with `seed`, kept in corpus order; all if fewer."""
    if len(texts) <= n:
        return list(texts)
    idx = np.sort(np.random.default_rng(seed).choice(len(texts), size=n, replace=False))
    return [texts[i] for i in idx]


def select_layers(model, tokenizer, texts: Sequence[str], *, n: int = 1000, seed: int = 0,
                  template: str = DOCUMENT_TEMPLATE, fingerprint: str | None = None, batch_size: int = 32,
                  max_length: int = 512) -> LayerSelection:
    """SPEC §1.4 on `texts`: sample N (seeded), run the plain model, TwoNN per layer, the window."""
    texts = list(texts)
    if n < 3:
        raise ValueError(f"select_layers: n={n}; TwoNN needs at least 3 texts (SPEC default 1000)")
    if len(texts) < 3:
        raise ValueError(f"select_layers: the corpus has {len(texts)} texts; TwoNN needs at least 3")
    states = collect_final_token_states(model, tokenizer, sample_texts(texts, n, seed), template, batch_size, max_length)
    ids = id_curve(states)
    skip, m, layers = window_rule(ids, len(ids))
    return LayerSelection(layers=layers, ids=ids, skip=skip, m=m, n_texts=min(n, len(texts)),
                          corpus_sha256=corpus_sha256(texts), seed=seed, fingerprint=fingerprint, template=template,
                          max_length=max_length)


def format_curve(selection: LayerSelection, width: int = 40) -> str:
    """The per-layer ID as a text bar chart, marking the skipped layers, the minimum and the window."""
    ids, chosen = selection.ids, set(selection.layers)
    top = max(max(ids), 1e-12)
    lines = [
        f"intrinsic dimension (TwoNN) of the final-token state after each layer, {selection.n_texts} texts, "
        f"seed {selection.seed}",
        f"skip the first {selection.skip} of {len(ids)} layers; minimum at layer {selection.m}; "
        f"selected layers {selection.layers}",
    ]
    for l, v in enumerate(ids):
        bar = "#" * max(1, round(width * v / top))
        mark = "skipped" if l < selection.skip else ""
        if l in chosen:
            mark = "<- selected (minimum)" if l == selection.m else "<- selected"
        lines.append(f"{l:5d} {v:8.2f}  {bar:<{width}}  {mark}".rstrip())
    return "\n".join(lines)

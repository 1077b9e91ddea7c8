"""One rule for every numeric comparison in the tests: how far two floating-point routes to the same number may
drift apart, derived from the computation, not tuned to a machine.

Two implementations of the same math in the same dtype (SDPA vs an explicit softmax, a batch vs one row at a
time, ours vs transformers) differ only in the order of their roundings. Summing n terms in another order
moves the result by at most about lambda * sqrt(n) * u times the sum of the terms' magnitudes, with
probability at least 1 - 2 exp(-lambda^2 / 2) per sum (Higham & Mary, "A new approach to probabilistic
rounding error analysis", SIAM J. Sci. Comput. 2019); u is the dtype's unit roundoff. lambda = 6 makes a
false alarm rarer than one in 10^7 per sum. A network adds one such step per layer (depth), and its
normalisations can amplify a difference by a bounded factor (`gain`, stated by the caller where it is more
than 1: RMSNorm divides by the row's RMS, softmax by its row sum).

The bound is relative to the *magnitude of the values compared* (the largest |want|), not element by
element: an element near zero carries the absolute error of its neighbours, and an elementwise rtol turns
that into a false failure (it did: batched vs one-by-one states, 1 element of 1536 off by 1.34e-5).

    tol = drift(torch.float32, terms=C, depth=L)          # a relative bound
    assert_close(got, want, tol, "layer outputs")          # |got - want|max <= tol * |want|max
    assert_differ(a, b, tol, "re-routing changes it")     # the change a sameness check guards against

A decoder's longest sum is over C, the MLP width, the concatenated heads or the T keys of a softmax, one such
step per layer: `decoder_drift(args, T)` spells that once. Bit-for-bit claims (world sizes, reruns,
determinism) are not tolerances: they compare with ==.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Unit roundoff u = 2^-(mantissa bits + 1) of each dtype.
UNIT_ROUNDOFF = {
    torch.float64: 2.0 ** -53,
    torch.float32: 2.0 ** -24,
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
}
LAMBDA = 6.0
# How far a "these differ" check must sit above the sameness bound it backs: the effect a sameness check
# guards against (re-routing, a layer more, a bias) must dwarf rounding, or a broken variant could pass it.
MARGIN = 100.0


def unit_roundoff(dtype) -> float:
    if isinstance(dtype, np.dtype) or dtype in (np.float32, np.float64):
        dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]
    return UNIT_ROUNDOFF[dtype]


def drift(dtype, terms: int, depth: int = 1, gain: float = 1.0) -> float:
    """Relative bound on the difference between two orderings of the same computation.

    terms  the length of the longest reduction (a dot product over D or C, a softmax over T keys, ...)
    depth  how many such reductions feed one another (layers of a network)
    gain   how much normalisations downstream may amplify a difference (1 when none)
    """
    return LAMBDA * math.sqrt(terms) * unit_roundoff(dtype) * depth * gain


def decoder_drift(args, tokens: int, layers: int | None = None, dtype=torch.float32, gain: float = 1.0) -> float:
    """drift() through `layers` (default: all) layers of the decoder `args` (a ModelArgs) on rows of <= `tokens`."""
    terms = max(args.hidden_size, args.intermediate_size, args.num_attention_heads * args.head_dim, tokens)
    return drift(dtype, terms, args.num_hidden_layers if layers is None else layers, gain)


def norm_gain(x) -> float:
    """`gain` of a per-row normalisation (a final RMSNorm) applied to `x` (..., C): it divides each row by its RMS,
    which raises a quiet row's error, measured against the loudest row, by the ratio of the two RMS."""
    rms = _f64(x).pow(2).mean(-1).sqrt()
    return (rms.max() / rms.min()).item()


def _f64(x) -> torch.Tensor:
    # np.array copies: reversed views and read-only buffers (np.load, torch outputs) convert cleanly.
    return x.detach().cpu().double() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float64))


def max_rel_err(got, want) -> float:
    """max |got - want| / max |want|, in float64."""
    g, w = _f64(got), _f64(want)
    scale = w.abs().max().item()
    return (g - w).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close(got, want, tol: float, what: str = "") -> None:
    """|got - want|max <= tol * |want|max, with the measured error in the message."""
    assert tuple(np.shape(got)) == tuple(np.shape(want)), f"{what}: shape {np.shape(got)} != {np.shape(want)}"
    err = max_rel_err(got, want)
    assert err <= tol, f"{what}: max relative error {err:.3g} > bound {tol:.3g}"


def assert_differ(a, b, tol: float, what: str = "", margin: float = MARGIN) -> None:
    """|a - b|max > margin * tol * |b|max: the change a sameness check at `tol` guards against stands far above
    rounding, so that check can fail."""
    err = max_rel_err(a, b)
    assert err > margin * tol, f"{what}: max relative difference {err:.3g} <= {margin:g} x bound {tol:.3g}"

"""The prefix-attention routine: fast path (one SDPA call) vs its fp32 reference twin, and its invariants.

Tolerance 1e-5 relative in fp32: SDPA and the explicit softmax reorder the same sums (see test_model_parity).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvembed.model import Prefix, attention, attention_reference, build_mask

RTOL = 1e-5


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def inputs(B=3, Hq=4, Hkv=2, T=9, D=16, P=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    lengths = torch.tensor([T, 5, 1][:B])
    am = (torch.arange(T)[None] < lengths[:, None]).long()  # right padding, one row of length 1
    prefix = Prefix(torch.randn(B, Hkv, P, D, generator=g), torch.randn(B, Hkv, P, D, generator=g),
                    torch.full((1, 1, 1, P), 1.0))
    return q, k, v, am, prefix


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 4), (8, 1)])  # GQA, MHA, MQA
@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_fast_equals_reference(Hq, Hkv, with_prefix, window):
    q, k, v, am, prefix = inputs(Hq=Hq, Hkv=Hkv)
    mask = build_mask(am, q.dtype, window=window)
    p = prefix if with_prefix else None
    got, want = attention(q, k, v, mask, p), attention_reference(q, k, v, mask, p)
    real = am.bool()
    assert rel(got.transpose(1, 2)[real], want.transpose(1, 2)[real]) < RTOL


def test_per_head_per_row_prefix_mask():
    """unrotated mode puts a (B, Hq, T, 1) logit in the prefix column: fast and reference must agree."""
    q, k, v, am, prefix = inputs()
    prefix.mask = torch.randn(3, 4, 9, 1)
    mask = build_mask(am, q.dtype)
    assert rel(attention(q, k, v, mask, prefix), attention_reference(q, k, v, mask, prefix)) < RTOL


def test_no_prefix_is_plain_causal_sdpa():
    q, k, v, am, _ = inputs(B=1, Hq=4, Hkv=4)
    am[:] = 1
    got = attention(q, k, v, build_mask(am, q.dtype))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel(got, want) < RTOL


@pytest.mark.parametrize("fn", [attention, attention_reference])
def test_prefix_with_bias_minus_inf_is_no_prefix(fn):
    q, k, v, am, prefix = inputs()
    mask = build_mask(am, q.dtype)
    prefix.mask = torch.full((1, 1, 1, 1), float("-inf"))
    real = am.bool()
    got, want = fn(q, k, v, mask, prefix), fn(q, k, v, mask)
    assert rel(got.transpose(1, 2)[real], want.transpose(1, 2)[real]) < RTOL


def test_prefix_changes_every_real_row():
    """Slot 0 is visible to every real query row, the first token included (SPEC §1.2)."""
    q, k, v, am, prefix = inputs()
    mask = build_mask(am, q.dtype)
    with_p, without = attention(q, k, v, mask, prefix), attention(q, k, v, mask)
    diff = (with_p - without).abs().amax(dim=(1, 3))  # (B, T)
    assert (diff[am.bool()] > 1e-4).all()


def test_bias_adds_to_the_prefix_logit():
    """A bias b multiplies the prefix slot's unnormalised weight by e^b: check on a single query, single key."""
    q = torch.randn(1, 1, 1, 4)
    k, v = torch.randn(1, 1, 1, 4), torch.zeros(1, 1, 1, 4)
    pk, pv = torch.randn(1, 1, 1, 4), torch.ones(1, 1, 1, 4)
    am = torch.ones(1, 1, dtype=torch.long)
    for b in (0.0, 1.0, 2.5):
        out = attention(q, k, v, build_mask(am, q.dtype), Prefix(pk, pv, torch.full((1, 1, 1, 1), b)))
        s0 = (q @ pk.transpose(-1, -2)).item() / 2 + b  # 1/sqrt(D) = 1/2
        s1 = (q @ k.transpose(-1, -2)).item() / 2
        w0 = torch.softmax(torch.tensor([s0, s1]), 0)[0]
        assert abs(out[0, 0, 0, 0].item() - w0.item()) < 1e-6


def test_bf16_fast_path_close_to_reference():
    q, k, v, am, prefix = inputs()
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    prefix = Prefix(prefix.k.bfloat16(), prefix.v.bfloat16(), prefix.mask)
    mask = build_mask(am, q.dtype)
    real = am.bool()
    got, want = attention(q, k, v, mask, prefix), attention_reference(q, k, v, mask, prefix)
    # bf16 output rounding alone is 3.9e-3 relative; allow a few ulps.
    assert rel(got.transpose(1, 2)[real], want.transpose(1, 2)[real]) < 2e-2

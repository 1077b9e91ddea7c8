"""The attention routine: every fast path (one SDPA call, no dense mask) against its fp32 reference twin.

Cases: GQA / MHA / MQA; right-padded rows (lengths T, 5, 1); causal and bidirectional; a window shorter than T;
no prefix, a prefix with a bias (rotated / position0: one shared key), and a per-row prefix logit (unrotated:
the q2 . k2 pair); bias -inf. Every row is compared, pads included: they must be finite and equal to the
reference's definition, since a NaN there would reach real rows through the next layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvembed.model import Prefix, attention, attention_reference, visible
from tests.tolerance import assert_close, assert_differ, drift

D = 16
# SDPA (flash, blocked online softmax) vs an explicit fp32 softmax: reordered sums over D channels and over the
# T + 1 keys of the softmax and of the value average; one level, no normalisation downstream.
TOL = drift(torch.float32, terms=D + 10)


def inputs(B=3, Hq=4, Hkv=2, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    lengths = torch.tensor([T, 5, 1][:B])
    am = (torch.arange(T)[None] < lengths[:, None]).long()  # right padding, one row of length 1
    return q, k, v, am, g


def make_prefix(kind: str, q, k, g, bias=1.0):
    B, Hkv = k.shape[:2]
    pk, pv = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
    if kind == "none":
        return None
    if kind == "shared":  # rotated / position0: one key for every row
        return Prefix(pk, pv, bias)
    # unrotated: zero key, the logit from a second (pre-RoPE) query/key pair
    return Prefix(torch.zeros_like(pk), pv, bias, q2=torch.randn(q.shape, generator=g), k2=pk)


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 4), (8, 1)])  # GQA, MHA, MQA
@pytest.mark.parametrize("kind", ["none", "shared", "per_row"])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (True, 9), (False, None), (False, 4)])
def test_fast_equals_reference_on_every_row(Hq, Hkv, kind, causal, window):
    q, k, v, am, g = inputs(Hq=Hq, Hkv=Hkv)
    prefix = make_prefix(kind, q, k, g)
    kw = dict(causal=causal, window=window, key_padding=am, prefix=prefix)
    got, want = attention(q, k, v, **kw), attention_reference(q, k, v, **kw)
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    assert_close(got, want, TOL, f"Hq={Hq} Hkv={Hkv} {kind} causal={causal} window={window}")


def test_the_hot_path_builds_no_mask():
    """Causal, no window shorter than T: no mask at all, with or without the prefix (is_causal does it)."""
    am = torch.ones(2, 9, dtype=torch.long)
    assert visible(9, "cpu", causal=True) is None
    assert visible(9, "cpu", causal=True, key_padding=am, prefix=True) is None  # padding needs no mask
    assert visible(9, "cpu", causal=True, window=9, prefix=True) is None  # a window >= T is no window
    m = visible(9, "cpu", causal=True, window=3)
    assert m.dtype == torch.bool and m.shape == (1, 1, 9, 9)
    m = visible(9, "cpu", causal=False, key_padding=am, prefix=True)
    assert m.dtype == torch.bool and m.shape == (2, 1, 10, 10) and m[..., 0].all()


def test_no_prefix_is_plain_causal_sdpa():
    q, k, v, _, _ = inputs(B=1, Hq=4, Hkv=4)
    got = attention(q, k, v)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(got, want)  # the same kernel call: bit for bit


@pytest.mark.parametrize("kind", ["shared", "per_row"])
@pytest.mark.parametrize("fn", [attention, attention_reference])
def test_bias_minus_inf_is_no_prefix(fn, kind):
    q, k, v, am, g = inputs()
    prefix = make_prefix(kind, q, k, g, bias=float("-inf"))
    got, want = fn(q, k, v, prefix=prefix), fn(q, k, v)
    assert_close(got, want, TOL, f"{fn.__name__} {kind}")


def test_prefix_changes_every_real_row():
    """Slot 0 is visible to every real query row, the first token included (SPEC §1.2)."""
    q, k, v, am, g = inputs()
    prefix = make_prefix("shared", q, k, g)
    diff = (attention(q, k, v, prefix=prefix) - attention(q, k, v)).abs().amax(dim=(1, 3))  # (B, T)
    assert (diff[am.bool()] > 100 * TOL).all()


def test_bias_adds_to_the_prefix_logit():
    """A bias b multiplies the slot's unnormalised weight by e^b: one query, one real key, worked by hand."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 4, generator=g), torch.randn(1, 1, 1, 4, generator=g)
    pk = torch.randn(1, 1, 1, 4, generator=g)
    v, pv = torch.zeros(1, 1, 1, 4), torch.ones(1, 1, 1, 4)
    for b in (0.0, 1.0, 2.5):
        out = attention(q, k, v, prefix=Prefix(pk, pv, b))
        s0 = (q @ pk.transpose(-1, -2)).item() / 2 + b  # 1/sqrt(D) = 1/2
        s1 = (q @ k.transpose(-1, -2)).item() / 2
        w0 = torch.softmax(torch.tensor([s0, s1], dtype=torch.float64), 0)[0].item()
        # the output is the slot's weight itself (values 1 and 0); a 2-term softmax in fp32
        assert abs(out[0, 0, 0, 0].item() - w0) <= drift(torch.float32, terms=4)


@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 3, 20])
def test_a_shared_past_is_the_same_tokens_at_the_head_of_every_row(Hq, Hkv, window):
    """`past` (S tokens, one row, shared by all) against the reference twin, and against the definition: plain
    causal attention over [past; row], rows S.. . Windows shorter and longer than S + T."""
    q, k, v, am, g = inputs(Hq=Hq, Hkv=Hkv)
    B, S = q.shape[0], 4
    pq, pk, pv = (torch.randn(1, h, S, D, generator=g) for h in (Hq, Hkv, Hkv))
    got = attention(q, k, v, window=window, past=(pk, pv))
    # the softmax now runs over up to S + T keys
    tol = drift(torch.float32, terms=D + S + q.shape[2])
    assert_close(got, attention_reference(q, k, v, window=window, past=(pk, pv)), tol, "past vs reference")
    whole = attention_reference(*(torch.cat((p.expand(B, -1, -1, -1), t), dim=2) for p, t in
                                  zip((pq, pk, pv), (q, k, v))), window=window)  # (B, Hq, S + T, D)
    assert_close(got, whole[:, :, S:], tol, "past vs the whole sequence")
    assert_differ(got, attention(q, k, v, window=window), tol, "the past is read")


def test_a_shared_past_refuses_a_slot_and_bidirectional_attention():
    q, k, v, am, g = inputs()
    past = (k[:1, :, :2], v[:1, :, :2])
    with pytest.raises(ValueError, match="shared past goes with causal attention"):
        attention(q, k, v, causal=False, past=past)
    with pytest.raises(ValueError, match="shared past goes with causal attention"):
        attention(q, k, v, prefix=make_prefix("shared", q, k, g), past=past)


def test_bf16_fast_path_close_to_reference():
    q, k, v, am, g = inputs()
    prefix = make_prefix("per_row", q, k, g)
    bf = Prefix(prefix.k.bfloat16(), prefix.v.bfloat16(), prefix.bias, prefix.q2.bfloat16(), prefix.k2.bfloat16())
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), prefix=bf)
    want = attention_reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), prefix=bf)
    # The reference computes in fp32 from the same bf16 inputs; the fused kernel rounds its logits, weights and
    # output to bf16: the same reordered sums at bf16's unit roundoff.
    assert_close(got.float(), want.float(), drift(torch.bfloat16, terms=D + 10), "bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["none", "shared", "per_row"])
def test_cuda_bf16_runs_on_a_fused_kernel(kind):
    """On CUDA every call must run on a fused backend: the math kernel is excluded and the call must succeed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, am, g = inputs(B=2, Hq=8, Hkv=2, T=256)
    prefix = make_prefix(kind, q, k, g)
    to = dict(device="cuda", dtype=torch.bfloat16)
    q, k, v = q.to(**to), k.to(**to), v.to(**to)
    if prefix is not None:
        prefix = Prefix(prefix.k.to(**to), prefix.v.to(**to), prefix.bias,
                        None if prefix.q2 is None else prefix.q2.to(**to), None if prefix.k2 is None else prefix.k2.to(**to))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        got = attention(q, k, v, prefix=prefix)
    want = attention_reference(q, k, v, prefix=prefix)
    assert_close(got.float(), want.float(), drift(torch.bfloat16, terms=D + 256), f"cuda {kind}")

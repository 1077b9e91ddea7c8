"""KV-Embedding against a deliberately naive implementation written here from SPEC §1.

The naive side shares nothing with kvembed's attention, masks, RoPE or pooling: it runs one row at a time
(no padding at all), loops over heads, takes an explicit softmax, and uses the transformers modules of the
same random model for the projections, norms, MLPs and rotary tables. Only the re-routing rule itself is
re-derived from the SPEC text:

  in each selected layer, the final token's key/value (after RoPE, from this same layer of this same pass)
  become slot 0; every row sees it with logit q.k/sqrt(D) + b; real slots keep the causal mask.

Both sides are the same fp32 math summed in a different order, so they may drift apart by `decoder_drift`
(tests/tolerance.py) through every layer of every pass, relative to the largest embedding entry.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvembed.method import collate, kv_embed
from tests import tiny
from tests.test_model_parity import ours_from_hf
from tests.tolerance import assert_close, assert_differ, decoder_drift


def naive_rows(hf, rows: list[list[int]], layers, bias, rope_mode, passes, pooling="hybrid"):
    """Embed each row alone with explicit loops; returns (B, C) float64-normalised fp32."""
    m = hf.model
    cfg = hf.config
    out = []
    for ids in rows:
        n = len(ids)
        ids_t = torch.tensor([ids])
        pos = torch.arange(n)[None]
        cos, sin = m.rotary_emb(m.embed_tokens(ids_t), pos)  # (1, n, D)
        cos, sin = cos[0], sin[0]

        def rot(x, p):  # rotate one vector (D,) to position p
            half = x.shape[-1] // 2
            xr = torch.cat((-x[half:], x[:half]))
            return x * cos[p] + xr * sin[p]

        def run(captured, active):
            h = m.embed_tokens(ids_t)[0]  # (n, C)
            keep = {}
            for l, layer in enumerate(m.layers):
                a = layer.self_attn
                x = layer.input_layernorm(h)
                Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, a.head_dim
                q = a.q_proj(x).view(n, Hq, D)
                k = a.k_proj(x).view(n, Hkv, D)
                v = a.v_proj(x).view(n, Hkv, D)
                if hasattr(a, "q_norm"):
                    q, k = a.q_norm(q), a.k_norm(k)
                q_rot = torch.stack([torch.stack([rot(q[t, hh], t) for hh in range(Hq)]) for t in range(n)])
                k_rot = torch.stack([torch.stack([rot(k[t, hh], t) for hh in range(Hkv)]) for t in range(n)])
                keep[l] = (k_rot[n - 1].clone(), k[n - 1].clone(), v[n - 1].clone())
                window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
                o = torch.zeros(n, Hq, D)
                for hh in range(Hq):
                    g = hh // (Hq // Hkv)
                    for t in range(n):
                        logits, vals = [], []
                        if l in active:
                            pk_rot, pk_pre, pv = captured[l] if captured else keep[l]
                            if rope_mode == "rotated":
                                s = q_rot[t, hh] @ pk_rot[g]
                            elif rope_mode == "position0":
                                s = q_rot[t, hh] @ pk_pre[g]
                            else:
                                s = q[t, hh] @ pk_pre[g]
                            logits.append(s / math.sqrt(D) + bias)
                            vals.append(pv[g])
                        for j in range(t + 1):
                            if window is not None and t - j >= window:
                                continue
                            logits.append(q_rot[t, hh] @ k_rot[j, g] / math.sqrt(D))
                            vals.append(v[j, g])
                        w = torch.softmax(torch.stack(logits), 0)
                        o[t, hh] = sum(wi * vi for wi, vi in zip(w, vals))
                h = h + a.o_proj(o.reshape(n, Hq * D))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            return m.norm(h), keep

        with torch.no_grad():
            # passes=2: a plain first pass (no prefix anywhere) captures the final token's K/V.
            captured = run(None, set())[1] if passes == 2 else None
            hid, _ = run(captured, layers)
        mean, last = hid.mean(0), hid[-1]
        e = {"hybrid": (mean + last) / 2, "mean": mean, "last": last}[pooling]
        out.append(e / e.norm())
    return torch.stack(out)


ROWS = [[1, 17, 44, 90, 12, 5, 66, 201, 33], [1, 250, 3, 8], [1, 9, 9, 100, 41, 7, 2]]


def drift(args, rows, passes: int) -> float:
    """Explicit per-head softmax and Python sums vs SDPA on a padded batch: reordered sums over C, I, Hq*D and
    the T keys plus the prefix slot; each pass chains its L layers (the second on the first's K/V)."""
    return decoder_drift(args, max(map(len, rows)) + 1, layers=passes * args.num_hidden_layers)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral_window"])
@pytest.mark.parametrize("rope_mode", ["rotated", "position0", "unrotated"])
@pytest.mark.parametrize("passes", [1, 2])
def test_rerouting_matches_naive(name, rope_mode, passes):
    hf = tiny.hf_model(name)
    ours = ours_from_hf(hf)
    layers = (1, 2)
    with torch.no_grad():
        got = kv_embed(ours, collate(ROWS), layers, bias=1.0, rope_mode=rope_mode, passes=passes)
    want = naive_rows(hf, ROWS, set(layers), 1.0, rope_mode, passes)
    assert_close(got, want, drift(ours.args, ROWS, passes), f"{name} {rope_mode} passes={passes}")


def test_naive_reference_is_sensitive():
    """Guard against a naive twin that ignores its switches: re-routing must change the embedding."""
    hf = tiny.hf_model("llama")
    with_prefix = naive_rows(hf, ROWS[:1], {1, 2}, 1.0, "rotated", 1)
    without = naive_rows(hf, ROWS[:1], set(), 1.0, "rotated", 1)
    assert_differ(with_prefix, without, drift(ours_from_hf(hf).args, ROWS[:1], 1), "re-routing in the naive twin")

"""The prefix-attention routine (`kvembed.model.attention` with a one-slot prefix) against plain causal SDPA.

    python bench/attention.py --quick    SmolLM2-135M heads, B=1, T in {128, 512, 1024}, fp32 and bf16
    python bench/attention.py --full     + Qwen3-0.6B and Llama-3.2-1B heads, T in {128, 512, 2048, 8192}

Shapes are one layer's q (B, Hq, T, D) and k, v (B, Hkv, T, D), Hq/Hkv/D as in the three models. Every
row is real (no padding). Three things are timed, pairwise and alternately:

    sdpa_causal      F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa)   the floor: no mask
    masked           attention(q, k, v, mask)          the engine's plain path: the additive (B,1,T,T) mask
    prefix           attention(q, k, v, mask, prefix)  KV-Embedding's routine: slot 0 prepended, mask [b | causal]

and reported as three ratios: prefix vs sdpa_causal (the routine against the floor, the issue's target),
masked vs sdpa_causal (what the additive mask costs by itself) and prefix vs masked (what the prefix slot
costs on top). The mask is built once per shape, outside the timing, as the decoder builds it once per
forward for all layers; the prefix's concatenation is timed, because the routine does it in every layer.
`sdpa_backend` is read from the profiler for each side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, environment, free, paired, record, sdpa_backends, write_results  # noqa: E402
from kvembed.model import Prefix, attention, build_mask  # noqa: E402

# (name, Hq, Hkv, D) of one attention layer.
HEADS = {
    "smollm2-135m": (9, 3, 64),
    "qwen3-0.6b": (16, 8, 128),
    "llama-3.2-1b": (32, 8, 64),
}


def inputs(B: int, Hq: int, Hkv: int, D: int, T: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    mask = build_mask(torch.ones(B, T, dtype=torch.long), dtype)  # (B, 1, T, T)
    # KV-Embedding's slot: the final token's own key/value, bias 1.0 on its logit.
    prefix = Prefix(k[:, :, -1:], v[:, :, -1:], torch.full((1, 1, 1, 1), 1.0, dtype=dtype))
    return q, k, v, mask, prefix


def run(heads: list[str], Ts: list[int], B: int, dtypes, repeats: int, sink: list[dict]) -> None:
    for model in heads:
        Hq, Hkv, D = HEADS[model]
        for dtype in dtypes:
            for T in Ts:
                q, k, v, mask, prefix = inputs(B, Hq, Hkv, D, T, dtype)
                gqa = Hq != Hkv

                def sdpa_causal():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

                def masked():
                    return attention(q, k, v, mask)

                def with_prefix():
                    return attention(q, k, v, mask, prefix)

                backend = {f.__name__: sdpa_backends(f) for f in (sdpa_causal, masked, with_prefix)}
                shape = dict(model=model, B=B, Hq=Hq, Hkv=Hkv, D=D, T=T)
                tokens = B * T
                for name, (bn, bf), (cn, cf) in (
                    ("prefix_vs_sdpa_causal", ("sdpa_causal", sdpa_causal), ("with_prefix", with_prefix)),
                    ("masked_vs_sdpa_causal", ("sdpa_causal", sdpa_causal), ("masked", masked)),
                    ("prefix_vs_masked", ("masked", masked), ("with_prefix", with_prefix)),
                ):
                    free()
                    tb, tc, all_b, all_c = paired(bf, cf, repeats=repeats, warmup=1)
                    emit(record(name, shape, dtype, baseline=bn, baseline_s=tb, candidate_s=tc, tokens=tokens,
                                sdpa=backend[cf.__name__], baseline_sdpa=backend[bf.__name__],
                                overhead=tc / tb - 1, repeats=repeats, baseline_times_s=all_b,
                                candidate_times_s=all_c), sink)
                del q, k, v, mask, prefix


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the small honest subset (default)")
    g.add_argument("--full", action="store_true", help="three head shapes, T up to 8192")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    opts = p.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    full = opts.full
    heads = list(HEADS) if full else ["smollm2-135m"]
    Ts = [128, 512, 2048, 8192] if full else [128, 512, 1024]
    repeats = opts.repeats or (7 if full else 5)
    env = environment()
    print(__import__("json").dumps(dict(env=env)), flush=True)
    records: list[dict] = []
    run(heads, Ts, opts.batch, [torch.float32, torch.bfloat16], repeats, records)
    if not opts.no_write:
        notes = [f"B={opts.batch}, every row real; mask built outside the timing; {repeats} alternating repeats "
                 "after 1 warm-up",
                 "sdpa_backend: the kernel the candidate ran; baseline_sdpa (in the JSON): the baseline's"]
        if not full:
            notes.append("QUICK SUBSET: SmolLM2-135M heads only, T <= 1024; see --full for Qwen3/Llama heads "
                         "and T up to 8192")
        write_results("attention", "full" if full else "quick", records, env, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

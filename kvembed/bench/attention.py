"""The prefix-attention routine (`kvembed.model.attention` with KV-Embedding's slot) against plain causal SDPA.

    python -m kvembed.bench.attention --quick   SmolLM2-135M heads, B=1, T in {512, 1024, 2048, 4096, 8192}
    python -m kvembed.bench.attention --full    + Qwen3-0.6B and Llama-3.2-1B heads, T from 128, fp32 and bf16

One layer's q (B, Hq, T, D) and k, v (B, Hkv, T, D), every row real. Three calls, timed interleaved:

    sdpa_causal  F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa)    the floor: no mask, no slot
    prefix       attention(q, k, v, prefix=Prefix(k_last, v_last, 1.0))    rotated / position0: one shared key
    unrotated    the same slot with the unrotated mode's second pair (q2: the pre-RoPE queries, k2: the pre-RoPE
                 key), which widens every head by D channels: its re-routed layers cost more

Target (fp32, CPU): prefix overhead <= 15% at every T in 512..8192. Below 512 the attention is a sliver of
the forward, and the whole forward is compared instead (kvembed.bench.forward). The slot's construction
(copies into width-E tensors) is timed, because the routine does it in every re-routed layer.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from kvembed.model import Prefix, attention

from . import common
from .models import heads

QUICK = dict(heads=["smollm2-135m"], lengths=[512, 1024, 2048, 4096, 8192], dtypes=None, repeats=5)
FULL = dict(heads=["smollm2-135m", "qwen3-0.6b", "llama-3.2-1b"], lengths=[128, 256, 512, 1024, 2048, 4096, 8192],
            dtypes=["float32", "bfloat16"], repeats=7)


def calls(B: int, Hq: int, Hkv: int, D: int, T: int, dtype, device, seed: int = 0) -> dict:
    """The three calls on fresh random inputs of one shape."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    q, k, v = rand(B, Hq, T, D), rand(B, Hkv, T, D), rand(B, Hkv, T, D)
    q_pre, k_pre = rand(B, Hq, T, D), rand(B, Hkv, 1, D)
    # KV-Embedding's slot: the final token's own key and value, bias 1.0 on its logit.
    rotated = Prefix(k[:, :, -1:], v[:, :, -1:], 1.0)
    unrotated = Prefix(torch.zeros_like(k_pre), v[:, :, -1:], 1.0, q2=q_pre, k2=k_pre)
    gqa, scale = Hq != Hkv, 1.0 / math.sqrt(D)
    return {
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa),
        "prefix": lambda: attention(q, k, v, prefix=rotated),
        "unrotated": lambda: attention(q, k, v, prefix=unrotated),
    }


def run(head_names, lengths, B: int, dtypes, repeats: int, device, sink: list[dict]) -> None:
    clock = common.Clock(device)
    for name in head_names:
        Hq, Hkv, D = heads(name)
        for dtype in dtypes:
            for T in lengths:
                common.free(device)
                shape = dict(model=name, B=B, Hq=Hq, Hkv=Hkv, D=D, T=T)
                try:
                    fns = calls(B, Hq, Hkv, D, T, dtype, device)
                    # The kernel choice on the CPU does not depend on T: probe on a short copy there; on CUDA
                    # (where it can) on the real inputs.
                    probe = fns if device.type == "cuda" else calls(B, Hq, Hkv, D, min(T, 256), dtype, device)
                    kernel = {n: common.sdpa_backends(f, device) for n, f in probe.items()}
                    fused = {n: common.fused_only(f, device) for n, f in probe.items()}
                    times, inner = common.interleaved(fns, clock, repeats=repeats, warmup=1,
                                                      min_sample_s=0.02 if device.type == "cuda" else 0.05)
                except RuntimeError as e:  # CUDA out of memory, or no kernel: a result too
                    common.emit(dict(name="attention", shape=shape, dtype=str(dtype), device=str(device),
                                     error=f"{type(e).__name__}: {str(e)[:300]}"), sink)
                    continue
                for cand, label in (("prefix", "prefix_vs_sdpa_causal"),
                                    ("unrotated", "unrotated_prefix_vs_sdpa_causal")):
                    common.emit(common.compare(
                        label, times, "sdpa_causal", cand, shape=shape, dtype=dtype, device=device, tokens=B * T,
                        inner=inner, sdpa_backend=kernel[cand], baseline_sdpa=kernel["sdpa_causal"],
                        fused_only=fused[cand], baseline_fused_only=fused["sdpa_causal"]), sink)
                del fns


def main(argv=None) -> int:
    argv = common.argv_list(argv)
    p = argparse.ArgumentParser(prog="python -m kvembed.bench.attention", description=__doc__.split("\n\n")[0])
    common.add_arguments(p, quick="SmolLM2-135M heads, T in 512..8192, one dtype",
                         full="three head shapes, T in 128..8192, fp32 and bf16")
    p.add_argument("--heads", nargs="+", default=None, help="head shapes by model name (models.CONFIGS)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths T")
    p.add_argument("--batch", type=int, default=1)
    opts = p.parse_args(argv)
    device, dtype = common.setup(opts)
    grid = FULL if opts.full else QUICK
    dtypes = [getattr(torch, d) for d in grid["dtypes"]] if grid["dtypes"] and not opts.dtype else [dtype]
    head_names, lengths = opts.heads or grid["heads"], opts.lengths or grid["lengths"]
    repeats = opts.repeats or grid["repeats"]
    env = common.environment(device)
    common.print_env(env)
    records: list[dict] = []
    run(head_names, lengths, opts.batch, dtypes, repeats, device, records)
    if not opts.no_write:
        notes = [f"B={opts.batch}, every row real; {repeats} interleaved rounds after 1 warm-up; a sample repeats a "
                 "short call `inner` times (JSON) so that it lasts >= 50 ms (CPU) / 20 ms (CUDA)",
                 "sdpa: the kernel(s) the candidate ran, from the profiler; baseline_sdpa in the JSON",
                 f"heads: {', '.join(head_names)}; T: {lengths}; dtypes: {[str(d) for d in dtypes]}"]
        common.write_results(opts.out, "attention", argv, common.subset_name(opts), records, env, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The whole embedding forward (decoder + pooling): KV-Embedding against the plain forward and against transformers'
sdpa forward on the same weights, and the share of the measured matmul peak it reaches.

    python -m kvembed.bench.forward --quick    the default model (real weights), fp32:
                                               B=1 x T in {128, 256}: re-routing (rotated, unrotated) vs plain
                                               B=1 x T in {2048, 4096}: KV-Embedding vs transformers sdpa
                                               32 real texts cut to 16..1024 tokens, right-padded: vs transformers
    python -m kvembed.bench.forward --full     + B in {1, 8, 32} x T in {32, 128, 512, 2048}, every side at every
                                               shape, random Qwen3-0.6B- and Llama-3.2-1B-shaped models, and
                                               torch.compile vs eager at B=8 x T=128

Sides (the same token tensors, the same pooling, kvembed.method.pool):
    plain       kv_embed(model, batch, ())                          no re-routing
    kvembed     kv_embed(model, batch, layers)                      KV-Embedding, rope_mode rotated
    unrotated   kv_embed(model, batch, layers, rope_mode=unrotated) the mode whose slot carries a second q/k pair
    hf_sdpa     transformers AutoModel(attn_implementation="sdpa") holding the same parameter tensors
A padded batch is right-padded to its longest row; transformers then builds a dense (B, 1, T, T) mask for SDPA,
where kvembed's causal layers need none (right padding: a real row never reaches a pad key).

achieved_flops_fraction = model FLOPs (models.model_flops: 2 x non-embedding params x tokens + causal attention)
/ time / the best n^3 matmul timed right before and right after that comparison, in the same dtype: the honest
ceiling of a dense forward on this machine, reported instead of a compile speed-up.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from kvembed.method import collate, kv_embed, pool

from . import common, models

COMPARISONS = (  # (record name, baseline side, candidate side)
    ("kvembed_vs_hf_sdpa", "hf_sdpa", "kvembed"),
    ("plain_vs_hf_sdpa", "hf_sdpa", "plain"),
    ("rerouting_vs_plain", "plain", "kvembed"),
    ("unrotated_vs_plain", "plain", "unrotated"),
    ("compiled_vs_eager", "kvembed", "compiled"),
)


@dataclass
class Case:
    B: int
    T: int  # the longest row; "mixed" rows are spread over lo..T
    sides: tuple[str, ...]
    repeats: int
    warmup: int = 1
    rows: str = "full"  # "full": every row T real tokens; "mixed": lengths spread over lo..T, right-padded
    lo: int = 16


ALL = ("hf_sdpa", "plain", "kvembed", "unrotated")
QUICK = [
    Case(1, 128, ("plain", "kvembed", "unrotated"), repeats=7),
    Case(1, 256, ("plain", "kvembed", "unrotated"), repeats=7),
    Case(1, 2048, ("hf_sdpa", "kvembed"), repeats=3),
    # Tens of seconds a call on one core: the 2048 pair has warmed threads and allocator; 3 rounds, no warm-up.
    Case(1, 4096, ("hf_sdpa", "kvembed"), repeats=3, warmup=0),
    # ~1.5 min a call on one core (32 x 1024 padded tokens): 2 rounds (hf, kv | kv, hf).
    Case(32, 1024, ("hf_sdpa", "kvembed"), repeats=2, warmup=0, rows="mixed"),
]
FULL = [Case(b, t, ALL, repeats=5 if b * t <= 4096 else 3, warmup=1 if b * t <= 8192 else 0)
        for b in (1, 8, 32) for t in (32, 128, 512, 2048)]
FULL += [Case(32, 1024, ALL, repeats=3, warmup=0, rows="mixed"), Case(8, 128, ("kvembed", "compiled"), repeats=5)]


def make_batch(bm: models.BenchModel, case: Case, device, source: str, data_dir=None):
    """The case's token batch (right-padded) and a short one of the same structure for kernel probes."""
    vocab = bm.args.vocab_size
    if case.rows == "full":
        seqs = models.random_ids(case.B, case.T, vocab, seed=case.B * 100003 + case.T)
        probe = models.random_ids(min(case.B, 2), min(case.T, 64), vocab, seed=1)
    elif source == "text":
        seqs = models.text_mixed(bm.tokenizer, case.B, case.lo, case.T, models.data_dir(data_dir))
        probe = [seqs[0][:48], seqs[1][:24]]
    else:
        seqs = models.random_mixed(case.B, case.lo, case.T, vocab)
        probe = [seqs[0][:48], seqs[1][:24]]
    batch = collate(seqs, device)
    return batch, (batch if device.type == "cuda" else collate(probe, device))


def side_fns(bm: models.BenchModel, hf, batch, compiled=None) -> dict:
    m, layers, ids, mask = bm.model, bm.layers, batch.input_ids, batch.attention_mask
    fns = {
        "plain": lambda: kv_embed(m, batch, ()),
        "kvembed": lambda: kv_embed(m, batch, layers),
        "unrotated": lambda: kv_embed(m, batch, layers, rope_mode="unrotated"),
    }
    if hf is not None:
        fns["hf_sdpa"] = lambda: pool(hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    if compiled is not None:
        fns["compiled"] = lambda: kv_embed(compiled, batch, layers)
    return fns


def measure(bm: models.BenchModel, hf, case: Case, device, dtype, sink: list[dict], *, source: str = "random",
            data_dir=None, repeats: int | None = None, compiled=None) -> None:
    """Time the case's sides interleaved; emit every comparison in COMPARISONS whose two sides ran."""
    common.free(device)
    batch, probe_batch = make_batch(bm, case, device, source, data_dir)
    B, T = batch.input_ids.shape
    real = int(batch.attention_mask.sum())
    shape = dict(model=bm.label, B=B, T=T, rows=case.rows, real_tokens=real, layers=list(bm.layers))
    if case.rows == "mixed":
        shape.update(lengths=f"{case.lo}..{case.T}", source=source)
    extra = {}
    if "compiled" in case.sides:
        t0 = time.perf_counter()
        with torch.inference_mode():
            kv_embed(compiled, batch, bm.layers)
        common.Clock(device).sync()
        extra["compile_s"] = time.perf_counter() - t0
    fns = {s: f for s, f in side_fns(bm, hf, batch, compiled).items() if s in case.sides}
    probes = {s: f for s, f in side_fns(bm, hf, probe_batch, compiled).items() if s in case.sides}
    clock = common.Clock(device)
    try:
        kernel = {s: common.sdpa_backends(f, device) for s, f in probes.items()}
        fused = {s: common.fused_only(f, device) for s, f in probes.items()}
        peak = common.matmul_peak(device, dtype)
        times, inner = common.interleaved(fns, clock, repeats=repeats or case.repeats, warmup=case.warmup,
                                          min_sample_s=0.02 if device.type == "cuda" else 0.0)
        peak = max(peak, common.matmul_peak(device, dtype))
    except RuntimeError as e:  # CUDA out of memory (or a kernel refusing): a result too
        common.emit(dict(name="forward", shape=shape, dtype=str(dtype), device=str(device), sides=list(fns),
                         error=f"{type(e).__name__}: {str(e)[:300]}"), sink)
        common.free(device)
        return
    flops = models.model_flops(bm.model, B, T)
    for name, base, cand in COMPARISONS:
        if base in times and cand in times:
            rec = common.compare(name, times, base, cand, shape=shape, dtype=dtype, device=device, tokens=B * T,
                                 inner=inner, warmup=case.warmup, sdpa_backend=kernel[cand],
                                 baseline_sdpa=kernel[base], fused_only=fused[cand], baseline_fused_only=fused[base],
                                 model_flops=flops, peak_flops_per_s=peak, **extra)
            rec["achieved_flops_per_s"] = flops / rec["median_s"]
            rec["achieved_flops_fraction"] = flops / rec["median_s"] / peak
            rec["baseline_flops_fraction"] = flops / rec["baseline_median_s"] / peak
            common.emit(rec, sink)


def run_model(bm: models.BenchModel, cases: list[Case], device, dtype, sink, *, source="random", data_dir=None,
              repeats=None) -> None:
    needs_hf = any("hf_sdpa" in c.sides for c in cases)
    hf = models.hf_twin(bm, "sdpa") if needs_hf else None
    compiled = None
    if any("compiled" in c.sides for c in cases):
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        compiled = torch.compile(bm.model, dynamic=False)
    for case in cases:
        measure(bm, hf, case, device, dtype, sink, source=source, data_dir=data_dir, repeats=repeats,
                compiled=compiled)


def main(argv=None) -> int:
    argv = common.argv_list(argv)
    p = argparse.ArgumentParser(prog="python -m kvembed.bench.forward", description=__doc__.split("\n\n")[0])
    common.add_arguments(p, quick="the targets: default model, five cases", full="the grid, three models")
    p.add_argument("--model", default="default",
                   help=f"'default' (real weights) or random weights shaped like one of {', '.join(models.CONFIGS)}")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="re-routed layers (default: a middle window as wide as SPEC §1.4's)")
    p.add_argument("--short", type=int, nargs="*", default=None, help="quick: T of the re-routing-vs-plain cases")
    p.add_argument("--long", type=int, nargs="*", default=None, help="quick: T of the vs-transformers cases")
    p.add_argument("--padded", type=int, nargs=3, default=None, metavar=("B", "LO", "HI"),
                   help="quick: the padded batch (default 32 16 1024)")
    p.add_argument("--no-padded", action="store_true", help="quick: skip the padded batch")
    p.add_argument("--padded-source", choices=["text", "random"], default=None,
                   help="real texts from the data pack (default with real weights) or random ids")
    p.add_argument("--data-dir", default=None, help="the data pack (default $KVEMBED_DATA, else ../shared/data)")
    opts = p.parse_args(argv)
    device, dtype = common.setup(opts)
    cases = quick_cases(opts) if not opts.full else FULL
    env = common.environment(device)
    common.print_env(env)
    records: list[dict] = []
    bm = models.load(opts.model, dtype, device, tuple(opts.layers) if opts.layers else None)
    source = opts.padded_source or ("text" if bm.tokenizer is not None else "random")
    run_model(bm, cases, device, dtype, records, source=source, data_dir=opts.data_dir, repeats=opts.repeats)
    if opts.full:
        for name in ("qwen3-0.6b", "llama-3.2-1b"):
            del bm
            common.free(device)
            bm = models.load(name, dtype, device)
            run_model(bm, [c for c in FULL if "compiled" not in c.sides], device, dtype, records,
                      repeats=opts.repeats)
    if not opts.no_write:
        notes = [
            "rows 'full': random token ids, every row T real tokens; rows 'mixed': right-padded rows of lengths "
            f"spread over lo..T ({source}: real BBC News / Brown texts tokenized and cut, or random ids)",
            "layers: re-routed layers (a middle window as wide as SPEC §1.4's rule gives: the cost depends on how "
            "many, not which)",
            "every comparison: its sides interleaved in one process after `warmup` calls each; ratio = baseline "
            "median / candidate median; round_ratio_min..max = the ratio within each round (the noise)",
            "achieved_flops_fraction: model FLOPs / time / best n^3 matmul (same dtype) timed right before and "
            "after the comparison",
        ]
        common.write_results(opts.out, "forward", argv, common.subset_name(opts), records, env, notes)
    return 0


def quick_cases(opts) -> list[Case]:
    cases = []
    short = opts.short if opts.short is not None else [128, 256]
    long = opts.long if opts.long is not None else [2048, 4096]
    template = {c.T: c for c in QUICK}
    for T in short:
        cases.append(Case(1, T, ("plain", "kvembed", "unrotated"), repeats=7))
    for T in long:
        cases.append(Case(1, T, ("hf_sdpa", "kvembed"), repeats=3, warmup=template.get(T, QUICK[2]).warmup))
    if not opts.no_padded:
        B, lo, hi = opts.padded or (32, 16, 1024)
        cases.append(Case(B, hi, ("hf_sdpa", "kvembed"), repeats=2, warmup=0, rows="mixed", lo=lo))
    return cases


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU run: attention, the whole forward and memory on random weights shaped like three real models, in bf16,
against transformers' sdpa forward on the same tensors. Written to run first time on a bare CUDA machine.

    python -m kvembed.bench.device_check [--out DIR] [--budget-s 300] [--models smollm2-135m qwen3-4b mistral-7b]

Per model (models.CONFIGS: SmolLM2-135M, Qwen3-4B, Mistral-7B-v0.1 with its 4096-token sliding window):
    attention  prefix and unrotated prefix vs causal SDPA, that model's heads, B=1, T in {512, 2048, 8192}
    forward    hf_sdpa, plain, kvembed, unrotated interleaved at B=1 x T in {2048, 8192} and 32 rows of
               16..1024 tokens right-padded; kvembed vs hf_sdpa at B x 8192 (B = 32 / 8 / 4 by model size)
    memory     B=1, T in {4096, 8192}: torch.cuda.max_memory_allocated above the weights, kvembed and hf_sdpa
Every record names the SDPA kernels that ran (profiler) and whether the call runs with the math backend
excluded (`fused_only`). An out-of-memory or a refused kernel is recorded, not fatal; cases left when
--budget-s has passed are recorded as skipped, so the run ends in time. Writes <out>/device_check.json and
regenerates <out>/perf.md (copy device_check.json into bench/results and run `python -m kvembed.bench.report`
to merge it with the CPU results there).
"""

from __future__ import annotations

import argparse
import time

import torch

from . import attention, common, forward, memory, models

ALL = forward.ALL
BIG_B = {"smollm2-135m": 32, "qwen3-4b": 8, "mistral-7b": 4}  # rows at T=8192, by model size


def cases(name: str, scale: int = 1) -> list[forward.Case]:
    """The forward grid; --smoke divides every length by `scale` (the same code paths, on a CPU, in seconds)."""
    return [
        forward.Case(1, 2048 // scale, ALL, repeats=5),
        forward.Case(1, 8192 // scale, ALL, repeats=5),
        forward.Case(32 // min(scale, 8), 1024 // scale, ALL, repeats=5, rows="mixed", lo=16 // min(scale, 8)),
        forward.Case(BIG_B.get(name, 4) // min(scale, 4), 8192 // scale, ("hf_sdpa", "kvembed"), repeats=3),
    ]


def memory_records(bm: models.BenchModel, hf, device, dtype, sink: list[dict], scale: int = 1) -> None:
    from kvembed.method import collate, kv_embed, pool

    for T in (4096 // scale, 8192 // scale):
        common.free(device)
        batch = collate(models.random_ids(1, T, bm.args.vocab_size, seed=T), device)
        ids, mask = batch.input_ids, batch.attention_mask
        sides = {"kvembed": lambda: kv_embed(bm.model, batch, bm.layers)}
        if hf is not None:
            sides["hf_sdpa"] = lambda: pool(hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        shape = dict(model=bm.label, B=1, T=T, layers=list(bm.layers))
        try:
            with torch.inference_mode():
                for f in sides.values():
                    f()  # warm: kernels chosen, workspaces allocated
                got = {s: memory.measure_call(f, device) for s, f in sides.items()}
        except RuntimeError as e:
            common.emit(dict(name="embed_one_text", shape=shape, device=str(device), error=str(e)[:300]), sink)
            continue
        rec = dict(name="embed_one_text", shape=shape, dtype=str(dtype).replace("torch.", ""), device=str(device),
                   candidate="kvembed", median_s=got["kvembed"][0], peak_bytes=got["kvembed"][1],
                   dense_fp32_mask_bytes=4 * T * T)
        if "hf_sdpa" in got:
            rec.update(baseline="hf_sdpa", baseline_median_s=got["hf_sdpa"][0], baseline_peak_bytes=got["hf_sdpa"][1])
        common.emit(rec, sink)


def main(argv=None) -> int:
    argv = common.argv_list(argv)
    p = argparse.ArgumentParser(prog="python -m kvembed.bench.device_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen3-4b", "mistral-7b"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--budget-s", type=float, default=300.0, help="start no new case after this many seconds")
    p.add_argument("--out", default=str(common.DEFAULT_OUT), help="results folder (default ./bench/results)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="every length / 64, fewer rows: the same code paths in seconds (for a CPU check of the script)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU side)")
    opts = p.parse_args(argv)
    scale = 64 if opts.smoke else 1
    opts.full = False
    device, dtype = common.setup(opts)
    t0 = time.perf_counter()
    env = common.environment(device)
    common.print_env(env)
    records: list[dict] = []
    save = _saver(opts, argv, records, env, dtype)
    peak = common.matmul_peak(device, dtype)
    common.emit(dict(name="matmul_peak", shape=dict(n=8192 if device.type == "cuda" else 1024),
                     dtype=str(dtype).replace("torch.", ""),
                     device=str(device), flops_per_s=peak), records)

    def over(what: str, shape: dict) -> bool:
        if time.perf_counter() - t0 <= opts.budget_s:
            return False
        common.emit(dict(name=what, shape=shape, device=str(device), error=f"skipped: past --budget-s {opts.budget_s}"),
                    records)
        return True

    for name in opts.models:
        if over("model", dict(model=name)):
            continue
        bm = hf = None
        try:
            bm = models.load(name, dtype, device)
            attention.run([name], [512 // scale, 2048 // scale, 8192 // scale], 1, [dtype], 10 // min(scale, 5),
                          device, records)
            try:
                hf = models.hf_twin(bm, "sdpa")
            except Exception as e:  # transformers missing or too old: our sides still run
                common.emit(dict(name="hf_twin", shape=dict(model=bm.label), device=str(device),
                                 error=f"{type(e).__name__}: {str(e)[:300]}"), records)
            for case in cases(name, scale):
                if not over("forward", dict(model=bm.label, B=case.B, T=case.T, rows=case.rows)):
                    forward.measure(bm, hf, case, device, dtype, records)
            if not over("embed_one_text", dict(model=bm.label)):
                memory_records(bm, hf, device, dtype, records, scale)
        except Exception as e:  # one model's failure must not cost the others' results
            common.emit(dict(name="model", shape=dict(model=name), device=str(device),
                             error=f"{type(e).__name__}: {str(e)[:300]}"), records)
        del bm, hf
        common.free(device)
        save()  # after every model: a run stopped from outside keeps what it measured
    common.emit(dict(name="wall", device=str(device), seconds=round(time.perf_counter() - t0, 1)), records)
    save()
    return 0


def _saver(opts, argv, records, env, dtype):
    def save():
        if opts.no_write:
            return
        notes = [f"random weights (std 0.02) in the real shapes of {', '.join(opts.models)}; {dtype}; "
                 "re-routed layers: a middle window as wide as SPEC §1.4's rule gives",
                 "timing: CUDA events around each sample after a synchronize; a short call repeats `inner` times per "
                 "sample; sides interleaved; matmul peak (8192^3) in the JSON",
                 "fused_only: the call ran with the math backend excluded (candidate / baseline)"]
        common.write_results(opts.out, "device_check", argv, "device", records, env, notes)

    return save


if __name__ == "__main__":
    raise SystemExit(main())

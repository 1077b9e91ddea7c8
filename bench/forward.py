"""Tokens/s of the whole embedding forward: kvembed (eager, compiled) against transformers, and KV-Embedding
against the plain forward, echo and metaeol — every number a ratio of two runs in this process.

    python bench/forward.py --quick     default model; B in {1, 8, 32} x T in {32, 128} plus B=1 x T=512
    python bench/forward.py --full      + T in {512, 2048}, and random Qwen3-0.6B- and Llama-3.2-1B-shaped models

Inputs are tokenized already: random token ids, every row T real tokens (no padding, no I/O, no tokenizer).
An "embedding forward" is the decoder plus pooling, exactly what `KVEmbedder.encode` runs per batch:
    kvembed      kv_embed(model, batch, layers)            KV-Embedding (re-routing in `layers`), hybrid pooling
    plain        kv_embed(model, batch, ())                the same forward with no re-routing
    hf_sdpa/eager  transformers' LlamaModel/Qwen3Model on the *same tensors* (shared storage) + the same pooling
    echo         kvembed.baselines.Echo on 2T-token rows   (the text twice)
    metaeol      kvembed.baselines.MetaEOL on 8 x B rows   (8 prompts; the prompts' own tokens are not counted:
                                                            each view is T tokens, so this understates its cost)
tokens/s counts B x T tokens of the *text* for every method, so echo and metaeol pay for their extra rows.

Model FLOPs per forward = 2 x non-embedding parameters x tokens + attention (4 x Hq x D x T^2/2 x B x L for
QK^T and PV under the causal mask); `achieved_flops_fraction` divides the achieved FLOP/s by the best of two
1024^3 fp32 matmuls timed right before and right after that pair (a 2048^3 one is also timed at the start
and end of the run).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.common import emit, environment, free, matmul_peak, paired, record, sdpa_backends, write_results  # noqa: E402
from kvembed.config import ModelArgs  # noqa: E402
from kvembed.method import collate, kv_embed, pool  # noqa: E402
from kvembed.model import Decoder  # noqa: E402

# Random-weight stand-ins with the real shapes (the hub is unreachable; timing does not depend on the values).
QWEN3_0_6B = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
    max_position_embeddings=40960, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
)
LLAMA_3_2_1B = dict(
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
)

QUICK_SHAPES = [(1, 32), (1, 128), (8, 32), (8, 128), (32, 32), (32, 128), (1, 512)]
FULL_SHAPES = [(b, t) for b in (1, 8, 32) for t in (32, 128, 512, 2048)]


# ------------------------------------------------------------------------------------------ models


def default_model(dtype):
    from weights_loader import load_model

    loaded = load_model(None, dtype=dtype)
    return "smollm2-135m", loaded.model, loaded.config, default_layers(loaded)


def default_layers(loaded) -> tuple[int, ...]:
    """The shipped ID selection for these weights; else the window the rule would give around the middle."""
    try:
        from kvembed.layer_select import shipped_selection

        sel = shipped_selection(loaded.fingerprint)
        if sel is not None:
            return tuple(sel.layers)
    except ImportError:
        pass
    return middle_window(loaded.args.num_hidden_layers)


def middle_window(L: int) -> tuple[int, ...]:
    """max(1, L // 10) + 1 layers (SPEC §1.4's window width) starting at the middle layer."""
    m = L // 2
    return tuple(range(m, min(L, m + max(1, L // 10) + 1)))


def random_model(cfg: dict, dtype, seed: int = 0):
    """A Decoder with std-0.02 random weights for a config dict (the init scale HF uses)."""
    args = ModelArgs.from_hf_config(cfg)
    torch.manual_seed(seed)
    model = Decoder(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.to(dtype).eval(), middle_window(args.num_hidden_layers)


def hf_twin(model: Decoder, config: dict, attn: str):
    """transformers' base model (no lm_head) for `config`, sharing `model`'s parameter tensors.

    Built on the meta device and given our tensors with assign=True: the same weights, no second copy in
    memory. The rotary module is rebuilt on the CPU because its inv_freq buffer is computed, not loaded.
    """
    import transformers

    cfg = copy.deepcopy(config)
    model_type = cfg.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    hf_cfg.use_cache = False
    with torch.device("meta"):
        hf = transformers.AutoModel.from_config(hf_cfg, attn_implementation=attn)
    hf.rotary_emb = type(hf.rotary_emb)(config=hf.config)
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    dtype = next(model.parameters()).dtype
    return hf.to(dtype).eval()


# ---------------------------------------------------------------------------------------- forwards


def model_flops(args: ModelArgs, n_params_nonembed: int, B: int, T: int) -> float:
    """2 x non-embedding params x tokens + causal attention (QK^T and PV, each 2*Hq*D per visible pair)."""
    pairs = B * T * (T + 1) / 2
    return 2.0 * n_params_nonembed * B * T + 4.0 * args.num_attention_heads * args.head_dim * pairs * args.num_hidden_layers


def make_batch(B: int, T: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    return collate(ids.tolist())


def run_model(label, model, config, layers, shapes, dtype, opts, sink, peak):
    from kvembed.baselines import Echo, Marked, MetaEOL

    args = model.args
    nonembed = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed_tokens"))
    hf_sdpa = hf_twin(model, config, "sdpa")
    hf_eager = hf_twin(model, config, "eager") if opts.hf_eager else None
    compiled = None
    echo, metaeol = Echo(), MetaEOL()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    for B, T in shapes:
        batch = make_batch(B, T, args.vocab_size, seed=B * 100003 + T)
        ids, mask = batch.input_ids, batch.attention_mask
        tokens = B * T
        shape = dict(model=label, B=B, T=T, layers=list(layers))
        flops = model_flops(args, nonembed, B, T)
        big = tokens >= opts.big_tokens
        reps, warm = (opts.big_repeats, 0) if big else (opts.repeats, opts.warmup)

        def kvembed():
            return kv_embed(model, batch, layers)

        def plain():
            return kv_embed(model, batch, ())

        def hf(m):
            return lambda: pool(m(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

        def pair(name, base_name, base_fn, cand_fn, sdpa_fn, cand_flops=flops, **extra):
            free()
            # The achievable peak is re-measured around every pair (best of before/after): on a shared machine
            # the run-level figure can be off by 2x from what was available during this pair.
            local = matmul_peak(1024, 3)["flops_per_s"]
            tb, tc, all_b, all_c = paired(base_fn, cand_fn, repeats=reps, warmup=warm)
            local = max(local, matmul_peak(1024, 3)["flops_per_s"])
            rec = record(name, shape, dtype, baseline=base_name, baseline_s=tb, candidate_s=tc, tokens=tokens,
                         sdpa=sdpa_backends(sdpa_fn) if sdpa_fn else None, repeats=reps, warmup=warm,
                         baseline_times_s=all_b, candidate_times_s=all_c, **extra)
            if cand_flops is not None:
                rec["achieved_flops_per_s"] = cand_flops / tc
                rec["peak_flops_per_s"] = local
                rec["achieved_flops_fraction"] = cand_flops / tc / local
            rec["overhead"] = tc / tb - 1
            emit(rec, sink)

        small = make_batch(1, 8, args.vocab_size, 0)
        if True:
            sdpa_probe = lambda: kv_embed(model, small, layers)  # noqa: E731  (which kernel ran: a cheap call)
            hf_probe = lambda: hf_sdpa(input_ids=small.input_ids, attention_mask=small.attention_mask)  # noqa: E731

        pair("kvembed_eager_vs_hf_sdpa", "hf_sdpa", hf(hf_sdpa), kvembed, sdpa_probe, hf_sdpa=sdpa_backends(hf_probe))
        if (B, T) in opts.plain_shapes:
            pair("rerouting_vs_plain", "kvembed_plain", plain, kvembed, None)
        if hf_eager is not None and (B, T) in opts.eager_shapes:
            pair("kvembed_eager_vs_hf_eager", "hf_eager", hf(hf_eager), kvembed, None)
        if (B, T) in opts.compile_shapes:
            if compiled is None:
                compiled = torch.compile(model, dynamic=False)

            def kv_compiled():
                return kv_embed(compiled, batch, layers)

            import time

            t0 = time.perf_counter()
            with torch.inference_mode():
                kv_compiled()
            compile_s = time.perf_counter() - t0
            pair("kvembed_compiled_vs_hf_sdpa", "hf_sdpa", hf(hf_sdpa), kv_compiled, kv_compiled, compile_s=compile_s)
        if (B, T) in opts.baseline_shapes:
            ids2 = torch.cat((ids, ids), dim=1).tolist()  # (B, 2T): the text twice
            views2 = [[Marked(r, False, [], "", (T, 2 * T))] for r in ids2]
            batch2 = collate(ids2)
            pair("kvembedding_vs_echo", "echo", lambda: echo.embed(model, views2, lambda s: batch2), kvembed, None,
                 baseline_tokens_processed=2 * tokens)
            rows = ids.tolist()
            views8 = [[Marked(r, False, [], "", (0, T))] * 8 for r in rows]
            batch8 = collate([r for r in rows for _ in range(8)])  # (8B, T), text-major like MetaEOL.embed
            pair("kvembedding_vs_metaeol", "metaeol", lambda: metaeol.embed(model, views8, lambda s: batch8), kvembed,
                 None, baseline_tokens_processed=8 * tokens)


# -------------------------------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the small honest subset (default)")
    g.add_argument("--full", action="store_true", help="the whole grid, three models (hours on a small CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each side per pair")
    p.add_argument("--no-write", action="store_true", help="print JSON lines only; leave bench/results alone")
    p.add_argument("--profile", type=int, nargs=2, metavar=("B", "T"),
                   help="instead of timing: torch.profiler tables of one kvembed and one hf_sdpa forward at B x T")
    return p.parse_args(argv)


def profile(B: int, T: int, dtype, rows: int = 18) -> None:
    """Where the time goes: the top aten ops (self CPU time) of one warm forward of each engine."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    label, model, config, layers = default_model(dtype)
    hf = hf_twin(model, config, "sdpa")
    batch = make_batch(B, T, model.args.vocab_size, seed=0)
    runs = {
        "kvembed (KV-Embedding, eager)": lambda: kv_embed(model, batch, layers),
        "kvembed (plain, eager)": lambda: kv_embed(model, batch, ()),
        "transformers sdpa": lambda: pool(hf(input_ids=batch.input_ids,
                                             attention_mask=batch.attention_mask).last_hidden_state,
                                          batch.attention_mask),
    }
    with torch.inference_mode():
        for name, fn in runs.items():
            fn()  # warm-up outside the profile
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"\n### {name}, {label} B={B} T={T} {dtype} threads={torch.get_num_threads()}\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> int:
    opts = parse(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    dtype = getattr(torch, opts.dtype)
    if opts.profile:
        profile(*opts.profile, dtype)
        return 0
    full = opts.full
    shapes = FULL_SHAPES if full else QUICK_SHAPES
    opts.repeats = opts.repeats or (5 if full else 3)
    opts.warmup = 1
    # At >= big_tokens a forward takes tens of seconds on a small CPU: the smaller shapes before it have warmed
    # the allocator and thread pool, so it gets no warm-up of its own and fewer repeats.
    opts.big_tokens, opts.big_repeats = 2048, max(2, opts.repeats - 1)
    opts.hf_eager = True
    if full:
        opts.plain_shapes = opts.eager_shapes = opts.compile_shapes = set(shapes)
        opts.baseline_shapes = {(b, t) for b, t in shapes if b * t <= 8 * 512}
    else:
        opts.plain_shapes = {(1, 32), (1, 128), (8, 128), (1, 512)}
        opts.eager_shapes = {(1, 128), (8, 128)}
        opts.compile_shapes = {(8, 128)}
        opts.baseline_shapes = {(1, 128), (8, 32)}

    env = environment()
    print(__import__("json").dumps(dict(env=env)), flush=True)
    records: list[dict] = []
    peak = matmul_peak()
    emit(dict(peak, threads=torch.get_num_threads(), torch=torch.__version__), records)

    label, model, config, layers = default_model(dtype)
    run_model(label, model, config, layers, shapes, dtype, opts, records, peak)
    if full:
        for label, cfg in (("qwen3-0.6b-shaped", QWEN3_0_6B), ("llama-3.2-1b-shaped", LLAMA_3_2_1B)):
            del model
            free()
            model, layers = random_model(cfg, dtype)
            run_model(label, model, cfg, layers, shapes, dtype, opts, records, peak)

    peak_end = matmul_peak()
    emit(dict(peak_end, name="matmul_peak_end", threads=torch.get_num_threads(), torch=torch.__version__), records)
    if not opts.no_write:
        notes = [
            "inputs: random token ids, every row T real tokens (no padding); tokens/s counts B x T text tokens",
            f"layers re-routed: {list(layers)} "
            "(shipped ID selection if present, else a middle window of SPEC §1.4's width)",
            "echo: kvembed.baselines.Echo on 2T-token rows; metaeol: kvembed.baselines.MetaEOL on 8 x B rows of T "
            "tokens (the prompts' own tokens not added, so metaeol's real cost is higher)",
            f"shapes with >= {opts.big_tokens} tokens: no per-shape warm-up, {opts.big_repeats} repeats; "
            f"others: 1 warm-up, {opts.repeats} repeats",
            "matmul peak (2048^3 fp32) timed at the start and at the end of the run: "
            f"{peak['flops_per_s'] / 1e9:.1f} and {peak_end['flops_per_s'] / 1e9:.1f} GFLOP/s; "
            "achieved_flops_fraction uses the best 1024^3 matmul timed right before/after each pair",
        ]
        if not full:
            notes.append("QUICK SUBSET: default model only; compiled only at B=8 x T=128; see --full for the grid")
        write_results("forward", "full" if full else "quick", records, env, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

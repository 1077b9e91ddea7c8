"""MetaEOL with each prompt's instruction run once (kvembed.baselines.shared_forward) against every row running it.

    python -m kvembed.bench.baselines --quick   the default model (real weights), 16 texts a batch:
                                                STS-B sentences (short: the instruction is most of each row) and
                                                BBC News articles cut to 128 tokens (long: the text is most of it)
    python -m kvembed.bench.baselines --full    the same at 8 and 32 texts a batch (32: the encoder's default)

Sides (the same texts, views and batches: `MetaEOL().embed`, 8 prompts, one batch per prompt):
    plain    every row runs its whole prompt (the shared path switched off: SHARED_MIN_TOKENS above any prompt)
    shared   the default: the tokens all rows of a prompt's batch start with run once, as the others' past
The vectors agree to rounding (tests/test_baselines.py); each record carries their largest difference.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

from kvembed import baselines
from kvembed.evaluation.tasks import TextCap
from kvembed.method import collate

from . import common, models

QUICK = dict(batches=[16], repeats=3)
FULL = dict(batches=[8, 32], repeats=5)


@contextlib.contextmanager
def unshared():
    """The plain side: no prompt reaches the shared-prefix threshold."""
    keep = baselines.SHARED_MIN_TOKENS
    baselines.SHARED_MIN_TOKENS = 1 << 30
    try:
        yield
    finally:
        baselines.SHARED_MIN_TOKENS = keep


def texts(directory, tokenizer, n: int) -> dict[str, list[str]]:
    """n STS-B test sentences, and n BBC News test articles cut to their first 128 tokens."""
    with open(directory / "stsb" / "test.jsonl", encoding="utf-8") as f:
        sts = [json.loads(line)["sentence1"] for _, line in zip(range(n), f)]
    with open(directory / "bbc_news_clustering" / "test.jsonl", encoding="utf-8") as f:
        bbc = [json.loads(line)["text"] for _, line in zip(range(n), f)]
    cut = TextCap(tokenizer, 128)  # kvembed eval's --max-text-tokens 128
    return {"stsb": sts, "bbc_128_tokens": [cut(t) for t in bbc]}


def run(bm: models.BenchModel, corpora: dict[str, list[str]], batches, repeats: int, device, dtype,
        sink: list[dict]) -> None:
    clock = common.Clock(device)
    method = baselines.MetaEOL()
    for corpus, all_texts in corpora.items():
        for B in batches:
            views = [method.prepare(bm.tokenizer, t, None, None) for t in all_texts[:B]]
            per_prompt = [collate([v[p] for v in views]) for p in range(len(method.TEMPLATES))]
            shared = [baselines.shared_length(b.input_ids, b.attention_mask) for b in per_prompt]
            tokens = sum(int(b.attention_mask.sum()) for b in per_prompt)

            def embed():
                with torch.inference_mode():
                    return method.embed(bm.model, views, lambda vs: collate(vs, device))

            def plain():
                with unshared():
                    return embed()

            common.free(device)
            diff = (embed() - plain()).abs().max().item()
            times, inner = common.interleaved({"plain": plain, "shared": embed}, clock, repeats=repeats, warmup=1)
            shape = dict(model=bm.label, texts=corpus, B=B, prompts=len(per_prompt),
                         mean_tokens=round(tokens / (B * len(per_prompt)), 1),
                         shared_tokens=f"{min(shared)}..{max(shared)}")
            common.emit(common.compare("metaeol_shared_vs_plain", times, "plain", "shared", shape=shape,
                                       dtype=dtype, device=device, tokens=tokens, inner=inner,
                                       max_abs_diff=diff), sink)


def main(argv=None) -> int:
    argv = common.argv_list(argv)
    p = argparse.ArgumentParser(prog="python -m kvembed.bench.baselines", description=__doc__.split("\n\n")[0])
    common.add_arguments(p, quick="default model, 16 texts a batch, short and long texts",
                         full="the same at 8 and 32 texts a batch")
    p.add_argument("--data-dir", default=None, help="the data pack (default: $KVEMBED_DATA or ../shared/data)")
    opts = p.parse_args(argv)
    device, dtype = common.setup(opts)
    grid = FULL if opts.full else QUICK
    repeats = opts.repeats or grid["repeats"]
    env = common.environment(device)
    common.print_env(env)
    bm = models.load("default", dtype, device)
    corpora = texts(models.data_dir(opts.data_dir), bm.tokenizer, max(grid["batches"]))
    records: list[dict] = []
    run(bm, corpora, grid["batches"], repeats, device, dtype, records)
    if not opts.no_write:
        notes = [f"MetaEOL's 8 prompts, one batch of B texts per prompt; {repeats} interleaved rounds after 1 "
                 "warm-up; tokens = real tokens over the 8 batches (both sides embed the same ones)",
                 "max_abs_diff (JSON): the largest difference between the two sides' normalised vectors"]
        common.write_results(opts.out, "baselines", argv, common.subset_name(opts), records, env, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

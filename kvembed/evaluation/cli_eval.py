"""`kvembed eval`: score methods on the local data pack with the MTEB 2.x protocol, write a table.

    kvembed eval --method kvembedding --tasks all --max-rows 200
    kvembed eval --methods kvembedding,mean,last,prompteol --split test --out bench/results
    kvembed eval --methods kvembedding,kvembedding:bias=2:layers=10-12 --tasks stsb,mrpc --split validation
    kvembed eval --ablations                      # validation splits only; writes ablations.md/json

A method is a name (`KVEmbedder.from_pretrained(model, method=NAME, **switches)`), or `lexical_bow`
(a model-free floor). The switch flags (--layers, --bias, ...) apply to every listed method; one method
can carry its own with `name:key=value:key=value` (layer lists there are written `3-5` or `3+4+5`).
Only the flags given are passed on: everything else stays the encoder's default.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from kvembed.cli_options import add_model_options, positive_int, switches_from_args
from kvembed.switches import SWITCHES, SwitchError, check, parse

from .tasks import default_data_dir


def parse_method(spec: str) -> tuple[str, dict]:
    """`kvembedding:bias=2:layers=3-5` -> ("kvembedding", {"bias": 2.0, "layers": (3, 4, 5)}).

    Keys and values are the switches of kvembed/switches.py with the command line's parsers; a switch that does
    not apply to the method is refused here, before anything runs."""
    from kvembed.encoder import method_name

    name, *parts = spec.strip().split(":")
    switches = {}
    for p in parts:
        key, sep, value = p.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SWITCHES:
            raise SwitchError(f"method spec {spec!r}: '{p}' is not key=value with key in {', '.join(SWITCHES)}")
        if key in switches:  # the later would silently win
            raise SwitchError(f"method spec {spec!r}: {key} is given twice; give each switch once")
        try:
            switches[key] = parse(key, value)
        except SwitchError as e:
            raise SwitchError(f"method spec {spec!r}: {key}: {e}") from None
    if name != "lexical_bow":
        name = method_name(name)
        check(name, switches)
    return name, switches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to run")
    g.add_argument("--methods", default=None,
                   help="several methods into one table, comma-separated; each may be name:key=value:... "
                        "(overrides --method)")
    g.add_argument("--tasks", default="all", help="'all' or comma-separated task names or types (default all)")
    g.add_argument("--split", default=None, choices=("test", "validation"),
                   help="reported split (default test; --ablations: validation, and only validation)")
    g.add_argument("--max-rows", type=positive_int, default=None,
                   help="seeded sample of N rows per scored split (retrieval: N queries, whole corpus)")
    g.add_argument("--task-rows", type=task_rows, default={},
                   help="per-task --max-rows, e.g. bbc_news_clustering=800,brown_genres=300")
    g.add_argument("--max-text-tokens", type=positive_int, default=None,
                   help="cut every text to its first N tokens before any prompt, the same for every method "
                        "(long documents; stated in the report)")
    g.add_argument("--seed", type=int, default=0, help="seed of the --max-rows sample (default 0)")
    g.add_argument("--ablations", action="store_true",
                   help="the one-switch-at-a-time grid on STS-B/MRPC/TrecQA validation")
    g.add_argument("--batch-size", type=positive_int, default=32)
    add_model_options(parser)

    o = parser.add_argument_group("files")
    o.add_argument("--data-dir", type=Path, default=None,
                   help="the data pack (default $KVEMBED_DATA, else a shared/data folder next to the checkout or "
                        "the current directory)")
    o.add_argument("--out", type=Path, default=Path("bench") / "results",
                   help="where the report goes (default ./bench/results)")
    o.add_argument("--name", default=None, help="report file stem (default eval, or ablations)")
    o.add_argument("--combine", nargs="+", default=None, metavar="REPORT",
                   help="write <out>/<name>.md|json from reports already written (file stems, one per backbone), "
                        "running nothing")
    o.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default $KVEMBED_CACHE/eval)")
    o.add_argument("--no-cache", action="store_true", help="compute every embedding, store nothing")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def task_rows(text: str) -> dict:
    """`name=N,name=N` -> {name: N}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, n = part.partition("=")
        if not sep or not n.strip().isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"--task-rows {text!r}: use task=N pairs, e.g. stsb=500,brown_genres=300")
        out[name.strip()] = int(n)
    return out


def method_list(args) -> list[tuple[str, str, dict]]:
    """(label, method, switches) per requested method.

    A switch flag goes to every listed method that takes it (`--bias 2` with kvembedding,mean reaches kvembedding
    only); one that no listed method takes is refused, never ignored. A method's own `name:key=value` wins."""
    specs = args.methods.split(",") if args.methods else [args.method]
    common = switches_from_args(args)
    if args.max_length is not None:
        common["max_length"] = args.max_length
    out, used = [], {"max_length"}
    for spec in specs:
        name, own = parse_method(spec)
        takes = {k: v for k, v in common.items() if k == "max_length" or name in SWITCHES[k].methods}
        used |= set(takes)
        out.append((spec.strip(), name, {**takes, **own}))
    unused = sorted(set(common) - used)
    if unused:
        raise SwitchError(f"--{unused[0].replace('_', '-')} applies to none of the listed methods "
                          f"({', '.join(s for _, s, _ in out)}); it applies to {', '.join(SWITCHES[unused[0]].methods)}")
    return out


def run(args) -> int:
    """Run the table (or the ablation grid), write `<out>/<name>.md|json`, print the markdown."""
    from .ablations import run_ablations
    from .cache import EmbeddingCache
    from .report import combine_reports, write_report
    from .runners import Table, make_embedder, run_method
    from .tasks import select_tasks

    if args.combine:
        md, js = combine_reports(args.combine, args.out, args.name or "eval")
        print(f"wrote {md} and {js}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # does nothing where logging is set up already
    logging.getLogger("kvembed").setLevel(logging.INFO)
    # mteb/datasets/sklearn chatter (per-map progress bars, ill-defined-metric warnings on few-shot
    # folds) would bury our own progress bars; scores are unaffected.
    import datasets

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", module="sklearn")
    for name in ("mteb", "datasets", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    data_dir = args.data_dir or default_data_dir()
    cache = None if args.no_cache else EmbeddingCache(args.cache_dir)  # None: $KVEMBED_CACHE/eval
    progress = not args.no_progress

    if args.ablations:
        split = args.split or "validation"  # run_ablations refuses any other
        if args.method != "kvembedding" or args.methods:
            raise SwitchError("--ablations varies the kvembedding switches; drop --method/--methods")
        fixed = sorted(switches_from_args(args))
        if fixed:
            raise SwitchError(f"--ablations varies the switches itself; drop "
                              f"{', '.join('--' + k.replace('_', '-') for k in fixed)}")
        table = run_ablations(args.model, split=split, dtype=args.dtype, device=args.device, data_dir=data_dir,
                              max_rows=args.max_rows, seed=args.seed, cache=cache, batch_size=args.batch_size,
                              show_progress_bar=progress, command=args.command,
                              tasks=None if args.tasks == "all" else args.tasks.split(","),
                              base={} if args.max_length is None else {"max_length": args.max_length})
    else:
        split = args.split or "test"
        specs = select_tasks(args.tasks, data_dir)
        unknown = sorted(set(args.task_rows) - {s.name for s in specs})
        if unknown:
            raise ValueError(f"--task-rows names {unknown}, which are not among the tasks run "
                             f"({', '.join(s.name for s in specs)})")
        t0 = time.perf_counter()
        runs = []
        for label, method, switches in method_list(args):
            embedder = make_embedder(args.model, method, switches, dtype=args.dtype, device=args.device,
                                     data_dir=data_dir, id_corpus=args.id_corpus)
            runs.append(run_method(embedder, specs, split=split, max_rows=args.max_rows, seed=args.seed,
                                   cache=cache, batch_size=args.batch_size, show_progress_bar=progress,
                                   label=label, method=method, switches=switches, model_name=args.model,
                                   task_rows=args.task_rows, max_text_tokens=args.max_text_tokens))
        table = Table(model=args.model or "default", dtype=args.dtype, split=split, max_rows=args.max_rows,
                      seed=args.seed, command=args.command, runs=runs, wall_s=round(time.perf_counter() - t0, 3),
                      task_rows=args.task_rows, max_text_tokens=args.max_text_tokens)
    md, js = write_report(table, args.out, args.name or table.kind)  # default stem: eval, or ablations
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md} and {js}")
    return 0


def main(argv=None) -> int:
    """`python -m kvembed.evaluation.cli_eval ...` = `kvembed eval ...` (same options, errors and exit codes)."""
    from kvembed.cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

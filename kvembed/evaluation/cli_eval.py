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
import shlex
import sys
import time
import warnings
from pathlib import Path

from kvembed.cli import parse_layers, switches_from_args

from .tasks import REPO_ROOT, default_data_dir

DTYPES = ("float32", "bfloat16", "float16")


_SWITCH_TYPES = {"bias": float, "passes": int, "layers": parse_layers, "rope_mode": str, "pooling": str,
                 "template": str, "normalize": lambda v: v.lower() in ("1", "true", "yes", "on")}


def parse_method(spec: str) -> tuple[str, dict]:
    """`kvembedding:bias=2:layers=3-5` -> ("kvembedding", {"bias": 2.0, "layers": [3, 4, 5]})."""
    name, *parts = spec.strip().split(":")
    switches = {}
    for p in parts:
        key, sep, value = p.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in _SWITCH_TYPES:
            raise argparse.ArgumentTypeError(
                f"method spec {spec!r}: '{p}' is not key=value with key in {', '.join(_SWITCH_TYPES)}")
        switches[key] = _SWITCH_TYPES[key](value)
    return name, switches


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to run")
    g.add_argument("--method", default=None, help="one method (default kvembedding)")
    g.add_argument("--methods", default=None,
                   help="several methods into one table, comma-separated; each may be name:key=value:...")
    g.add_argument("--tasks", default="all", help="'all' or comma-separated task names or types (default all)")
    g.add_argument("--model", default=None, help="local folder, hub id or .gguf (default: the default model)")
    g.add_argument("--dtype", default="float32", choices=DTYPES)
    g.add_argument("--device", default="cpu")
    g.add_argument("--split", default=None, choices=("test", "validation"),
                   help="reported split (default test; --ablations: validation, and only validation)")
    g.add_argument("--max-rows", type=int, default=None,
                   help="seeded sample of N rows per scored split (retrieval: N queries, whole corpus)")
    g.add_argument("--seed", type=int, default=0, help="seed of the --max-rows sample (default 0)")
    g.add_argument("--ablations", action="store_true",
                   help="the one-switch-at-a-time grid on STS-B/MRPC/TrecQA validation")
    g.add_argument("--batch-size", type=int, default=32)

    s = parser.add_argument_group("switches (passed to every method; omitted = the encoder's default)")
    s.add_argument("--layers", type=parse_layers, default=None, help="auto | none | all | 3,4,5 | 3-5")
    s.add_argument("--bias", type=float, default=None)
    s.add_argument("--rope-mode", default=None, choices=("rotated", "position0", "unrotated"))
    s.add_argument("--passes", type=int, default=None, choices=(1, 2))
    s.add_argument("--pooling", default=None, choices=("hybrid", "mean", "last"))
    s.add_argument("--no-normalize", action="store_true", help="keep embeddings unnormalised")
    s.add_argument("--template", default=None, help="'none' (raw text) or a string with a {text} slot")
    s.add_argument("--max-length", type=int, default=None,
                   help="tokens per text (default: the model's context); longer texts are cut on the text side")

    o = parser.add_argument_group("files")
    o.add_argument("--data-dir", type=Path, default=None,
                   help="the data pack (default $KVEMBED_DATA, else ../shared/data next to the repository)")
    o.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results", help="where the report goes")
    o.add_argument("--name", default=None, help="report file stem (default eval, or ablations)")
    o.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (default <repo>/.cache/eval)")
    o.add_argument("--no-cache", action="store_true", help="compute every embedding, store nothing")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def common_switches(args) -> dict:
    return switches_from_args(args)


def method_list(args) -> list[tuple[str, str, dict]]:
    """(label, method, switches) per requested method."""
    if args.method and args.methods:
        raise SystemExit("give --method or --methods, not both")
    specs = (args.methods.split(",") if args.methods else [args.method or "kvembedding"])
    out = []
    for spec in specs:
        name, own = parse_method(spec)
        out.append((spec.strip(), name, {**common_switches(args), **own}))
    return out


def _command() -> str:
    argv = sys.argv[1:]
    tail = argv[argv.index("eval") + 1:] if "eval" in argv else argv
    return shlex.join(["kvembed", "eval", *tail])


def _quiet_libraries() -> None:
    # mteb/datasets/sklearn chatter (per-map progress bars, ill-defined-metric warnings on few-shot
    # folds) would bury our own progress bars; scores are unaffected.
    import datasets

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", module="sklearn")
    for name in ("mteb", "datasets", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run(args, *, make=None) -> int:
    """Run the table (or the ablation grid), write `<out>/<name>.md|json`, print the markdown."""
    from .ablations import check_split, run_ablations
    from .cache import DEFAULT_CACHE_DIR, EmbeddingCache
    from .report import write_report
    from .runners import Table, make_embedder, run_method
    from .tasks import select_tasks

    make = make or make_embedder
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("kvembed").setLevel(logging.INFO)
    _quiet_libraries()
    data_dir = args.data_dir or default_data_dir()
    cache = None if args.no_cache else EmbeddingCache(args.cache_dir or DEFAULT_CACHE_DIR)
    command = getattr(args, "command", None) or _command()
    progress = not args.no_progress

    if args.ablations:
        split = args.split or "validation"
        check_split(split)
        if args.method not in (None, "kvembedding") or args.methods:
            raise SystemExit("--ablations varies the kvembedding switches; drop --method/--methods")
        fixed = sorted(set(common_switches(args)) - {"max_length"})
        if fixed:
            raise SystemExit(f"--ablations varies the switches itself; drop {', '.join('--' + k.replace('_', '-') for k in fixed)}")
        table = run_ablations(args.model, split=split, dtype=args.dtype, device=args.device, data_dir=data_dir,
                              max_rows=args.max_rows, seed=args.seed, cache=cache, batch_size=args.batch_size,
                              show_progress_bar=progress, command=command, make=make,
                              tasks=None if args.tasks == "all" else args.tasks.split(","),
                              base={k: v for k, v in common_switches(args).items() if k == "max_length"})
        name = args.name or "ablations"
    else:
        split = args.split or "test"
        specs = select_tasks(args.tasks, data_dir)
        t0 = time.perf_counter()
        runs = []
        for label, method, switches in method_list(args):
            embedder = make(args.model, method, switches, dtype=args.dtype, device=args.device, data_dir=data_dir)
            runs.append(run_method(embedder, specs, split=split, max_rows=args.max_rows, seed=args.seed,
                                   cache=cache, batch_size=args.batch_size, show_progress_bar=progress,
                                   label=label, method=method, switches=switches, model_name=args.model))
        table = Table(model=args.model or "default", dtype=args.dtype, split=split, max_rows=args.max_rows,
                      seed=args.seed, command=command, runs=runs, wall_s=round(time.perf_counter() - t0, 3))
        name = args.name or "eval"
    md, js = write_report(table, args.out, name)
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md} and {js}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvembed eval", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if argv is not None:
        args.command = shlex.join(["kvembed", "eval", *argv])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""kvembed's command line: embed | select-layers | eval | embed-corpus | golden | bench.

Exit codes (every subcommand):
    0    success
    1    an unexpected internal error (a bug: please report it with the traceback)
    2    bad usage or bad input: unknown option, bad switch value, missing/unreadable input file, bad line,
         output that would overwrite the input, missing or unwritable output folder, an embed-corpus output
         folder that belongs to another run
    3    the model could not be loaded (missing, corrupt or inconsistent weights/config; the message names the file)
    4    embedding failed: a non-finite vector, or a text too long with --on-truncation raise
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
from pathlib import Path

from .cli_options import add_model_options, embedder_from_args, join_negative_values, positive_int
from .files import atomic_output, atomic_write, is_jsonl, read_texts

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_MODEL, EXIT_EMBED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
OUTPUT_SUFFIXES = (".npy", ".jsonl", ".ndjson")
# Optional packages and the pip extra that installs each (pyproject.toml).
EXTRAS = {"mteb": "eval", "datasets": "eval", "sklearn": "eval", "scipy": "eval", "sentence_transformers": "st",
          "transformers": "bench"}


class InputError(ValueError):
    """Bad input files or options: exit code 2."""


# ------------------------------------------------------------------------------------------- embed


def check_output(path: str, src: str | None) -> Path:
    """Refuse, before any embedding, an output that cannot be written or would overwrite an input."""
    p = Path(path)
    if p.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"--output {path}: use a .npy or .jsonl file name")
    if not p.parent.is_dir():
        raise InputError(f"output folder {p.parent} does not exist; create it first")
    if not os.access(p.parent, os.W_OK):
        raise InputError(f"output folder {p.parent} is not writable; choose another --output")
    if p.is_dir():
        raise InputError(f"--output {path} is a folder; give a file name ending in .npy or .jsonl")
    if src and p.exists() and Path(src).exists() and p.resolve() == Path(src).resolve():
        raise InputError(f"--output {path} is the input file: writing it would destroy the input; "
                         "choose another output name")
    return p


def write_output(p: Path, vectors, texts: list[str], lines: list[int | None], ids: list) -> None:
    import numpy as np

    try:
        if p.suffix.lower() == ".npy":
            with atomic_output(p) as f:
                np.save(f, vectors)
        else:
            with atomic_output(p, "w", encoding="utf-8") as f:
                for i, (t, v) in enumerate(zip(texts, vectors)):
                    row = {"index": i, "line": lines[i], "text": t, "embedding": [float(x) for x in v]}
                    if ids[i] is not None:
                        row["id"] = ids[i]
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as e:
        raise InputError(f"cannot write {p}: {e.strerror or e}") from None


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", help="texts to embed (or use --input)")
    p.add_argument("--input", default=None, help=".jsonl (see --field) or a text file with one text per line")
    p.add_argument("--field", default=None, help="JSONL field holding the text (default: text)")
    p.add_argument("--id-field", default=None, help="JSONL field copied to .jsonl output as `id` (default: id)")
    p.add_argument("--skip-bad-lines", action="store_true", help="leave unreadable lines out and report them")
    p.add_argument("--output", default=None, help="write embeddings to a .npy or .jsonl file (input order)")
    p.add_argument("--prompt-name", default="document", choices=("document", "query"))
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--on-truncation", default="warn", choices=("warn", "raise", "ignore"))
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    add_model_options(p)


def run_embed(args) -> int:
    given = [o for o, v in (("--field", args.field), ("--id-field", args.id_field)) if v is not None]
    if given and not (args.input and is_jsonl(args.input)):
        where = (f"{args.input} is read as a text file (one text per line), which has no fields" if args.input
                 else "texts given as arguments have no fields")
        raise InputError(f"{' and '.join(given)}: for JSON lines input; {where}. Leave them out, or use --input "
                         "FILE.jsonl")
    texts, lines, ids = list(args.texts), [None] * len(args.texts), [None] * len(args.texts)
    if args.input:
        got = read_texts(args.input, args.field or "text", skip_bad=args.skip_bad_lines, id_field=args.id_field or "id")
        if got.skipped:
            print(f"kvembed: skipped {len(got.skipped)} unreadable line(s) of {args.input}: "
                  f"{[n for n, _ in got.skipped][:20]}", file=sys.stderr)
        texts, lines, ids = texts + got.texts, lines + got.lines, ids + got.ids
    if not texts:
        raise InputError("nothing to embed: give texts as arguments or --input FILE")
    out = check_output(args.output, args.input) if args.output else None
    emb = embedder_from_args(args)
    vectors = emb.encode(texts, prompt_name=args.prompt_name, batch_size=args.batch_size,
                         show_progress_bar=args.progress or None, on_truncation=args.on_truncation)
    print(f"kvembed: {len(texts)} text(s) -> {vectors.shape[1]}-d with {emb.method.name} "
          f"(model {emb.loaded.path.name}, layers {list(getattr(emb.method, 'layers', [])) or '-'})", file=sys.stderr)
    if out is not None:
        write_output(out, vectors, texts, lines, ids)
        print(f"kvembed: wrote {out}", file=sys.stderr)
    elif len(texts) == 2:
        print(f"cosine similarity: {float(emb.similarity(vectors[:1], vectors[1:])[0, 0]):.4f}")
    else:
        sim = emb.similarity(vectors, vectors)
        for i, row in enumerate(sim):
            print(f"[{i}] " + " ".join(f"{x:+.3f}" for x in row))
    return EXIT_OK


# ----------------------------------------------------------------------------------- select-layers


def add_select_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=None,
                   help="FILE.jsonl (a \"text\" field per row) or FILE.txt (a text per line); "
                        "without it, print the selection shipped for the model")
    p.add_argument("--n", type=positive_int, default=1000, help="texts sampled from the corpus (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--template", default=None,
                   help='prompt the texts are wrapped in: default the document template, "none" for the raw '
                        "text, or any string with a {text} slot")
    p.add_argument("--cache-dir", default=None, help="where selections are cached (default: <cache root>/layer_select)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the selection as JSON")
    add_model_options(p, max_length=512, method=False)  # 512: the budget the shipped selections were made with


def run_select(args) -> int:
    import weights_loader

    from .encoder import as_dtype, check_device
    from .layer_select import format_curve
    from .method import DOCUMENT_TEMPLATE, RAW_TEMPLATE, check_template
    from .selections import cached_selection, read_corpus, shipped_selection

    template = check_template({None: DOCUMENT_TEMPLATE, "none": RAW_TEMPLATE}.get(args.template, args.template))
    loaded = weights_loader.load_model(args.model, dtype=as_dtype(args.dtype), device=check_device(args.device))
    if args.corpus is None:
        sel = shipped_selection(loaded.fingerprint)
        if sel is None or (args.n, args.seed, args.max_length, template) != (1000, 0, sel.max_length, sel.template):
            raise InputError("select-layers: no selection is shipped for this model and these options; "
                             "pass --corpus FILE.jsonl|FILE.txt")
        print("(the selection shipped with kvembed, computed on the id_corpus)")
    else:
        sel = cached_selection(loaded.model, loaded.tokenizer, read_corpus(args.corpus), n=args.n, seed=args.seed,
                               template=template, fingerprint=loaded.fingerprint, cache_dir=args.cache_dir,
                               batch_size=args.batch_size, max_length=args.max_length)
    print(format_curve(sel))
    if args.json_out:
        atomic_write(args.json_out, json.dumps(sel.to_dict(), indent=1) + "\n", fsync=False)
    return EXIT_OK


# ------------------------------------------------------------------------------------------ golden


def add_golden_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("outdir", help="folder for golden.safetensors + golden.json")
    p.add_argument("--text", action="append", default=None, help="input text (repeatable; default: two fixed ones)")
    p.add_argument("--check", action="store_true", help="compare against an existing golden folder instead")
    add_model_options(p)


def run_golden(args) -> int:
    from .golden import GOLDEN_TEXTS, check_golden, write_golden

    emb = embedder_from_args(args)
    if args.check:
        errs = check_golden(emb, args.outdir)
        worst = max(errs, key=errs.get)
        for k, e in sorted(errs.items()):
            print(f"{k:28s} {e:.2e}")
        print(f"worst: {worst} {errs[worst]:.2e}")
        return EXIT_OK if errs[worst] <= 1e-5 else EXIT_EMBED
    out = write_golden(emb, args.outdir, tuple(args.text) if args.text else GOLDEN_TEXTS)
    print(f"kvembed: wrote {out / 'golden.safetensors'} and {out / 'golden.json'}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------- bench

BENCHES = ("forward", "attention", "memory", "baselines", "scale")


def run_bench(args) -> int:
    return int(importlib.import_module(f"kvembed.bench.{args.which}").main(args.rest) or 0)


# -------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from . import corpus
    from .evaluation import cli_eval

    parser = argparse.ArgumentParser(prog="kvembed", description="Training-free text embeddings by KV re-routing.",
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, helptext, add, run in (
        ("embed", "embed texts (arguments, a text file or JSONL) to .npy/.jsonl or print similarities",
         add_embed_arguments, run_embed),
        ("select-layers", "intrinsic-dimension curve and the selected layers (SPEC §1.4)", add_select_arguments,
         run_select),
        ("eval", "MTEB-protocol evaluation on the shared data pack", cli_eval.add_arguments, cli_eval.run),
        ("embed-corpus", "embed a JSONL corpus into resumable parts (alone or under torchrun)", corpus.add_arguments,
         corpus.run),
        ("golden", "write (or --check) golden vectors for ports to other frameworks", add_golden_arguments,
         run_golden),
    ):
        p = sub.add_parser(name, help=helptext)
        add(p)
        p.set_defaults(func=run)
    p = sub.add_parser("bench", help=f"run a benchmark ({', '.join(BENCHES)}); results under ./bench/results")
    p.add_argument("which", choices=BENCHES)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (e.g. --quick)")
    p.set_defaults(func=run_bench)
    return parser


def main(argv=None) -> int:
    from weights_loader import WeightsError

    from .config import ConfigError
    from .encoder import TruncationError
    from .scale.manifest import OutdirError

    argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    args.command = shlex.join(["kvembed", *argv])  # recorded in reports, so a run can be repeated
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("kvembed: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise  # not an optional package: a bug, with its traceback
        print(f"kvembed: error: `kvembed {args.cmd}` needs the optional package {e.name}: "
              f"pip install 'kvembed[{extra}]'", file=sys.stderr)
        return EXIT_INPUT
    except (WeightsError, ConfigError) as e:
        print(f"kvembed: model error: {e}", file=sys.stderr)
        return EXIT_MODEL
    except (FloatingPointError, TruncationError) as e:
        print(f"kvembed: embedding error: {e}", file=sys.stderr)
        return EXIT_EMBED
    except (InputError, OutdirError, ValueError, OSError) as e:
        # ValueError covers every input check (SwitchError, TextFileError, CorpusError, TaskDataError, ...)
        print(f"kvembed: error: {e}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())

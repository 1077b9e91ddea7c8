"""kvembed's command line: embed | select-layers | eval | embed-corpus | golden | bench.

Exit codes (every subcommand):
    0  success
    1  an unexpected internal error (a bug: please report it with the traceback)
    2  bad usage or bad input: unknown option, missing/unreadable input file, bad JSONL line, missing output folder,
       an embed-corpus output folder that belongs to another run
    3  the model could not be loaded (missing, corrupt or inconsistent weights/config; the message names the file)
    4  embedding failed: a non-finite vector, or a text too long with --on-truncation raise
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_MODEL, EXIT_EMBED = 0, 1, 2, 3, 4


class InputError(ValueError):
    """Bad input files or options: exit code 2."""


# ------------------------------------------------------------------------------------ shared options


def parse_layers(value: str):
    """`auto` / `none` / `all` / `3,4,5` / `3-5` / `3+4+5` -> the encoder's `layers` switch."""
    value = value.strip()
    if value in ("auto", "none", "all"):
        return value
    out = []
    try:
        for part in value.replace("+", ",").split(","):
            if "-" in part:
                a, b = part.split("-")
                out += list(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers {value!r}: use auto, none, all, or layer indices like 3,4,5 or 3-5") from None
    if not out:
        raise argparse.ArgumentTypeError(f"--layers {value!r}: no layer index given")
    return out


# Options that become KVEmbedder.from_pretrained switches when given (None = the method's default).
SWITCHES = ("layers", "bias", "rope_mode", "passes", "pooling", "template", "query_template", "max_length")


def switches_from_args(args) -> dict:
    """The method switches a parsed command line sets, for every subcommand that builds an embedder."""
    switches = {k: getattr(args, k) for k in SWITCHES if getattr(args, k, None) is not None}
    if getattr(args, "no_normalize", False):  # --no-normalize
        switches["normalize"] = False
    elif getattr(args, "normalize", None) is not None:  # --normalize / --no-normalize (BooleanOptionalAction)
        switches["normalize"] = args.normalize
    return switches


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local folder, hub id or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--method", default="kvembedding",
                   help="kvembedding (default) or a baseline: mean, last, prompteol, metaeol, echo, "
                        "token_prepending, bidirectional")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's context)")
    p.add_argument("--id-corpus", default=None, help="texts for --layers auto on a model without a shipped selection")
    p.add_argument("--compile", action="store_true", help="run the decoder under torch.compile")
    s = p.add_argument_group("KV-Embedding switches (SPEC §1; omitted = the default)")
    s.add_argument("--layers", type=parse_layers, default=None, help="auto | none | all | 3,4,5 | 3-5")
    s.add_argument("--bias", type=float, default=None, help="logit bias of the prefix slot (default 1.0)")
    s.add_argument("--rope-mode", default=None, choices=("rotated", "position0", "unrotated"))
    s.add_argument("--passes", type=int, default=None, choices=(1, 2))
    s.add_argument("--pooling", default=None, choices=("hybrid", "mean", "last"))
    s.add_argument("--no-normalize", action="store_true", help="keep embeddings unnormalised")
    s.add_argument("--template", default=None, help="'none' (raw text) or a prompt with a {text} slot")
    s.add_argument("--query-template", default=None, help="prompt with a {text} slot for --prompt-name query")


def embedder_from_args(args):
    from .encoder import KVEmbedder

    return KVEmbedder.from_pretrained(args.model, method=args.method, dtype=args.dtype, device=args.device,
                                      compile=args.compile, id_corpus=args.id_corpus, **switches_from_args(args))


# ------------------------------------------------------------------------------------------- embed


def read_texts(path: str, field: str = "text", skip_bad_lines: bool = False) -> tuple[list[str], list[int]]:
    """Texts from a .jsonl (one object per line, `field`) or any other file (one text per line).

    Returns (texts, skipped line numbers). A bad line (invalid UTF-8 or JSON, missing field, not a string)
    is an InputError naming its line number, unless skip_bad_lines, which leaves it out and reports it.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file {path} does not exist (or is not a file)")
    texts, skipped = [], []
    is_jsonl = p.suffix in (".jsonl", ".ndjson")
    with open(p, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
                if is_jsonl:
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                    if not isinstance(obj, dict) or field not in obj:
                        raise ValueError(f"no {field!r} field")
                    text = obj[field]
                    if not isinstance(text, str):
                        raise ValueError(f"{field!r} is {type(text).__name__}, not a string")
                else:
                    text = line
            except (UnicodeDecodeError, ValueError) as e:
                if not skip_bad_lines:
                    raise InputError(f"{path}:{n}: unreadable line ({e}); fix it or pass --skip-bad-lines") from None
                skipped.append(n)
                continue
            texts.append(text)
    return texts, skipped


def write_output(path: str, vectors, texts: list[str]) -> None:
    import numpy as np

    p = Path(path)
    if not p.parent.is_dir():
        raise InputError(f"output folder {p.parent} does not exist; create it first")
    tmp = p.with_name(p.name + ".partial")
    try:
        if p.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, vectors)
        elif p.suffix in (".jsonl", ".ndjson"):
            with open(tmp, "w", encoding="utf-8") as f:
                for i, (t, v) in enumerate(zip(texts, vectors)):
                    f.write(json.dumps({"index": i, "text": t, "embedding": [float(x) for x in v]}) + "\n")
        else:
            raise InputError(f"--output {path}: use a .npy or .jsonl file name")
        tmp.replace(p)  # never leave a half-written output under the real name
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", help="texts to embed (or use --input)")
    p.add_argument("--input", default=None, help=".jsonl (see --field) or a text file with one text per line")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true", help="leave unreadable lines out and report them")
    p.add_argument("--output", default=None, help="write embeddings to a .npy or .jsonl file (input order)")
    p.add_argument("--prompt-name", default="document", choices=("document", "query"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--on-truncation", default="warn", choices=("warn", "raise", "ignore"))
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    add_model_options(p)


def run_embed(args) -> int:
    texts = list(args.texts)
    if args.input:
        more, skipped = read_texts(args.input, args.field, args.skip_bad_lines)
        if skipped:
            print(f"kvembed: skipped {len(skipped)} unreadable line(s) of {args.input}: {skipped[:20]}", file=sys.stderr)
        texts += more
    if not texts:
        raise InputError("nothing to embed: give texts as arguments or --input FILE")
    if args.output and not Path(args.output).parent.is_dir():
        raise InputError(f"output folder {Path(args.output).parent} does not exist; create it first")
    emb = embedder_from_args(args)
    vectors = emb.encode(texts, prompt_name=args.prompt_name, batch_size=args.batch_size,
                         show_progress_bar=args.progress or None, on_truncation=args.on_truncation)
    print(f"kvembed: {len(texts)} text(s) -> {vectors.shape[1]}-d with {emb.method.name} "
          f"(model {emb.loaded.path.name}, layers {list(getattr(emb.method, 'layers', [])) or '-'})", file=sys.stderr)
    if args.output:
        write_output(args.output, vectors, texts)
        print(f"kvembed: wrote {args.output}", file=sys.stderr)
    elif len(texts) == 2:
        print(f"cosine similarity: {float(emb.similarity(vectors[:1], vectors[1:])[0, 0]):.4f}")
    else:
        sim = emb.similarity(vectors, vectors)
        for i, row in enumerate(sim):
            print(f"[{i}] " + " ".join(f"{x:+.3f}" for x in row))
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


def run_bench(args) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "bench" / f"{args.which}.py"
    if not script.is_file():
        raise InputError(f"{script} not found: the benchmarks live in the source checkout's bench/ folder")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return EXIT_OK


# -------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from . import corpus, layer_select
    from .evaluation import cli_eval

    parser = argparse.ArgumentParser(prog="kvembed", description="Training-free text embeddings by KV re-routing.",
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("embed", help="embed texts (arguments, a text file or JSONL) to .npy/.jsonl or print similarities")
    add_embed_arguments(p)
    p.set_defaults(func=run_embed)
    p = sub.add_parser("select-layers", help="intrinsic-dimension curve and the selected layers (SPEC §1.4)")
    layer_select.add_arguments(p)
    p.set_defaults(func=layer_select.run)
    p = sub.add_parser("eval", help="MTEB-protocol evaluation on the shared data pack")
    cli_eval.add_arguments(p)
    p.set_defaults(func=cli_eval.run)
    p = sub.add_parser("embed-corpus", help="embed a JSONL corpus into resumable parts (alone or under torchrun)")
    corpus.add_arguments(p)
    p.set_defaults(func=corpus.run)
    p = sub.add_parser("golden", help="write (or --check) golden vectors for ports to other frameworks")
    add_golden_arguments(p)
    p.set_defaults(func=run_golden)
    p = sub.add_parser("bench", help="run a benchmark script from bench/ (forward, attention, memory, scale)")
    p.add_argument("which", choices=("forward", "attention", "memory", "scale"))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script (e.g. --quick)")
    p.set_defaults(func=run_bench)
    return parser


def main(argv=None) -> int:
    from weights_loader import WeightsError

    from .config import ConfigError
    from .scale.manifest import OutdirError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (InputError, OutdirError) as e:
        print(f"kvembed: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except (WeightsError, ConfigError) as e:
        print(f"kvembed: model error: {e}", file=sys.stderr)
        return EXIT_MODEL
    except FloatingPointError as e:
        print(f"kvembed: embedding error: {e}", file=sys.stderr)
        return EXIT_EMBED
    except ValueError as e:
        if "max_length" in str(e) and "cut" in str(e):
            print(f"kvembed: embedding error: {e}", file=sys.stderr)
            return EXIT_EMBED
        print(f"kvembed: error: {e}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())

"""Command-line options shared by every subcommand that embeds: generated from the one switch table.

`add_switch_options` writes one `--option` per entry of kvembed/switches.py's SWITCHES (same names, parsers,
choices and help), so `kvembed embed`, `embed-corpus`, `eval` and `golden` can never drift apart; a test walks
the parsers to check it. An omitted switch is None: the method's own default.
"""

from __future__ import annotations

import argparse
import re

from .switches import ALL_METHODS, SWITCHES, SwitchError, check_int, parse, parse_int

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
NAMED_MODELS_HELP = "local folder, hub id, .gguf file, or a named model (smollm2-135m, qwen2.5-coder-0.5b)"


def positive_int(text: str) -> int:
    try:  # argparse's message names the option
        return check_int("value", parse_int(text), minimum=1)
    except SwitchError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def switch_type(name: str):
    def convert(text: str):
        try:
            return parse(name, text)
        except SwitchError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def add_switch_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method switches (SPEC §1 and §2; omitted = the method's own default)")
    for sw in SWITCHES.values():
        helptext = f"{sw.help} [{', '.join(sw.methods) if len(sw.methods) < 8 else 'every method'}]"
        # Booleans take a value (--normalize false): a bare flag would turn "--normalize False" into a flag plus
        # a text to embed.
        metavar = "{true,false}" if sw.choices == (True, False) else sw.name.upper() if sw.choices is None else None
        g.add_argument("--" + sw.name.replace("_", "-"), type=switch_type(sw.name), default=None, help=helptext,
                       choices=sw.choices, metavar=metavar)


def add_model_options(p: argparse.ArgumentParser, *, device="cpu", max_length=None, method=True) -> None:
    g = p.add_argument_group("model and method" if method else "model")
    g.add_argument("--model", default=None, help=NAMED_MODELS_HELP + " (default: smollm2-135m)")
    if method:
        g.add_argument("--method", default="kvembedding",
                       help=f"kvembedding (default) or a baseline: {', '.join(ALL_METHODS[1:])}")
    g.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES)
    g.add_argument("--device", default=device, help=f"cpu, cuda, cuda:N (default {device})")
    g.add_argument("--max-length", type=positive_int, default=max_length, help="tokens per text, longer texts are "
                   "cut on the text side (default: %s)" % (max_length or "the model's context"))
    if not method:
        return
    g.add_argument("--id-corpus", default=None, help="texts for --layers auto on a model without a shipped selection")
    g.add_argument("--compile", action="store_true", help="run the decoder under torch.compile")
    add_switch_options(p)


def switches_from_args(args) -> dict:
    """The switches a parsed command line sets (None ones are left to the method)."""
    return {name: getattr(args, name) for name in SWITCHES if getattr(args, name, None) is not None}


def embedder_from_args(args, device: str | None = None):
    from .encoder import KVEmbedder

    return KVEmbedder.from_pretrained(args.model, method=args.method, dtype=args.dtype,
                                      device=device or args.device, compile=args.compile,
                                      max_length=args.max_length, id_corpus=args.id_corpus,
                                      **switches_from_args(args))


def join_negative_values(argv: list[str]) -> list[str]:
    """`--bias -inf` as `--bias=-inf`: argparse would read '-inf' as an unknown option, yet -inf is a documented
    bias value (no prefix). Plain negative numbers (-2) argparse already takes."""
    out = []
    for a in argv:
        if out and re.match(r"^-(inf|infinity)$", a, re.IGNORECASE) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out

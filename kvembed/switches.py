"""The switches, defined once: SPEC §1's ablation table and SPEC §2's baseline switches as code.

Every surface derives from `SWITCHES`: the method objects take them as keyword arguments (and validate them
here), every CLI subcommand that embeds gets one `--option` per switch (kvembed/cli_options.py), `kvembed eval`
parses `name:key=value` with the same parsers, and the embedder fingerprint, the golden metadata and the mteb
model meta all read `method.config()`, whose keys are these names.

    switch          methods                                        values (the SPEC default first)
    layers          kvembedding                                    auto / none / all / a list of layer indices
    bias            kvembedding                                    1.0 / any float, or -inf (= no prefix)
    rope_mode       kvembedding                                    rotated / position0 / unrotated
    passes          kvembedding                                    1 / 2
    pooling         all                                            hybrid / mean / last / text (per method)
    normalize       all                                            true / false
    template        all but metaeol                                the method's own / none / any {text} string
    query_template  all but metaeol                                the method's own / any {text} string
    cleanup         prompteol, metaeol, token_prepending           true (the authors' text clean-up) / false
    exit_layer      token_prepending                               -2 / any layer index / final (the final norm)
    prepend_layers  token_prepending                               6 / any k >= 1 (placeholder rewritten in 1..k)
    placeholder_seed token_prepending                              0 / any seed of the placeholder's embedding

A value given as None means "the method's own default". Strings from a command line go through `parse`;
Python values through `check`, which refuses what would otherwise be silently coerced (`layers=[1.7]`,
`normalize="False"`, a NaN bias).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

ALL_METHODS = ("kvembedding", "mean", "last", "prompteol", "metaeol", "echo", "token_prepending", "bidirectional")
TEMPLATED = tuple(m for m in ALL_METHODS if m != "metaeol")

ROPE_MODES = ("rotated", "position0", "unrotated")
POOLINGS = ("hybrid", "mean", "last", "text")
LAYER_WORDS = ("auto", "none", "all")
# Named templates: `none` is the raw text and `kvembedding` KV-Embedding's two prompts, for every templated
# method; echo also knows its two template sets, `paper` and `repo`.
TEMPLATE_WORDS = ("none", "kvembedding", "paper", "repo")


class SwitchError(ValueError):
    """A switch value that is not one of its allowed values: the message names the switch and what to pass."""


# ------------------------------------------------------------------------------------- value checks


def check_bool(name: str, value) -> bool:
    # bool only: "False" is a non-empty string, so bool("False") is True, and 0/1 hide typos in code
    if not isinstance(value, bool):
        raise SwitchError(f"{name}={value!r}: pass True or False (a bool), not {type(value).__name__}")
    return value


def check_int(name: str, value, minimum: int | None = None, what: str = "an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SwitchError(f"{name}={value!r}: pass {what}, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise SwitchError(f"{name}={value!r}: must be >= {minimum}")
    return int(value)


def check_bias(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SwitchError(f"{name}={value!r}: pass a number, not {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value == math.inf:
        raise SwitchError(f"{name}={value!r} is not finite: pass a finite number, or -inf for no prefix at all")
    return value


def check_choice(name: str, value, choices) -> Any:
    if value not in choices:
        raise SwitchError(f"{name}={value!r}: choose one of {', '.join(map(str, choices))}")
    return value


def check_layers(name: str, value):
    """'auto' / 'none' / 'all', or a sequence of distinct non-negative integers (kept sorted)."""
    if isinstance(value, str):
        return check_choice(name, value, LAYER_WORDS)
    if not isinstance(value, (list, tuple, range)):
        raise SwitchError(f"{name}={value!r}: pass 'auto', 'none', 'all' or a list of layer indices")
    out = [check_int(f"{name}[{i}]", v, minimum=0) for i, v in enumerate(value)]
    if not out:
        raise SwitchError(f"{name}=[]: an empty list re-routes nothing; say layers='none' for that")
    return tuple(sorted(set(out)))


def check_template(value, name: str = "template", words: tuple[str, ...] = ()) -> str:
    """A prompt with a {text} slot; as a switch, also one of the named templates `words` (the method resolves them)."""
    if not isinstance(value, str) or "{text}" not in value and value not in words:
        named = f", or one of {', '.join(words)}" if words else ""
        raise SwitchError(f"{name}={value!r}: pass a string with a {{text}} slot{named}")
    return value


# ------------------------------------------------------------------------------------ string parsers


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise SwitchError(f"{text!r} is not a boolean: use true or false")


def number_parser(convert: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def parse_number(text: str):
        try:
            return convert(text)
        except ValueError:
            raise SwitchError(f"{text!r} is not {what}") from None

    return parse_number


parse_float = number_parser(float, "a number (e.g. 1.0, -2, -inf)")
parse_int = number_parser(int, "an integer")


def parse_layers(text: str):
    """`auto` / `none` / `all` / `3,4,5` / `3-5` / `3+4+5` (the eval spec's separator is ':', so '+' works there)."""
    text = text.strip()
    if text in LAYER_WORDS:
        return text
    out = []
    for part in filter(None, map(str.strip, text.replace("+", ",").split(","))):  # empty parts are skipped
        a, dash, b = part.partition("-")
        try:
            lo, hi = int(a), int(b) if dash else int(a)
        except ValueError:
            raise SwitchError(f"layers {text!r}: use auto, none, all, or indices like 3,4,5 or 3-5") from None
        if hi < lo:
            raise SwitchError(f"layers {text!r}: the range {part} is reversed; write {hi}-{lo}")
        out += range(lo, hi + 1)
    if not out:
        raise SwitchError(f"layers {text!r}: no layer index given")
    return out


# ------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Switch:
    name: str
    # the methods that take it
    methods: tuple[str, ...]
    # string -> value (command line, eval specs)
    parse: Callable[[str], Any]
    # Python value -> checked value (the API)
    check: Callable[[str, Any], Any]
    # allowed values, when they are a fixed set
    choices: tuple | None
    # KV-Embedding's default (SPEC §1), or the baselines' where only they take it
    default: Any
    help: str


SWITCHES: dict[str, Switch] = {s.name: s for s in (
    Switch("layers", ("kvembedding",), parse_layers, check_layers, None, "auto",
           "re-routed layers: auto (intrinsic-dimension window, SPEC §1.4), none, all, or 3,4,5 / 3-5"),
    Switch("bias", ("kvembedding",), parse_float, check_bias, None, 1.0,
           "logit bias of the re-routed slot, after 1/sqrt(D); -inf = no prefix"),
    Switch("rope_mode", ("kvembedding",), str, lambda n, v: check_choice(n, v, ROPE_MODES), ROPE_MODES, "rotated",
           "position of the slot's key: rotated at last[b] / position0 (pre-RoPE key) / unrotated (no position)"),
    Switch("passes", ("kvembedding",), parse_int, lambda n, v: check_choice(n, check_int(n, v), (1, 2)), (1, 2), 1,
           "1: the slot comes from the same layer of the same pass; 2: a plain pass captures it first"),
    Switch("pooling", ALL_METHODS, str, lambda n, v: check_choice(n, v, POOLINGS), POOLINGS, "hybrid",
           "hybrid = (mean + last) / 2, mean over real tokens, last token, or text = mean over the text's own "
           "tokens only (no template, no special tokens); each method has its own default"),
    Switch("normalize", ALL_METHODS, parse_bool, check_bool, (True, False), True,
           "L2-normalise the embeddings (the default of encode's normalize_embeddings)"),
    Switch("template", TEMPLATED, str, lambda n, v: check_template(v, n, TEMPLATE_WORDS), None, None,
           "prompt with a {text} slot, 'none' (the raw text), 'kvembedding' (KV-Embedding's prompts); echo: 'paper' or "
           "'repo'; default: the method's own"),
    Switch("query_template", TEMPLATED, str, lambda n, v: check_template(v, n, TEMPLATE_WORDS), None, None,
           "prompt for queries (prompt_name='query'); default: the method's"),
    Switch("cleanup", ("prompteol", "metaeol", "token_prepending"), parse_bool, check_bool, (True, False), True,
           "the authors' text clean-up before filling the prompt: final '.', '\"' -> \"'\", final '?' -> '.'"),
    Switch("exit_layer", ("token_prepending",),
           lambda t: "final" if t.strip().lower() in ("final", "none") else parse_int(t),
           lambda n, v: "final" if v == "final" else check_int(n, v, what="a layer index (e.g. -2) or 'final'"),
           None, -2,
           "layer whose raw output is pooled (python index, -2 = second to last), or 'final' for the final norm"),
    Switch("prepend_layers", ("token_prepending",), parse_int, lambda n, v: check_int(n, v, minimum=1), None, 6,
           "k: the placeholder takes the previous layer's final-token state before layers 1..k"),
    Switch("placeholder_seed", ("token_prepending",), parse_int, check_int, None, 0,
           "seed of the placeholder's random input embedding (the authors' is unseeded)"),
)}


def check(method: str, switches: dict) -> dict:
    """The given switches, checked for `method`; None values are dropped (= the method's default)."""
    out = {}
    for name, value in switches.items():
        if value is None:
            continue
        if name not in SWITCHES:
            raise SwitchError(f"unknown switch {name!r}; the switches are {', '.join(SWITCHES)}")
        sw = SWITCHES[name]
        if method not in sw.methods:
            takers = [n for n in SWITCHES if method in SWITCHES[n].methods]
            raise SwitchError(f"switch {name!r} does not apply to method {method!r} (it applies to "
                              f"{', '.join(sw.methods)}); {method} takes {', '.join(takers)}")
        out[name] = sw.check(name, value)
    return out


def parse(name: str, text: str):
    """A known switch's value from a string, as typed on a command line or in an eval spec."""
    return SWITCHES[name].check(name, SWITCHES[name].parse(text))

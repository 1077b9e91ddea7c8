"""The floors hold: each layer imports only what is below it, and the switches are defined once.

    config, model              no files, no method, no user
    weights_loader             files -> ModelArgs + weights + tokenizer; no method, no user
    method, baselines,         pure tensor and token code: no files, argparse or printing
      layer_select
    encoder, cli, evaluation,  the face, on top
      corpus, golden
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACE = ("kvembed.encoder", "kvembed.cli", "kvembed.corpus", "kvembed.evaluation", "kvembed.golden", "kvembed.st")


def modules_after(statement: str) -> set[str]:
    """sys.modules of a fresh interpreter after running `statement`."""
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


@pytest.mark.parametrize("statement", ["import weights_loader", "import kvembed.model", "import kvembed.config"])
def test_lower_floors_do_not_import_the_method_or_the_face(statement):
    loaded = modules_after(statement)
    for mod in ("kvembed.encoder", "kvembed.method", "kvembed.baselines", "kvembed.cli", "kvembed.layer_select"):
        assert mod not in loaded, f"{statement} imported {mod}"


def test_layer_select_is_pure():
    loaded = modules_after("import kvembed.layer_select")
    for mod in ("weights_loader", "kvembed.encoder", "kvembed.cli", "kvembed.files", "kvembed.selections"):
        assert mod not in loaded, f"kvembed.layer_select imported {mod}"
    tree = ast.parse((ROOT / "kvembed" / "layer_select.py").read_text())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"print", "open", "input"}, calls & {"print", "open", "input"}


@pytest.mark.parametrize("module", ["method", "baselines", "layer_select", "model", "config"])
def test_pure_floors_hold_no_file_or_cli_code(module):
    src = (ROOT / "kvembed" / f"{module}.py").read_text()
    tree = ast.parse(src)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0}
    # (json may serialise for a hash; it never touches a file here: `open` is checked below)
    assert not imported & {"argparse", "weights_loader", "os", "pathlib", "sys", "shutil"}, (module, imported)
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"print", "open", "input"}, (module, calls & {"print", "open", "input"})
    assert not relative & {"encoder", "cli", "corpus", "golden", "files", "selections", "cli_options"}, relative


def test_no_import_cycles_between_package_modules():
    """Walk every module's top-level imports inside the package; the graph must be acyclic."""
    pkg = {}
    for path in list((ROOT / "kvembed").rglob("*.py")) + list((ROOT / "weights_loader").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        pkg[name] = path
    graph = {}
    for name, path in pkg.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # top level only: imports inside functions are the lazy, deliberate ones
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".")
                    parent = parts[: len(parts) - node.level + (1 if path.name == "__init__.py" else 0)]
                    base = ".".join(parent + ([base] if base else []))
                for alias in node.names:
                    for cand in (f"{base}.{alias.name}", base):
                        if cand in pkg:
                            deps.add(cand)
                            break
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in pkg}
        graph[name] = deps - {name}
    seen, stack = {}, []

    def visit(n):
        seen[n] = "open"
        stack.append(n)
        for d in graph[n]:
            if seen.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in seen:
                visit(d)
        seen[n] = "done"
        stack.pop()

    for n in graph:
        if n not in seen:
            visit(n)


# ------------------------------------------------------------------------------------ the switches


def embedding_subcommands():
    from kvembed.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name] for name in ("embed", "embed-corpus", "eval", "golden")}


@pytest.mark.parametrize("command", ["embed", "embed-corpus", "eval", "golden"])
def test_every_switch_is_an_option_of_every_embedding_subcommand(command):
    from kvembed.switches import SWITCHES

    parser = embedding_subcommands()[command]
    options = {a.dest: a for a in parser._actions}
    for name, sw in SWITCHES.items():
        assert name in options, f"kvembed {command} lacks --{name.replace('_', '-')}"
        action = options[name]
        assert action.default is None, f"{command} --{name}: default {action.default!r} (None = the method's own)"
        assert tuple(action.choices or ()) == tuple(sw.choices or ()), (command, name, action.choices)
        if sw.choices is not None:  # every allowed value parses back to itself through the option's type
            assert all(action.type(str(c).lower()) == c for c in sw.choices), (command, name)


def test_the_subcommands_agree_with_one_another():
    parsers = embedding_subcommands()
    from kvembed.switches import SWITCHES

    def signature(p):
        return {a.dest: (type(a).__name__, a.default, tuple(a.choices or ())) for a in p._actions if a.dest in SWITCHES}

    first, *rest = parsers.values()
    for other in rest:
        assert signature(other) == signature(first)


def test_every_method_field_is_a_switch_that_applies_to_it():
    from kvembed.baselines import METHODS
    from kvembed.switches import SWITCHES

    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls):
            assert f.name in SWITCHES, f"{name}.{f.name} is not in SWITCHES"
            assert name in SWITCHES[f.name].methods, f"SWITCHES[{f.name!r}] does not list {name}"
    for sw in SWITCHES.values():
        for m in sw.methods:
            assert sw.name in {f.name for f in dataclasses.fields(METHODS[m])}, f"{m} has no field {sw.name}"


def test_eval_specs_and_the_command_line_parse_alike():
    from kvembed.evaluation.cli_eval import parse_method
    from kvembed.switches import SwitchError

    assert parse_method("kvembedding:bias=-inf:layers=3-5:normalize=false") == (
        "kvembedding", {"bias": float("-inf"), "layers": (3, 4, 5), "normalize": False})
    assert parse_method("token_prepending:exit_layer=-2:prepend_layers=3") == (
        "token_prepending", {"exit_layer": -2, "prepend_layers": 3})
    with pytest.raises(SwitchError, match="does not apply"):
        parse_method("prompteol:bias=2")
    with pytest.raises(SwitchError, match="reversed"):
        parse_method("kvembedding:layers=5-3")


def test_methods_are_immutable_and_a_per_call_prompt_is_a_new_object():
    from kvembed.method import KVEmbedding

    m = KVEmbedding(layers=(1,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.bias = 2.0
    n = m.with_template("Say: {text}")
    assert n is not m and n.template == "Say: {text}" and m.template != n.template
    assert n.config() != m.config() and m.config()["template"] == KVEmbedding.DEFAULT_TEMPLATE


def test_the_table_defaults_are_the_methods_defaults():
    """SPEC §1's defaults live in the table and in the method classes: they must agree (pooling and templates
    differ by method by design; layers='auto' is resolved by the encoder before the method is built)."""
    from kvembed.baselines import METHODS
    from kvembed.switches import SWITCHES

    per_method = {"pooling", "template", "query_template", "layers", "normalize"}
    for name, cls in METHODS.items():
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        for sw in SWITCHES.values():
            if name in sw.methods and sw.name not in per_method:
                assert fields[sw.name] == sw.default, (name, sw.name, fields[sw.name], sw.default)
    assert all(f.default is True for m in METHODS.values() for f in dataclasses.fields(m) if f.name == "normalize")
    kv = {f.name: f.default for f in dataclasses.fields(METHODS["kvembedding"])}
    assert kv["pooling"] == SWITCHES["pooling"].default == "hybrid"  # the table's pooling column is KV-Embedding's

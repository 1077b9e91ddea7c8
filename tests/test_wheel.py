"""kvembed as an installed package: the extras list what the code imports, and the built wheel works from a venv
outside the checkout, writing only under the current directory and $KVEMBED_CACHE, never into the package.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # the data pack beside the checkout (CI: ../shared/data)
FIRST_PARTY = {"kvembed", "weights_loader", "tests"}


# ----------------------------------------------------------------------------- extras list what is imported


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(reqs: list[str]) -> set[str]:
    return {canonical(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in reqs}


def area(path: Path) -> str | None:
    """The extra a file's imports belong to (None: the runtime dependencies)."""
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith("kvembed/evaluation/"):
        return "eval"
    if rel == "kvembed/st.py":
        return "st"
    if rel.startswith("kvembed/bench/"):
        return "bench"
    if rel.startswith("tests/"):
        return "test"
    return None


def imports(path: Path):
    """(top-level module, extra it must be in or None, line) for every absolute import in the file.

    An import inside `try: ... except ImportError: raise ImportError("... pip install 'kvembed[X]'")` belongs to
    X; any other one to the file's area. `pytest.importorskip("m")` counts as an import of m."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    named: dict[int, str] = {}  # id(import node) -> extra named by its ImportError handler
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for h in node.handlers:
                text = ast.unparse(h)
                if "ImportError" in text and (m := re.search(r"kvembed\[(\w+)\]", text)):
                    for inner in node.body:
                        for sub in ast.walk(inner):
                            named[id(sub)] = m.group(1)
    for node in ast.walk(tree):
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant)):
            mods = [node.args[0].value]
        for mod in mods:
            top = mod.split(".")[0]
            if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                yield top, named.get(id(node), area(path)), node.lineno


def test_every_import_is_a_dependency_or_in_its_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = requirement_names(project["dependencies"])
    extras = {k: requirement_names(v) for k, v in project["optional-dependencies"].items()}
    dists = importlib.metadata.packages_distributions()  # top-level module -> distributions providing it
    files = [p for d in ("kvembed", "weights_loader", "tests") for p in sorted((ROOT / d).rglob("*.py"))]
    missing, used = [], {k: set() for k in extras}
    for path in files:
        for top, extra, line in imports(path):
            names = {canonical(d) for d in dists.get(top, [top])}
            allowed = core | extras.get(extra, set())
            if not names & allowed:
                missing.append(f"{path.relative_to(ROOT)}:{line} imports {top} ({', '.join(sorted(names))}): "
                               f"not a dependency{f' nor in the {extra!r} extra' if extra else ''}")
            if extra in used:
                used[extra] |= names
    assert not missing, "\n".join(missing)
    # and the other way: an extra (but `test`, which may carry what its libraries need) lists nothing it never imports
    for extra in ("st", "eval", "bench"):
        unused = sorted(extras[extra] - used[extra] - core)
        assert not unused, f"extra {extra!r} lists {unused}, which no module of kvembed's {extra} part imports"
    assert {"scikit-dimension", "sentence-transformers", "mteb"} <= extras["test"]


def test_the_cli_names_the_extra_that_really_installs_each_optional_module():
    # cli.EXTRAS (module -> extra, for the "pip install 'kvembed[X]'" message) is a second copy of what
    # pyproject.toml says; every entry must name an extra that lists a distribution providing that module.
    from kvembed import cli

    tomllib = pytest.importorskip("tomllib")
    extras = {k: requirement_names(v) for k, v in
              tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"].items()}
    dists = importlib.metadata.packages_distributions()
    wrong = {mod: extra for mod, extra in cli.EXTRAS.items()
             if not {canonical(d) for d in dists.get(mod, [mod])} & extras.get(extra, set())}
    assert not wrong, f"cli.EXTRAS names extras that do not install these modules: {wrong}"


# ----------------------------------------------------------------------------------- the wheel, installed


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def build_wheel(src: Path, dist: Path) -> Path:
    """`pip wheel` of a copy of the checkout (building in place would leave build/ and *.egg-info in it)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("kvembed", "weights_loader"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # No build isolation when this environment can build wheels itself (setuptools with bdist_wheel): nothing to
    # download. Otherwise pip fetches setuptools into an isolated build environment.
    try:
        setuptools = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
        own = setuptools >= (70, 1) or importlib.util.find_spec("wheel") is not None
    except importlib.metadata.PackageNotFoundError:
        own = False
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *(["--no-build-isolation"] if own else []),
         "-w", dist, src])
    wheels = list(dist.glob("kvembed-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def outer_site_packages() -> list[str]:
    """This environment's site-packages folders (torch and every other dependency live there), never the checkout."""
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    paths |= {p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))}
    return sorted(p for p in paths if os.path.isdir(p) and not Path(p).resolve().is_relative_to(ROOT))


def files_under(folder: Path) -> set[str]:
    # __pycache__ is the interpreter's (bytecode), not kvembed's writing
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if "__pycache__" not in p.parts}


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    if not (DATA / "stsb").is_dir():
        pytest.skip(f"no data pack at {DATA}")
    src, dist, venv, work, cache, home = (tmp_path / n for n in ("src", "dist", "venv", "work", "cache", "home"))
    for d in (src, dist, work, home):
        d.mkdir()
    wheel = build_wheel(src, dist)

    # A venv of the same interpreter that sees this environment's packages through a .pth (so torch is not
    # installed again) but not the checkout; the wheel goes in with the dependencies already there.
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "_outer_environment.pth").write_text("\n".join(outer_site_packages()) + "\n")
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel])

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "KVEMBED_", "HF_"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", HOME=str(home),
               KVEMBED_CACHE=str(cache), KVEMBED_DATA=str(DATA), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    where = run([python, "-c", "import kvembed, sys; print(kvembed.__file__); print(sys.path)"], cwd=work, env=env)
    installed = Path(where.stdout.splitlines()[0]).parent
    assert installed == site / "kvembed", where.stdout
    assert str(ROOT) not in where.stdout, f"the checkout is on the venv's path: {where.stdout}"
    before = files_under(installed) | {"weights_loader/" + f for f in files_under(site / "weights_loader")}

    model = tmp_path / "tiny"
    tiny.write_checkpoint(model, "qwen2")
    kvembed = venv / "bin" / "kvembed"
    r = run([kvembed, "embed", "--model", model, "--layers", "1,2", "a cat sat on the mat", "a dog ran"],
            cwd=work, env=env)
    assert r.stdout.startswith("cosine similarity: "), r.stdout
    r = run([kvembed, "eval", "--model", model, "--layers", "1,2", "--tasks", "stsb", "--max-rows", "20",
             "--no-progress"], cwd=work, env=env)
    assert "stsb" in r.stdout
    run([kvembed, "bench", "attention", "--quick", "--lengths", "64", "--repeats", "1"], cwd=work, env=env)

    # outputs under the current directory and $KVEMBED_CACHE ...
    results = work / "bench" / "results"
    assert {"eval.md", "eval.json", "attention.json", "perf.md"} <= {p.name for p in results.iterdir()}
    assert (cache / "eval" / "embeddings.sqlite").is_file()
    # ... and none in the installed package
    after = files_under(installed) | {"weights_loader/" + f for f in files_under(site / "weights_loader")}
    assert after == before, f"written into the installed package: {sorted(after - before)}"
    assert not any(home.rglob("kvembed*")), "kvembed wrote under $HOME although $KVEMBED_CACHE was set"

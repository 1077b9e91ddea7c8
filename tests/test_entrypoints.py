"""The ways a user starts kvembed all work and all exit 0: `python -m kvembed`, and torchrun with `-m kvembed`.

The torchrun case runs five times in a row: a gloo group torn down by interpreter exit used to abort one rank
(SIGABRT after "[done]", torchrun exit 1) about one run in five, so a single green run proved nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
RUNS = 5
N_TEXTS, PART, BATCH = 64, 16, 8  # 4 parts: each of the 2 ranks computes 2


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("entry")
    tiny.write_checkpoint(root / "ckpt", "llama")
    inp = root / "in.jsonl"
    words = "the a cat dog sat ran on under mat station where is".split()
    with open(inp, "w") as f:
        for i in range(N_TEXTS):
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(words[: 1 + i % len(words)])}) + "\n")
    return root, inp


def corpus_args(root: Path, inp: Path, out: Path) -> list[str]:
    return ["embed-corpus", str(inp), str(out), "--model", str(root / "ckpt"), "--layers", "1,2",
            "--part-size", str(PART), "--batch-size", str(BATCH), "--device", "cpu", "--quiet"]


def test_python_dash_m_kvembed_is_the_console_script(corpus):
    root, _ = corpus
    r = run([sys.executable, "-m", "kvembed", "--help"])
    assert r.returncode == 0 and "embed-corpus" in r.stdout, r.stderr
    r = run([sys.executable, "-m", "kvembed", "embed", "--model", str(root / "ckpt"), "--layers", "1,2",
             "a cat sat", "a dog ran"])
    assert r.returncode == 0 and r.stdout.startswith("cosine similarity: "), r.stderr


def test_torchrun_dash_m_kvembed_exits_0_every_time_and_equals_one_process(corpus):
    import torch

    from kvembed.cli import main

    root, inp = corpus
    single = root / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels and thread count as each torchrun rank (OMP_NUM_THREADS=1)
    try:
        assert main(corpus_args(root, inp, single)) == 0
    finally:
        torch.set_num_threads(threads)
    want = {p.name: p.read_bytes() for p in sorted(single.iterdir()) if p.name != "summary.json"}

    for i in range(RUNS):
        out = root / f"two-{i}"
        r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "kvembed", *corpus_args(root, inp, out)])
        assert r.returncode == 0, f"run {i + 1} of {RUNS}: exit {r.returncode}\n{r.stderr[-3000:]}"
        got = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "summary.json"}
        assert got.keys() == want.keys() and all(got[n] == want[n] for n in want), f"run {i + 1}: output differs"

"""embed-corpus for real: a tiny llama checkpoint, `torchrun --nproc-per-node 2` on CPU (gloo).

- two ranks give the same bytes as one process (every output file, fp32), in input order;
- a rank that dies while writing a part (hard exit, half a temporary file on disk) takes the run down;
  the rerun completes without touching the parts already committed, and the output is again identical.

Run as a script (under torchrun), this file is the dying worker: it makes rank 1 exit mid-write.
Every rank gets OMP_NUM_THREADS=1 and the one-process reference runs on one thread too, so all use the
same kernels and thread count (bit-identity across world sizes assumes the same hardware, dtype and threads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import tiny
from tests.tolerance import assert_close, decoder_drift

ROOT = Path(__file__).resolve().parents[1]
N_TEXTS, PART, BATCH = 300, 32, 8  # 10 parts: rank 0 of 2 owns 0,2,4,6,8; rank 1 owns 1,3,5,7,9
WORDS = "the a cat dog sat ran on under mat station where is quick brown fox jumps over lazy number code".split()


def corpus_texts() -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(N_TEXTS)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    tiny.write_checkpoint(root / "ckpt", "llama")
    inp = root / "in.jsonl"
    with open(inp, "w") as f:
        for i, text in enumerate(corpus_texts()):
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    return root, inp


def cli_args(root: Path, inp: Path, out: Path) -> list[str]:
    # An explicit layer list: no layer selection runs.
    return [str(inp), str(out), "--model", str(root / "ckpt"), "--layers", "1,2", "--part-size", str(PART),
            "--batch-size", str(BATCH), "--device", "cpu", "--log-every", "0.2"]


def launch(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def outputs(outdir: Path) -> dict[str, bytes]:
    """Every output file (summary.json is a log with timings, not output)."""
    return {p.name: p.read_bytes() for p in sorted(outdir.iterdir()) if p.name != "summary.json"}


@pytest.fixture(scope="module")
def single(setup):
    """The one-process reference, run in this process (a launch costs seconds of imports) on one thread."""
    import torch

    from kvembed import corpus

    root, inp = setup
    out = root / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert corpus.main([*cli_args(root, inp, out), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_two_ranks_equal_one_process_bit_for_bit(setup, single):
    from kvembed.corpus import load_corpus_embeddings
    from kvembed.encoder import KVEmbedder

    root, inp = setup
    out = root / "two"
    r = launch(torchrun("-m", "kvembed.corpus", *cli_args(root, inp, out)))
    assert r.returncode == 0, r.stderr
    assert "[rank 1/2]" in r.stderr and "[all 2 ranks]" in r.stderr and "[done] 300 rows" in r.stderr
    a, b = outputs(single), outputs(out)
    assert len([n for n in a if n.startswith("part-") and n.endswith(".npy")]) == 10
    assert a.keys() == b.keys() and all(a[n] == b[n] for n in a), [n for n in a if a[n] != b[n]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and [r["parts_computed"] for r in summary["ranks"]] == [5, 5]

    # Input order and real embeddings: the same texts through the in-process API. Batches differ (padding
    # length, thread count), which reorders sums over C, I, Hq*D and the T keys plus the prefix slot.
    ids, matrix = load_corpus_embeddings(out, verify=True)
    assert ids == [f"d{i}" for i in range(N_TEXTS)]
    emb = KVEmbedder.from_pretrained(str(root / "ckpt"), layers=[1, 2])
    T = max(len(emb.method.prepare(emb.tokenizer, t, "document", None)[0].ids) for t in corpus_texts())
    want = emb.encode(corpus_texts(), prompt_name="document")
    assert_close(matrix, want, decoder_drift(emb.args, T + 1), "two ranks vs the in-process API")


def test_killed_rank_then_rerun_reuses_committed_parts(setup, single):
    root, inp = setup
    out = root / "killed"
    r = launch(torchrun(__file__, *cli_args(root, inp, out)))
    assert r.returncode != 0 and "rank 1 exits while writing" in r.stderr, r.stderr
    assert not (out / "manifest.json").exists()
    # Rank 1 committed parts 1 and 3, then died halfway through part 5's embeddings file.
    committed = {k: (out / f"part-{k:05d}.npy").stat() for k in (1, 3)}
    assert all((out / f"part-{k:05d}.json").is_file() for k in committed)
    assert not (out / "part-00005.json").exists() and list(out.glob("part-00005.npy.tmp-*"))

    r = launch(torchrun("-m", "kvembed.corpus", *cli_args(root, inp, out)))
    assert r.returncode == 0, r.stderr
    for k, before in committed.items():  # same inode and mtime: never rewritten
        after = (out / f"part-{k:05d}.npy").stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    ranks = json.loads((out / "summary.json").read_text())["ranks"]
    assert ranks[1]["parts_skipped"] >= 2
    assert outputs(out) == outputs(single)  # and no temporary file is left


def die_while_writing() -> None:
    """Worker entry: rank 1 writes half of its third part's embeddings file, then exits hard."""
    from kvembed import corpus
    from kvembed.scale import parts

    real_write, calls = parts.atomic_write, []

    def atomic_write(path, data):
        calls.append(path)
        # Each part is 3 writes (npy, ids, record): write 7 is the third part's npy.
        if os.environ.get("RANK") == "1" and len(calls) == 7:
            path.with_name(f"{path.name}{parts.TMP_MARK}{os.getpid()}").write_bytes(data[: len(data) // 2])
            print("rank 1 exits while writing", path.name, file=sys.stderr, flush=True)
            os._exit(9)  # no cleanup, no exception handlers: as a kill would
        real_write(path, data)

    parts.atomic_write = atomic_write
    sys.exit(corpus.main(sys.argv[1:]))


if __name__ == "__main__":
    die_while_writing()

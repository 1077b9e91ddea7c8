"""Scale-out: `kvembed embed-corpus` texts/s with 1 process vs `torchrun --nproc-per-node 2`.

    python -m kvembed.bench.scale [--n 256] [--model PATH] [--layers 12,13,14,15] [--batch-size 32] [--part-size 64]

Runs, on the first --n texts of the data pack's id_corpus, after one untimed warm-up run (model conversion,
caches):
    1proc       one process, torch's default thread count (all cores)  <- the baseline
    1proc_1thr  one process, OMP_NUM_THREADS=1
    2proc       torchrun --standalone --nproc-per-node 2, OMP_NUM_THREADS=1 per rank
texts/s is rows / the embedding phase (barrier to barrier, from OUTDIR/summary.json); wall_s adds process start,
imports and model loading. Prints one JSON line per run and writes <out>/scale.json and <out>/scale.md
(--out, default ./bench/results). The children run `python -m kvembed.corpus` from wherever this process
imported kvembed (a checkout or an installed package), in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import common, models


def write_input(source: Path, path: Path, n: int) -> None:
    with open(source, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as out:
        for i, line in zip(range(n), f):
            out.write(json.dumps({"id": i, "text": json.loads(line)["text"]}) + "\n")


def launch(cmd: list[str], threads: int | None, cwd: Path) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(models.package_root()), env.get("PYTHONPATH")) if p)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return wall


def main(argv=None) -> int:
    argv = common.argv_list(argv)
    ap = argparse.ArgumentParser(prog="python -m kvembed.bench.scale", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    # A 4-layer window, the size auto selection picks for a 30-layer model (m .. m + floor(30 / 10)); which
    # layers does not change the cost, and auto would first run TwoNN on 1000 texts.
    ap.add_argument("--layers", default="12,13,14,15")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--part-size", type=int, default=64)
    ap.add_argument("--data-dir", default=None, help="the data pack (default $KVEMBED_DATA, else ../shared/data)")
    ap.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="results folder (default ./bench/results)")
    args = ap.parse_args(argv)
    source = data_file(args.data_dir)

    work = Path(tempfile.mkdtemp(prefix="kvembed-scale-"))
    try:
        inp = work / "in.jsonl"
        write_input(source, inp, args.n)
        write_input(source, work / "warm.jsonl", 32)
        shared = ["--layers", args.layers, "--batch-size", str(args.batch_size),
                  "--part-size", str(args.part_size), "--device", "cpu", "--quiet"]
        if args.model:
            shared += ["--model", args.model]
        corpus = [sys.executable, "-m", "kvembed.corpus"]
        launch([*corpus, str(work / "warm.jsonl"), str(work / "warm"), *shared], None, work)
        runs = {
            "1proc": (lambda o: [*corpus, str(inp), o, *shared], None),
            "1proc_1thr": (lambda o: [*corpus, str(inp), o, *shared], 1),
            "2proc": (lambda o: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node", "2", "-m", "kvembed.corpus", str(inp), o, *shared], 1),
        }
        env = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
               "dtype": "float32", "device": "cpu", "backend": "gloo", "n_texts": args.n,
               "batch_size": args.batch_size, "part_size": args.part_size, "layers": args.layers,
               "model": args.model or "SmolLM2-135M-Instruct (default)",
               "loadavg_before": os.getloadavg()[0]}
        records = []
        for name, (cmd, threads) in runs.items():
            out = work / name
            wall = launch(cmd(str(out)), threads, work)
            summary = json.loads((out / "summary.json").read_text())
            rec = {"run": name, "processes": summary["world_size"],
                   "threads_per_process": threads or torch.get_num_threads(),
                   "texts_per_s": summary["texts_per_s"], "embed_s": summary["embed_seconds"], "wall_s": round(wall, 2)}
            records.append(rec)
            print(json.dumps(rec), flush=True)
        base = records[0]["texts_per_s"]
        for rec in records:
            rec["speedup_vs_1proc"] = round(rec["texts_per_s"] / base, 3)
        m = {name: np.load(work / name / "embeddings.npy") for name in runs}
        env["bit_identical_2proc_vs_1proc_1thr"] = bool(np.array_equal(m["2proc"], m["1proc_1thr"]))
        env["max_abs_diff_2proc_vs_1proc"] = float(np.abs(m["2proc"] - m["1proc"]).max())
        env["loadavg_after"] = os.getloadavg()[0]
        print(json.dumps({"env": env, "speedups": {r["run"]: r["speedup_vs_1proc"] for r in records}}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps({"env": env, "runs": records}, indent=1) + "\n")
    (args.out / "scale.md").write_text(markdown(env, records))
    return 0


def data_file(explicit) -> Path:
    tries = [Path(explicit)] if explicit else [
        *([Path(os.environ["KVEMBED_DATA"])] if os.environ.get("KVEMBED_DATA") else []),
        Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data",
        models.package_root().parent / "shared" / "data"]
    for d in tries:
        if (d / "id_corpus" / "train.jsonl").is_file():
            return d / "id_corpus" / "train.jsonl"
    raise SystemExit(f"id_corpus/train.jsonl is not in any of {[str(d) for d in tries]}; pass --data-dir")


def markdown(env: dict, records: list[dict]) -> str:
    lines = [
        "# embed-corpus: 1 process vs torchrun 2 processes (CPU, gloo)",
        "",
        f"torch {env['torch']}, {env['cpus']} CPUs, {env['dtype']}, model {env['model']}, layers {env['layers']}, "
        f"{env['n_texts']} id_corpus texts, batch {env['batch_size']}, part {env['part_size']}. "
        f"Load average {env['loadavg_before']:.1f} before, {env['loadavg_after']:.1f} after (a shared machine).",
        "",
        "| run | processes | threads/process | texts/s (embedding phase) | vs 1proc | wall s (with start-up) |",
        "|---|---|---|---|---|---|",
        *(f"| {r['run']} | {r['processes']} | {r['threads_per_process']} | {r['texts_per_s']} | "
          f"{r['speedup_vs_1proc']} | {r['wall_s']} |" for r in records),
        "",
        f"2proc output bit-identical to 1proc_1thr: {env['bit_identical_2proc_vs_1proc_1thr']}; "
        f"max |2proc - 1proc (2 threads)| = {env['max_abs_diff_2proc_vs_1proc']:.2e}.",
        "",
        f"Same threads per process, 2 processes vs 1: {records[2]['texts_per_s'] / records[1]['texts_per_s']:.2f}x. "
        "On a busy machine (load average above the core count) one process with 2 OpenMP threads loses most "
        "to oversubscription, which inflates the ratios against 1proc; on an idle machine expect 2proc to "
        "be close to 1proc, since both use both cores.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

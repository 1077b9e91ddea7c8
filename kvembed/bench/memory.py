"""Peak memory (and time) of embedding one long text (B = 1), above the weights, and how it grows with T.

    python -m kvembed.bench.memory --quick          T in {4096, 8192}, plain then KV-Embedding, once each
    python -m kvembed.bench.memory --full           T in {1024, 2048, 4096, 8192}, twice each, alternating
    python -m kvembed.bench.memory --lengths 8192   any list

Each length runs in a fresh child process (`python -m kvembed.bench.memory --child T`, so it works from an
installed package), so that one length's freed-but-kept heap cannot hide the next one's growth.
    CPU   a sampler thread reads the resident set (/proc/self/statm) every 2 ms during the call;
          peak_bytes = highest RSS during the call - RSS just before it. A 16-token call first pages in the
          weights and the text's embedding rows are touched, so that neither counts as the forward's growth;
          the child runs with a fixed glibc mmap threshold and trims the heap before each call, so that RSS
          follows the live tensors rather than what the allocator kept.
    CUDA  torch.cuda.max_memory_allocated() during the call - memory_allocated() before it (exact).

Targets (fp32, CPU, default model): T = 8192 adds <= 150 MiB, and peak(8192) / peak(4096) <= 2.3 (linear in T,
not quadratic). With no dense mask, nothing in the forward is O(T^2): the flash kernels tile the scores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

import torch

from . import common, models

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def trim() -> None:
    """Give freed heap back to the OS, so that one call's leftovers neither hide nor inflate the next one's peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: peaks may then be understated for the second side
        pass


class PeakRSS:
    """Highest resident set size while the block runs, sampled by a background thread."""

    def __init__(self, every_s: float = 0.002):
        self.every_s = every_s

    def __enter__(self):
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.added = self.peak - self.start


def measure_call(fn, device) -> tuple[float, int]:
    """(seconds, bytes added at the peak) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) - before
    trim()
    with PeakRSS() as m:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    return seconds, m.added


def child(opts, device, dtype) -> dict:
    """One length, in this process: the sides alternating, `repeats` times; times and peaks as one dict."""
    from kvembed.method import collate, kv_embed

    bm = models.load(opts.model, dtype, device, tuple(opts.layers) if opts.layers else None)
    T = opts.child
    batch = collate(models.random_ids(1, T, bm.args.vocab_size, seed=T), device)
    short = collate([[5] * 16], device)
    sides = {"plain": (), "kvembed": bm.layers}
    with torch.inference_mode():
        # The first call faults in the (memory-mapped) weights and starts thread pools: RSS that is not the
        # forward's own. The tied embedding matrix is memory-mapped too: touch the rows this text uses.
        kv_embed(bm.model, short, bm.layers)
        bm.model.embed_tokens(batch.input_ids)
        times = {s: [] for s in opts.sides}
        peaks = {s: [] for s in opts.sides}
        for r in range(opts.repeats):
            for s in (opts.sides if r % 2 == 0 else opts.sides[::-1]):
                seconds, added = measure_call(lambda: kv_embed(bm.model, batch, sides[s]), device)
                times[s].append(seconds)
                peaks[s].append(added)
    return dict(T=T, model=bm.label, layers=list(bm.layers), times=times, peaks=peaks,
                threads=torch.get_num_threads(), sdpa=common.sdpa_backends(lambda: kv_embed(bm.model, short, bm.layers),
                                                                           device))


def run_child(T: int, opts) -> dict:
    cmd = [sys.executable, "-m", "kvembed.bench.memory", "--child", str(T), "--model", opts.model,
           "--device", opts.device, "--repeats", str(opts.repeats), "--sides", *opts.sides]
    for flag, value in (("--dtype", opts.dtype), ("--threads", opts.threads)):
        if value:
            cmd += [flag, str(value)]
    if opts.layers:
        cmd += ["--layers", *map(str, opts.layers)]
    env = dict(os.environ)
    # The child imports kvembed from wherever this process did (a checkout or site-packages).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(models.package_root()), env.get("PYTHONPATH")) if p)
    # A fixed mmap threshold makes glibc map every large tensor separately and unmap it on free, so that RSS
    # follows the live tensors (the default threshold adapts upwards and keeps freed blocks in the heap).
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return dict(error=f"child exited {out.returncode}", stderr_tail=out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = common.argv_list(argv)
    p = argparse.ArgumentParser(prog="python -m kvembed.bench.memory", description=__doc__.split("\n\n")[0])
    common.add_arguments(p, quick="T in {4096, 8192}, one run of each side",
                         full="T in {1024, 2048, 4096, 8192}, two runs of each side")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--model", default="default", help="'default' (real weights) or a models.CONFIGS shape")
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--sides", nargs="+", choices=["plain", "kvembed"], default=None)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    device, dtype = common.setup(opts)
    opts.repeats = opts.repeats or (2 if opts.full else 1)
    opts.sides = opts.sides or ["plain", "kvembed"]
    if opts.child is not None:
        print(json.dumps(child(opts, device, dtype)), flush=True)
        return 0

    lengths = opts.lengths or ([1024, 2048, 4096, 8192] if opts.full else [4096, 8192])
    env = common.environment(device)
    common.print_env(env)
    records: list[dict] = []
    prev = None
    for T in lengths:
        res = run_child(T, opts)
        shape = dict(model=res.get("model", opts.model), B=1, T=T, layers=res.get("layers"))
        if "error" in res:
            # An out-of-memory kill is a result too: record it rather than hide it.
            common.emit(dict(name="embed_one_text", shape=shape, device=str(device), **res), records)
            continue
        rec = dict(name="embed_one_text", shape=shape, dtype=str(dtype).replace("torch.", ""), device=str(device),
                   threads=res["threads"], torch=torch.__version__, sdpa_backend=res["sdpa"], repeats=opts.repeats,
                   candidate="kvembed" if "kvembed" in res["peaks"] else "plain",
                   dense_fp32_mask_bytes=4 * T * T, times_s=res["times"], peaks_bytes=res["peaks"])
        side = rec["candidate"]
        rec["peak_bytes"] = max(res["peaks"][side])
        rec["median_s"] = common.median(res["times"][side])
        if "plain" in res["peaks"] and side != "plain":
            rec.update(baseline="plain", baseline_peak_bytes=max(res["peaks"]["plain"]),
                       baseline_median_s=common.median(res["times"]["plain"]))
            rec["ratio"] = rec["baseline_median_s"] / rec["median_s"]
            rec["overhead"] = rec["median_s"] / rec["baseline_median_s"] - 1
        if prev is not None:
            # Growth between consecutive lengths: peak ratio, and exponents (1 = linear, 2 = quadratic).
            f = math.log(T / prev["shape"]["T"])
            rec["peak_ratio_vs_previous"] = rec["peak_bytes"] / max(prev["peak_bytes"], 1)
            rec["memory_growth_exponent"] = math.log(max(rec["peak_bytes"], 1) / max(prev["peak_bytes"], 1)) / f
            rec["time_growth_exponent"] = math.log(rec["median_s"] / prev["median_s"]) / f
        common.emit(rec, records)
        prev = rec
    if not opts.no_write:
        how = ("peak = highest RSS during the call minus RSS before it (sampled every 2 ms)" if device.type == "cpu"
               else "peak = torch.cuda.max_memory_allocated during the call minus memory_allocated before it")
        notes = [f"one text of T random token ids, B=1; each length in a fresh process; {how}",
                 f"sides: {opts.sides}, {opts.repeats} run(s) each, alternating, no warm-up beyond a 16-token call",
                 "dense_fp32_mask_bytes (JSON) = 4 T^2: what one dense (T, T) fp32 mask would add; none is built"]
        common.write_results(opts.out, "memory", argv, "lengths" if opts.lengths else common.subset_name(opts),
                             records, env, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

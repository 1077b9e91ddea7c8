"""Peak memory and time of embedding one long text (B = 1) with the default model, and how both grow with T.

    python bench/memory.py --quick           T in {1024, 2048}
    python bench/memory.py --full            T in {1024, 2048, 4096, 8192}
    python bench/memory.py --lengths 8192    any list

Each length runs in a fresh child process, so that one length's freed-but-kept heap cannot hide the next
one's growth. In the child, the plain forward and the KV-Embedding forward alternate (plain first); a sampler
thread reads the process's resident set (/proc/self/statm) every 2 ms during each call, and
peak_bytes = the highest RSS during the call - the RSS just before it (what the forward itself added).
A 16-token call first pages in the weights, so that they are not counted as the first long call's growth;
the child runs with a fixed glibc mmap threshold and trims the heap before each call, so that RSS follows
the live tensors rather than what the allocator kept from the previous call.

What must grow how (fp32, one text, SmolLM2-135M: C = 576, Hq = 9, D = 64, L = 30):
    activations  O(T): a few (T, C) and (T, 1536) tensors live at once
    mask         O(T^2): build_mask's (1, 1, T, T) additive fp32 mask (4 T^2 bytes) plus its bool temporaries,
                 and in a re-routed layer the concatenated (1, 1, T, T+1) mask [bias | causal]
    attention    O(T) inside CPU flash SDPA (tiles; no (T, T) score matrix per head); the math fallback
                 would hold (Hq, T, T) scores: 9 x 4 T^2 bytes
so the expected peak is linear in T plus about 3 x 4 T^2 bytes for the masks (800 MB at T = 8192).
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit, environment, record, sdpa_backends, write_results  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def trim() -> None:
    """Give freed heap back to the OS, so one call's leftovers neither hide nor inflate the next one's peak."""
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


def child(T: int, repeats: int) -> dict:
    """One length, in this process: alternate plain and KV-Embedding, return medians and peaks as one dict."""
    from bench.forward import default_layers
    from kvembed.method import collate, kv_embed
    from weights_loader import load_model

    loaded = load_model(None)
    model, layers = loaded.model, default_layers(loaded)
    g = torch.Generator().manual_seed(T)
    batch = collate(torch.randint(3, loaded.args.vocab_size, (1, T), generator=g).tolist())
    with torch.inference_mode():
        # The first call faults in the (memory-mapped) weights and sets up thread pools: hundreds of MB of
        # RSS that are not the forward's own. A short text does it without touching the long one's sizes.
        kv_embed(model, collate([[5] * 16]), layers)
        # The tied embedding matrix is memory-mapped too: page in the rows this text uses, or the first side
        # timed would be charged for them (~100 MB for SmolLM2's 49152 x 576 table).
        model.embed_tokens(batch.input_ids)
    runs = {"plain": (), "kvembedding": layers}
    times = {k: [] for k in runs}
    peaks = {k: [] for k in runs}
    with torch.inference_mode():
        for r in range(repeats):
            for name in (("plain", "kvembedding") if r % 2 == 0 else ("kvembedding", "plain")):
                trim()
                with PeakRSS() as m:
                    t0 = time.perf_counter()
                    kv_embed(model, batch, runs[name])
                    times[name].append(time.perf_counter() - t0)
                peaks[name].append(m.added)
    small = collate([[5] * 16])
    return dict(T=T, layers=list(layers), times=times, peaks=peaks, threads=torch.get_num_threads(),
                sdpa=sdpa_backends(lambda: kv_embed(model, small, layers)))


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="T in {1024, 2048} (default)")
    g.add_argument("--full", action="store_true", help="T in {1024, 2048, 4096, 8192}")
    g.add_argument("--lengths", type=int, nargs="+", help="explicit lengths")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each of plain / KV-Embedding")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true")
    opts = p.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    repeats = opts.repeats or (2 if opts.full else 1)
    if opts.child is not None:
        print(json.dumps(child(opts.child, repeats)), flush=True)
        return 0

    lengths = opts.lengths or ([1024, 2048, 4096, 8192] if opts.full else [1024, 2048])
    subset = "full" if opts.full else ("lengths" if opts.lengths else "quick")
    env = environment()
    print(json.dumps(dict(env=env)), flush=True)
    records: list[dict] = []
    prev = None
    for T in lengths:
        cmd = [sys.executable, __file__, "--child", str(T), "--repeats", str(repeats)]
        if opts.threads:
            cmd += ["--threads", str(opts.threads)]
        # A fixed mmap threshold makes glibc map every large tensor separately and unmap it on free, so RSS
        # follows the live tensors (the default threshold adapts upwards and keeps freed blocks in the heap).
        env_child = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env_child)
        if out.returncode != 0:
            # An out-of-memory kill is a result too: record it rather than hide it.
            emit(dict(name="embed_one_text", shape=dict(T=T), error=f"child exited {out.returncode}",
                      stderr_tail=out.stderr[-2000:]), records)
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        tb, tc = median(res["times"]["plain"]), median(res["times"]["kvembedding"])
        peak_plain, peak_kv = max(res["peaks"]["plain"]), max(res["peaks"]["kvembedding"])
        rec = record("embed_one_text", dict(model="smollm2-135m", B=1, T=T, layers=res["layers"]), "float32",
                     baseline="kvembed_plain", baseline_s=tb, candidate_s=tc, tokens=T, sdpa=res["sdpa"],
                     overhead=tc / tb - 1, peak_bytes=peak_kv, baseline_peak_bytes=peak_plain,
                     mask_bytes=4 * T * T, repeats=repeats, baseline_times_s=res["times"]["plain"],
                     candidate_times_s=res["times"]["kvembedding"])
        rec["threads"] = res["threads"]
        if prev is not None:
            # Growth exponents between consecutive lengths: 1 = linear, 2 = quadratic.
            f = math.log(T / prev["shape"]["T"])
            rec["time_growth_exponent"] = math.log(tc / prev["median_s"]) / f
            rec["memory_growth_exponent"] = math.log(max(peak_kv, 1) / max(prev["peak_bytes"], 1)) / f
        emit(rec, records)
        prev = rec
    if not opts.no_write:
        notes = [
            "one text of T random token ids, B=1; each length in a fresh process; peak = highest RSS during the "
            "call minus RSS before it (sampled every 2 ms)",
            f"{repeats} run(s) of each side, alternating, no warm-up (a single call takes seconds to minutes)",
            "mask_bytes (JSON) = 4 T^2, one fp32 (T, T) additive mask: the O(T^2) term in the peak",
        ]
        if subset == "quick":
            notes.append("QUICK SUBSET: T <= 2048; see --full for 4096 and 8192")
        write_results("memory", subset, records, env, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

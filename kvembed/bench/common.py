"""Benchmark plumbing: devices, interleaved timing, which SDPA kernel ran, JSON lines, results files.

Every figure is a *ratio*: a baseline and one or more candidates timed in the same process, interleaved after
warm-up (round r runs them in a rotated, alternately reversed order), so that a shared machine's drifting load
hits every side alike. A record carries both medians, their ratio and the per-round ratios' range:

    ratio    = baseline median / candidate median = candidate tokens/s / baseline tokens/s  (> 1: faster)
    overhead = candidate median / baseline median - 1

On CUDA each timed sample is bracketed by CUDA events after a synchronize, so it measures the GPU's work and
not the launch queue; on the CPU by perf_counter. A sample too short to time (a sub-millisecond attention
call) repeats the call `inner` times, the same count for every side of a comparison.

Files: `<out>/<script>.json` = {"env", "command", "subset", "notes", "records"}, then `<out>/perf.md` is
regenerated from every results file present (kvembed.bench.report). `<out>` is `--out`, default
`./bench/results` relative to the current directory: never a path inside the installed package.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

DEFAULT_OUT = Path("bench") / "results"
SCHEMA = 2  # results files without it come from the older bench/ scripts: shown in perf.md, never judged


# ------------------------------------------------------------------------------------------ arguments


def add_arguments(p: argparse.ArgumentParser, *, quick: str, full: str, dtype: str | None = None) -> None:
    """The options every script shares."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help=f"{quick} (the default)")
    g.add_argument("--full", action="store_true", help=full)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on the CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (default: per subset)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results folder, created if missing (default: ./bench/results)")
    p.add_argument("--no-write", action="store_true", help="print JSON lines only; write no files")


def setup(opts) -> tuple[torch.device, torch.dtype]:
    """Apply --threads, check --device, pick the dtype (fp32 on the CPU, bf16 on CUDA unless --dtype)."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        if device.index is not None:
            torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SystemExit(f"--device {opts.device}: only cpu and cuda are benchmarked")
    dtype = getattr(torch, opts.dtype) if opts.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def subset_name(opts) -> str:
    return "full" if opts.full else "quick"


# ---------------------------------------------------------------------------------------- environment


def _cpuinfo(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment(device: torch.device) -> dict:
    """What the numbers depend on: processor, vector flags, threads, versions, GPU and its SDPA switches."""
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    flags = set((_cpuinfo("flags") or "").split())
    env = dict(
        device=str(device),
        cpu=_cpuinfo("model name") or platform.processor() or platform.machine(),
        cpu_flags=[f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
        logical_cores=os.cpu_count(),
        usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=tf_version,
        python=platform.python_version(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            sdp_enabled=dict(flash=torch.backends.cuda.flash_sdp_enabled(),
                             efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                             cudnn=torch.backends.cuda.cudnn_sdp_enabled(),
                             math=torch.backends.cuda.math_sdp_enabled()),
        )
    return env


def print_env(env: dict) -> None:
    print(json.dumps(dict(env=env)), flush=True)


# -------------------------------------------------------------------------------------------- timing


class Clock:
    """Seconds per call of fn, `inner` calls per sample: perf_counter on the CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object], inner: int = 1) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # nothing queued earlier may land inside this sample
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


def interleaved(fns: dict[str, Callable[[], object]], clock: Clock, *, repeats: int, warmup: int = 1,
                min_sample_s: float = 0.0, max_inner: int = 200) -> tuple[dict[str, list[float]], int]:
    """Time every fn `repeats` times, interleaved, after `warmup` untimed calls of each.

    Round r runs the fns rotated by r, and every other cycle of rotations reversed, so that no side always
    follows the same neighbour. With min_sample_s > 0, each sample repeats the call `inner` times (the same
    for every fn), chosen from the first fn's warm time so that one sample lasts about min_sample_s.
    Returns ({name: seconds per call, one per round}, inner).
    """
    names = list(fns)
    inner = 1
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        if min_sample_s > 0:
            t = clock.time(fns[names[0]])
            inner = max(1, min(max_inner, round(min_sample_s / max(t, 1e-9))))
        times = {n: [] for n in names}
        for r in range(repeats):
            k = r % len(names)
            order = names[k:] + names[:k]
            if (r // len(names)) % 2:
                order = order[::-1]
            for n in order:
                times[n].append(clock.time(fns[n], inner))
    return times, inner


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------------------ which kernel ran

# The dispatcher's op for each SDPA backend: the CPU side of the profile names it on both devices.
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_scaled_dot_product_attention_math": "math",
}


def sdpa_backends(fn: Callable[[], object], device: torch.device) -> str:
    """Which SDPA kernel(s) one call of fn ran, read off the profiler (not guessed), e.g. 'flash(30)'.

    A forward can mix kernels (plain layers on one, re-routed layers on another): every backend is listed with
    its call count, e.g. 'flash(26)+math(4)'. 'none': no SDPA op ran (a compiled graph lowers attention to its
    own kernels).
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    counts: dict[str, int] = {}
    for e in prof.key_averages():
        kind = SDPA_OPS.get(e.key)
        if kind:
            counts[kind] = counts.get(kind, 0) + e.count
    if not counts:
        return "none"
    return "+".join(f"{k}({n})" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def fused_only(fn: Callable[[], object], device: torch.device) -> bool | None:
    """CUDA: does fn run with the math backend excluded (flash / efficient / cuDNN only)? None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # torch explains each refused kernel; the answer is the exception
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
                fn()
            torch.cuda.synchronize()
        return True
    except RuntimeError:
        return False


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """Achievable FLOP/s now: the best of `repeats` n x n x n products (2 n^3 FLOPs) in the bench's dtype.

    n defaults to 1024 on the CPU (25 ms a product on one AVX-512 core: cheap enough to re-time around every
    comparison, since a shared machine's available speed drifts) and 8192 on CUDA.
    """
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    clock = Clock(device)
    with torch.inference_mode():
        for _ in range(2 if device.type == "cuda" else 1):
            a @ b  # first calls allocate and pick a kernel
        best = min(clock.time(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


# ------------------------------------------------------------------------------------------- records


def compare(name: str, times: dict[str, list[float]], baseline: str, candidate: str, *, shape: dict,
            dtype: torch.dtype, device: torch.device, tokens: int | None = None, inner: int = 1,
            warmup: int = 1, **extra) -> dict:
    """One record: candidate against baseline from one interleaved run."""
    tb, tc = times[baseline], times[candidate]
    mb, mc = median(tb), median(tc)
    rounds = [b / c for b, c in zip(tb, tc)]  # the ratio within each round: its spread is the noise
    rec = dict(name=name, shape=shape, dtype=str(dtype).replace("torch.", ""), device=str(device),
               threads=torch.get_num_threads(), torch=torch.__version__, baseline=baseline, candidate=candidate,
               median_s=mc, baseline_median_s=mb, ratio=mb / mc, overhead=mc / mb - 1,
               round_ratio_min=min(rounds), round_ratio_max=max(rounds), repeats=len(tc), warmup=warmup,
               inner=inner)
    if tokens is not None:
        rec.update(tokens=tokens, tokens_per_s=tokens / mc, baseline_tokens_per_s=tokens / mb)
    rec.update(extra)
    rec.update(candidate_times_s=tc, baseline_times_s=tb)
    return rec


def emit(rec: dict, sink: list[dict]) -> dict:
    """Print one JSON line (flushed, so a long run shows progress) and keep it for the results file."""
    print(json.dumps(rec), flush=True)
    sink.append(rec)
    return rec


def free(device: torch.device | None = None) -> None:
    """Drop what the previous measurement left, so that the next one does not time its cleanup."""
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# -------------------------------------------------------------------------------------- results files


def command_line(script: str, argv: list[str]) -> str:
    return " ".join(["python -m kvembed.bench." + script, *argv])


def write_results(out: Path, script: str, argv: list[str], subset: str, records: list[dict], env: dict,
                  notes: list[str]) -> Path:
    """Write <out>/<script>.json and regenerate <out>/perf.md from every results file there."""
    from .report import write_perf_md

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{script}.json"
    data = dict(schema=SCHEMA, env=env, command=command_line(script, argv), subset=subset, notes=notes,
                records=records)
    path.write_text(json.dumps(data, indent=1) + "\n")
    md = write_perf_md(out)
    print(json.dumps(dict(wrote=[str(path), str(md)])), flush=True)
    return path


def argv_list(argv) -> list[str]:
    return sys.argv[1:] if argv is None else list(argv)

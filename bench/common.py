"""Shared benchmark helpers: the machine description, paired timing, JSON lines and the results files.

Every measurement is a *pair*: a baseline and a candidate timed in the same process, right next to each
other, alternating (b, c, b, c, ...) after warm-up, so that drift in a shared machine's load hits both
sides alike. A record carries both medians and their ratio; a lone time is never reported.

    ratio = candidate tokens/s / baseline tokens/s = baseline seconds / candidate seconds
            (> 1: the candidate is faster; overhead of the candidate = 1/ratio - 1)

Files:
    bench/results/<script>.json   {"env", "command", "subset", "records"} from the latest run of that script
    bench/results/perf.md         regenerated from every <script>.json present after each run
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"
SCRIPTS = ("forward", "attention", "memory")  # the order of sections in perf.md


# ------------------------------------------------------------------------------------ environment


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector ISA the CPU offers: it decides the matmul peak more than the clock does."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in have]
    except OSError:
        pass
    return []


def environment() -> dict:
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return dict(
        cpu=cpu_model(),
        cpu_flags=cpu_flags(),
        logical_cores=os.cpu_count(),
        usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=tf_version,
        python=platform.python_version(),
        mkldnn=torch.backends.mkldnn.is_available(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )


def sdpa_backends(fn: Callable[[], object]) -> str:
    """Which SDPA kernel(s) `fn` actually ran, read off the profiler's aten op names (not guessed from rules).

    CPU has two: the fused flash kernel (`_scaled_dot_product_flash_attention_for_cpu`) and the unfused
    `math` composite (`_scaled_dot_product_attention_math`, used e.g. for fp32 masks it cannot fuse).
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    found = []
    if any("flash_attention" in n for n in names):
        found.append("flash")
    if any("efficient_attention" in n for n in names):
        found.append("efficient")
    if any("_scaled_dot_product_attention_math" in n for n in names):
        found.append("math")
    if any("cudnn_attention" in n for n in names):
        found.append("cudnn")
    if not found:
        # A compiled graph lowers SDPA to its own kernels, or the code does matmul + softmax itself.
        found.append("none-visible" if not any("scaled_dot_product" in n for n in names) else "other")
    return "+".join(found)


# ------------------------------------------------------------------------------------------ timing


def _time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(baseline: Callable[[], object], candidate: Callable[[], object], *, repeats: int = 5,
           warmup: int = 1) -> tuple[float, float, list[float], list[float]]:
    """Median seconds of baseline and candidate, run alternately `repeats` times each after `warmup` each.

    The order inside a round flips every round (b c, c b, b c, ...) so that neither side always runs
    right after the other's cache footprint.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            baseline()
            candidate()
        tb, tc = [], []
        for r in range(repeats):
            if r % 2 == 0:
                tb.append(_time_once(baseline))
                tc.append(_time_once(candidate))
            else:
                tc.append(_time_once(candidate))
                tb.append(_time_once(baseline))
    return statistics.median(tb), statistics.median(tc), tb, tc


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
    """Achievable fp32 FLOP/s on this machine now: the median time of an n x n x n matmul (2 n^3 FLOPs)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b  # warm-up: first call allocates and picks a kernel
    times = [_time_once(lambda: a @ b) for _ in range(repeats)]
    s = statistics.median(times)
    return dict(name="matmul_peak", shape=[n, n, n], dtype="float32", median_s=s, flops_per_s=2 * n**3 / s)


# ------------------------------------------------------------------------------------ records


def record(name: str, shape: dict, dtype: torch.dtype | str, *, baseline: str, baseline_s: float,
           candidate_s: float, tokens: int | None = None, sdpa: str | None = None, **extra) -> dict:
    """One JSON line: both medians, tokens/s of each side (when tokens is given), and the ratio."""
    rec = dict(
        name=name,
        shape=shape,
        dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        sdpa_backend=sdpa,
        median_s=candidate_s,
        baseline=baseline,
        baseline_median_s=baseline_s,
        ratio=baseline_s / candidate_s,
    )
    if tokens is not None:
        rec["tokens"] = tokens
        rec["tokens_per_s"] = tokens / candidate_s
        rec["baseline_tokens_per_s"] = tokens / baseline_s
    rec.update(extra)
    return rec


def emit(rec: dict, sink: list[dict]) -> None:
    """Print one JSON line (flushed: a long run shows progress) and keep it for the results file."""
    print(json.dumps(rec), flush=True)
    sink.append(rec)


def free() -> None:
    """Drop what the previous measurement left, so the next one does not time the allocator's cleanup."""
    gc.collect()


# ------------------------------------------------------------------------------------ results files


def write_results(script: str, subset: str, records: list[dict], env: dict, notes: list[str] | None = None) -> Path:
    """Write bench/results/<script>.json and regenerate perf.md from every results file present."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([f"bench/{script}.py"] + sys.argv[1:])
    path = RESULTS / f"{script}.json"
    path.write_text(json.dumps(dict(env=env, command=command, subset=subset, notes=notes or [], records=records),
                               indent=1) + "\n")
    write_markdown()
    return path


def _fmt_shape(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def write_markdown() -> Path:
    """perf.md: per script, the machine, the command, the notes, then every ratio as one table row."""
    lines = [
        "# kvembed performance results",
        "",
        "Generated by `bench/forward.py`, `bench/attention.py` and `bench/memory.py` (do not edit by hand; see",
        "`docs/performance.md` for what each number means). Every ratio compares two things timed in the same",
        "process, alternately, after warm-up: **ratio = candidate tokens/s ÷ baseline tokens/s** (> 1: the",
        "candidate is faster; its overhead is 1/ratio − 1). Times are medians over the repeats.",
        "",
    ]
    for script in SCRIPTS:
        path = RESULTS / f"{script}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        env = data["env"]
        lines += [
            f"## {script} ({data['subset']} subset)",
            "",
            f"- command: `{data['command']}`",
            f"- machine: {env['cpu']} ({', '.join(env.get('cpu_flags') or []) or 'no AVX flags found'}), "
            f"{env['usable_cores']} usable of {env['logical_cores']} logical cores, {env['threads']} torch threads, "
            f"load average at start {env.get('load_average')}",
            f"- software: torch {env['torch']}, transformers {env.get('transformers')}, python {env['python']}",
        ]
        lines += [f"- {n}" for n in data.get("notes", [])]
        lines.append("")
        recs = data["records"]
        extra_cols = [c for c in ("achieved_flops_fraction", "peak_bytes", "overhead") if any(c in r for r in recs)]
        header = ["name", "shape", "dtype", "sdpa", "baseline", "baseline time", "candidate time", "ratio"]
        header += extra_cols
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in recs:
            if "ratio" not in r:
                continue
            row = [r["name"], _fmt_shape(r["shape"]), r["dtype"], r.get("sdpa_backend") or "",
                   r["baseline"], _fmt_s(r["baseline_median_s"]), _fmt_s(r["median_s"]), f"{r['ratio']:.3f}"]
            for c in extra_cols:
                v = r.get(c)
                if v is None:
                    row.append("")
                elif c == "peak_bytes":
                    row.append(f"{v / 2**20:.0f} MiB")
                elif c == "overhead":
                    row.append(f"{100 * v:+.1f}%")
                else:
                    row.append(f"{v:.3f}")
            lines.append("| " + " | ".join(row) + " |")
        others = [r for r in recs if "ratio" not in r]
        if others:
            lines += ["", "Other measurements:", ""]
            lines += [f"- `{json.dumps(r)}`" for r in others]
        lines.append("")
    out = RESULTS / "perf.md"
    out.write_text("\n".join(lines))
    return out

"""Write a `Table` as `<name>.md` (for people) and `<name>.json` (everything, for scripts).

The markdown has one row per method (or ablation setting), one column per task with the score and its 95%
interval, then the per-type and overall averages, all x 100; then the paired differences that answer the
paper's question per task (KV-Embedding - the same prompt and pooling without re-routing, and KV-Embedding -
the best baseline on that task), marked where the interval excludes 0; then the run's facts (model, dtype,
split, sizes, text cap, seed, versions, wall time, the exact command) and a per-task timing table.
The JSON keeps every per-row score (intervals.py), so any interval can be recomputed without re-embedding.
"""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict
from pathlib import Path

from kvembed.files import read_json

from .intervals import Interval, paired_interval
from .runners import MethodRun, Table, type_averages
from .tasks import TASK_TYPES

BASELINE_METHODS = ("mean", "last", "prompteol", "metaeol", "echo", "token_prepending", "bidirectional")


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "mteb", "sklearn", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing package is reported, not fatal
            out[mod] = "missing"
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _cell(r) -> str:
    if r is None or r.score is None:
        return "-"
    iv = r.interval
    if not iv or iv.get("lo") is None:
        return _fmt(r.score)
    return f"{100 * r.score:.1f} [{100 * iv['lo']:.1f}, {100 * iv['hi']:.1f}]"


def _result(run: MethodRun, task: str):
    return next((r for r in run.results if r.task == task), None)


def paired_rows(table: Table, tasks) -> list[dict]:
    """Per task: KV-Embedding - the same without re-routing, and KV-Embedding - the best baseline, with intervals."""
    kv = next((r for r in table.runs if r.method == "kvembedding" and set(r.switches) <= {"max_length"}), None)
    none = next((r for r in table.runs if r.method == "kvembedding" and r.switches.get("layers") == "none"
                 and set(r.switches) <= {"max_length", "layers"}), None)
    if kv is None:
        return []
    out = []
    for name, kind, _ in tasks:
        a = _result(kv, name)
        if a is None or a.score is None or not a.per_row:
            continue
        row = {"task": name, "type": kind, "kvembedding": a.score}
        b = _result(none, name) if none else None
        if b is not None and b.score is not None and b.per_row:
            row["vs_none"] = asdict(paired_interval(kind, a.per_row, b.per_row))
        base = [(r, _result(r, name)) for r in table.runs if r.method in BASELINE_METHODS]
        base = [(r, x) for r, x in base if x is not None and x.score is not None and x.per_row]
        if base:
            best_run, best = max(base, key=lambda rx: rx[1].score)
            row["best_baseline"] = best_run.label
            row["vs_best"] = asdict(paired_interval(kind, a.per_row, best.per_row))
        out.append(row)
    return out


def _diff(iv: dict | None) -> str:
    if not iv:
        return "-"
    mark = " **\\***" if Interval(**iv).excludes_zero() else ""
    return f"{100 * iv['point']:+.2f} [{100 * iv['lo']:+.2f}, {100 * iv['hi']:+.2f}]{mark}"


def render_markdown(table: Table, meta: dict, tasks: list[tuple[str, str, str]], paired: list[dict]) -> str:
    types = [t for t in TASK_TYPES if any(tt == t for _, tt, _ in tasks)]
    title = "Ablations (validation splits only)" if table.kind == "ablations" else "Evaluation"
    lines = [f"# kvembed {title}, MTEB 2.x protocol", ""]
    head = ["method", "layers", *[n for n, _, _ in tasks], *[f"avg {t}" for t in types], "avg"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in table.runs:
        avgs = type_averages(run)
        cells = [run.label, run.layers, *[_cell(_result(run, n)) for n, _, _ in tasks],
                 *[_fmt(avgs.get(t)) for t in types], _fmt(avgs.get("avg"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Main scores x 100 with their 95% interval: " + "; ".join(f"{n} {m} ({t})" for n, t, m in tasks) +
              ". Intervals: bootstrap over pairs (STS, pair classification) or queries (reranking, retrieval), "
              "1000 resamples; the spread of mteb's k-means over 50 seeds (clustering: the score is mteb's one "
              "run, itself one such draw, so 1 in 20 lands outside); the t interval over mteb's 10 experiments "
              "(classification); see docs/evaluation.md.",
              "`-`: task not run on this split (no such split; never replaced by test).", ""]
    if paired:
        lines += ["## Does re-routing help? Paired differences x 100, 95% interval", "",
                  "Same rows, same resamples (or the same mteb experiments) for both sides; **\\*** marks an "
                  "interval that excludes 0.", "",
                  "| task | type | KV-Embedding − no re-routing (`layers=none`) | best baseline | "
                  "KV-Embedding − best baseline |", "|---|---|---|---|---|"]
        for p in paired:
            lines.append(f"| {p['task']} | {p['type']} | {_diff(p.get('vs_none'))} | {p.get('best_baseline', '-')} | "
                         f"{_diff(p.get('vs_best'))} |")
        lines.append("")
    rows = f"{table.max_rows} (seeded sample, seed {table.seed})" if table.max_rows else "all"
    per_task = ", ".join(f"{k} {v}" for k, v in table.task_rows.items()) or "none"
    cap = (f"every text cut to its first {table.max_text_tokens} tokens before any prompt (the same cut for every "
           "method)") if table.max_text_tokens else "none"
    lines += [f"- model: `{table.model}`", f"- dtype: {table.dtype}", f"- split: {table.split}",
              f"- rows per task: {rows}; per-task overrides: {per_task} (retrieval keeps its whole corpus, "
              "classification its whole train pool)", f"- text cap: {cap}",
              f"- wall time: {table.wall_s:.1f} s", f"- date: {meta['date']}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
              f"- command: `{table.command}`", ""]
    lines += ["## Per task", "", "| method | task | split | rows | texts encoded | wall s | note |",
              "|---|---|---|---|---|---|---|"]
    for run in table.runs:
        lines.append(f"| {run.label} | fingerprint `{run.fingerprint[:16]}` | | | | {run.wall_s:.1f} | "
                     f"switches {json.dumps(run.switches)} |")
        for r in run.results:
            lines.append(f"| {run.label} | {r.task} | {r.split} | {r.rows} | {r.texts_encoded} | {r.wall_s:.1f} | "
                         f"{r.note} |")
    return "\n".join(lines) + "\n"


def write_report(table: Table, out_dir: Path | str, name: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": _versions()}
    tasks = list(dict.fromkeys((r.task, r.type, r.main_score) for run in table.runs for r in run.results))
    paired = paired_rows(table, tasks)
    data = {**asdict(table), **meta, "paired": paired,
            "averages": {run.label: type_averages(run) for run in table.runs}}
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md.write_text(render_markdown(table, meta, tasks, paired), encoding="utf-8")
    js.write_text(json.dumps(data, default=str) + "\n", encoding="utf-8")  # per-row lists: compact
    return md, js


def combine_reports(stems: list[Path | str], out_dir: Path | str, name: str) -> tuple[Path, Path]:
    """One `<name>.md|json` from several written reports (one per backbone): each becomes a section, its own
    command and facts kept, so every table stays reproducible by the command printed in it."""
    out_dir = Path(out_dir)
    sections, parts = ["# kvembed Evaluation, MTEB 2.x protocol, on both named backbones", ""], []
    for stem in map(Path, stems):
        if stem.suffix in (".md", ".json"):
            stem = stem.with_suffix("")
        # not with_suffix: a name like eval_qwen2.5-coder-0.5b has a dot that is not a suffix
        md, js = stem.parent / f"{stem.name}.md", stem.parent / f"{stem.name}.json"
        if not md.is_file() or not js.is_file():
            raise FileNotFoundError(f"{stem}: no {md.name} and {js.name} to combine; run `kvembed eval --name "
                                    f"{stem.name}` first")
        data = read_json(js, advice=f"run `kvembed eval --name {stem.name}` again")
        body = md.read_text(encoding="utf-8").split("\n", 1)[1]  # without its own title
        sections += [f"## Backbone: `{data['model']}` ({stem.name})", "", body.replace("\n## ", "\n### ").strip(), ""]
        parts.append({"report": stem.name, **data})
    md_out, js_out = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md_out.write_text("\n".join(sections) + "\n", encoding="utf-8")
    js_out.write_text(json.dumps({"backbones": parts}, default=str) + "\n", encoding="utf-8")
    return md_out, js_out

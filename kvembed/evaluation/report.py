"""Write a `Table` as `<name>.md` (for people) and `<name>.json` (everything, for scripts).

The markdown has one row per method (or ablation setting), one column per task, then the per-type
averages and the overall average, all main scores x 100; below it, the run's facts (model, dtype,
split, max-rows, seed, versions, wall time, the exact command) and a per-task timing table.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

from .runners import Table, type_averages
from .tasks import TASK_TYPES


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


def render_markdown(table: Table, meta: dict) -> str:
    tasks = []
    for run in table.runs:
        for r in run.results:
            if (r.task, r.type, r.main_score) not in tasks:
                tasks.append((r.task, r.type, r.main_score))
    types = [t for t in TASK_TYPES if any(tt == t for _, tt, _ in tasks)]
    title = "Ablations (validation splits only)" if table.kind == "ablations" else "Evaluation"
    lines = [f"# kvembed {title}, MTEB 2.x protocol", ""]
    head = ["method", "layers", *[n for n, _, _ in tasks], *[f"avg {t}" for t in types], "avg"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in table.runs:
        avgs = type_averages(run)
        cells = [run.label, run.layers, *[_fmt(run.score(n)) for n, _, _ in tasks],
                 *[_fmt(avgs.get(t)) for t in types], _fmt(avgs.get("avg"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Main scores x 100: " + "; ".join(f"{n} {m} ({t})" for n, t, m in tasks) + ".",
              "`-`: task not run on this split (no such split; never replaced by test).", ""]
    lines += [f"- model: `{table.model}`", f"- dtype: {table.dtype}", f"- split: {table.split}",
              f"- max-rows: {table.max_rows if table.max_rows else 'all'} (seeded sample, seed {table.seed}; "
              "retrieval keeps its whole corpus, classification its whole train pool)",
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
    data = {**table.to_json(), **meta,
            "averages": {run.label: type_averages(run) for run in table.runs}}
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md.write_text(render_markdown(table, meta), encoding="utf-8")
    js.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    return md, js

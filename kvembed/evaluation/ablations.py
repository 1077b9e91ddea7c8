"""The ablation grid: one KV-Embedding switch changed at a time, scored on validation splits only.

Tasks: STS-B validation, MRPC validation, TrecQA validation (the three tasks with an official dev
set that cost little). Test splits are never touched here: `run_ablations` refuses any split but
`validation`, so no switch can be chosen on test data.

Rows (each is the default with one switch changed; the default is bias 1.0, layers auto, rope_mode
rotated, 1 pass, hybrid pooling, the compression prompt):
- bias 0, 0.5, 2, 4 (1.0 is the default row)
- layers: all, none, and three fixed thirds of the stack: [0, L/3), [L/3, 2L/3), [2L/3, L)
- rope_mode: position0, unrotated
- passes: 2
- pooling: mean, last
- prompt off: template "none" (the raw text)
"""

from __future__ import annotations

import time

from .runners import Table, make_embedder, run_method
from .tasks import select_tasks

ABLATION_TASKS = ("stsb", "mrpc", "trecqa")
ABLATION_SPLIT = "validation"


def thirds(n_layers: int) -> list[list[int]]:
    return [list(range(i * n_layers // 3, (i + 1) * n_layers // 3)) for i in range(3)]


def ablation_grid(n_layers: int) -> list[tuple[str, dict]]:
    """(label, switches) rows; switches are relative to the method's defaults."""
    rows = [("default", {})]
    rows += [(f"bias={b:g}", {"bias": b}) for b in (0.0, 0.5, 2.0, 4.0)]
    rows += [("layers=all", {"layers": "all"}), ("layers=none", {"layers": "none"})]
    rows += [(f"layers={t[0]}-{t[-1]} (third {i + 1})", {"layers": t}) for i, t in enumerate(thirds(n_layers)) if t]
    rows += [(f"rope_mode={m}", {"rope_mode": m}) for m in ("position0", "unrotated")]
    rows += [("passes=2", {"passes": 2})]
    rows += [(f"pooling={p}", {"pooling": p}) for p in ("mean", "last")]
    rows += [("prompt off", {"template": "none"})]
    return rows


def check_split(split: str) -> None:
    if split != ABLATION_SPLIT:
        raise ValueError(f"ablations run on the validation split only (got --split {split}): choices made on "
                         "test data would leak into the reported scores")


def run_ablations(model: str | None, *, split: str = ABLATION_SPLIT, dtype: str = "float32", device: str = "cpu",
                  data_dir=None, max_rows: int | None = None, seed: int = 0, cache=None, batch_size: int = 32,
                  show_progress_bar: bool = True, command: str = "", make=make_embedder,
                  grid: list[tuple[str, dict]] | None = None, method: str = "kvembedding",
                  tasks: list[str] | None = None, base: dict | None = None) -> Table:
    """Score every grid row on the ablation tasks; `make(model, method, switches, dtype=, device=)` builds one.

    `tasks` narrows the grid to some of ABLATION_TASKS; `base` switches (e.g. max_length) apply to every row.
    """
    check_split(split)
    tasks = list(tasks or ABLATION_TASKS)
    unknown = sorted(set(tasks) - set(ABLATION_TASKS))
    if unknown:
        raise ValueError(f"ablation tasks {unknown} are not among {', '.join(ABLATION_TASKS)}")
    specs = select_tasks(tasks, data_dir)
    base = dict(base or {})
    t0 = time.perf_counter()
    runs = []
    default = make(model, method, base, dtype=dtype, device=device, data_dir=data_dir)
    if grid is None:
        grid = ablation_grid(default.args.num_hidden_layers)
    for label, switches in grid:
        switches = {**base, **switches}
        embedder = default if switches == base else make(model, method, switches, dtype=dtype, device=device,
                                                          data_dir=data_dir)
        runs.append(run_method(embedder, specs, split=split, max_rows=max_rows, seed=seed, cache=cache,
                               batch_size=batch_size, show_progress_bar=show_progress_bar, label=label,
                               method=method, switches=switches, model_name=model))
    return Table(model=model or "default", dtype=dtype, split=split, max_rows=max_rows, seed=seed, command=command,
                 runs=runs, wall_s=round(time.perf_counter() - t0, 3), kind="ablations")

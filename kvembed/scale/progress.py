"""Progress lines for a corpus run: each rank reports its own rate and ETA; rank 0 also reports the whole
run, counted from the part records on disk (so no collective is needed while ranks work at their own pace).

    [rank 1/2] 3000/5000 rows  41.2 texts/s  ETA 48s
    [all 2 ranks] parts 6/10  6000/10000 rows  82.0 texts/s  ETA 48s
"""

from __future__ import annotations

import time
from dataclasses import KW_ONLY, dataclass
from typing import Callable, TextIO


def fmt_seconds(s: float) -> str:
    if s != s or s == float("inf"):  # NaN or inf: no rate yet
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def say(out: TextIO | None, line: str) -> None:
    if out is not None:
        print(line, file=out, flush=True)


def rate_and_eta(rows: int, left: int, elapsed: float) -> str:
    rate = rows / elapsed if elapsed > 0 else 0.0
    return f"{rate:.1f} texts/s  ETA {fmt_seconds(left / rate if rate > 0 else float('inf'))}"


@dataclass
class Progress:
    rank: int
    world: int
    rank_total: int
    _: KW_ONLY
    total_rows: int
    total_parts: int
    # Rank 0 only: () -> (parts, rows) finished on disk, by any rank.
    done_on_disk: Callable[[], tuple[int, int]] | None = None
    every: float = 10.0
    # Where the lines go; None: nowhere (quiet).
    out: TextIO | None = None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self):
        self.start = self.last_log = self.clock()
        self.rows = 0
        # Rows already on disk when this run started do not count towards this run's rate.
        self.disk_start = self.done_on_disk()[1] if self.done_on_disk else 0

    def advance(self, rows: int, *, force: bool = False) -> None:
        """Count `rows` more embedded texts; print at most once every `every` seconds unless forced."""
        self.rows += rows
        now = self.clock()
        if not force and now - self.last_log < self.every:
            return
        self.last_log = now
        elapsed = now - self.start
        say(self.out, f"[rank {self.rank}/{self.world}] {self.rows}/{self.rank_total} rows  "
            + rate_and_eta(self.rows, self.rank_total - self.rows, elapsed))
        if self.done_on_disk is not None:
            parts, disk_rows = self.done_on_disk()
            say(self.out, f"[all {self.world} ranks] parts {parts}/{self.total_parts}  {disk_rows}/{self.total_rows} "
                "rows  " + rate_and_eta(disk_rows - self.disk_start, self.total_rows - disk_rows, elapsed))

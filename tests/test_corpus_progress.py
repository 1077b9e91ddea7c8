"""Progress lines of embed-corpus: rate and ETA per rank, and for the whole run from the parts on disk."""

from __future__ import annotations

import io

from kvembed.scale.progress import Progress, fmt_seconds


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_rank_and_overall_rate_and_eta_with_a_fake_clock():
    clock, out = Clock(), io.StringIO()
    disk = {"parts": 2, "rows": 200}  # finished before this run: must not count towards its rate
    p = Progress(0, 2, 600, total_rows=1000, total_parts=10, every=10.0, out=out, clock=clock,
                 done_on_disk=lambda: (disk["parts"], disk["rows"]))
    clock.t += 5
    p.advance(100)  # 5 s after the start: under `every`, silent
    assert out.getvalue() == ""
    clock.t += 15
    disk.update(parts=6, rows=600)
    p.advance(200)  # 300 rows in 20 s on this rank = 15/s, 300 left -> 20 s; all ranks: 400 new rows in 20 s
    assert out.getvalue().splitlines() == [
        "[rank 0/2] 300/600 rows  15.0 texts/s  ETA 20s",
        "[all 2 ranks] parts 6/10  600/1000 rows  20.0 texts/s  ETA 20s",
    ]


def test_other_ranks_print_only_their_own_line_and_eta_formats():
    clock, out = Clock(), io.StringIO()
    p = Progress(1, 2, 10, total_rows=20, total_parts=2, every=0.0, out=out, clock=clock)
    clock.t += 2
    p.advance(4)
    assert out.getvalue() == "[rank 1/2] 4/10 rows  2.0 texts/s  ETA 3s\n"
    assert [fmt_seconds(s) for s in (59.4, 61, 3725, float("inf"))] == ["59s", "1m01s", "1h02m", "?"]

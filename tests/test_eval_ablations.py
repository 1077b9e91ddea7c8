"""The ablation grid runs on validation splits only and refuses test, from the API and from the CLI."""

from types import SimpleNamespace

import pytest

from kvembed.evaluation import cli_eval
from kvembed.evaluation.ablations import ABLATION_TASKS, ablation_grid, check_split, run_ablations, thirds
from kvembed.evaluation.lexical import HashingBowEmbedder


class FakeKV(HashingBowEmbedder):
    """Stands in for KVEmbedder: takes switches, reports 30 layers, and its fingerprint names the switches."""

    def __init__(self, switches):
        super().__init__()
        self.method = "kvembedding"
        self.args = SimpleNamespace(num_hidden_layers=30)
        self.fingerprint = f"fake-kv-{sorted(switches.items())}"


def fake_make(model, method, switches, **kw):
    return FakeKV(switches)


def test_ablations_refuse_the_test_split():
    with pytest.raises(ValueError, match="validation split only"):
        check_split("test")
    with pytest.raises(ValueError, match="validation split only"):
        run_ablations(None, split="test", make=fake_make)
    assert cli_eval.main(["--ablations", "--split", "test", "--no-cache", "--no-progress"]) == 2


def test_grid_changes_one_switch_at_a_time():
    grid = dict(ablation_grid(30))
    assert grid["default"] == {}
    assert [grid[f"bias={b}"]["bias"] for b in ("0", "0.5", "2", "4")] == [0.0, 0.5, 2.0, 4.0]
    assert thirds(30) == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    assert grid["layers=10-19 (third 2)"] == {"layers": list(range(10, 20))}
    assert {"layers": "all"} in grid.values() and {"layers": "none"} in grid.values()
    assert grid["passes=2"] == {"passes": 2} and grid["prompt off"] == {"template": "none"}
    assert grid["rope_mode=unrotated"] == {"rope_mode": "unrotated"} and grid["pooling=last"] == {"pooling": "last"}
    assert all(len(sw) <= 1 for sw in grid.values())


def test_ablation_table_uses_only_validation_rows(tmp_path):
    grid = [("default", {}), ("bias=2", {"bias": 2.0})]
    table = run_ablations(None, make=fake_make, grid=grid, max_rows=8, show_progress_bar=False)
    assert table.kind == "ablations" and table.split == "validation"
    assert [run.label for run in table.runs] == ["default", "bias=2"]
    for run in table.runs:
        assert [r.task for r in run.results] == list(ABLATION_TASKS)
        assert all(r.split == "validation" and r.score is not None for r in run.results)
    assert table.runs[0].fingerprint != table.runs[1].fingerprint

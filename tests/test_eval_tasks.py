"""The data pack loads as announced; seeded subsets; a tiny end-to-end eval and CLI run on real data.

The end-to-end runs use the hashed bag-of-words embedder (no model) on a few rows, so they check the
whole pipeline (loader -> mteb task -> adapter -> cache -> report) in seconds. Banking77 is left out
of them only for time (its 77 labels make mteb fit 10 logistic regressions on ~4800 train texts), and
BBC classification because AmazonCounterfactual already covers the type.
"""

import json

import pytest

from kvembed.evaluation import cli_eval
from kvembed.evaluation.lexical import HashingBowEmbedder
from kvembed.evaluation.mteb_tasks import build_task
from kvembed.evaluation.runners import _rows, run_method, type_averages
from kvembed.evaluation.tasks import (TASK_TYPES, TaskDataError, default_data_dir, list_tasks, load_retrieval,
                                      load_spec, load_split, sample_indices, select_tasks)
from kvembed.switches import SwitchError

DATA = default_data_dir()
CHEAP = "stsb,amazon_counterfactual_en,bbc_news_clustering,brown_genres,mrpc,trecqa,cranfield"


def test_data_pack_is_present():
    assert DATA.is_dir(), f"{DATA}: the evaluation data pack is missing; set $KVEMBED_DATA"
    names = {s.name for s in list_tasks(DATA)}
    assert names == {"stsb", "banking77", "amazon_counterfactual_en", "mrpc", "trecqa", "cranfield",
                     "bbc_news_clustering", "bbc_news_classification", "brown_genres"}
    assert {s.type for s in list_tasks(DATA)} == set(TASK_TYPES)


@pytest.mark.parametrize("spec", list_tasks(DATA), ids=lambda s: s.name)
def test_every_split_loads_with_task_json_counts(spec):
    meta = json.loads((spec.path / "task.json").read_text())
    if spec.type == "retrieval":
        corpus, queries, qrels = load_retrieval(spec)
        assert (len(corpus), len(queries), len(qrels)) == (meta["corpus_size"], meta["splits"]["test"], meta["qrels"])
        return
    for split, n in spec.splits.items():
        rows = load_split(spec, split)
        assert len(rows) == n, f"{spec.name}/{split}"
        keys = {"sts": {"sentence1", "sentence2", "score"}, "pair_classification": {"sentence1", "sentence2", "label"},
                "classification": {"text", "label"}, "clustering": {"text", "label"},
                "reranking": {"query", "positive", "negative"}}[spec.type]
        assert keys <= set(rows[0])


@pytest.mark.parametrize("spec", list_tasks(DATA), ids=lambda s: s.name)
def test_mteb_task_holds_every_scored_row(spec):
    split = "test"
    task = build_task(spec, split)
    assert _rows(task) == spec.splits[split]
    assert task.metadata.main_score == spec.mteb_main_score


def test_max_rows_is_a_seeded_sample_in_file_order():
    a = sample_indices(100, 10, seed=0)
    assert a == sample_indices(100, 10, seed=0) and a == sorted(a) and len(set(a)) == 10
    assert a != sample_indices(100, 10, seed=1)
    assert sample_indices(5, 10) == list(range(5)) and sample_indices(5, None) == list(range(5))
    with pytest.raises(TaskDataError, match="positive"):
        sample_indices(5, 0)
    stsb = select_tasks("stsb", DATA)[0]
    full = load_split(stsb, "test")
    sub = load_split(stsb, "test", max_rows=7, seed=3)
    assert sub == [full[i] for i in sample_indices(len(full), 7, seed=3)]


def test_retrieval_subset_keeps_whole_corpus_and_only_its_qrels():
    cran = select_tasks("cranfield", DATA)[0]
    corpus, queries, qrels = load_retrieval(cran, max_rows=5)
    assert len(corpus) == 1398 and len(queries) == 5
    assert {r["query_id"] for r in qrels} == {q["id"] for q in queries}


def test_task_selection_by_name_and_type_and_errors():
    assert [s.name for s in select_tasks("sts,trecqa", DATA)] == ["stsb", "trecqa"]
    assert {s.name for s in select_tasks("clustering", DATA)} == {"bbc_news_clustering", "brown_genres"}
    with pytest.raises(TaskDataError, match="unknown task 'nope'.*stsb"):
        select_tasks("nope", DATA)
    with pytest.raises(TaskDataError, match="no split 'validation'"):
        load_split(select_tasks("banking77", DATA)[0], "validation")


def test_tiny_end_to_end_eval_every_type():
    specs = select_tasks(CHEAP, DATA)
    run = run_method(HashingBowEmbedder(), specs, max_rows=12, show_progress_bar=False)
    by_task = {r.task: r for r in run.results}
    assert set(by_task) == set(CHEAP.split(","))
    for r in run.results:
        assert 0.0 <= r.score <= 1.0 or r.type == "sts" and -1.0 <= r.score <= 1.0, r
        assert r.rows == 12 and r.texts_encoded > 0
    # a bag of words matches Cranfield's vocabulary-heavy queries well above chance (~0.01)
    assert by_task["cranfield"].score > 0.05
    assert set(type_averages(run)) == set(TASK_TYPES) | {"avg"}


def test_validation_split_skips_tasks_without_one_instead_of_using_test():
    specs = select_tasks("stsb,brown_genres,cranfield", DATA)
    run = run_method(HashingBowEmbedder(), specs, split="validation", max_rows=10, show_progress_bar=False)
    by_task = {r.task: r for r in run.results}
    assert by_task["stsb"].score is not None and by_task["stsb"].split == "validation"
    assert by_task["brown_genres"].score is None and "no 'validation' split" in by_task["brown_genres"].note
    assert by_task["cranfield"].score is None and by_task["cranfield"].texts_encoded == 0


def test_cli_writes_table_and_json(tmp_path, capsys):
    rc = cli_eval.main(["--methods", "lexical_bow", "--tasks", "stsb,mrpc,trecqa", "--max-rows", "10",
                        "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    md = (tmp_path / "eval.md").read_text()
    assert "| lexical_bow | n/a |" in md and "rows per task: 10 (seeded" in md and "kvembed eval --methods lexical_bow" in md
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["split"] == "test" and data["max_rows"] == 10
    [run] = data["runs"]
    assert [r["task"] for r in run["results"]] == ["stsb", "mrpc", "trecqa"]
    assert all(isinstance(r["score"], float) for r in run["results"])
    assert set(data["averages"]["lexical_bow"]) == {"sts", "pair_classification", "reranking", "avg"}


def test_cli_parses_switches_and_method_specs():
    from kvembed.switches import parse_layers

    assert parse_layers("3,4,5") == [3, 4, 5] == parse_layers("3-5") == parse_layers("3+4+5")
    assert parse_layers("auto") == "auto"
    assert cli_eval.parse_method("kvembedding:bias=2:layers=10-12:rope-mode=position0") == (
        "kvembedding", {"bias": 2.0, "layers": (10, 11, 12), "rope_mode": "position0"})
    with pytest.raises(Exception, match="key=value"):
        cli_eval.parse_method("kvembedding:colour=blue")
    with pytest.raises(SwitchError, match="layers is given twice"):  # not: the later silently wins
        cli_eval.parse_method("kvembedding:layers=none:layers=all")
    with pytest.raises(SwitchError, match=r"'kvembedding:bias=abc': bias: 'abc' is not a number"):
        cli_eval.parse_method("kvembedding:bias=abc")  # the message names the switch
    import argparse

    p = argparse.ArgumentParser()
    cli_eval.add_arguments(p)
    args = p.parse_args(["--methods", "kvembedding,mean", "--bias", "0.5", "--normalize", "false", "--layers", "none"])
    # A flag goes to every listed method that takes it (mean takes no bias or layers).
    assert cli_eval.method_list(args) == [
        ("kvembedding", "kvembedding", {"layers": "none", "bias": 0.5, "normalize": False}),
        ("mean", "mean", {"normalize": False})]
    args = p.parse_args(["--methods", "mean,last", "--bias", "0.5"])
    with pytest.raises(ValueError, match="bias"):
        cli_eval.method_list(args)  # a flag no listed method takes is refused, never ignored


# ------------------------------------------------------------- red-team inputs: nothing dropped, nothing shrunk


def _task(root, meta: dict, rows: list[dict]):
    folder = root / meta["name"]
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps(meta))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


STS_ROWS = [{"sentence1": f"a{i}", "sentence2": f"b{i}", "score": float(i)} for i in range(8)]


def test_a_task_type_in_capitals_is_the_same_type_not_dropped(tmp_path):
    _task(tmp_path, {"name": "loud", "type": "STS", "splits": {"test": 8}}, STS_ROWS)
    assert [(s.name, s.type) for s in list_tasks(tmp_path)] == [("loud", "sts")]


def test_an_unknown_task_type_is_an_error_naming_the_file(tmp_path):
    _task(tmp_path, {"name": "odd", "type": "summarisation", "splits": {"test": 8}}, STS_ROWS)
    with pytest.raises(TaskDataError, match=r"odd/task.json.*summarisation"):
        list_tasks(tmp_path)


def test_fewer_rows_than_announced_is_an_error_not_a_smaller_score(tmp_path):
    folder = _task(tmp_path, {"name": "short", "type": "sts", "splits": {"test": 500}}, STS_ROWS)
    with pytest.raises(TaskDataError, match="8 rows, but task.json announces 500"):
        load_split(load_spec(folder), "test")


def test_a_row_missing_a_field_names_file_line_and_field(tmp_path):
    rows = STS_ROWS[:3] + [{"sentence1": "x", "sentence2": "y"}] + STS_ROWS[4:]
    folder = _task(tmp_path, {"name": "holey", "type": "sts", "splits": {"test": 8}}, rows)
    with pytest.raises(TaskDataError, match=r"test.jsonl:4: sts row: no 'score' field"):
        load_split(load_spec(folder), "test")


def test_an_ill_typed_field_names_file_line_and_field(tmp_path):
    rows = STS_ROWS[:2] + [{"sentence1": "x", "sentence2": "y", "score": "high"}] + STS_ROWS[3:]
    folder = _task(tmp_path, {"name": "typed", "type": "sts", "splits": {"test": 8}}, rows)
    with pytest.raises(TaskDataError, match=r"test.jsonl:3: sts row: 'score' is str"):
        load_split(load_spec(folder), "test")


def test_a_malformed_task_json_names_the_file(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "task.json").write_text('{"name": "bad", "type": ')
    with pytest.raises(TaskDataError, match=r"bad/task.json: not valid JSON"):
        list_tasks(tmp_path)
    assert cli_eval.main(["--methods", "lexical_bow", "--data-dir", str(tmp_path), "--no-cache", "--no-progress",
                          "--out", str(tmp_path / "out")]) == 2


def test_combine_puts_each_backbone_in_its_own_section(tmp_path, capsys):
    # eval_b0.5 has a dot that is not a suffix (as in eval_qwen2.5-coder-0.5b); a stem may also be named by its .md
    for name in ("eval_a", "eval_b0.5"):
        assert cli_eval.main(["--methods", "lexical_bow", "--tasks", "stsb", "--max-rows", "10", "--out", str(tmp_path),
                              "--name", name, "--no-cache", "--no-progress"]) == 0
    assert cli_eval.main(["--combine", str(tmp_path / "eval_a.md"), str(tmp_path / "eval_b0.5"), "--out",
                          str(tmp_path), "--name", "eval"]) == 0
    md = (tmp_path / "eval.md").read_text()
    assert md.count("## Backbone:") == 2 and "(eval_a)" in md and "(eval_b0.5)" in md
    assert md.count("- command: `kvembed eval --methods lexical_bow") == 2  # each table keeps its own command
    data = json.loads((tmp_path / "eval.json").read_text())
    assert [b["report"] for b in data["backbones"]] == ["eval_a", "eval_b0.5"]
    assert cli_eval.main(["--combine", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2

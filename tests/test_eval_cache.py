"""The embedding cache: a re-run encodes nothing, a new method computes only itself, keys keep apart."""

import numpy as np

from kvembed.evaluation.cache import CachedEncoder, EmbeddingCache
from kvembed.evaluation.lexical import HashingBowEmbedder
from kvembed.evaluation.runners import run_method
from kvembed.evaluation.tasks import default_data_dir, select_tasks

TASKS = "stsb,mrpc,trecqa,brown_genres"


class Counting(HashingBowEmbedder):
    """The bag-of-words embedder under another name (= another method), counting what it is asked."""

    def __init__(self, name: str):
        super().__init__()
        self.method = name
        self.fingerprint = f"counting-{name}"


def test_second_call_encodes_nothing_and_restores_order(tmp_path):
    emb = Counting("a")
    enc = CachedEncoder(emb, EmbeddingCache(tmp_path), show_progress_bar=False)
    texts = ["b b", "a", "ccc c", "a"]  # a duplicate, and lengths out of order
    first = enc.encode(texts, "document")
    assert len(emb.seen) == 3  # each unique text once
    assert np.array_equal(first, emb.encode(texts))  # input order restored, duplicates filled
    emb.seen.clear()
    second = CachedEncoder(emb, EmbeddingCache(tmp_path), show_progress_bar=False).encode(texts, "document")
    assert emb.seen == [] and np.array_equal(first, second)  # a fresh process reads the same file


def test_prompt_name_and_fingerprint_are_part_of_the_key(tmp_path):
    cache = EmbeddingCache(tmp_path)
    a, b = Counting("a"), Counting("b")
    CachedEncoder(a, cache, show_progress_bar=False).encode(["x y"], "document")
    CachedEncoder(a, cache, show_progress_bar=False).encode(["x y"], "query")
    CachedEncoder(b, cache, show_progress_bar=False).encode(["x y"], "document")
    assert [p for p, _ in a.seen] == ["document", "query"] and [p for p, _ in b.seen] == ["document"]
    assert cache.count("counting-a") == 2 and cache.count("counting-b") == 1


def test_rerun_of_a_table_encodes_nothing_and_scores_the_same(tmp_path):
    specs = select_tasks(TASKS, default_data_dir())
    emb = Counting("a")
    first = run_method(emb, specs, max_rows=15, cache=EmbeddingCache(tmp_path), show_progress_bar=False)
    assert sum(r.texts_encoded for r in first.results) == len(emb.seen) > 0
    emb.seen.clear()
    again = run_method(emb, specs, max_rows=15, cache=EmbeddingCache(tmp_path), show_progress_bar=False)
    assert emb.seen == [] and all(r.texts_encoded == 0 for r in again.results)
    assert [r.score for r in again.results] == [r.score for r in first.results]


def test_adding_a_method_computes_only_that_method(tmp_path):
    specs = select_tasks(TASKS, default_data_dir())
    cache = EmbeddingCache(tmp_path)
    a = Counting("a")
    run_method(a, specs, max_rows=15, cache=cache, show_progress_bar=False)
    n_a = len(a.seen)
    a.seen.clear()
    b = Counting("b")
    runs = [run_method(e, specs, max_rows=15, cache=cache, show_progress_bar=False) for e in (a, b)]
    assert a.seen == [] and sum(r.texts_encoded for r in runs[0].results) == 0
    # b computes exactly what a computed the first time: the same texts under the same prompts
    assert len(b.seen) == n_a == sum(r.texts_encoded for r in runs[1].results)
    assert len(set(b.seen)) == len(b.seen)  # and no (prompt, text) twice

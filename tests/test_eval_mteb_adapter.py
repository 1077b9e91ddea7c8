"""KVEmbeddingMTEB under mteb's own entry point, on mteb's in-memory mock tasks (offline, no hub).

The mock tasks ship with mteb (`mteb.mocks.mock_tasks`) and hold their few rows in code. Scores from
a bag-of-words stand-in are not the point; what is checked: mteb accepts the adapter as a model (its
meta is ours, not swapped for an empty one), every task type runs through `encode`, queries get the
query prompt and documents/symmetric texts the document prompt, and the vectors are the embedder's.
"""

import math

import mteb
import numpy as np
from mteb.mocks.mock_tasks.classification import MockClassificationTask
from mteb.mocks.mock_tasks.clustering import MockClusteringTask
from mteb.mocks.mock_tasks.pair_classification import MockPairClassificationTask
from mteb.mocks.mock_tasks.reranking import MockRerankingTask
from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
from mteb.mocks.mock_tasks.sts import MockSTSTask
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType

from kvembed.evaluation.lexical import HashingBowEmbedder
from kvembed.evaluation.mteb_adapter import KVEmbeddingMTEB, prompt_name_for


def test_mteb_evaluate_runs_every_task_type_on_mock_tasks():
    emb = HashingBowEmbedder()
    model = KVEmbeddingMTEB(emb, show_progress_bar=False, name="tiny/model", method="lexical_bow",
                            switches={"bias": 2.0})
    tasks = [MockSTSTask(), MockClassificationTask(), MockClusteringTask(), MockPairClassificationTask(),
             MockRerankingTask(), MockRetrievalTask()]
    result = mteb.evaluate(model, tasks, cache=None, co2_tracker=False, show_progress_bar=False)
    assert result.model_name == "kvembed/tiny-model__lexical_bow"
    assert result.model_revision == emb.fingerprint
    scores = {tr.task_name: tr.get_score() for tr in result.task_results}
    assert set(scores) == {t.metadata.name for t in tasks}
    assert all(math.isfinite(s) for s in scores.values())
    # the mock STS pair 0 shares most words, pair 1 none: a bag of words ranks them right
    assert scores["MockSTSTask"] > 0.99

    prompts = {}
    for task, split, prompt in model.calls:
        prompts.setdefault(task, set()).add(prompt)
    assert prompts["MockRetrievalTask"] == prompts["MockRerankingTask"] == {"query", "document"}
    for symmetric in ("MockSTSTask", "MockClassificationTask", "MockClusteringTask", "MockPairClassificationTask"):
        assert prompts[symmetric] == {"document"}
    assert [p for _, p in emb.seen if p is None] == []


def test_model_meta_is_complete():
    model = KVEmbeddingMTEB(HashingBowEmbedder(), method="lexical_bow", switches={"layers": [3, 4]})
    meta = model.mteb_model_meta
    assert isinstance(meta, ModelMeta)
    assert meta.name == "kvembed/none__lexical_bow" and meta.revision.startswith("lexical_bow-dim512")
    assert meta.embed_dim == 512 and meta.similarity_fn_name.value == "cosine"
    assert meta.experiment_kwargs == {"method": "lexical_bow", "layers": "[3, 4]"}


def test_encode_returns_the_embedders_vectors_in_order():
    from mteb._create_dataloaders import _create_dataloader_from_texts

    emb = HashingBowEmbedder()
    model = KVEmbeddingMTEB(emb, show_progress_bar=False)
    texts = ["the cat sat", "a dog ran", "the cat sat", "x"]
    out = model.encode(_create_dataloader_from_texts(texts, batch_size=3), task_metadata=MockSTSTask().metadata,
                       hf_split="test", hf_subset="default", prompt_type=PromptType.query)
    assert np.array_equal(out, emb.encode(texts))
    assert model.calls == [("MockSTSTask", "test", "query")]
    assert prompt_name_for(None) == prompt_name_for(PromptType.document) == "document"
    assert prompt_name_for("query") == "query"

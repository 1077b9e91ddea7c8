"""KV-Embedding's invariants (SPEC §1) and switches, on tiny random models of the four families."""

from __future__ import annotations

import pytest
import torch

from kvembed.method import (
    DOCUMENT_TEMPLATE,
    QUERY_TEMPLATE,
    KVEmbedding,
    collate,
    encode_text,
    kv_embed,
    pool,
    resolve_layers,
)
from tests import tiny
from tests.test_model_parity import ours_from_hf

ROWS = [[1, 17, 44, 90, 12, 5, 66, 201, 33, 7, 9], [1, 250, 3, 8], [1, 9], [1, 9, 100, 41, 7, 2]]
FAMILIES = ["llama", "mistral_window", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return ours_from_hf(tiny.hf_model(request.param))


def emb(model, rows=ROWS, layers=(1, 2), **kw):
    with torch.no_grad():
        return kv_embed(model, collate(rows), tuple(layers), **kw)


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() < tol


def test_layers_none_is_the_plain_model(model):
    batch = collate(ROWS)
    with torch.no_grad():
        plain = pool(model(batch.input_ids, batch.attention_mask).hidden, batch.attention_mask)
    assert close(emb(model, layers=()), plain)
    assert not close(emb(model, layers=(1, 2)), plain, 1e-3)  # and re-routing does change it


def test_bias_minus_inf_is_no_rerouting(model):
    for mode in ("rotated", "position0", "unrotated"):
        assert close(emb(model, bias=float("-inf"), rope_mode=mode), emb(model, layers=()))


def test_one_layer_one_pass_equals_two_passes(model):
    for mode in ("rotated", "position0", "unrotated"):
        assert close(emb(model, layers=(2,), passes=1, rope_mode=mode), emb(model, layers=(2,), passes=2, rope_mode=mode))
    # With two layers the second sees a final token the first already changed: the passes differ.
    assert not close(emb(model, layers=(1, 2), passes=1), emb(model, layers=(1, 2), passes=2), 1e-4)


def test_rope_modes_differ(model):
    a, b, c = (emb(model, rope_mode=m) for m in ("rotated", "position0", "unrotated"))
    assert not close(a, b, 1e-4) and not close(a, c, 1e-4) and not close(b, c, 1e-4)


def test_batch_invariance(model):
    """A text's embedding is the same alone or with any batch-mates, whatever their lengths (1e-5 fp32)."""
    together = emb(model)
    for i, row in enumerate(ROWS):
        assert close(emb(model, rows=[row])[0], together[i])
    shuffled = emb(model, rows=ROWS[::-1])
    assert close(shuffled.flip(0), together)


def test_bias_changes_the_embedding_monotonically_away_from_plain(model):
    plain = emb(model, layers=())
    d = [(emb(model, bias=b) - plain).norm(dim=-1).mean().item() for b in (-4.0, 0.0, 4.0)]
    assert d[0] < d[1] < d[2]


def test_pooling_and_normalize():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third position is padding
    assert torch.allclose(pool(hidden, mask, "mean", False), torch.tensor([[2.0, 2.0]]))
    assert torch.allclose(pool(hidden, mask, "last", False), torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(pool(hidden, mask, "hybrid", False), torch.tensor([[2.5, 3.0]]))
    assert torch.allclose(pool(hidden, mask, "last", True), torch.tensor([[0.6, 0.8]]))


def test_resolve_layers():
    assert resolve_layers("none", 4) == () and resolve_layers("all", 4) == (0, 1, 2, 3)
    assert resolve_layers([3, 1, 1], 4) == (1, 3)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([4], 4)
    with pytest.raises(ValueError, match="auto"):
        resolve_layers("some", 4)


def test_bad_switches_raise():
    for kw, msg in ((dict(rope_mode="x"), "rope_mode"), (dict(passes=3), "passes"), (dict(pooling="max"), "pooling")):
        with pytest.raises(ValueError, match=msg):
            KVEmbedding((1,), **kw)
    with pytest.raises(ValueError, match="{text}"):
        KVEmbedding((1,), template="no slot")


# ------------------------------------------------------------------------------- prompt and truncation


@pytest.fixture(scope="module")
def tok():
    return tiny.make_tokenizer()


def test_default_templates_and_special_tokens(tok):
    e = encode_text(tok, "a cat", DOCUMENT_TEMPLATE, None)
    assert e.prompt == '"Context: a cat" Compress the Context in one word:'
    assert e.ids[0] == 1  # <s>: the tokenizer's own special-token rule (add_special_tokens=True)
    assert e.ids == tok.encode(e.prompt).ids
    q = KVEmbedding((1,)).prepare(tok, "a cat", "query", None)[0]
    assert q.prompt == QUERY_TEMPLATE.replace("{text}", "a cat")
    assert KVEmbedding((1,), template="none").prepare(tok, "a cat", None, None)[0].prompt == "a cat"


def test_truncation_cuts_the_text_never_the_instruction(tok):
    text = "the quick brown fox jumps over the lazy dog " * 20
    full = encode_text(tok, text, DOCUMENT_TEMPLATE, None)
    tail = tok.encode('" Compress the Context in one word:', add_special_tokens=False).ids
    for max_length in (len(full.ids) - 1, 40, 25):
        e = encode_text(tok, text, DOCUMENT_TEMPLATE, max_length)
        assert e.truncated and len(e.ids) <= max_length
        assert e.ids[-len(tail):] == tail, "the instruction after the text must survive"
        assert e.prompt.startswith('"Context: the quick')
        assert len(e.ids) >= max_length - 3  # cut at a token boundary, not far more than needed
    assert not encode_text(tok, "short", DOCUMENT_TEMPLATE, 40).truncated


def test_template_longer_than_max_length_raises(tok):
    with pytest.raises(ValueError, match="template alone"):
        encode_text(tok, "x", DOCUMENT_TEMPLATE, 5)

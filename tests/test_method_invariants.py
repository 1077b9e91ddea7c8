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
from tests.tolerance import assert_close, assert_differ, decoder_drift

ROWS = [[1, 17, 44, 90, 12, 5, 66, 201, 33, 7, 9], [1, 250, 3, 8], [1, 9], [1, 9, 100, 41, 7, 2]]
FAMILIES = ["llama", "mistral_window", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return ours_from_hf(tiny.hf_model(request.param))


def emb(model, rows=ROWS, layers=(1, 2), **kw):
    with torch.no_grad():
        return kv_embed(model, collate(rows), tuple(layers), **kw)


def drift(model) -> float:
    """Two routes to the same embedding (with or without a prefix slot or padding, one pass or two) differ in the
    order of their sums over C, I, Hq*D and the T keys plus the slot, through every layer."""
    return decoder_drift(model.args, max(map(len, ROWS)) + 1)


def test_layers_none_is_the_plain_model(model):
    batch = collate(ROWS)
    with torch.no_grad():
        plain = pool(model(batch.input_ids, batch.attention_mask).hidden, batch.attention_mask)
    assert_close(emb(model, layers=()), plain, drift(model), "layers=() vs the plain model")
    assert_differ(emb(model, layers=(1, 2)), plain, drift(model), "re-routing vs plain")  # re-routing does change it


def test_bias_minus_inf_is_no_rerouting(model):
    for mode in ("rotated", "position0", "unrotated"):
        # exp(-inf) = 0 exactly; what remains is the slot's place in the sums.
        assert_close(emb(model, bias=float("-inf"), rope_mode=mode), emb(model, layers=()), drift(model), mode)


def test_one_layer_one_pass_equals_two_passes(model):
    for mode in ("rotated", "position0", "unrotated"):
        one, two = (emb(model, layers=(2,), passes=p, rope_mode=mode) for p in (1, 2))
        assert_close(one, two, drift(model), f"one layer, {mode}: one pass vs two")
    # With two layers the second sees a final token the first already changed: the passes differ.
    assert_differ(emb(model, layers=(1, 2), passes=1), emb(model, layers=(1, 2), passes=2), drift(model), "passes")


def test_rope_modes_differ(model):
    a, b, c = (emb(model, rope_mode=m) for m in ("rotated", "position0", "unrotated"))
    for x, y, what in ((a, b, "rotated/position0"), (a, c, "rotated/unrotated"), (b, c, "position0/unrotated")):
        assert_differ(x, y, drift(model), what)


def test_batch_invariance(model):
    """A text's embedding is the same alone or with any batch-mates, whatever their lengths (up to rounding)."""
    together = emb(model)
    for i, row in enumerate(ROWS):
        assert_close(emb(model, rows=[row])[0], together[i], drift(model), f"row {i} alone vs batched")
    shuffled = emb(model, rows=ROWS[::-1])
    assert_close(shuffled.flip(0), together, drift(model), "reversed batch")


def test_bias_changes_the_embedding_monotonically_away_from_plain(model):
    plain = emb(model, layers=())
    d = [(emb(model, bias=b) - plain).norm(dim=-1).mean().item() for b in (-4.0, 0.0, 4.0)]
    assert d[0] < d[1] < d[2]


def test_pooling_and_normalize():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third position is padding
    # Exact: sums and halves of small integers are representable, and 3/5, 4/5 (|(3, 4)| = 5 exactly) are one
    # correctly rounded division each, the same rounding as the literals 0.6 and 0.8.
    assert torch.equal(pool(hidden, mask, "mean", False), torch.tensor([[2.0, 2.0]]))
    assert torch.equal(pool(hidden, mask, "last", False), torch.tensor([[3.0, 4.0]]))
    assert torch.equal(pool(hidden, mask, "hybrid", False), torch.tensor([[2.5, 3.0]]))
    assert torch.equal(pool(hidden, mask, "last", True), torch.tensor([[0.6, 0.8]]))


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

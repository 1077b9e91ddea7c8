"""The compiled hot path: the decoder traces as one graph (no breaks), with and without KV-Embedding's
re-routing, and the compiled output equals eager.

One small config (Qwen3-shaped: GQA, q/k norm, head_dim != C / Hq; two layers, so that one is re-routed and
one is plain) and one shape: inductor compilation is the slow part on a small CPU.
Tolerance (tests/tolerance.py): inductor may fuse and reorder fp32 reductions (matmuls, RMSNorm, softmax), so
compiled and eager drift apart by at most `decoder_drift` through the two layers, relative to the largest value;
a wrong mask, a dropped prefix or a mis-ordered RoPE moves them by far more (checked below too).
"""

from __future__ import annotations

import pytest
import torch

from kvembed.config import ModelArgs
from kvembed.method import ReRouting, collate
from kvembed.model import Decoder
from tests import tiny
from tests.tolerance import assert_close, assert_differ, decoder_drift


@pytest.fixture(scope="module")
def setup():
    cfg = tiny.hf_config("qwen3").to_dict()
    cfg["num_hidden_layers"] = 2
    cfg.pop("layer_types", None)  # recomputed from num_hidden_layers
    args = ModelArgs.from_hf_config(cfg)
    torch.manual_seed(0)
    model = Decoder(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.ndim >= 2 else p.add_(0.1 * torch.randn_like(p))
    model.eval()
    # Right-padded rows of different lengths, so the padding mask and last[b] both matter.
    seqs = [[1, 5, 9, 11, 17, 23, 40, 41, 42, 7, 8, 3], [1, 30, 31, 32, 33, 4, 6]]
    batch = collate(seqs)
    plan = ReRouting(frozenset({1}), 1.0, "rotated", batch.last)
    return model, batch, plan


def run(m, batch, plan):
    with torch.inference_mode():
        return m(batch.input_ids, batch.attention_mask, intervention=plan).hidden


def test_decoder_has_no_graph_breaks(setup):
    model, batch, plan = setup
    torch._dynamo.reset()
    for intervention in (None, plan):
        with torch.inference_mode():
            explained = torch._dynamo.explain(model)(batch.input_ids, batch.attention_mask, intervention=intervention)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_compiled_equals_eager_with_and_without_rerouting(setup):
    model, batch, plan = setup
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    real = batch.attention_mask.bool()
    # Fused and reordered sums over C, I, Hq*D and T keys, in each of the two layers.
    tol = decoder_drift(model.args, batch.input_ids.shape[1])
    for intervention in (None, plan):
        eager = run(model, batch, intervention)
        out = run(compiled, batch, intervention)
        # Padded positions are never pooled and may legitimately differ in how -inf rows are handled.
        assert_close(out[real], eager[real], tol, f"compiled vs eager (intervention={type(intervention).__name__})")
    # The check can fail: re-routing changes the output by far more than the bound, so comparing the compiled
    # re-routed forward with the eager plain one must not pass.
    assert_differ(run(compiled, batch, plan)[real], run(model, batch, None)[real], tol, "re-routing vs plain")

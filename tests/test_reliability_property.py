"""Property tests (hypothesis): random Unicode texts (surrogates, controls and astral characters included) and
random batch splits never crash, always give one finite unit row per text in input order, and a text's vector
does not depend on the batch, the batch size or the split it came in.

Tolerance (tests/tolerance.py): batch company only changes padding, which never reaches a real row; what
remains is the order of float additions in matmuls of different shapes, at most `decoder_drift` apart.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvembed.encoder import KVEmbedder, SurrogateWarning, TruncationWarning
from tests import tiny
from tests.tolerance import assert_close, decoder_drift, drift

DIM = tiny.BASE["hidden_size"]

# All of Unicode, surrogates (category Cs) included: Python strings can carry them.
ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
TEXTS = st.lists(st.text(ANY_CHAR, max_size=60), min_size=1, max_size=12)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    folder, _ = tiny.write_checkpoint(tmp_path_factory.mktemp("rel_prop") / "qwen2", "qwen2")
    # A short context, so that some random texts are also cut.
    return KVEmbedder.from_pretrained(folder, layers=[1, 2], max_length=48)


def same(emb) -> float:
    """Sums over C, I, Hq*D and the T keys (at most max_length, plus the prefix slot) in another order, per layer."""
    return decoder_drift(emb.args, emb.max_seq_length + 1)


def quiet(emb, texts, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        warnings.simplefilter("ignore", SurrogateWarning)
        return emb.encode(texts, **kw)


@SETTINGS
@given(texts=TEXTS, batch_size=st.integers(1, 5))
def test_random_unicode_never_crashes_and_keeps_count_and_order(emb, texts, batch_size):
    out = quiet(emb, texts, batch_size=batch_size)
    assert out.shape == (len(texts), DIM) and out.dtype == np.float32
    assert np.isfinite(out).all()
    # L2-normalised fp32 rows: the normalisation's sum over C, then norm()'s own.
    assert_close(np.linalg.norm(out, axis=1), np.ones(len(texts)), drift(np.float32, terms=DIM, depth=2), "row norms")
    # Order: reversing the input reverses the output.
    assert_close(quiet(emb, texts[::-1], batch_size=batch_size), out[::-1], same(emb), "reversed input")


@SETTINGS
@given(texts=TEXTS, data=st.data())
def test_batch_invariance_under_random_splits(emb, texts, data):
    whole = quiet(emb, texts, batch_size=len(texts))
    # A random partition into consecutive calls, each with its own random batch size.
    cuts = sorted(data.draw(st.sets(st.integers(1, len(texts) - 1), max_size=4)) if len(texts) > 1 else [])
    parts = [texts[a:b] for a, b in zip([0, *cuts], [*cuts, len(texts)])]
    pieces = [quiet(emb, p, batch_size=data.draw(st.integers(1, 4))) for p in parts]
    assert_close(np.concatenate(pieces), whole, same(emb), "random split vs one batch")

"""Numerics and concurrency: a non-finite embedding is an error naming the text's index, fp32 is deterministic
run to run, bf16 stays close to fp32 on real sentences, and two threads sharing one embedder get the results
of sequential calls.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from kvembed.encoder import KVEmbedder
from tests import tiny

DIM = tiny.BASE["hidden_size"]
TEXTS = [f"sentence {i}: " + "abc " * (i % 5) for i in range(12)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f, _ = tiny.write_checkpoint(tmp_path_factory.mktemp("rel_num") / "llama", "llama")
    return f


@pytest.fixture(scope="module")
def emb(folder):
    return KVEmbedder.from_pretrained(folder, layers=[1, 2])


# ------------------------------------------------------------------------------------------- non-finite


def poisoned(folder, char: str) -> KVEmbedder:
    """A fresh embedder whose embedding row for `char`'s token is +inf (a damaged weight): any text holding
    that token goes NaN in the first RMSNorm (inf * rsqrt(inf) = inf * 0), other texts stay finite.

    A huge finite value (1e38) would not do: RMSNorm is scale-invariant, its fp32 variance overflows to inf,
    rsqrt gives 0, and the row quietly becomes zeros.
    """
    e = KVEmbedder.from_pretrained(folder, layers=[1, 2])
    ids = e.tokenizer.encode(char, add_special_tokens=False).ids
    assert len(ids) == 1, f"{char!r} must be a single token of the tiny tokenizer"
    with torch.no_grad():
        e.model.embed_tokens.weight[ids[0]] = float("inf")
    return e


def test_non_finite_output_names_the_input_indices(folder):
    e = poisoned(folder, "~")
    texts = [t if i not in (3, 10) else t + " ~" for i, t in enumerate(TEXTS)]
    # batch_size 4 with length sorting: the two bad texts land in different batches; the first raises.
    with pytest.raises(FloatingPointError, match=r"non-finite embedding .* index\(es\) \[(3|10)\]"):
        e.encode(texts, batch_size=4)
    # Both named when they share one batch.
    with pytest.raises(FloatingPointError, match=r"\[3, 10\]"):
        e.encode(texts, batch_size=len(texts))
    # The poisoned token is the only cause: the clean texts embed to finite vectors.
    clean = [t for i, t in enumerate(texts) if i not in (3, 10)]
    assert np.isfinite(e.encode(clean)).all()


def test_non_finite_index_is_global_across_chunks(folder):
    e = poisoned(folder, "~")
    texts = (("bad ~" if i == 77 else f"ok {i}") for i in range(100))  # batch_size 2 -> chunks of 64
    with pytest.raises(FloatingPointError, match=r"index\(es\) \[77\]"):
        e.encode(texts, batch_size=2)


def test_nan_weights_are_an_error_not_a_vector(folder):
    e = KVEmbedder.from_pretrained(folder, layers=[1, 2])
    with torch.no_grad():
        e.model.norm.weight[5] = float("nan")  # every output row goes NaN
    with pytest.raises(FloatingPointError, match=r"\[0, 1\]"):
        e.encode(["a", "b"])


# ------------------------------------------------------------------------------------------- determinism


def test_fp32_is_deterministic_run_to_run(folder, emb):
    first = emb.encode(TEXTS, batch_size=5)
    again = emb.encode(TEXTS, batch_size=5)
    fresh = KVEmbedder.from_pretrained(folder, layers=[1, 2]).encode(TEXTS, batch_size=5)
    np.testing.assert_array_equal(first, again)  # bitwise: same kernels, same order of additions
    np.testing.assert_array_equal(first, fresh)


# ------------------------------------------------------------------------------------------- threads


def test_two_threads_get_the_sequential_results(emb):
    a = [f"thread A text {i} " + "x" * i for i in range(40)]
    b = [f"B {i} " + "yz " * (i % 9) for i in range(40)]
    want_a, want_b = emb.encode(a, batch_size=3), emb.encode(b, batch_size=3)
    got: dict[str, list] = {"a": [], "b": []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(name, texts):
        try:
            barrier.wait()
            for _ in range(3):
                got[name].append(emb.encode(texts, batch_size=3))
        except BaseException as e:  # surfaced below: an exception in a thread would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=worker, args=("a", a)), threading.Thread(target=worker, args=("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(got["a"]) == len(got["b"]) == 3
    for out in got["a"]:
        np.testing.assert_array_equal(out, want_a)
    for out in got["b"]:
        np.testing.assert_array_equal(out, want_b)


def test_encode_calls_are_serialised(emb, monkeypatch):
    """The embedder documents concurrent calls as safe because it serialises them: check that two calls
    never run the model at the same time (an assertion that fails if the lock is removed)."""
    inside, overlap = 0, []
    guard = threading.Lock()
    forward = type(emb.model).forward

    def counting_forward(self, *a, **kw):
        nonlocal inside
        with guard:
            inside += 1
            overlap.append(inside)
        try:
            threading.Event().wait(0.002)  # widen the window in which an overlap could happen
            return forward(self, *a, **kw)
        finally:
            with guard:
                inside -= 1

    monkeypatch.setattr(type(emb.model), "forward", counting_forward)
    threads = [threading.Thread(target=emb.encode, args=([f"t{j} {i}" for i in range(20)],), kwargs={"batch_size": 2})
               for j in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(overlap) == 30 and max(overlap) == 1


# ------------------------------------------------------------------------------------------- bf16 (real model)


def stsb_sentences(n: int = 20) -> list[str]:
    root = Path(os.environ.get("KVEMBED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    rows = (root / "stsb" / "validation.jsonl").read_text(encoding="utf-8").splitlines()[: n // 2]
    return [s for r in rows for s in (json.loads(r)["sentence1"], json.loads(r)["sentence2"])]


@pytest.mark.slow
def test_bf16_close_to_fp32_on_real_sentences():
    texts = stsb_sentences(20)
    assert len(texts) == 20
    # Explicit layers: the same re-routing in both dtypes (auto selection is tested elsewhere); 12-14 are
    # mid-depth layers of SmolLM2's 30.
    layers = [12, 13, 14]
    fp32 = KVEmbedder.from_pretrained(layers=layers).encode(texts)
    bf16 = KVEmbedder.from_pretrained(layers=layers, dtype="bfloat16").encode(texts)
    cos = (fp32 * bf16).sum(-1)  # both L2-normalised
    assert cos.min() >= 0.99, f"min cosine {cos.min():.4f} (mean {cos.mean():.4f})"
    # Cosine near 1 is not enough if bf16 collapsed every text onto one direction: the similarity structure
    # must survive too.
    sim32, sim16 = fp32 @ fp32.T, bf16 @ bf16.T
    assert np.abs(sim32 - sim16).max() < 0.05
    print(f"bf16 vs fp32 cosine: min {cos.min():.5f} mean {cos.mean():.5f}")

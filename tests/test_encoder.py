"""The user API (sentence-transformers contract), the embed CLI and golden vectors, on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvembed import KVEmbedder
from kvembed.cli import main
from kvembed.golden import GOLDEN_TEXTS, check_golden, write_golden
from kvembed.method import kv_embed, tokenize_batch
from tests import tiny
from tests.tolerance import MARGIN, assert_close, assert_differ, decoder_drift, drift

TEXTS = ["a cat sat on the mat", "dogs bark", "the quick brown fox jumps over the lazy dog", "x", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.write_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")[0]


@pytest.fixture(scope="module")
def emb(folder):
    return KVEmbedder.from_pretrained(folder, layers=[1, 2])


def batch_drift(emb, texts) -> float:
    """Another batch composition or route to the same vectors: sums over C, I, Hq*D and the T keys plus the
    prefix slot reordered, through every layer."""
    T = tokenize_batch(emb.tokenizer, texts, emb.method.template, None).input_ids.shape[1]
    return decoder_drift(emb.args, T + 1)


def unit_drift(emb) -> float:
    """|e|^2 of an L2-normalised fp32 row: the norm's sum over C, then the check's own sum over C."""
    return drift(torch.float32, terms=emb.get_embedding_dimension(), depth=2)


def test_encode_shapes_and_types(emb):
    a = emb.encode(TEXTS)
    assert isinstance(a, np.ndarray) and a.shape == (5, emb.get_embedding_dimension()) and a.dtype == np.float32
    assert_close((a ** 2).sum(1), np.ones(len(TEXTS)), unit_drift(emb), "squared norms")
    one = emb.encode("dogs bark")
    assert one.shape == (emb.get_embedding_dimension(),)
    assert_close(one, a[1], batch_drift(emb, TEXTS), "alone vs in the batch")
    t = emb.encode(TEXTS, convert_to_tensor=True)
    # The same call again, only returned as a tensor: bit-for-bit (encode is deterministic run to run).
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(a))
    assert emb.encode([]).shape == (0, emb.get_embedding_dimension())


def test_encode_equals_the_method_on_one_batch(emb):
    """The batcher (sorting, chunking, order restoring) adds nothing to the method's own output."""
    batch = tokenize_batch(emb.tokenizer, TEXTS, emb.method.template, None)
    with torch.no_grad():
        want = kv_embed(emb.model, batch, emb.method.layers)
    got = emb.encode(TEXTS, batch_size=2)
    assert_close(got, want, batch_drift(emb, TEXTS), "encode in batches of 2 vs one kv_embed batch")


def test_query_and_document_prompts(emb):
    q, d = emb.encode_query("dogs bark"), emb.encode_document("dogs bark")
    tol = batch_drift(emb, ["dogs bark"])
    assert_differ(q, d, tol, "query vs document template")
    assert np.array_equal(d, emb.encode("dogs bark"))  # document is the default: the very same computation
    custom = emb.encode("dogs bark", prompt="Summarise: {text} in one word:")
    assert_differ(custom, d, tol, "custom prompt vs document template")


def test_similarity(emb):
    a = emb.encode(TEXTS[:3])
    s = emb.similarity(a, a)
    assert s.shape == (3, 3)
    assert_close(np.diag(s), np.ones(3), unit_drift(emb), "self-similarity")
    ts = emb.similarity(torch.from_numpy(a), torch.from_numpy(a))
    assert isinstance(ts, torch.Tensor)


def test_options_that_cannot_apply_raise(emb):
    with pytest.raises(TypeError, match="unsupported"):
        emb.encode(TEXTS, colour="blue")
    with pytest.raises(ValueError, match="output_value"):
        emb.encode(TEXTS, output_value="token_embeddings")  # one pooled vector per text: no token states here
    with pytest.raises(ValueError, match="pool"):
        emb.encode(TEXTS, pool=object())
    with pytest.raises(ValueError, match="prompt_name"):
        emb.encode(TEXTS, prompt_name="passage")
    for device in ("meta", "bogus", "cuda:7"):
        with pytest.raises(ValueError, match="device"):
            emb.encode(TEXTS, device=device)


def test_switches_reach_the_method_and_the_fingerprint(folder, emb):
    other = KVEmbedder.from_pretrained(folder, layers=[1, 2], bias=2.0, rope_mode="position0", pooling="mean",
                                       normalize=False)
    assert other.method.config()["bias"] == 2.0 and other.method.rope_mode == "position0"
    assert other.fingerprint != emb.fingerprint
    v = other.encode(TEXTS)
    assert_differ((v ** 2).sum(1), np.ones(len(TEXTS)), unit_drift(emb), "normalize=False kept")
    none = KVEmbedder.from_pretrained(folder, layers="none")
    assert none.method.layers == ()
    with pytest.raises(ValueError, match="out of range"):
        KVEmbedder.from_pretrained(folder, layers=[99])
    with pytest.raises(ValueError, match="id_corpus"):
        KVEmbedder.from_pretrained(folder)  # auto layers on a model with no shipped selection and no corpus


def test_auto_layers_from_an_id_corpus(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("KVEMBED_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"sentence number {i} about {w}"}) + "\n"
                              for i, w in enumerate(["cats", "dogs", "trains", "rain", "music"] * 8)))
    e = KVEmbedder.from_pretrained(folder, id_corpus=str(corpus))
    L = e.args.num_hidden_layers
    assert len(e.method.layers) >= 1 and all(0 <= l < L for l in e.method.layers)
    # SPEC §1.4: the window starts after floor(0.2 L) and is contiguous.
    assert min(e.method.layers) >= int(0.2 * L)
    assert list(e.method.layers) == list(range(min(e.method.layers), max(e.method.layers) + 1))


def test_golden_round_trip(emb, tmp_path):
    write_golden(emb, tmp_path)
    desc = json.loads((tmp_path / "golden.json").read_text())
    for name in ("input_ids", "layer1.prefix_k", "layer2.prefix_v", "layer1.attn_out", "hidden", "embedding"):
        assert name in desc["tensors"]
    assert desc["tensors"]["layer1.prefix_k"]["shape"][2] == 1  # one slot per KV head
    errs = check_golden(emb, tmp_path)
    # Written and checked by the same embedder in one process: same kernels, same inputs, so bit-for-bit.
    assert max(errs.values()) == 0.0, {k: e for k, e in errs.items() if e}
    # A port that differs (here: another bias) stands far above what rounding lets an honest port drift.
    bent = KVEmbedder.from_pretrained(emb.loaded.path, layers=[1, 2], bias=0.5)
    assert check_golden(bent, tmp_path)["embedding"] > MARGIN * batch_drift(emb, list(GOLDEN_TEXTS))


@pytest.mark.parametrize("damage", ["json_cut", "texts_not_a_list", "safetensors_garbage"])
def test_a_damaged_golden_folder_is_named_not_a_traceback(emb, tmp_path, damage):
    write_golden(emb, tmp_path)
    if damage == "json_cut":
        (tmp_path / "golden.json").write_text('{"texts": ["a"')
    elif damage == "texts_not_a_list":
        (tmp_path / "golden.json").write_text('{"texts": 5}')
    else:
        (tmp_path / "golden.safetensors").write_bytes(b"garbage" * 10)
    name = "golden.safetensors" if damage == "safetensors_garbage" else "golden.json"
    with pytest.raises(ValueError, match=rf"{name}: .*restore it from the golden folder"):
        check_golden(emb, tmp_path)


def test_cli_embed_files_keep_order(folder, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out.npy"
    rc = main(["embed", "--model", str(folder), "--layers", "1,2", "--input", str(src), "--output", str(out)])
    assert rc == 0
    got = np.load(out)
    want = KVEmbedder.from_pretrained(folder, layers=[1, 2]).encode(TEXTS)
    assert np.array_equal(got, want)  # the CLI calls encode with the same batches: bit-for-bit
    rc = main(["embed", "--model", str(folder), "--layers", "1,2", "dogs bark", "cats meow"])
    assert rc == 0 and "cosine similarity:" in capsys.readouterr().out


def test_cli_errors_have_exit_codes(folder, tmp_path, capsys):
    assert main(["embed", "--model", str(folder), "--layers", "1", "--input", str(tmp_path / "missing.txt")]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n{"text": "fine"}\n')
    assert main(["embed", "--model", str(folder), "--layers", "1", "--input", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    out = tmp_path / "o.npy"
    assert main(["embed", "--model", str(folder), "--layers", "1", "--input", str(bad), "--skip-bad-lines",
                 "--output", str(out)]) == 0
    assert np.load(out).shape[0] == 2 and "skipped 1" in capsys.readouterr().err
    assert main(["embed", "--model", str(folder), "--layers", "1", "x", "--output", str(tmp_path / "no" / "o.npy")]) == 2
    assert main(["embed", "--model", str(tmp_path / "nomodel"), "x"]) == 3


def test_a_low_precision_that_runs_slower_here_is_said(folder, monkeypatch):
    """bf16/fp16 on a CPU without native support ran ~10x slower than fp32: measured at load, and said."""
    import warnings

    from kvembed import encoder
    from kvembed.encoder import PrecisionWarning

    monkeypatch.setattr(encoder, "low_precision_slowdown", lambda dtype, device: 9.8)
    with pytest.warns(PrecisionWarning, match="9.8x slower than float32"):
        KVEmbedder.from_pretrained(folder, layers=[1, 2], dtype="bfloat16")
    monkeypatch.setattr(encoder, "low_precision_slowdown", lambda dtype, device: 0.2)  # AMX: faster than fp32
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        KVEmbedder.from_pretrained(folder, layers=[1, 2], dtype="bfloat16")


def test_the_slowdown_is_measured_not_guessed():
    import torch

    from kvembed.encoder import low_precision_slowdown

    assert low_precision_slowdown(torch.float32, "cpu") is None
    r = low_precision_slowdown(torch.bfloat16, "cpu")
    assert r is not None and r > 0  # a ratio of two timings on this machine, whatever it is

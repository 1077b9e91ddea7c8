"""The user API (sentence-transformers contract), the embed CLI and golden vectors, on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvembed import KVEmbedder
from kvembed.cli import main
from kvembed.golden import check_golden, write_golden
from kvembed.method import kv_embed, tokenize_batch
from tests import tiny

TEXTS = ["a cat sat on the mat", "dogs bark", "the quick brown fox jumps over the lazy dog", "x", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.write_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")[0]


@pytest.fixture(scope="module")
def emb(folder):
    return KVEmbedder.from_pretrained(folder, layers=[1, 2])


def test_encode_shapes_and_types(emb):
    a = emb.encode(TEXTS)
    assert isinstance(a, np.ndarray) and a.shape == (5, emb.get_embedding_dimension()) and a.dtype == np.float32
    assert np.allclose((a ** 2).sum(1), 1.0, atol=1e-5)
    one = emb.encode("dogs bark")
    assert one.shape == (emb.get_embedding_dimension(),) and np.allclose(one, a[1], atol=1e-5)
    t = emb.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.from_numpy(a), atol=1e-6)
    assert emb.encode([]).shape == (0, emb.get_embedding_dimension())


def test_encode_equals_the_method_on_one_batch(emb):
    """The batcher (sorting, chunking, order restoring) adds nothing to the method's own output."""
    batch = tokenize_batch(emb.tokenizer, TEXTS, emb.method.template, None)
    with torch.no_grad():
        want = kv_embed(emb.model, batch, emb.method.layers)
    got = emb.encode(TEXTS, batch_size=2)
    assert np.abs(got - want.numpy()).max() < 1e-5


def test_query_and_document_prompts(emb):
    q, d = emb.encode_query("dogs bark"), emb.encode_document("dogs bark")
    assert np.abs(q - d).max() > 1e-3  # different templates
    assert np.allclose(d, emb.encode("dogs bark"), atol=1e-6)  # document is the default
    custom = emb.encode("dogs bark", prompt="Summarise: {text} in one word:")
    assert np.abs(custom - d).max() > 1e-3


def test_similarity(emb):
    a = emb.encode(TEXTS[:3])
    s = emb.similarity(a, a)
    assert s.shape == (3, 3) and np.allclose(np.diag(s), 1.0, atol=1e-5)
    ts = emb.similarity(torch.from_numpy(a), torch.from_numpy(a))
    assert isinstance(ts, torch.Tensor)


def test_unsupported_options_raise(emb):
    with pytest.raises(TypeError, match="unsupported"):
        emb.encode(TEXTS, precision="int8")
    with pytest.raises(ValueError, match="normalize"):
        emb.encode(TEXTS, normalize_embeddings=False)
    with pytest.raises(ValueError, match="prompt_name"):
        emb.encode(TEXTS, prompt_name="passage")
    with pytest.raises(ValueError, match="device"):
        emb.encode(TEXTS, device="meta")


def test_switches_reach_the_method_and_the_fingerprint(folder, emb):
    other = KVEmbedder.from_pretrained(folder, layers=[1, 2], bias=2.0, rope_mode="position0", pooling="mean",
                                       normalize=False)
    assert other.method.config()["bias"] == 2.0 and other.method.rope_mode == "position0"
    assert other.fingerprint != emb.fingerprint
    v = other.encode(TEXTS)
    assert not np.allclose((v ** 2).sum(1), 1.0, atol=1e-3)  # normalize=False kept
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
    assert max(errs.values()) < 1e-6
    # A port that differs (here: another bias) is caught.
    bent = KVEmbedder.from_pretrained(emb.loaded.path, layers=[1, 2], bias=0.5)
    assert check_golden(bent, tmp_path)["embedding"] > 1e-4


def test_cli_embed_files_keep_order(folder, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out.npy"
    rc = main(["embed", "--model", str(folder), "--layers", "1,2", "--input", str(src), "--output", str(out)])
    assert rc == 0
    got = np.load(out)
    want = KVEmbedder.from_pretrained(folder, layers=[1, 2]).encode(TEXTS)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-6
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

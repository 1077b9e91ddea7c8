"""Layer selection by intrinsic dimensionality (SPEC §1.4): TwoNN on data of known ID, the window rule,
final-token states under right padding, the disk cache, corpora, the printed curve.

TwoNN tolerances come from 30 seeds of each synthetic set at N = 1000 (mean, sd, max |error| measured):
  5-D Gaussian in 100-D       5.05, 0.25, 0.79   -> |est - 5| <= 1.0
  2-sphere in 3-D / in 50-D   2.00, 0.09, 0.18   -> |est - 2| <= 0.4
  swiss roll (2-D) in 50-D    1.98, 0.07, 0.18   -> |est - 2| <= 0.4
  10-D uniform cube           8.51, 0.32, 0.71 from 8.5 -> |est - 8.5| <= 1.2
Each bound is about 4 sd, above the worst of the 30 seeds. The cube is *expected* below 10: TwoNN
assumes the density is constant out to the second neighbour, and at d = 10 with N = 1000 most points
lie near a face (the neighbourhood is a large fraction of the cube), which shrinks mu and the slope
(Facco et al. 2017 show the same underestimate for hypercubes without periodic boundaries). The cube
test pins that known behaviour and still separates it from a 5-D cube (4.64 measured).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from kvembed import layer_select as ls
from kvembed import selections
from kvembed.cli import main
from kvembed.config import ModelArgs
from kvembed.method import RAW_TEMPLATE, fill
from kvembed.model import Decoder
from tests import tiny
from tests.tolerance import assert_close, assert_differ, decoder_drift, drift

# ----------------------------------------------------------------------------------------- synthetic


def embed(points: np.ndarray, dim: int, rng) -> np.ndarray:
    """Points (N, d) placed in a random d-dimensional linear subspace of R^dim (distances preserved)."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, points.shape[1])))  # (dim, d) orthonormal columns
    return points @ q.T


def sphere(n: int, rng) -> np.ndarray:
    p = rng.standard_normal((n, 3))
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def reference_twonn(x: np.ndarray) -> float:
    """SPEC §1.4 written the slow obvious way: full distance matrix, no chunks, no candidates."""
    x = x - x.mean(0)
    d = cdist(x, x)
    np.fill_diagonal(d, np.inf)
    d.sort(axis=1)
    r1, r2 = d[:, 0], d[:, 1]
    mu = np.sort(r2[r1 > 0] / r1[r1 > 0])
    n = len(mu)
    k = int(np.floor(0.9 * n))
    xs, ys = np.log(mu[:k]), -np.log(1 - np.arange(1, k + 1) / n)
    return float(xs @ ys / (xs @ xs))


def test_twonn_gaussian_5d_in_100d():
    rng = np.random.default_rng(1)
    x = embed(rng.standard_normal((1000, 5)), 100, rng)
    assert abs(ls.twonn(x) - 5.0) <= 1.0


def test_twonn_sphere_in_3d_and_in_50d():
    rng = np.random.default_rng(2)
    p = sphere(1000, rng)
    est3 = ls.twonn(p)
    est50 = ls.twonn(embed(p, 50, rng))
    assert abs(est3 - 2.0) <= 0.4
    # An isometric embedding changes the float64 distances only by rounding: the embedding and centring, the
    # distances' sums over 50 coordinates, then the fit's sums over ~N log-ratios.
    assert_close(est50, est3, drift(np.float64, terms=len(p), depth=3), "TwoNN in 50-D vs 3-D")


def test_twonn_swiss_roll_in_50d():
    rng = np.random.default_rng(3)
    t = 1.5 * np.pi * (1 + 2 * rng.random(1000))
    roll = np.stack([t * np.cos(t), 21 * rng.random(1000), t * np.sin(t)], 1)  # (N, 3), a 2-D manifold
    assert abs(ls.twonn(embed(roll, 50, rng)) - 2.0) <= 0.4


def test_twonn_uniform_cube_10d_and_5d():
    rng = np.random.default_rng(4)
    est10 = ls.twonn(rng.random((1000, 10)))
    est5 = ls.twonn(rng.random((1000, 5)))
    assert abs(est10 - 8.5) <= 1.2  # the boundary underestimate, see the module docstring
    assert abs(est5 - 4.64) <= 0.8
    assert est10 > est5 + 2.0


def test_twonn_equals_the_obvious_implementation():
    # Chunked Gram ranking + exact re-measure must give the full-matrix answer, across chunk borders.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((301, 40)) * rng.random(40)  # anisotropic, so neighbours are not all alike
    # float64, two orderings: distances summed over 40 coordinates, then the fit's sums over ~N log-ratios.
    assert_close(ls.twonn(x), reference_twonn(x), drift(np.float64, terms=len(x), depth=2), "TwoNN vs full matrix")
    r1, r2 = ls.nearest_two(x, chunk=7)
    d = cdist(x, x)
    np.fill_diagonal(d, np.inf)
    d.sort(axis=1)
    # Both difference the coordinates, then sum 40 squares in another order.
    assert_close(r1, d[:, 0], drift(np.float64, terms=x.shape[1]), "r1 vs cdist")
    assert_close(r2, d[:, 1], drift(np.float64, terms=x.shape[1]), "r2 vs cdist")


def test_nearest_two_is_exact_where_the_gram_trick_cancels():
    # Two clusters 2e4 apart; inside one, a pair 1e-6 apart. |x|^2 ~ 1e8 after centring, so the Gram form's
    # rounding (~1e-16 * 1e8 = 1e-8 in d^2, i.e. ~1e-4 in d) would swamp r1 = 1e-6. Differencing keeps 1e-5.
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 30))
    x[:20] += 1e4
    x[20:] -= 1e4
    x[1] = x[0] + 1e-6 / np.sqrt(30)  # |x1 - x0| = 1e-6 exactly up to rounding
    xc = x - x.mean(0)
    r1, _ = ls.nearest_two(xc)
    # Differencing is exact, but x1 and the centred rows were each rounded at |x| ~ 1e4: those roundings, summed
    # over 30 coordinates, are large next to r1 by |x| / r1 (bound ~4e-5; the Gram form is off by ~100 r1).
    tol = drift(np.float64, terms=x.shape[1], gain=np.abs(xc).max() / 1e-6)
    assert_close(r1[:2], [1e-6, 1e-6], tol, "r1 of the close pair")


def test_twonn_fits_on_the_unique_points():
    """Duplicates change nothing: a duplicate has no mu (r1 = 0), and it must not be another point's neighbour
    either (that point would get r1 = r2, mu = 1, and pull the slope up: 3.08 -> 3.70 on 3-D data before)."""
    rng = np.random.default_rng(7)
    x = embed(rng.standard_normal((500, 3)), 20, rng)
    dup = np.concatenate([x, x[:100]])
    # The same unique points, centred by a mean summed in another order: distances over C, the fit over ~N.
    tol = drift(np.float64, terms=len(dup), depth=2)
    assert_close(ls.twonn(dup), ls.twonn(x), tol, "TwoNN with 100 duplicates vs without")
    assert abs(ls.twonn(x) - 3.0) <= 0.4
    # The old way (duplicates kept as neighbours of others) is measurably biased on the same data.
    assert reference_twonn(dup) > ls.twonn(x) + 0.3


def test_twonn_equals_scikit_dimension_on_unique_points():
    """An independent implementation (scikit-dimension's TwoNN, same convention: F_i = i/N, slope through the
    origin on the smallest 90% of mu). It keeps duplicates as neighbours, so it is compared on unique points."""
    skdim = pytest.importorskip("skdim", reason="scikit-dimension is a test dependency (pip install -e .[test])")
    import warnings

    rng = np.random.default_rng(11)
    for d, n, c in ((3, 500, 20), (5, 800, 40), (2, 300, 3)):
        x = embed(rng.standard_normal((n, d)), c, rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = skdim.id.TwoNN().fit(x).dimension_
        # float64 distances (theirs from a full distance matrix, ours by differencing) and the same fit over ~N.
        assert_close(ls.twonn(x), theirs, drift(np.float64, terms=n, depth=2), f"TwoNN vs skdim, {d}-D in {c}-D")


@pytest.mark.parametrize(
    "points",
    [np.zeros((2, 4)), np.array([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 3), np.ones((1, 3))],
    ids=["two_points", "two_distinct_of_eight", "one_point"],
)
def test_twonn_needs_three_distinct_points(points):
    with pytest.raises(ValueError, match="at least 3 distinct points"):
        ls.twonn(points)


def test_twonn_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        ls.twonn(np.zeros(10))
    x = np.random.default_rng(0).standard_normal((10, 3))
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ls.twonn(x)


def test_id_curve_one_value_per_layer():
    rng = np.random.default_rng(8)
    states = np.stack([embed(rng.standard_normal((300, d)), 20, rng) for d in (2, 6, 4)], axis=1)  # (N, L, C)
    curve = ls.id_curve(states)
    assert curve == [ls.twonn(states[:, l]) for l in range(3)]
    assert curve[0] < curve[2] < curve[1]
    assert ls.id_curve(states[:, :2]) == curve[:2]


# ----------------------------------------------------------------------------------------- the window


def curve(L: int, m: int, low: float = 1.0) -> list[float]:
    ids = [10.0 + 0.1 * l for l in range(L)]
    ids[m] = low
    return ids


def test_window_l30():
    assert ls.window_rule(curve(30, 12), 30) == (6, 12, [12, 13, 14, 15])  # skip 6, width floor(30/10) = 3


def test_window_l4_skips_nothing_width_one():
    assert ls.window_rule(curve(4, 0), 4) == (0, 0, [0, 1])
    assert ls.window_rule(curve(4, 2), 4)[2] == [2, 3]


def test_window_clipped_at_the_last_layer():
    assert ls.window_rule(curve(30, 29), 30)[2] == [29]
    assert ls.window_rule(curve(30, 28), 30)[2] == [28, 29]
    assert ls.window_rule(curve(4, 3), 4)[2] == [3]


def test_window_ignores_a_minimum_in_the_skipped_layers():
    ids = curve(30, 20, low=3.0)
    ids[5] = 0.5  # layer 5 < floor(0.2 * 30) = 6: not a candidate
    assert ls.window_rule(ids, 30)[2] == [20, 21, 22, 23]
    ids[6] = 0.5  # layer 6 is the first candidate
    assert ls.window_rule(ids, 30)[2] == [6, 7, 8, 9]


def test_window_ties_take_the_earliest():
    ids = [5.0] * 10  # L = 10: skip 2, width 1
    assert ls.window_rule(ids, 10)[2] == [2, 3]
    ids[7] = ids[4] = 1.0
    assert ls.window_rule(ids, 10)[2] == [4, 5]


def test_window_rejects_bad_curves():
    with pytest.raises(ValueError, match="3 ids for n_layers=4"):
        ls.window_rule([1.0, 2.0, 3.0], 4)
    with pytest.raises(ValueError, match=r"layer\(s\) \[2\]"):
        ls.window_rule([1.0, 2.0, float("nan"), 3.0], 4)


# ------------------------------------------------------------------------------------- model states


@pytest.fixture(scope="module")
def tiny_model():
    hf = tiny.hf_model("llama")
    model = Decoder(ModelArgs.from_hf_config(hf.config.to_dict()))
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False), tiny.make_tokenizer()


TEXTS = [
    "The quick brown fox jumps over the lazy dog and keeps running far away.",
    "a cat",
    "Numbers 0123456789 and symbols",
    "where is the station?",
    "x",
    "def f(x): return x * 2",
]


def test_final_token_states_pick_the_last_real_token(tiny_model):
    model, tok = tiny_model
    batched = ls.collect_final_token_states(model, tok, TEXTS, batch_size=len(TEXTS), max_length=128)
    single = ls.collect_final_token_states(model, tok, TEXTS, batch_size=1, max_length=128)
    L, C = model.args.num_hidden_layers, model.args.hidden_size
    assert batched.shape == (len(TEXTS), L, C) and batched.dtype == np.float32
    lengths = {len(tok.encode(fill(ls.DOCUMENT_TEMPLATE, t)).ids) for t in TEXTS}
    assert len(lengths) > 2  # the batch really was padded
    # Same math on other padded shapes: sums over C, I, Hq*D and T keys reordered, through all L layers.
    tol = decoder_drift(model.args, max(lengths))
    assert_close(batched, single, tol, "batched vs one at a time")
    # Input order, and the state of the prompt's final token computed without any padding at all.
    for i in (0, 4):
        ids = torch.tensor([tok.encode(fill(ls.DOCUMENT_TEMPLATE, TEXTS[i])).ids])
        out = model(ids, torch.ones_like(ids), output_hidden_states=True)
        want = torch.stack([h[0, -1] for h in out.layer_outputs]).numpy()  # (L, C)
        assert_close(batched[i], want, tol, f"text {i} batched vs unpadded")
    assert_differ(batched[0], batched[4], tol, "two different texts")


class CountingModel(torch.nn.Module):
    """The model, counting forward calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def sel_cached(model, tok, texts, **kw):
    return selections.cached_selection(model, tok, texts, **kw)


CORPUS = [f"sentence number {i} talks about {w}" for i, w in enumerate(("cats dogs rain code maps tea " * 6).split())]


def test_select_layers_cache(tiny_model, tmp_path):
    model, tok = tiny_model
    counted = CountingModel(model)
    kw = dict(n=20, seed=0, fingerprint="tiny-llama", cache_dir=tmp_path, batch_size=8)
    first = sel_cached(counted, tok, CORPUS, **kw)
    assert counted.calls == 3  # 20 texts in batches of 8
    assert first.n_texts == 20 and len(first.ids) == 4 and first.layers == ls.window_rule(first.ids, 4)[2]
    assert len(list(tmp_path.glob("*.json"))) == 1

    again = sel_cached(counted, tok, CORPUS, **kw)
    assert counted.calls == 3  # served from disk
    assert again == first

    sel_cached(counted, tok, CORPUS, **{**kw, "n": 21})  # different N: different key, runs
    assert counted.calls == 6
    sel_cached(counted, tok, CORPUS[:-1], **kw)  # different corpus: different key, runs
    assert counted.calls == 9
    sel_cached(counted, tok, CORPUS, **{**kw, "seed": 1})
    assert counted.calls == 12
    assert len(list(tmp_path.glob("*.json"))) == 4


def test_select_layers_is_pure_and_repeats(tiny_model, tmp_path):
    model, tok = tiny_model
    counted = CountingModel(model)
    a = ls.select_layers(counted, tok, CORPUS[:10], n=10)
    b = ls.select_layers(counted, tok, CORPUS[:10], n=10)
    assert counted.calls == 2 and a == b and a.fingerprint is None


def test_cache_key_covers_every_input():
    base = ("fp", "sha", 1000, 0, ls.DOCUMENT_TEMPLATE, 512)
    keys = {selections.cache_key(*base)}
    for i, other in enumerate(("fp2", "sha2", 999, 1, "{text}", 256)):
        keys.add(selections.cache_key(*base[:i], other, *base[i + 1 :]))
    assert len(keys) == 7


def test_a_corrupt_or_foreign_cache_file_is_recomputed(tiny_model, tmp_path):
    model, tok = tiny_model
    counted = CountingModel(model)
    kw = dict(n=10, fingerprint="tiny", cache_dir=tmp_path)
    sel = sel_cached(counted, tok, CORPUS, **kw)
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    assert sel_cached(counted, tok, CORPUS, **kw) == sel and counted.calls == 2
    path.write_text(json.dumps({**sel.to_dict(), "fingerprint": "someone else"}))
    assert sel_cached(counted, tok, CORPUS, **kw) == sel and counted.calls == 3


def test_sample_is_seeded_and_all_when_fewer():
    texts = [str(i) for i in range(50)]
    assert ls.sample_texts(texts, 10, 0) == ls.sample_texts(texts, 10, 0)
    assert ls.sample_texts(texts, 10, 0) != ls.sample_texts(texts, 10, 1)
    assert len(set(ls.sample_texts(texts, 10, 0))) == 10
    assert ls.sample_texts(texts, 50, 3) == texts == ls.sample_texts(texts, 1000, 3)


# ------------------------------------------------------------------------------------ corpora, output


def test_read_corpus(tmp_path):
    """The one reading rule of kvembed/files.py: JSON lines by field, other files a text per line (kept as is)."""
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "a b c", "source": "x"}\n\n{"text": "line\\ntwo"}\n')
    assert selections.read_corpus(p) == ["a b c", "line\ntwo"]
    t = tmp_path / "c.txt"
    t.write_text("one\n\n two \n")
    assert selections.read_corpus(t) == ["one", "", " two "]
    p.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=":2: "):
        selections.read_corpus(p)
    with pytest.raises(ValueError, match="not read as texts"):
        selections.read_corpus(_touch(tmp_path / "c.json"))
    with pytest.raises(ValueError, match="does not exist"):
        selections.read_corpus(tmp_path / "gone.jsonl")


def _touch(path):
    path.write_text("x\n")
    return path


def test_read_the_shared_id_corpus():
    texts = selections.read_corpus(ID_CORPUS)
    assert len(texts) == 2000 and all(t.strip() for t in texts)


def test_format_curve_marks_skip_and_window():
    ids = curve(30, 12)
    skip, m, layers = ls.window_rule(ids, 30)
    sel = ls.LayerSelection(layers=layers, ids=ids, skip=skip, m=m, n_texts=1000, corpus_sha256="0" * 64,
                            seed=0, fingerprint="fp")
    text = ls.format_curve(sel)
    rows = text.splitlines()[2:]
    assert len(rows) == 30
    assert [i for i, r in enumerate(rows) if r.endswith("skipped")] == list(range(6))
    assert [i for i, r in enumerate(rows) if "selected" in r] == [12, 13, 14, 15]
    assert "(minimum)" in rows[12] and rows[12].count("#") < rows[11].count("#")


def test_selection_json_round_trip_and_shipped_lookup(tmp_path, monkeypatch):
    sel = ls.LayerSelection(layers=[3, 4], ids=[9.0, 8.0, 7.0, 1.0, 2.0], skip=1, m=3, n_texts=5,
                            corpus_sha256="ab", seed=0, fingerprint="fp-default")
    assert ls.LayerSelection.from_dict(json.loads(json.dumps(sel.to_dict()))) == sel
    (tmp_path / "some-model_layers.json").write_text(json.dumps(sel.to_dict()))
    monkeypatch.setattr(selections, "SHIPPED_DIR", tmp_path)
    assert selections.shipped_selection("fp-default") == sel
    assert selections.shipped_selection("another model") is None


def test_cli_select_layers_on_a_checkpoint(tmp_path, capsys):
    import argparse

    folder, _ = tiny.write_checkpoint(tmp_path / "ckpt", "qwen2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    out = tmp_path / "sel.json"
    argv = ["select-layers", "--model", str(folder), "--corpus", str(corpus), "--n", "12", "--batch-size", "5",
            "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    sel = ls.LayerSelection.from_dict(json.loads(out.read_text()))
    assert sel.n_texts == 12 and sel.template == ls.DOCUMENT_TEMPLATE and len(sel.ids) == 4
    assert f"selected layers {sel.layers}" in printed and len(printed.splitlines()) == 2 + 4
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1

    assert main(argv + ["--template", "none"]) == 0
    assert ls.LayerSelection.from_dict(json.loads(out.read_text())).template == RAW_TEMPLATE
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2

    capsys.readouterr()
    assert main(["select-layers", "--model", str(folder)]) == 2  # no corpus, and nothing shipped for these weights
    assert "pass --corpus" in capsys.readouterr().err


# --------------------------------------------------------------------------------- the shipped selection

ID_CORPUS = Path(__file__).resolve().parents[2] / "shared/data/id_corpus/train.jsonl"


def test_shipped_selection_is_the_rule_applied_to_its_curve():
    sel = ls.LayerSelection.from_dict(json.loads((selections.SHIPPED_DIR / "smollm2-135m_layers.json").read_text()))
    assert len(sel.ids) == 30 and (sel.skip, sel.m, sel.layers) == ls.window_rule(sel.ids, 30)
    assert (sel.n_texts, sel.seed, sel.template, sel.max_length) == (1000, 0, ls.DOCUMENT_TEMPLATE, 512)
    assert sel.corpus_sha256 == ls.corpus_sha256(selections.read_corpus(ID_CORPUS))
    assert selections.shipped_selection(sel.fingerprint) == sel


@pytest.mark.slow
def test_shipped_selection_belongs_to_the_default_model(tmp_path_factory):
    # Fails when the default model's converted bytes change (loader or conversion edits): recompute with
    # `kvembed select-layers --corpus <id_corpus> --json kvembed/data/smollm2-135m_layers.json`.
    import os

    import weights_loader
    from weights_loader.model_cache import named_model_path
    from weights_loader.named_models import SMOLLM2

    cache = Path(os.environ["KVEMBED_CACHE"]) if os.environ.get("KVEMBED_CACHE") else tmp_path_factory.mktemp("kvc")
    loaded = weights_loader.load_model(named_model_path(SMOLLM2, cache))
    assert selections.shipped_selection(loaded.fingerprint) is not None

"""kvembed as a real SentenceTransformer (kvembed/st.py) and as an mteb model, on tiny checkpoints, offline.

The issue's bar: the SentenceTransformer's encode equals KVEmbedder.encode within 1e-6 (query and document, every
method), prompts go through sentence-transformers' own prompts, save/load round-trips offline, the multi-process
pool runs on 2 CPU processes, and a LangChain-style call works; the mteb adapter's name and revision are stable and
follow the switches, and mteb's batch_size reaches KVEmbedder.encode. The examples in docs/ecosystem.md run here.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers", reason="pip install -e '.[st]' (or .[test])")
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.base.modules import Normalize  # noqa: E402

from kvembed import KVEmbedder, to_sentence_transformer  # noqa: E402
from kvembed.baselines import METHODS  # noqa: E402
from kvembed.st import KVEmbeddingModule  # noqa: E402
from kvembed.switches import SwitchError  # noqa: E402
from tests import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # the data pack beside the checkout (CI: ../shared/data)
TOL = 1e-6  # the bar for "equals KVEmbedder.encode"
# Quotes, a final '?', an empty text and very different lengths: what clean-up, prompts and batching touch.
TEXTS = ["a cat sat on the mat", 'he said "hi"?', "the quick brown fox jumps over the lazy dog " * 3, "x", ""]
# The tiny model has 4 layers: token_prepending's default k = 6 would not fit.
SWITCHES = {"kvembedding": {"layers": [1, 2]}, "token_prepending": {"prepend_layers": 2}}


def max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.write_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2")[0]


@pytest.fixture(scope="module")
def emb(folder):
    return KVEmbedder.from_pretrained(folder, layers=[1, 2])


@pytest.fixture(scope="module")
def st(emb):
    return to_sentence_transformer(emb)


# ------------------------------------------------------------------------------------ the model itself


def test_it_is_a_sentence_transformer_of_our_module_and_its_normalize(st, emb):
    assert type(st) is SentenceTransformer
    assert isinstance(st[0], KVEmbeddingModule) and isinstance(st[1], Normalize) and len(st) == 2
    assert st[0].decoder is emb.model  # the same weights, not a copy
    assert st.get_embedding_dimension() == emb.get_embedding_dimension() == 64
    assert st.max_seq_length == emb.max_seq_length and st.similarity_fn_name == "cosine"
    assert st.tokenizer is emb.tokenizer
    st.max_seq_length = 300  # sentence-transformers' setter reaches the module
    assert st[0].max_seq_length == 300
    st.max_seq_length = emb.max_seq_length
    # switched off: no Normalize module
    raw = to_sentence_transformer(KVEmbedder.from_pretrained(emb.loaded.path, layers=[1, 2], normalize=False))
    assert len(raw) == 1


@pytest.mark.parametrize("method", list(METHODS))
def test_encode_equals_kvembedder_for_every_method(folder, method):
    emb = KVEmbedder.from_pretrained(folder, method=method, **SWITCHES.get(method, {}))
    st = to_sentence_transformer(emb)
    assert max_err(st.encode(TEXTS), emb.encode(TEXTS)) <= TOL
    assert max_err(st.encode_query(TEXTS), emb.encode_query(TEXTS)) <= TOL
    assert max_err(st.encode_document(TEXTS), emb.encode_document(TEXTS)) <= TOL
    assert max_err(st.encode(TEXTS, prompt_name="query"), emb.encode(TEXTS, prompt_name="query")) <= TOL
    # and the two prompts really differ where the method has two templates (else the checks above prove little)
    if getattr(emb.method, "query_template", None) not in (None, getattr(emb.method, "template", None)):
        assert max_err(st.encode_query(TEXTS), st.encode_document(TEXTS)) > 1e-3


def test_encode_options_match(st, emb):
    one = st.encode("dogs bark")
    assert one.shape == (64,) and max_err(one, emb.encode("dogs bark")) <= TOL
    for kw in ({"batch_size": 1}, {"batch_size": 2}, {"normalize_embeddings": True}, {"convert_to_tensor": True}):
        assert max_err(st.encode(TEXTS, **kw), emb.encode(TEXTS, **kw)) <= TOL, kw
    t = st.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    assert len(st.encode([])) == 0
    s = st.similarity(st.encode(TEXTS[:2]), st.encode(TEXTS))
    assert max_err(s, emb.similarity(emb.encode(TEXTS[:2]), emb.encode(TEXTS))) <= TOL


def test_normalize_embeddings_semantics(folder, st, emb):
    """The table in docs/ecosystem.md: the default and True agree; kvembed's explicit False is the pooled vector,
    sentence-transformers' False the model's output (unit, as for any model ending in Normalize)."""
    unit = emb.encode(TEXTS)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-5)
    for n in (None, False, True):
        assert max_err(st.encode(TEXTS, normalize_embeddings=n), unit) <= TOL, n
    pooled = emb.encode(TEXTS, normalize_embeddings=False)
    assert not np.allclose(np.linalg.norm(pooled, axis=1), 1, atol=1e-2)  # really not normalised
    assert max_err(pooled / np.linalg.norm(pooled, axis=1, keepdims=True), unit) <= TOL
    # with the switch off every setting means the same in both
    raw_emb = KVEmbedder.from_pretrained(folder, layers=[1, 2], normalize=False)
    raw_st = to_sentence_transformer(raw_emb)
    for n in (None, False, True):
        got, want = raw_st.encode(TEXTS, normalize_embeddings=n), raw_emb.encode(TEXTS, normalize_embeddings=n)
        assert max_err(got, want) <= TOL, n
    assert max_err(raw_st.encode(TEXTS), pooled) <= TOL


def test_langchain_style_call(st, emb):
    """LangChain's HuggingFaceEmbeddings calls encode(texts, normalize_embeddings=..., show_progress_bar=...,
    batch_size=...); both objects take it and return (N, dim) float32 in input order."""
    kw = dict(normalize_embeddings=False, show_progress_bar=False, batch_size=8)
    a, b = emb.encode(TEXTS, **kw), st.encode(TEXTS, **kw)
    for x in (a, b):
        assert isinstance(x, np.ndarray) and x.shape == (len(TEXTS), 64) and x.dtype == np.float32
    assert max_err(b, emb.encode(TEXTS)) <= TOL  # the model's output: unit vectors (the docs' table)
    assert max_err(a, emb.encode(TEXTS, normalize_embeddings=False)) == 0.0  # kvembed's False: the pooled vector
    assert max_err(st.encode(TEXTS[::-1], **kw)[::-1], b) <= TOL  # order restored


def test_truncate_dim_is_applied_before_normalize(folder):
    emb = KVEmbedder.from_pretrained(folder, layers=[1, 2], truncate_dim=16)
    st = to_sentence_transformer(emb)
    got = st.encode(TEXTS)
    assert got.shape == (len(TEXTS), 16) and st.get_embedding_dimension() == 16
    assert max_err(got, emb.encode(TEXTS)) <= TOL
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


# ------------------------------------------------------------------------------------------ prompts


def test_prompts_are_sentence_transformers_prompts(folder, st, emb):
    assert st.prompts == {"query": emb.method.query_template, "document": emb.method.template}
    q = st.encode(TEXTS, prompt=emb.method.query_template)  # the template string itself, as prompt=
    assert max_err(q, emb.encode_query(TEXTS)) <= TOL
    prefix = "Represent this sentence: "
    assert max_err(st.encode(TEXTS, prompt=prefix), emb.encode(TEXTS, prompt=prefix)) <= TOL
    assert max_err(st.encode(TEXTS, prompt=prefix), st.encode(TEXTS, prompt=prefix + "{text}")) == 0.0
    assert max_err(st.encode(TEXTS, prompt=prefix), st.encode(TEXTS)) > 1e-3
    # "" is sentence-transformers' "no prompt": the method's own template; the raw text is "{text}"
    assert max_err(st.encode(TEXTS, prompt=""), st.encode(TEXTS)) == 0.0
    assert max_err(st.encode(TEXTS, prompt="{text}"), emb.encode(TEXTS, prompt="{text}")) <= TOL
    # an embedder's own named prompts and default prompt name travel too
    custom = KVEmbedder.from_pretrained(folder, layers=[1, 2], prompts={"short": "Summarise: "},
                                        default_prompt_name="short")
    cst = to_sentence_transformer(custom)
    assert cst.prompts["short"] == "Summarise: {text}" and cst.default_prompt_name == "short"
    assert max_err(cst.encode(TEXTS), custom.encode(TEXTS)) <= TOL
    assert max_err(cst.encode_query(TEXTS), custom.encode_query(TEXTS)) <= TOL


def test_a_fixed_prompt_method_refuses_a_prompt_instead_of_pasting_it(folder):
    """MetaEOL's prompts are the method: a per-call prompt raises (a SwitchError, which sentence-transformers does
    not catch) rather than being pasted onto the text by its TypeError fallback."""
    st = to_sentence_transformer(KVEmbedder.from_pretrained(folder, method="metaeol"))
    assert st.prompts == {"query": "", "document": ""}  # sentence-transformers' empty defaults: no prompt
    with pytest.raises(SwitchError, match="fixed prompts"):
        st.encode(["a text"], prompt="Represent: ")


def test_bad_inputs_raise(st, emb):
    with pytest.raises(ValueError, match="not str"):
        st[0].preprocess(["ok", 3])
    with pytest.raises(ValueError, match="not str"):
        st.encode(["ok", 3])
    with pytest.raises(ValueError, match="unsupported"):
        st[0].preprocess(["ok"], padding=True)
    with pytest.raises(TypeError, match="takes no from_pretrained options"):
        to_sentence_transformer(emb, layers=[1, 2])


def test_to_sentence_transformer_by_name_or_path(folder, emb):
    st = to_sentence_transformer(folder, layers=[1, 2])
    assert max_err(st.encode(TEXTS), emb.encode(TEXTS)) <= TOL


# -------------------------------------------------------------------------------------- save / load


def test_save_writes_config_not_weights_and_needs_trust_remote_code(st, tmp_path):
    out = tmp_path / "saved"
    st.save(str(out))
    files = {p.name for p in out.rglob("*") if p.is_file()}
    assert not any(f.endswith((".safetensors", ".bin", ".pt")) for f in files), files
    config = json.loads((out / "kvembed_config.json").read_text())
    assert config["model"] == str(Path(st[0].name_or_path)) and Path(config["model"]).is_absolute()
    assert config["method"] == "kvembedding" and config["switches"]["layers"] == [1, 2]
    assert config["dtype"] == "float32" and config["max_seq_length"] == st.max_seq_length
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["kvembed.st.KVEmbeddingModule",
                                            "sentence_transformers.base.modules.normalize.Normalize"]
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(out), device="cpu")


@pytest.mark.parametrize("method", ["kvembedding", "metaeol", "token_prepending", "echo"])
def test_save_load_round_trip_in_process(folder, method, tmp_path):
    emb = KVEmbedder.from_pretrained(folder, method=method, **SWITCHES.get(method, {}))
    st = to_sentence_transformer(emb)
    st.save(str(tmp_path / "m"), create_model_card=False)
    back = SentenceTransformer(str(tmp_path / "m"), trust_remote_code=True, device="cpu")
    assert back[0].method == emb.method  # every switch, exactly
    assert back.prompts == st.prompts and back.similarity_fn_name == "cosine"
    assert max_err(back.encode_query(TEXTS), emb.encode_query(TEXTS)) <= TOL
    assert max_err(back.encode_document(TEXTS), emb.encode_document(TEXTS)) <= TOL


def test_load_offline_in_a_fresh_process_from_a_relative_path(folder, tmp_path):
    """A model built from a relative path, saved, and loaded back by a new interpreter with the hub switched off,
    from another directory; the vectors are the ones of the process that saved it."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "ck").symlink_to(folder, target_is_directory=True)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        emb = KVEmbedder.from_pretrained("ck", layers=[1, 2], truncate_dim=32, prompts={"p": "Summarise: "})
    finally:
        os.chdir(cwd)
    st = to_sentence_transformer(emb)
    st.save(str(tmp_path / "saved"))
    want = st.encode_query(TEXTS)
    code = ("import sys, numpy as np; from sentence_transformers import SentenceTransformer; "
            "m = SentenceTransformer(sys.argv[1], trust_remote_code=True, device='cpu'); "
            "np.save(sys.argv[2], m.encode_query(%r)); np.save(sys.argv[3], m.encode(%r, prompt_name='p'))"
            % (TEXTS, TEXTS))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "saved"), str(tmp_path / "q.npy"),
                        str(tmp_path / "p.npy")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_err(np.load(tmp_path / "q.npy"), want) <= TOL
    assert max_err(np.load(tmp_path / "p.npy"), emb.encode(TEXTS, prompt_name="p")) <= TOL


def test_changed_weights_warn_on_load(st, tmp_path):
    st.save(str(tmp_path / "m"), create_model_card=False)
    config_path = tmp_path / "m" / "kvembed_config.json"
    config = json.loads(config_path.read_text())
    config["weights_fingerprint"] = "0" * 16
    config_path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="differ from those the model was saved with"):
        SentenceTransformer(str(tmp_path / "m"), trust_remote_code=True, device="cpu")


def test_load_overrides_and_refusals(st, tmp_path):
    st.save(str(tmp_path / "m"), create_model_card=False)
    m = SentenceTransformer(str(tmp_path / "m"), trust_remote_code=True, device="cpu",
                            model_kwargs={"max_length": 100})
    assert m.max_seq_length == 100
    with pytest.raises(ValueError, match="backend"):
        KVEmbeddingModule.load(str(tmp_path / "m"), backend="onnx")
    config_path = tmp_path / "m" / "kvembed_config.json"
    config = json.loads(config_path.read_text())
    del config["switches"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="kvembed_config.json lacks switches"):  # not a bare KeyError
        KVEmbeddingModule.load(str(tmp_path / "m"))


# --------------------------------------------------------------------------------- pickling and the pool


def test_module_pickles(st):
    back = pickle.loads(pickle.dumps(st))
    assert max_err(back.encode(TEXTS), st.encode(TEXTS)) == 0.0


def threads_after_unpickling(blob: bytes) -> int:
    pickle.loads(blob)
    return torch.get_num_threads()


def test_a_spawned_worker_runs_one_thread(st):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as p:
        assert p.apply(threads_after_unpickling, (pickle.dumps(st[0]),)) == 1


def test_multi_process_pool_on_two_cpu_processes(st, emb):
    texts = [f"text {i}: " + "the cat sat on the mat " * (i % 5) for i in range(24)] + TEXTS
    pool = st.start_multi_process_pool(["cpu", "cpu"])
    try:
        got = st.encode(texts, pool=pool, chunk_size=6, batch_size=4)
        got_q = st.encode_query(texts, pool=pool, chunk_size=10)
        assert len({p.pid for p in pool["processes"]}) == 2 and all(p.is_alive() for p in pool["processes"])
    finally:
        st.stop_multi_process_pool(pool)
    assert got.shape == (len(texts), 64)
    assert max_err(got, emb.encode(texts)) <= TOL
    assert max_err(got_q, emb.encode_query(texts)) <= TOL


# ------------------------------------------------------------------------------------------------ mteb


def test_mteb_name_and_revision_are_stable_and_follow_the_switches(folder):
    from kvembed.evaluation.mteb_adapter import KVEmbeddingMTEB

    def meta(**switches):
        return KVEmbeddingMTEB(KVEmbedder.from_pretrained(folder, **switches), show_progress_bar=False).mteb_model_meta

    a, b = meta(layers=[1, 2]), meta(layers=[1, 2])  # two embedders, built separately
    assert (a.name, a.revision) == (b.name, b.revision)
    assert a.name == f"kvembed/{folder.name}__kvembedding" and len(a.revision) >= 16
    for changed in (meta(layers=[1, 2], bias=2.0), meta(layers=[1, 3]), meta(layers=[1, 2], pooling="mean")):
        assert changed.name == a.name and changed.revision != a.revision
    assert meta(method="mean").name == f"kvembed/{folder.name}__mean"
    # from run to run: another interpreter computes the same revision
    code = ("import sys; from kvembed import KVEmbedder; from kvembed.evaluation.mteb_adapter import KVEmbeddingMTEB; "
            "print(KVEmbeddingMTEB(KVEmbedder.from_pretrained(sys.argv[1], layers=[1, 2])).mteb_model_meta.revision)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == a.revision


def test_mteb_batch_size_reaches_kvembedder_encode(emb, monkeypatch):
    import mteb
    from mteb.mocks.mock_tasks.sts import MockSTSTask

    from kvembed.evaluation.mteb_adapter import KVEmbeddingMTEB

    seen = []
    encode = emb.encode

    def spy(*args, **kwargs):
        seen.append(kwargs.get("batch_size"))
        return encode(*args, **kwargs)

    monkeypatch.setattr(emb, "encode", spy)
    model = KVEmbeddingMTEB(emb, show_progress_bar=False, batch_size=32)
    for bs in (3, 5):
        seen.clear()
        mteb.evaluate(model, [MockSTSTask()], cache=None, co2_tracker=False, show_progress_bar=False,
                      encode_kwargs={"batch_size": bs})
        assert seen and set(seen) == {bs}


# ------------------------------------------------------------------------------------ the docs' examples


def doc_example(name: str) -> str:
    """The python block that follows `<!-- test: tests/test_st.py::<name> -->` in docs/ecosystem.md."""
    text = (ROOT / "docs" / "ecosystem.md").read_text()
    m = re.search(rf"<!-- test: tests/test_st.py::{name} -->\n```python\n(.*?)```", text, re.S)
    assert m, f"docs/ecosystem.md has no example marked for {name}"
    return m.group(1)


def with_tiny_model(code: str, folder: Path) -> str:
    """The example with the default model swapped for the tiny checkpoint (4 layers: explicit ones)."""
    want = 'KVEmbedder.from_pretrained("smollm2-135m")'
    assert code.count(want) == 1, f"the example no longer loads {want}"
    return code.replace(want, f"KVEmbedder.from_pretrained({str(folder)!r}, layers=[1, 2])")


def test_docs_sentence_transformer_example(folder, capsys):
    exec(compile(with_tiny_model(doc_example("test_docs_sentence_transformer_example"), folder), "ecosystem.md",
                 "exec"), {})
    assert "tensor" in capsys.readouterr().out


def test_docs_mteb_example(folder, monkeypatch, capsys):
    if not (DATA / "stsb").is_dir() and not os.environ.get("KVEMBED_DATA"):
        pytest.skip(f"no data pack at {DATA} and no $KVEMBED_DATA")
    if not os.environ.get("KVEMBED_DATA"):
        monkeypatch.setenv("KVEMBED_DATA", str(DATA))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn/mteb chatter on 50 rows
        exec(compile(with_tiny_model(doc_example("test_docs_mteb_example"), folder), "ecosystem.md", "exec"), {})
    out = capsys.readouterr().out.split("\n")
    assert out[0].startswith(f"kvembed/{folder.name}__kvembedding ")
    assert -1.0 <= float(out[1]) <= 1.0

"""Bad and odd input to `KVEmbedder.encode`: it never crashes on a text, never drops, reorders or truncates
without telling, and rejects non-text items with a TypeError naming the index.

Every case runs on one tiny random llama checkpoint (64 wide, 4 layers, re-routing in layers 1 and 2).
"Same vector" below means within `same(emb)` (tests/tolerance.py): padding and batch company change only the
order of float additions, never the maths, so two routes drift apart by at most `decoder_drift`.
"""

from __future__ import annotations

import warnings
import weakref

import numpy as np
import pytest

from kvembed import method as method_module
from kvembed.encoder import KVEmbedder, SurrogateWarning, TruncationWarning
from kvembed.method import DOCUMENT_TEMPLATE, QUERY_TEMPLATE, fill
from tests import tiny
from tests.tolerance import assert_close, assert_differ, decoder_drift, drift

DIM = tiny.BASE["hidden_size"]

# Each of these must embed to a finite unit vector, one row per text, in order (the list).
ODD_TEXTS = {
    "empty": "",
    "space": " ",
    "whitespace": " \t\n\r\n  ",
    "one char": "a",
    "emoji": "I love it 😀👍🏽👨‍👩‍👧‍👦🇫🇷",
    "cjk": "你好，世界。日本語のテキスト。한국어 문장",
    "rtl": "مرحبا بالعالم שלום עולם",
    "zero-width": "a\u200bb\u200cc\u200dd\ufeffe\u2060",
    "control": "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\x85",
    "bidi controls": "\u202eevil\u202c \u2066x\u2069",
    "combining": "e\u0301\u0301\u0301 Z\u0351\u0354\u0359",
    "braces": "{text} {} {0} %s",
    "template look-alike": DOCUMENT_TEMPLATE,
    "noncharacters": "\uffff\ufffe\U0010ffff",
    "long 100k": "word " * 20_000,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f, _ = tiny.write_checkpoint(tmp_path_factory.mktemp("rel_input") / "llama", "llama")
    return f


@pytest.fixture(scope="module")
def emb(folder):
    return KVEmbedder.from_pretrained(folder, layers=[1, 2])


@pytest.fixture(scope="module")
def short_emb(folder):
    """Context of 40 tokens, so that truncation is cheap to trigger."""
    return KVEmbedder.from_pretrained(folder, layers=[1, 2], max_length=40)


def encode_quietly(emb, texts, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        return emb.encode(texts, **kw)


def same(emb) -> float:
    """Another batch composition for the same text: sums over C, I, Hq*D and the T keys (at most max_length, plus
    the prefix slot) reordered, through every layer."""
    return decoder_drift(emb.args, emb.max_seq_length + 1)


def assert_unit_rows(out, n):
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (n, DIM)
    assert np.isfinite(out).all()
    # L2-normalised fp32 rows: the normalisation's sum over C, then norm()'s own.
    assert_close(np.linalg.norm(out, axis=1), np.ones(n), drift(np.float32, terms=DIM, depth=2), "row norms")


# ------------------------------------------------------------------------------------------- odd texts


def test_odd_texts_embed_in_order_as_if_alone(emb):
    texts = list(ODD_TEXTS.values())
    together = encode_quietly(emb, texts, batch_size=4)
    assert_unit_rows(together, len(texts))
    for i, t in enumerate(texts):
        alone = encode_quietly(emb, t)
        assert alone.shape == (DIM,)
        assert_close(together[i], alone, same(emb), f"text {i} ({list(ODD_TEXTS)[i]})")
    # The odd texts are not all mapped to one vector (e.g. by being emptied): rows are pairwise distinct.
    assert len({row.tobytes() for row in together}) == len(texts)


def test_odd_texts_are_not_emptied(emb):
    # An empty text still carries the template; a text dropped to "" would give exactly that vector.
    empty = encode_quietly(emb, "")
    for name, text in ODD_TEXTS.items():
        if text.strip(" \t\n\r") and name != "long 100k":
            assert_differ(encode_quietly(emb, text), empty, same(emb), name)


def test_long_text_is_cut_on_the_text_side_and_reported(short_emb):
    tok = short_emb.tokenizer
    texts = ["short", "word " * 500, "also short", "tail " * 100]
    with pytest.warns(TruncationWarning, match=r"2 text\(s\) .*max_length=40.*indices: \[1, 3\]"):
        out = short_emb.encode(texts)
    assert_unit_rows(out, 4)
    assert short_emb.last_truncated == [1, 3]
    # The instruction survives: the cut prompt ends with the template's own last tokens.
    view = method_module.encode_text(tok, texts[1], DOCUMENT_TEMPLATE, 40)
    tail = tok.encode(fill(DOCUMENT_TEMPLATE, "x"), add_special_tokens=True).ids[-6:]
    assert view.truncated and len(view.ids) <= 40 and view.ids[-6:] == tail
    assert view.prompt.endswith(DOCUMENT_TEMPLATE.split("{text}")[1])
    # The cut is reproducible: the same long text embeds the same, alone or in company.
    assert_close(encode_quietly(short_emb, texts[1]), out[1], same(short_emb), "cut text alone vs in company")


def test_query_template_is_also_kept_when_cut(short_emb):
    view = method_module.encode_text(short_emb.tokenizer, "q " * 300, QUERY_TEMPLATE, 40)
    assert view.truncated and view.prompt.endswith(QUERY_TEMPLATE.split("{text}")[1])


def test_truncation_can_raise_instead(short_emb):
    with pytest.raises(ValueError, match=r"indices: \[2\].*on_truncation='warn'"):
        short_emb.encode(["a", "b", "long " * 200], on_truncation="raise")


def test_truncation_flag_is_reset_by_the_next_call(short_emb):
    encode_quietly(short_emb, ["x " * 200])
    assert short_emb.last_truncated == [0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all for texts that fit
        short_emb.encode(["fits"])
    assert short_emb.last_truncated == []


def test_template_too_long_for_max_length_is_a_clear_error(folder):
    tiny_ctx = KVEmbedder.from_pretrained(folder, layers=[1, 2], max_length=3)
    with pytest.raises(ValueError, match=r"template alone is \d+ tokens.*max_length=3"):
        tiny_ctx.encode(["a long enough text to need cutting"])


def test_lone_surrogates_are_replaced_and_reported(emb):
    # What json.loads('"\\ud800"') or a file read with errors="surrogateescape" hands over.
    texts = ["fine", "bad \ud800 half", "x\udcff", "pair \ud83d\ude00 ok", "fine too"]
    with pytest.warns(SurrogateWarning, match=r"3 text\(s\).*indices: \[1, 2, 3\]"):
        out = emb.encode(texts, batch_size=2)
    assert_unit_rows(out, 5)
    assert emb.last_repaired == [1, 2, 3]
    assert_close(out[1], encode_quietly(emb, "bad \ufffd half"), same(emb), "lone high surrogate")
    assert_close(out[2], encode_quietly(emb, "x\ufffd"), same(emb), "lone low surrogate")
    # A surrogate *pair* is joined into the character it spells, not replaced.
    assert_close(out[3], encode_quietly(emb, "pair 😀 ok"), same(emb), "surrogate pair")


# ------------------------------------------------------------------------------------------- containers


@pytest.mark.parametrize("bad, index", [(None, 0), (3, 2), (b"bytes", 1), (["nested"], 4), (float("nan"), 3)])
def test_non_string_item_is_a_type_error_naming_its_index(emb, bad, index):
    texts = ["a", "b", "c", "d", "e"]
    texts[index] = bad
    with pytest.raises(TypeError, match=rf"inputs\[{index}\] is {type(bad).__name__}, not str"):
        emb.encode(texts)


def test_non_string_deep_in_a_generator_names_its_global_index(emb):
    # batch_size=2 -> chunks of 64: index 150 sits in the third chunk, after two were embedded.
    gen = ("t" if i != 150 else None for i in range(200))
    with pytest.raises(TypeError, match=r"inputs\[150\] is NoneType"):
        emb.encode(gen, batch_size=2)


@pytest.mark.parametrize("bad", [None, 42, 3.5])
def test_inputs_that_are_not_iterable(emb, bad):
    with pytest.raises(TypeError, match="string or an ordered sequence of strings"):
        emb.encode(bad)


@pytest.mark.parametrize("empty", [[], (), iter([]), (t for t in [])])
def test_empty_input_gives_an_empty_matrix(emb, empty):
    out = emb.encode(empty)
    assert isinstance(out, np.ndarray) and out.shape == (0, DIM) and out.dtype == np.float32


def test_empty_input_as_tensor(emb):
    out = emb.encode([], convert_to_tensor=True)
    assert tuple(out.shape) == (0, DIM)


def test_generator_equals_list(emb):
    texts = [f"text number {i} " + "x" * (i % 7) for i in range(70)]
    from_list = emb.encode(texts, batch_size=3)
    from_gen = emb.encode((t for t in texts), batch_size=3)  # chunks of 96: one partial chunk
    np.testing.assert_array_equal(from_list, from_gen)


def test_unsupported_option_raises(emb):
    with pytest.raises(TypeError, match="unsupported option"):
        emb.encode(["a"], colour="blue")


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, "8"])
def test_bad_batch_size(emb, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        emb.encode(["a"], batch_size=batch_size)


# ------------------------------------------------------------------------------------------- 10,000 texts


def test_ten_thousand_texts_memory_is_bounded_by_the_chunk(emb, monkeypatch):
    """A generator of 10,000 texts: the embedder never holds token views for more than two chunks at once,
    and never pulls texts from the generator far ahead of embedding them."""
    n, batch_size = 10_000, 64
    chunk = batch_size * 32  # the encoder's chunk: 2048
    live = 0  # token views created and not yet freed
    peak_live = 0
    pulled = 0
    pulled_ahead = 0
    embedded = 0
    prepare, embed = method_module.KVEmbedding.prepare, method_module.KVEmbedding.embed

    def counting_prepare(self, *a, **kw):
        nonlocal live, peak_live
        views = prepare(self, *a, **kw)
        for v in views:
            live += 1
            weakref.finalize(v, freed)
        peak_live = max(peak_live, live)
        return views

    def freed():
        nonlocal live
        live -= 1

    def counting_embed(self, model, views, collate_fn, normalize=None):
        nonlocal embedded, pulled_ahead
        pulled_ahead = max(pulled_ahead, pulled - embedded)
        embedded += len(views)
        return embed(self, model, views, collate_fn, normalize)

    def texts():
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield f"t{i % 97}"

    monkeypatch.setattr(method_module.KVEmbedding, "prepare", counting_prepare)
    monkeypatch.setattr(method_module.KVEmbedding, "embed", counting_embed)
    out = emb.encode(texts(), batch_size=batch_size)
    assert out.shape == (n, DIM) and np.isfinite(out).all()
    assert embedded == n
    # The previous chunk's views are freed while the next are built: at most two chunks' worth are alive.
    assert peak_live <= 2 * chunk, peak_live
    assert pulled_ahead <= chunk, pulled_ahead
    # Same text -> same vector, wherever it sits in the stream (rows i and i + 97 share a text).
    assert_close(out[5], out[5 + 97 * 50], same(emb), "one text at two places in the stream")


# ------------------------------------------------------------- red-team inputs: nothing lost, nothing silent


def test_tables_and_mappings_are_refused_with_what_to_pass(emb):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"text": ["a cat", "a dog"]})
    with pytest.raises(TypeError, match=r"df\['text'\]\.tolist\(\)"):
        emb.encode(df)  # it used to embed the column name "text" as one text
    with pytest.raises(TypeError, match="keys"):
        emb.encode({"a": "a cat", "b": "a dog"})
    with pytest.raises(TypeError, match="no order"):
        emb.encode({"a cat", "a dog"})
    with pytest.raises(TypeError, match="2-D"):
        emb.encode(np.array([["a", "b"], ["c", "d"]]))
    # what is ordered and one-dimensional is taken, row for row
    want = emb.encode(["a cat", "a dog"])
    for ordered in (("a cat", "a dog"), np.array(["a cat", "a dog"]), df["text"], iter(["a cat", "a dog"])):
        assert np.array_equal(emb.encode(ordered), want), type(ordered)


@pytest.mark.parametrize("switches, words", [
    ({"layers": [1.7]}, "integer"), ({"layers": [True]}, "integer"), ({"layers": []}, "none"),
    ({"normalize": "False"}, "bool"), ({"bias": float("nan")}, "not finite"), ({"bias": float("inf")}, "not finite"),
    ({"bias": "1.0"}, "number"), ({"passes": 3}, "passes"), ({"pooling": "max"}, "pooling"),
])
def test_switch_values_are_never_coerced(folder, switches, words):
    with pytest.raises(ValueError, match=words):
        KVEmbedder.from_pretrained(folder, **switches)


def test_max_length_zero_is_an_error_not_the_default(folder):
    with pytest.raises(ValueError, match="max_seq_length"):
        KVEmbedder.from_pretrained(folder, layers=[1, 2], max_length=0)


def test_a_huge_text_is_cut_by_characters_before_it_is_tokenized(short_emb, monkeypatch):
    """A 4 MB line: the tokenizer never sees more than a bounded prefix (a 46 MB one aborted the process)."""
    seen = []
    tok = short_emb.tokenizer

    class Spy:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, text, *a, **kw):
            seen.append(len(text))
            return tok.encode(text, *a, **kw)

    monkeypatch.setattr(short_emb, "tokenizer", Spy())
    huge = "word " * 800_000
    with pytest.warns(TruncationWarning):
        v = short_emb.encode(huge)
    assert np.isfinite(v).all() and max(seen) < 100_000, max(seen)
    assert short_emb.last_truncated == [0]

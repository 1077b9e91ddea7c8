"""`kvembed embed` on bad files and bad places: each failure is one line on stderr naming the file (and line)
and a documented exit code (kvembed/cli.py: 0 ok, 2 bad input/usage, 3 model, 4 embedding); a failed run
never leaves a half-written output.
"""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest

from kvembed import cli
from kvembed.encoder import SurrogateWarning
from tests import tiny


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVEMBED_CACHE", str(tmp_path / "kvcache"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    f, _ = tiny.write_checkpoint(tmp_path_factory.mktemp("rel_cli") / "llama", "llama")
    return str(f)


def embed(model, *args) -> int:
    return cli.main(["embed", "--model", model, "--layers", "1,2", *args])


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_good_jsonl_to_npy_in_input_order(model, tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"text": t}).encode() for t in ["a", "b b", "c c c"]])
    out = tmp_path / "out.npy"
    assert embed(model, "--input", src, "--output", str(out)) == 0
    vecs = np.load(out)
    assert vecs.shape == (3, tiny.BASE["hidden_size"]) and np.isfinite(vecs).all()
    assert "3 text(s)" in capsys.readouterr().err
    assert list(tmp_path.glob("out.npy.tmp-*")) == []  # the temporary name is gone once the output is in place


def test_missing_input_file(model, tmp_path, capsys):
    assert embed(model, "--input", str(tmp_path / "nope.jsonl")) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and "does not exist" in err and "Traceback" not in err


def test_directory_as_input_file(model, tmp_path, capsys):
    assert embed(model, "--input", str(tmp_path)) == cli.EXIT_INPUT
    assert str(tmp_path) in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad, why",
    [(b'{"text": "unterminated', "Unterminated string"), (b'{"txt": "wrong field"}', "no 'text' field"),
     (b'{"text": 5}', "'text' is int, not str"), (b'["a list"]', "expected a JSON object, got list"),
     (b'\xff\xfe bad utf-8', "invalid UTF-8")],
    ids=["bad-json", "missing-field", "not-a-string", "not-an-object", "invalid-utf8"],
)
def test_unreadable_jsonl_line_names_its_number(model, tmp_path, capsys, bad, why):
    good = [json.dumps({"text": f"t{i}"}).encode() for i in range(4)]
    src = write_lines(tmp_path / "in.jsonl", [*good[:2], bad, *good[2:]])
    out = tmp_path / "out.npy"
    assert embed(model, "--input", src, "--output", str(out)) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert f"{src}:3:" in err and why in err and "--skip-bad-lines" in err
    assert not out.exists()


def test_skip_bad_lines_reports_them_and_keeps_the_rest_in_order(model, tmp_path, capsys):
    lines = [json.dumps({"text": "zero"}).encode(), b"{broken", json.dumps({"text": "two"}).encode(),
             b"\xc3\x28", json.dumps({"text": "four"}).encode()]
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.npy"
    assert embed(model, "--input", src, "--output", str(out), "--skip-bad-lines") == 0
    err = capsys.readouterr().err
    assert "skipped 2 unreadable line(s)" in err and "[2, 4]" in err
    ref = tmp_path / "ref.npy"
    assert embed(model, "zero", "two", "four", "--output", str(ref)) == 0
    np.testing.assert_array_equal(np.load(out), np.load(ref))


def test_text_file_with_invalid_utf8_line(model, tmp_path, capsys):
    src = write_lines(tmp_path / "in.txt", [b"fine", b"caf\xe9 latin-1", b"also fine"])
    assert embed(model, "--input", src) == cli.EXIT_INPUT
    assert f"{src}:2:" in capsys.readouterr().err


def test_jsonl_escaped_lone_surrogate_is_embedded_with_a_warning(model, tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", [b'{"text": "ok"}', b'{"text": "half \\ud800 pair"}'])
    out = tmp_path / "out.npy"
    with pytest.warns(SurrogateWarning, match=r"lone surrogates.*indices: \[1\]"):
        assert embed(model, "--input", src, "--output", str(out)) == 0
    assert np.isfinite(np.load(out)).all()


def test_missing_output_folder(model, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "dir" / "out.npy"
    assert embed(model, "a", "--output", str(out)) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert str(out.parent) in err and "create it first" in err


def test_unknown_output_suffix(model, tmp_path, capsys):
    out = tmp_path / "out.csv"
    assert embed(model, "a", "--output", str(out)) == cli.EXIT_INPUT
    assert ".npy or .jsonl" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_disk_full_leaves_no_partial_output(model, tmp_path, capsys, monkeypatch, suffix):
    out = tmp_path / f"out{suffix}"
    out.write_text("previous run")  # must survive a failed write untouched

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    monkeypatch.setattr(json, "dumps", full)
    assert embed(model, "a", "b", "--output", str(out)) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert f"cannot write {out}" in err and "No space left on device" in err
    assert out.read_text() == "previous run" and list(tmp_path.glob("*.tmp-*")) == []


def test_missing_model_folder(tmp_path, capsys):
    assert cli.main(["embed", "--model", str(tmp_path / "gone"), "--layers", "1", "a"]) == cli.EXIT_MODEL
    err = capsys.readouterr().err
    assert str(tmp_path / "gone") in err and "model error" in err


def test_damaged_weights(model, tmp_path, capsys):
    import shutil

    bad = shutil.copytree(model, tmp_path / "bad")
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-64])
    assert cli.main(["embed", "--model", str(bad), "--layers", "1", "a"]) == cli.EXIT_MODEL
    assert str(w) in capsys.readouterr().err


def test_too_long_text_with_raise(model, capsys):
    code = embed(model, "short", "long " * 100, "--max-length", "32", "--on-truncation", "raise")
    assert code == cli.EXIT_EMBED
    assert "indices: [1]" in capsys.readouterr().err


def test_too_long_text_warns_by_default(model, capsys):
    with pytest.warns(UserWarning, match=r"indices: \[1\]"):
        assert embed(model, "short", "long " * 100, "--max-length", "32") == 0


def test_nothing_to_embed(model, tmp_path, capsys):
    src = write_lines(tmp_path / "empty.jsonl", [b""])
    assert embed(model, "--input", src) == cli.EXIT_INPUT
    assert "nothing to embed" in capsys.readouterr().err


def test_bad_usage_exits_2(model, capsys):
    with pytest.raises(SystemExit) as e:
        embed(model, "--batch-size", "many", "a")
    assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err


# ------------------------------------------------------------- red-team inputs: nothing lost, nothing silent


def test_output_that_is_the_input_is_refused_and_the_input_survives(model, tmp_path, capsys):
    src = tmp_path / "s.jsonl"
    original = '{"id":"doc-A","text":"hello","meta":{"src":"x"}}\n'
    src.write_text(original)
    assert embed(model, "--input", str(src), "--output", str(src)) == cli.EXIT_INPUT
    assert "is the input file" in capsys.readouterr().err and src.read_text() == original


@pytest.mark.parametrize("name", ["u.JSONL", "u.Jsonl", "u.NDJSON"])
def test_jsonl_suffix_in_any_case_is_json_lines(model, tmp_path, name):
    src = tmp_path / name
    src.write_text(json.dumps({"text": "hello world"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert embed(model, "--input", str(src), "--output", str(out)) == 0
    assert json.loads(out.read_text())["text"] == "hello world"  # the field, not the raw JSON line


def test_a_json_array_file_is_refused_not_embedded_line_by_line(model, tmp_path, capsys):
    src = tmp_path / "a.json"
    src.write_text('[\n "one",\n "two"\n]\n')
    assert embed(model, "--input", str(src)) == cli.EXIT_INPUT
    assert ".jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--field", "--id-field"])
def test_a_jsonl_option_on_a_text_file_is_refused_not_ignored(model, tmp_path, capsys, option):
    src = tmp_path / "in.txt"
    src.write_text('{"body": "one"}\n')
    assert embed(model, "--input", str(src), option, "body") == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert f"{option}: for JSON lines input" in err and "in.txt is read as a text file" in err
    assert embed(model, "hello", option, "body") == cli.EXIT_INPUT  # texts as arguments have no fields either
    assert "texts given as arguments have no fields" in capsys.readouterr().err
    out = tmp_path / "out.jsonl"  # the same option on a .jsonl input applies
    src.rename(tmp_path / "in.jsonl")
    ids = [] if option == "--field" else [option, "body"]
    assert embed(model, "--input", str(tmp_path / "in.jsonl"), "--field", "body", *ids, "--output", str(out)) == 0
    row = json.loads(out.read_text())
    assert row["text"] == "one" and row.get("id") == ("one" if ids else None)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_utf8_bom_is_not_part_of_the_first_text(model, tmp_path, suffix):
    line = json.dumps({"text": "first text"}) if suffix == ".jsonl" else "first text"
    with_bom, without = tmp_path / f"bom{suffix}", tmp_path / f"plain{suffix}"
    with_bom.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n")
    without.write_bytes(line.encode() + b"\n")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert embed(model, "--input", str(with_bom), "--output", str(a)) == 0
    assert embed(model, "--input", str(without), "--output", str(b)) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["text"] == rb["text"] == "first text" and ra["embedding"] == rb["embedding"]


def test_cr_only_line_ends_are_line_ends(model, tmp_path):
    src = tmp_path / "mac.txt"
    src.write_bytes(b"one\rtwo\rthree\r")
    out = tmp_path / "out.jsonl"
    assert embed(model, "--input", str(src), "--output", str(out)) == 0
    assert [json.loads(l)["text"] for l in out.read_text().splitlines()] == ["one", "two", "three"]


@pytest.mark.parametrize("args, words", [
    (["--max-length", "0"], "must be >= 1"),
    (["--bias", "nan"], "not finite"),
    (["--bias", "inf"], "not finite"),
    (["--layers", "5-3"], "reversed"),
    (["--layers", "1.7"], "layers"),
    (["--normalize", "yes please"], "not a boolean"),
    (["--batch-size", "0"], "must be >= 1"),
])
def test_bad_values_are_refused_with_their_reason(model, capsys, args, words):
    with pytest.raises(SystemExit) as e:
        embed(model, *args, "a")
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_normalize_false_is_false_not_a_text(model, tmp_path):
    out = tmp_path / "o.npy"
    assert embed(model, "--normalize", "False", "a cat", "--output", str(out)) == 0
    v = np.load(out)
    assert v.shape[0] == 1 and abs(float(np.linalg.norm(v[0])) - 1.0) > 1e-3  # one text, not normalised


def test_bias_minus_inf_parses_and_is_no_prefix(model, tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert cli.main(["embed", "--model", model, "--layers", "1,2", "--bias", "-inf", "x y", "--output", str(a)]) == 0
    assert cli.main(["embed", "--model", model, "--layers", "none", "x y", "--output", str(b)]) == 0
    # exp(-inf) = 0 exactly, and the routine then runs the plain path: bit for bit the same
    assert np.array_equal(np.load(a), np.load(b))


@pytest.mark.parametrize("device, words", [("cuda", "no CUDA GPU"), ("bogus", "not a device name")])
def test_a_device_that_is_not_there_is_one_line(model, capsys, device, words):
    assert embed(model, "--device", device, "a") == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_missing_id_corpus(tmp_path, capsys):
    folder, _ = tiny.write_checkpoint(tmp_path / "m", "llama")
    assert cli.main(["embed", "--model", str(folder), "--id-corpus", str(tmp_path / "none.jsonl"), "a"]) == cli.EXIT_INPUT
    assert "none.jsonl does not exist" in capsys.readouterr().err


def test_bad_output_is_refused_before_the_model_loads(tmp_path, capsys):
    # The model path does not exist: if the output were checked after loading, this would be a model error (3).
    gone = str(tmp_path / "no-model")
    assert cli.main(["embed", "--model", gone, "a", "--output", str(tmp_path / "out.csv")]) == cli.EXIT_INPUT
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code = cli.main(["embed", "--model", gone, "a", "--output", str(locked / "out.npy")])
        import os

        assert code == (cli.EXIT_INPUT if os.geteuid() != 0 else cli.EXIT_MODEL)  # root may write anywhere
    finally:
        locked.chmod(0o700)


def test_skip_bad_lines_keeps_the_input_line_numbers_in_jsonl_output(model, tmp_path):
    good = [json.dumps({"id": f"r{i}", "text": f"t{i}"}).encode() for i in range(3)]
    src = write_lines(tmp_path / "in.jsonl", [good[0], b"{broken", good[1], b"", good[2]])
    out = tmp_path / "out.jsonl"
    assert embed(model, "--input", src, "--output", str(out), "--skip-bad-lines") == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [(r["line"], r["id"], r["text"]) for r in rows] == [(1, "r0", "t0"), (3, "r1", "t1"), (5, "r2", "t2")]


def test_ctrl_c_is_one_line_and_exit_130(model, monkeypatch, capsys):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "embedder_from_args", interrupted)
    assert embed(model, "a") == cli.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err.strip() == "kvembed: interrupted"


def test_a_missing_optional_package_names_the_extra(model, monkeypatch, capsys):
    def no_mteb(args):
        raise ModuleNotFoundError("No module named 'mteb'", name="mteb")

    monkeypatch.setattr(cli, "run_embed", no_mteb)
    assert embed(model, "a") == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "pip install 'kvembed[eval]'" in err and "Traceback" not in err

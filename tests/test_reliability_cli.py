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
    assert not (tmp_path / "out.npy.partial").exists()


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
     (b'{"text": 5}', "not a string"), (b'["a list"]', "expected a JSON object, got list"),
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
    assert out.read_text() == "previous run" and list(tmp_path.glob("*.partial")) == []


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

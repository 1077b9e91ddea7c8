"""embed-corpus logic with a fake embedder: sharding, world-size independence, resume, manifest, reader.

The fake maps each text to a vector seeded by its sha256, so a wrong row order, a lost row or a recomputed
part shows as a wrong vector or an extra encode call. Ranks are simulated in one process (rank/world_size
passed explicitly, no process group): the real multi-process run is in test_corpus_torchrun.py.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from kvembed.corpus import embed_corpus, embed_part
from kvembed.files import read_texts
from kvembed.scale.inputs import InputError, read_rows, scan_jsonl
from kvembed.scale.manifest import OutdirError, load_corpus_embeddings

DIM = 8


def vec(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


class FakeEmbedder:
    fingerprint = "fake-model/v1"

    def __init__(self, crash_after: int | None = None):
        self.calls: list[list[str]] = []
        self.crash_after = crash_after

    def get_embedding_dimension(self):
        return DIM

    def encode(self, texts, *, prompt_name=None, batch_size=32, show_progress_bar=None, convert_to_numpy=True):
        assert prompt_name == "document" and batch_size == len(texts)
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append(list(texts))
        self.last_truncated = [i for i, t in enumerate(texts) if len(t) > 35]  # as KVEmbedder reports cut texts
        return np.stack([vec(t) for t in texts])

    def encoded(self) -> list[str]:
        return [t for batch in self.calls for t in batch]


def make_input(path, n=103):
    # Lengths vary so that length sorting reorders rows; ids are strings out of numeric order.
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"doc-{(i * 37) % n}", "text": f"text {i} " + "word " * (i % 7)}) + "\n")
    return path


OPTS = dict(part_size=10, batch_size=4, quiet=True)


def outputs(outdir) -> dict[str, bytes]:
    """Every file that is output (not the summary log, which holds timings)."""
    return {p.name: p.read_bytes() for p in sorted(outdir.iterdir()) if p.name != "summary.json"}


def run_world(inp, outdir, world, emb=None, **kw):
    emb = emb or FakeEmbedder()
    # Ranks other than 0 first: without a process group there is no barrier, and rank 0 assembles.
    for rank in reversed(range(world)):
        embed_corpus(inp, outdir, emb, rank=rank, world_size=world, **{**OPTS, **kw})
    return emb


def test_output_identical_for_any_world_size_and_in_input_order(tmp_path):
    inp = make_input(tmp_path / "in.jsonl")
    run_world(inp, tmp_path / "w1", 1)
    run_world(inp, tmp_path / "w3", 3)
    a, b = outputs(tmp_path / "w1"), outputs(tmp_path / "w3")
    assert sorted(a) == sorted(b) and len([n for n in a if n.endswith(".npy") and n.startswith("part-")]) == 11
    assert a == b
    ids, matrix = load_corpus_embeddings(tmp_path / "w3", verify=True)
    rows = [json.loads(line) for line in open(inp)]
    assert ids == [r["id"] for r in rows]
    assert isinstance(matrix, np.memmap) and matrix.shape == (103, DIM) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, np.stack([vec(r["text"]) for r in rows]))
    manifest = json.loads((tmp_path / "w3" / "manifest.json").read_text())
    assert [(p["start"], p["end"]) for p in manifest["parts"]] == [(k * 10, min(k * 10 + 10, 103)) for k in range(11)]
    assert manifest["count"] == 103 and manifest["fingerprint"] == "fake-model/v1"
    assert manifest["truncated"] == sum(len(r["text"]) > 35 for r in rows) > 0  # the fake's cut-off


def test_ranks_take_parts_round_robin(tmp_path):
    inp = make_input(tmp_path / "in.jsonl", n=50)
    texts = [json.loads(line)["text"] for line in open(inp)]
    emb = FakeEmbedder()
    embed_corpus(inp, tmp_path / "out", emb, rank=1, world_size=2, finalize=False, **OPTS)
    # rank 1 of 2 owns parts 1 and 3: rows 10..19 and 30..39, and nothing else.
    assert sorted(emb.encoded()) == sorted(texts[10:20] + texts[30:40])


def test_batches_are_length_sorted_within_one_part(tmp_path):
    emb = FakeEmbedder()
    texts = ["a", "bbbbbb", "cc", "dddd", "ee", "f", "ggggg"]
    out, cut = embed_part(emb, texts, batch_size=3, prompt_name="document")
    assert cut == 0
    np.testing.assert_array_equal(out, np.stack([vec(t) for t in texts]))
    # longest first; equal lengths keep input order ("cc" before "ee", "a" before "f")
    assert emb.calls == [["bbbbbb", "ggggg", "dddd"], ["cc", "ee", "a"], ["f"]]


def test_resume_after_a_crash_recomputes_only_unfinished_parts(tmp_path):
    inp = make_input(tmp_path / "in.jsonl")
    run_world(inp, tmp_path / "clean", 2)
    out = tmp_path / "crashed"
    # Rank 1 of 2 owns parts 1,3,5,7,9; it dies in its 8th batch, the 2nd of part 5 (3 batches per part).
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(inp, out, FakeEmbedder(crash_after=7), rank=1, world_size=2, finalize=False, **OPTS)
    assert {p.name for p in out.glob("part-?????.json")} == {"part-00001.json", "part-00003.json"}
    assert not (out / "part-00005.npy").exists() and not (out / "manifest.json").exists()
    with pytest.raises(OutdirError, match="manifest.json: not found"):
        load_corpus_embeddings(out)
    # The rerun with 2 ranks computes parts 0,2,4,...,10 (rank 0) and 5,7,9 (rank 1): never 1 or 3.
    emb = run_world(inp, out, 2)
    texts = [json.loads(line)["text"] for line in open(inp)]
    redo = [t for k in (0, 2, 4, 5, 6, 7, 8, 9, 10) for t in texts[k * 10 : k * 10 + 10]]
    assert sorted(emb.encoded()) == sorted(redo)
    assert outputs(out) == outputs(tmp_path / "clean")
    # A third run finds everything done and encodes nothing.
    emb = run_world(inp, out, 1)
    assert emb.calls == [] and outputs(out) == outputs(tmp_path / "clean")


def test_half_written_or_damaged_parts_are_recomputed(tmp_path):
    inp = make_input(tmp_path / "in.jsonl", n=40)
    run_world(inp, tmp_path / "clean", 1)
    out = tmp_path / "out"
    run_world(inp, out, 1)
    (out / "manifest.json").unlink()
    damaged = bytearray((out / "part-00001.npy").read_bytes())
    damaged[-1] ^= 1  # flip one bit of the last float
    (out / "part-00001.npy").write_bytes(bytes(damaged))
    (out / "part-00002.json").unlink()  # killed between the data files and the commit record
    (out / "part-00003.npy.tmp-12345").write_bytes(b"half")
    emb = run_world(inp, out, 1)
    texts = [json.loads(line)["text"] for line in open(inp)]
    assert sorted(emb.encoded()) == sorted(texts[10:30])
    assert outputs(out) == outputs(tmp_path / "clean")  # includes: the .tmp file is gone


def test_rerun_with_another_model_or_part_size_is_refused(tmp_path):
    inp = make_input(tmp_path / "in.jsonl", n=20)
    run_world(inp, tmp_path / "out", 1)
    other = FakeEmbedder()
    other.fingerprint = "another-model/v2"
    with pytest.raises(OutdirError, match="fingerprint: OUTDIR has 'fake-model/v1', this run has 'another-model/v2'"):
        embed_corpus(inp, tmp_path / "out", other, **OPTS)
    with pytest.raises(OutdirError, match="part_size"):
        embed_corpus(inp, tmp_path / "out", FakeEmbedder(), **{**OPTS, "part_size": 7})
    assert other.calls == []


def test_ids_default_to_line_numbers_and_blank_lines_are_not_rows(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"body": "first"}\n\n{"key": 7, "body": "third line"}\n   \n{"body": "fifth"}\n')
    embed_corpus(inp, tmp_path / "out", FakeEmbedder(), id_field="key", text_field="body", **OPTS)
    ids, matrix = load_corpus_embeddings(tmp_path / "out")
    assert ids == [1, 7, 5]
    np.testing.assert_array_equal(matrix, np.stack([vec("first"), vec("third line"), vec("fifth")]))


def test_bad_line_names_its_number_or_is_skipped_and_reported(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "ok"}\n{"text": "also ok"}\n{"text": 3}\n{not json\n{"txt": "x"}\n{"text": "end"}\n')
    with pytest.raises(InputError, match=r"in.jsonl: line 3: 'text' is int, not str"):
        embed_corpus(inp, tmp_path / "strict", FakeEmbedder(), **OPTS)
    embed_corpus(inp, tmp_path / "out", FakeEmbedder(), skip_bad_lines=True, **OPTS)
    ids, _ = load_corpus_embeddings(tmp_path / "out")
    assert ids == [1, 2, 6]
    skipped = json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped_lines"]
    assert [s["line"] for s in skipped] == [3, 4, 5] and "no 'text' field" in skipped[2]["error"]


def test_reader_detects_a_changed_file_and_handles_an_empty_corpus(tmp_path):
    inp = make_input(tmp_path / "in.jsonl", n=12)
    run_world(inp, tmp_path / "out", 1)
    with open(tmp_path / "out" / "embeddings.npy", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    load_corpus_embeddings(tmp_path / "out", verify=False)  # the cheap open, for a folder one trusts
    with pytest.raises(OutdirError, match="sha256 differs"):
        load_corpus_embeddings(tmp_path / "out")  # verified by default
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    embed_corpus(empty, tmp_path / "e", FakeEmbedder(), **OPTS)
    ids, matrix = load_corpus_embeddings(tmp_path / "e", verify=True)
    assert ids == [] and matrix.shape == (0, DIM)


# ------------------------------------------------------------- red-team inputs: nothing lost, nothing silent


def test_a_damaged_final_file_is_rebuilt_on_rerun_not_reused(tmp_path):
    inp = make_input(tmp_path / "in.jsonl", n=30)
    out = tmp_path / "out"
    embed_corpus(inp, out, FakeEmbedder(), **OPTS)
    good = (out / "embeddings.npy").read_bytes()
    with open(out / "embeddings.npy", "r+b") as f:  # same size, one byte changed
        f.seek(-4, 2)
        f.write(b"\x00\x00\xc0\x7f")
    fake = FakeEmbedder()
    summary = embed_corpus(inp, out, fake, **OPTS)
    assert fake.calls == [] and summary["assembled"]  # nothing recomputed: the parts are intact; rebuilt from them
    assert (out / "embeddings.npy").read_bytes() == good
    ids, matrix = load_corpus_embeddings(out)  # verified by default
    assert len(ids) == 30


def test_a_damaged_json_file_in_outdir_is_rebuilt_or_named_never_a_bare_decode_error(tmp_path):
    inp = make_input(tmp_path / "in.jsonl", n=30)
    out = tmp_path / "out"
    embed_corpus(inp, out, FakeEmbedder(), **OPTS)
    good = (out / "manifest.json").read_bytes()
    (out / "manifest.json").write_text('{"format": "kvembed-corpus/1", "compl')  # cut short
    with pytest.raises(OutdirError, match=r"manifest.json: not valid JSON .*rerun the same `kvembed embed-corpus`"):
        load_corpus_embeddings(out)
    fake = FakeEmbedder()
    summary = embed_corpus(inp, out, fake, **OPTS)  # the rerun rebuilds it from the verified parts
    assert fake.calls == [] and summary["assembled"] and (out / "manifest.json").read_bytes() == good
    (out / "run.json").write_text("[1, 2]")  # run.json: refused, named, and left alone for the user to look at
    with pytest.raises(OutdirError, match=r"run.json: expected a JSON object, got list; .*delete"):
        embed_corpus(inp, out, FakeEmbedder(), **OPTS)
    assert (out / "run.json").read_text() == "[1, 2]"


def test_an_outdir_that_is_a_file_is_one_error(tmp_path):
    inp = make_input(tmp_path / "in.jsonl", n=5)
    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutdirError, match="is a file"):
        embed_corpus(inp, tmp_path / "out", FakeEmbedder(), **OPTS)


def test_duplicate_ids_warn_and_are_recorded_and_every_row_is_kept(tmp_path):
    inp = tmp_path / "in.jsonl"
    rows = [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}, {"id": "a", "text": "three"},
            {"id": 1, "text": "four"}, {"id": "1", "text": "five"}]  # 1 and "1" are different ids
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        embed_corpus(inp, tmp_path / "out", FakeEmbedder(), part_size=10, batch_size=4, log=f)
    assert "1 row(s) repeat an earlier id" in log.read_text()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["duplicate_ids"] == {"count": 1, "examples": [{"id": "a", "line": 3}]}
    ids, matrix = load_corpus_embeddings(tmp_path / "out")
    assert ids == ["a", "b", "a", 1, "1"] and np.array_equal(matrix[2], vec("three"))


def test_a_jsonl_with_a_bom_reads_as_without(tmp_path):
    rows = "".join(json.dumps({"id": f"r{i}", "text": f"text {i}"}) + "\n" for i in range(5)).encode()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + rows)
    (tmp_path / "plain.jsonl").write_bytes(rows)
    embed_corpus(tmp_path / "bom.jsonl", tmp_path / "a", FakeEmbedder(), **OPTS)
    embed_corpus(tmp_path / "plain.jsonl", tmp_path / "b", FakeEmbedder(), **OPTS)
    (ids_a, a), (ids_b, b) = load_corpus_embeddings(tmp_path / "a"), load_corpus_embeddings(tmp_path / "b")
    assert ids_a == ids_b == [f"r{i}" for i in range(5)] and np.array_equal(a, b)


def test_a_bom_on_a_blank_first_line_is_a_blank_line_for_both_readers(tmp_path):
    # Notepad's "UTF-8 with BOM" and an empty first line: `embed` skipped it, `embed-corpus` refused line 1
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf\r\n{"text": "a"}\r\n')
    index = scan_jsonl(path)
    assert index.line_numbers.tolist() == read_texts(path).lines == [2] and read_rows(index, 0, 1) == ([2], ["a"])

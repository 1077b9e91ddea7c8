"""Golden vectors for porters: every intermediate of KV-Embedding on a fixed input, number by number.

`kvembed golden OUT` writes OUT/golden.safetensors and OUT/golden.json (what each tensor is, its shape,
the model fingerprint and the method's switches). A port to JAX/MLX/C++ feeds `input_ids` and
`attention_mask` to its own code and compares, in this order:

    layer{l}.k, layer{l}.v        (B, Hkv, T, D) post-RoPE keys/values of every layer, *with* re-routing
    layer{l}.prefix_k/prefix_v    (B, Hkv, 1, D) the slot injected in each selected layer
    layer{l}.prefix_mask          (B, 1|Hq, T|1, 1) its additive logit (the bias, or the whole logit in unrotated mode)
    layer{l}.attn_out             (B, T, C) the first selected layer's attention output (after o_proj)
    layer{l}.hidden               (B, T, C) each layer's output
    hidden                        (B, T, C) after the final RMSNorm
    embedding                     (B, C) the pooled, normalised embedding

Only real tokens are part of the contract: positions after a row's last real token (right padding, see
`attention_mask`) hold whatever this implementation computed there and are never pooled, so a port may put
anything in them; `check_golden` compares real positions only.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .files import read_json
from .method import Prefix, ReRouting, collate, pool

GOLDEN_TEXTS = (
    "A man is playing a guitar.",
    "The new movie is awesome, and the soundtrack is even better!",
)


@dataclass
class RecordingReRouting(ReRouting):
    """ReRouting that keeps a copy of every prefix it injects."""

    record: dict = field(default_factory=dict)

    def prefix(self, layer, qkv) -> Prefix | None:
        p = super().prefix(layer, qkv)
        if p is not None:
            self.record[f"layer{layer}.prefix_k"] = p.k
            self.record[f"layer{layer}.prefix_v"] = p.v
            self.record[f"layer{layer}.prefix_mask"] = p.extra_logit()
        return p


def golden_tensors(embedder, texts) -> dict[str, torch.Tensor]:
    """Run KV-Embedding on `texts` and return every intermediate (fp32, CPU, contiguous)."""
    method = embedder.method
    if method.name != "kvembedding":
        raise ValueError(f"golden vectors are defined for kvembedding, not {method.name!r}")
    if method.passes != 1:
        raise ValueError("golden vectors are written for passes=1 (the default)")
    views = [method.prepare(embedder.tokenizer, t, None, embedder.max_seq_length)[0] for t in texts]
    batch = collate([v.ids for v in views], embedder.device)
    model = embedder.model
    plan = RecordingReRouting(frozenset(method.layers), method.bias, method.rope_mode, batch.last)
    out_t: dict[str, torch.Tensor] = {}
    hooks = []
    if method.layers:
        first = min(method.layers)
        # A forward hook only for this export: the method itself never patches modules.
        hooks.append(model.layers[first].self_attn.register_forward_hook(
            lambda mod, args, out: out_t.__setitem__(f"layer{first}.attn_out", out[0])))
    try:
        with torch.inference_mode():
            out = model(batch.input_ids, batch.attention_mask, intervention=plan if method.layers else None,
                        output_hidden_states=True, output_kv=True)
    finally:
        for h in hooks:
            h.remove()
    emb = pool(out.hidden, batch.attention_mask, method.pooling, method.normalize)
    t = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "hidden": out.hidden, "embedding": emb}
    for l, (k, v) in enumerate(out.kv):
        t[f"layer{l}.k"], t[f"layer{l}.v"] = k, v
        t[f"layer{l}.hidden"] = out.layer_outputs[l]
    t.update(plan.record | out_t)
    return {k: (v.float() if v.is_floating_point() else v).cpu().contiguous() for k, v in t.items()}


def write_golden(embedder, outdir, texts=GOLDEN_TEXTS) -> Path:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tensors = golden_tensors(embedder, texts)
    save_file(tensors, str(outdir / "golden.safetensors"))
    desc = {
        "texts": list(texts),
        "model_fingerprint": embedder.loaded.fingerprint,
        "model_path": str(embedder.loaded.path),
        "config": embedder.args.to_dict(),
        "method": embedder.method.config(),
        "max_length": embedder.max_seq_length,
        "dtype": str(embedder.dtype),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in tensors.items()},
        "notes": __doc__,
    }
    (outdir / "golden.json").write_text(json.dumps(desc, indent=1))
    return outdir


def check_golden(embedder, outdir) -> dict[str, float]:
    """Recompute and compare with a golden folder; returns {name: max error relative to the tensor's max}."""
    outdir = Path(outdir)
    restore = "restore it from the golden folder you were given"
    try:
        want = load_file(str(outdir / "golden.safetensors"))
    except SafetensorError as e:
        raise ValueError(f"{outdir / 'golden.safetensors'}: not a readable safetensors file ({e}); {restore}") from None
    texts = read_json(outdir / "golden.json", advice=restore).get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{outdir / 'golden.json'}: 'texts' is not a non-empty list of strings; {restore}")
    got = golden_tensors(embedder, texts)
    if set(got) != set(want):
        raise ValueError(f"golden tensors differ in names: missing {sorted(set(want) - set(got))[:5]}, "
                         f"extra {sorted(set(got) - set(want))[:5]}")
    errs = {}
    real = want["attention_mask"].bool()  # (B, T)
    for k, w in want.items():
        g = got[k]
        if g.shape != w.shape:
            raise ValueError(f"golden {k}: shape {tuple(g.shape)} != {tuple(w.shape)}")
        if not w.is_floating_point():
            errs[k] = float((g != w).any())
            continue
        g, w = g.double(), w.double()
        if w.dim() in (3, 4) and w.shape[-2] == real.shape[1]:
            # (B, T, C) or (B, H, T, D): real tokens only; prefix slots and embeddings are compared whole
            keep = (real[:, None, :, None] if w.dim() == 4 else real[:, :, None]).expand_as(w)
            g, w = g[keep], w[keep]
        errs[k] = ((g - w).abs().max() / w.abs().max().clamp_min(1e-12)).item()
    return errs

"""Our decoder against transformers on tiny random configs of all four families (LitGPT's test_against_hf_*).

The weights go straight from the transformers module's state dict into ours (no file loader in between),
so a failure here is a modelling difference, never a loading one.

Tolerances (tests/tolerance.py). fp32: both sides run the same math in a different order (SDPA vs eager
softmax, other matmul blocking), so they may drift apart by `decoder_drift` per layer, relative to the largest
magnitude compared (~1e-5 at the final layer here); a real bug (a missing bias, a wrong RoPE frequency or
mask) moves values by 1e-2 or more. bf16 is judged against the fp32 truth, with slack from bf16's unit
roundoff (see test_against_hf_bf16).
"""

from __future__ import annotations

import pytest
import torch

from kvembed.config import ModelArgs
from kvembed.model import Decoder
from tests import tiny
from tests.tolerance import assert_close, decoder_drift, drift, max_rel_err, norm_gain, unit_roundoff


def ours_from_hf(hf_model, dtype=torch.float32) -> Decoder:
    args = ModelArgs.from_hf_config(hf_model.config.to_dict())
    with torch.device("meta"):
        model = Decoder(args)
    sd = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(dtype).eval()


def padded_batch(T: int = 11, seed: int = 0):
    """Three rows, right-padded to T: full length, short, and length 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tiny.BASE["vocab_size"], (3, T), generator=g)
    lengths = torch.tensor([T, 6, 1])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("name", list(tiny.CONFIGS))
def test_against_hf_fp32(name):
    hf = tiny.hf_model(name)
    ours = ours_from_hf(hf)
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = hf.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=True)
        out = ours(ids, mask, output_hidden_states=True, output_kv=True)
    real = mask.bool()  # padded positions are garbage on both sides; compare real tokens only
    L, T = hf.config.num_hidden_layers, ids.shape[1]
    # transformers' hidden_states[l + 1] is layer l's output, except the last, which is after the final norm.
    for layer in range(L - 1):
        # SDPA vs eager softmax, other matmul blocking: reordered sums over C, I, Hq*D and T keys, per layer.
        tol = decoder_drift(ours.args, T, layers=layer + 1)
        assert_close(out.layer_outputs[layer][real], ref.hidden_states[layer + 1][real], tol, f"{name}: layer {layer}")
    # The same through all L layers, then the final RMSNorm's per-row rescale.
    tol = decoder_drift(ours.args, T, gain=norm_gain(out.layer_outputs[-1][real]))
    assert_close(out.hidden[real], ref.last_hidden_state[real], tol, f"{name}: final hidden")
    for layer in range(L):
        ck, cv = ref.cache.layers[layer].keys, ref.cache.layers[layer].values  # (B, Hkv, T', D)
        k, v = out.kv[layer]
        # A sliding-window cache keeps only the last T' of the T (padded) positions.
        T, Tk = ids.shape[1], ck.shape[2]
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            start = T - Tk  # position of the cache's first slot
            if n <= start:
                continue
            for ours_t, ref_t, what in ((k, ck, "K"), (v, cv, "V")):
                # Layer `layer`'s input (layer drifts) times W_k or W_v: one more sum over C.
                tol = decoder_drift(ours.args, T, layers=layer + 1)
                assert_close(ours_t[b, :, start:n], ref_t[b, :, : n - start], tol, f"{name}: L{layer} {what} row {b}")


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral_window", "qwen2"])
def test_against_hf_bf16(name):
    """bf16 is judged against the fp32 truth: ours may not be worse than transformers' own bf16 run."""
    hf = tiny.hf_model(name)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        truth = ours_from_hf(hf)(ids, mask).hidden[real]
        hf = hf.to(torch.bfloat16)
        ref = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state[real]
        out = ours_from_hf(hf, torch.bfloat16)(ids, mask).hidden[real]
    assert out.dtype == torch.bfloat16
    ours_err, hf_err = max_rel_err(out, truth), max_rel_err(ref, truth)
    # Each side's bf16 error (~8-12u from the truth, u = 2^-8) is a walk of roundings to bf16. Where the two
    # store a tensor differently (SDPA keeps its softmax in fp32, eager attention rounds it), ours may take one
    # rounding per layer more: L*u of slack (1.6e-2; measured: ours -3.4u to +1u from transformers' error).
    u, L = unit_roundoff(torch.bfloat16), hf.config.num_hidden_layers
    assert ours_err <= hf_err + L * u, f"{name}: bf16 error {ours_err:.2e} vs transformers' own {hf_err:.2e}"
    # The residual stream takes 2L rounded updates (attention, MLP), rounded independently on the two sides:
    # they part like a sum of 2L bf16 roundings, drift(bf16, terms=2L) = 17u = 6.6e-2 (measured 6-7.5u).
    assert_close(out, ref, drift(torch.bfloat16, terms=2 * L), f"{name}: bf16 ours vs transformers")


def test_sliding_window_is_shorter_than_input():
    """The Mistral case must actually exercise the window, or its parity above proves nothing."""
    args = ModelArgs.from_hf_config(tiny.hf_config("mistral_window").to_dict())
    ids, _ = padded_batch()
    assert args.sliding_window is not None and args.sliding_window < ids.shape[1]
    assert set(args.layer_types) == {"sliding_attention"}


def test_qwen3_head_dim_is_read_not_derived():
    args = ModelArgs.from_hf_config(tiny.hf_config("qwen3").to_dict())
    assert args.head_dim * args.num_attention_heads != args.hidden_size
    assert args.head_dim == 24


def test_mlp_in_row_blocks_equals_the_whole(monkeypatch):
    """Past MLP_CHUNK tokens the MLP runs on row blocks (bounded memory): every row is independent, so the blocks
    change only how the GEMMs are tiled."""
    from kvembed import model as model_module

    ours = ours_from_hf(tiny.hf_model("llama"))
    ids, mask = padded_batch()
    with torch.no_grad():
        whole = ours(ids, mask, output_hidden_states=True)
        monkeypatch.setattr(model_module, "MLP_CHUNK", 4)  # 3 rows of 11 tokens: blocks cut across rows too
        blocks = ours(ids, mask, output_hidden_states=True)
    tol = decoder_drift(ours.args, ids.shape[1])
    for layer, (a, b) in enumerate(zip(blocks.layer_outputs, whole.layer_outputs)):
        assert_close(a, b, tol, f"layer {layer}, MLP in blocks of 4 tokens")

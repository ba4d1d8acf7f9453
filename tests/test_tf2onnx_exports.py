"""Models converted from TensorFlow/Keras with tf2onnx, an exporter whose graphs differ from torch's.

Committed fixtures (``models/tf2onnx/``, made with ``models/_tf2onnx.py --fixture`` under TensorFlow
2.15 / transformers 4.57 / tf2onnx 1.17, each checked against TensorFlow; opset 15, tf2onnx's
default): TFBertModel, TFElectraModel, TFGPT2LMHeadModel and TFOPTForCausalLM (no cache; 2 layers, 4
heads of 16).
What they exercise: opset 15 raised to 17 by normalize; reshape targets assembled in int32 and cast to
int64 (head pruning retargets their pieces); GPT-2's causal mask as arithmetic (``w*b - 1e4*(1-b)``,
read as a Where); OPT's causal mask built in an ``If`` branch by tf2onnx's ``band_part`` lowering
(CumSum row/column numbers: read as causal, so token pruning gathers it instead of replacing it with
a padding-only mask); Keras' ``stable_softmax`` (+1e-9 on the scores); ELECTRA's embedding projection,
whose ``[B*S, D]`` output tf2onnx feeds to Q/K/V without the Reshape pair (the layer input and Q's
rows are the same tokens). The checks are the coverage
harness's (``bench/coverage.py``): token pruning at keep 1.0 and with every token selected after
layer 0, head pruning at keep 1.0 and one head group sliced out of the weights, all within 1e-5 of
the input model in onnxruntime; K/V quantization and the default preset run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from bench.coverage import heads, kv, preset, tokens
from spatten_compiler import inspect
from spatten_compiler.errors import OptionError

TF2ONNX = Path(__file__).resolve().parent.parent / "models" / "tf2onnx"
NAMES = ["bert_tf2onnx", "electra_tf2onnx", "gpt2_tf2onnx", "opt_tf2onnx"]
MASKS = {"bert_tf2onnx": "padding", "electra_tf2onnx": "padding", "gpt2_tf2onnx": "causal+padding",
         "opt_tf2onnx": "causal+padding"}


def _feeds(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(TF2ONNX / f"{name}.npz"))


@pytest.mark.parametrize("name", NAMES)
def test_discovery(name: str) -> None:
    path = TF2ONNX / f"{name}.onnx"
    assert onnx.load(str(path), load_external_data=False).opset_import[0].version == 15
    sites = inspect(str(path))
    assert [(s.num_heads, s.num_kv_heads, s.head_dim, s.mask_kind) for s in sites] == [(4, 4, 16, MASKS[name])] * 2


@pytest.mark.parametrize("name", NAMES)
def test_token_pruning_exact(name: str, tmp_path: Path) -> None:
    ok, why = tokens(TF2ONNX / f"{name}.onnx", _feeds(name), tmp_path, {"num_layers": 2, "kv_cache": False})
    assert ok, why


@pytest.mark.parametrize("name", NAMES)
def test_head_pruning_exact(name: str, tmp_path: Path) -> None:
    ok, why = heads(TF2ONNX / f"{name}.onnx", _feeds(name), tmp_path)
    assert ok, why


@pytest.mark.parametrize("name", NAMES)
def test_kv_quantization_and_preset_run(name: str, tmp_path: Path) -> None:
    ok, why = kv(TF2ONNX / f"{name}.onnx", _feeds(name), tmp_path)
    assert ok, why
    ok, why = preset(TF2ONNX / f"{name}.onnx", _feeds(name), tmp_path, {"num_layers": 2, "kv_cache": False})
    assert ok, why


def test_whisper_encoder_fixed_frames(tmp_path: Path) -> None:
    """TF Whisper's encoder (heads folded into the batch: 3-D bmm scores with no view before the Softmax,
    read as folded) unfolds its context with the frames' fixed count written into the target: token
    pruning refuses in one line; head pruning is exact and K/V quantization runs."""
    path, feeds = TF2ONNX / "whisper_tf2onnx.onnx", _feeds("whisper_tf2onnx")
    sites = inspect(str(path))
    assert [(s.num_heads, s.head_dim, s.variant.get("layout")) for s in sites] == [(2, 32, "folded")] * 2
    with pytest.raises(OptionError, match="unfolds heads from the batch with the export's fixed 16 tokens"):
        tokens(path, feeds, tmp_path, {"num_layers": 2, "kv_cache": False})
    for check in (heads, kv):
        ok, why = check(path, feeds, tmp_path)
        assert ok, why


@pytest.mark.parametrize("name", ["opt_tf2onnx", "whisper_tf2onnx"])
def test_paper_rule_keeps_the_heads_p_at_v_ranks_first(name: str, tmp_path: Path) -> None:
    """tf2onnx folds the heads into the batch for both bmm's (3-D probabilities and P @ V): the paper rule
    (run time, keep 0.5) reads them unfolded to ``[B, H, ., .]`` (refused before: "run-time head scores need
    [B, H, S, S] probabilities"). Layer 1 keeps the heads with the largest |P @ V| of layer 0 over the real
    query rows, so the output is the input model's with layer 1's other heads' output rows zeroed."""
    from spatten_compiler.passes.find_attention import find_attention
    from spatten_compiler.passes.score_chain import static_rank

    from bench.coverage import _compile, _read, _run, _tolerance, _zero_rows
    from spatten_compiler.pipeline import make_pass

    path, feeds = TF2ONNX / f"{name}.onnx", _feeds(name)
    model = _read(path)
    sites = find_attention(model).sites
    assert all(static_rank(s.probs) == 3 and static_rank(s.pv.outputs[0]) == 3 for s in sites)
    heads_, dh = sites[0].num_heads, sites[0].v_head_dim
    ctx_v, probs_v = sites[0].pv.outputs[0], sites[0].probs
    model.graph.outputs.extend([ctx_v, probs_v])
    probe = tmp_path / "probe.onnx"
    ir.save(model, str(probe))
    got0 = _run(probe, feeds)
    ctx = got0[ctx_v.name].reshape(-1, heads_, *got0[ctx_v.name].shape[1:])
    probs = got0[probs_v.name].reshape(-1, heads_, *got0[probs_v.name].shape[1:])
    valid = (probs[:, :, -1, :].sum(axis=1) > 0)[:, : ctx.shape[2]]  # the keys the last query row sees
    score = (np.abs(ctx).sum(axis=-1) * valid[:, None, :]).sum(axis=(0, 2))
    kept = set(np.argsort(-score)[: heads_ // 2].tolist())
    zeroed = _read(path)
    last = find_attention(zeroed).sites[-1]
    pruned = sorted(set(range(heads_)) - kept)
    _zero_rows(zeroed, last.out_proj, np.concatenate([np.arange(h * dh, (h + 1) * dh) for h in pruned]))
    base = tmp_path / "zeroed.onnx"
    ir.save(zeroed, str(base))
    want = _run(base, feeds)
    out = tmp_path / "half.onnx"
    _compile(path, [make_pass("prune-heads", keep=0.5)], out)
    got = _run(out, feeds)
    for key, w in want.items():
        np.testing.assert_allclose(got[key], w, atol=_tolerance(want), rtol=0, err_msg=key)

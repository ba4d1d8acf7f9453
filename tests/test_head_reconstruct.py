"""prune-heads' ``reconstruct``: each pruned layer's output projection is refitted (ridge least squares
on the calibration contexts) so its kept heads stand in for the pruned ones; nothing else changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, load_meta, reference_io, run_ort
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.head_calibration import reconstruct_output
from spatten_compiler.passes.prune_heads import PruneHeads
from spatten_compiler.runtime.reference import ReferenceRuntime
from test_prune_heads import compile_ir, save, with_taps

from spatten_compiler.errors import OptionError


def oracle_rows(x: np.ndarray, w: np.ndarray, kept: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge regression of the missing output ``x_P W_P`` on the kept contexts, by lstsq on the
    augmented system (independent of the normal equations the pass solves)."""
    pruned = np.setdiff1d(np.arange(x.shape[1]), kept)
    xk = x[:, kept] / np.sqrt(len(x))
    lam = ridge * (xk ** 2).sum() / len(kept)
    a = np.vstack([xk, np.sqrt(lam) * np.eye(len(kept))])
    b = np.vstack([x[:, pruned] @ w[pruned] / np.sqrt(len(x)), np.zeros((len(kept), w.shape[1]))])
    return w[kept] + np.linalg.lstsq(a, b, rcond=None)[0]


def test_reconstruct_output_math() -> None:
    rng = np.random.default_rng(0)
    xk = rng.normal(size=(500, 6))
    x = np.hstack([xk, xk @ rng.normal(size=(6, 2))])  # the pruned columns are linear in the kept ones
    w, kept = rng.normal(size=(8, 5)), np.arange(6)
    stats = (x.T @ x, len(x))
    np.testing.assert_allclose(x[:, kept] @ reconstruct_output(w, stats, kept, 1e-12), x @ w, atol=1e-6)
    np.testing.assert_allclose(reconstruct_output(w, stats, kept, 1e9), w[kept], atol=1e-6)  # ridge -> plain slice
    noisy = x + rng.normal(size=x.shape)
    for ridge in (0.01, 0.3, 3.0):  # on the fitted data the refit is never worse than the plain slice
        rows = reconstruct_output(w, (noisy.T @ noisy, len(noisy)), kept, ridge)
        np.testing.assert_allclose(rows, oracle_rows(noisy, w, kept, ridge), atol=1e-8)
        assert np.linalg.norm(noisy[:, kept] @ rows - noisy @ w) < np.linalg.norm(noisy[:, kept] @ w[kept] - noisy @ w)


# MHA encoder with biases; packed QKV (Gemm/Split); GQA decoder with KV cache and no output bias
@pytest.mark.parametrize("name", ["bert_torchscript", "gpt2_torchscript", "llama_dynamo"])
def test_reconstructed_heads_on_fixtures(name: str, tmp_path: Path) -> None:
    proto = onnx.load(MODELS / f"{name}.onnx")
    f, _ = reference_io(load_meta(name))
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{k: np.concatenate([v] * 3) for k, v in f.items()})
    opts = dict(schedule=(1.0, 0.5), rule="calibrated", calibration=str(calib))
    plain = compile_ir(proto, PruneHeads(**opts))
    refit = compile_ir(proto, PruneHeads(**opts, reconstruct=True))
    assert refit.metadata_props["spatten.heads_kept"] == plain.metadata_props["spatten.heads_kept"]
    kept = eval(refit.metadata_props["spatten.heads_kept"])  # noqa: S307 - our own metadata, a list literal
    # Same graph, same shapes; only the output projections of pruned layers have other values.
    plain_w = {n.name: n.const_value.numpy() for n in plain.graph.initializers.values()}
    refit_sites, dense = find_attention(refit).sites, compile_ir(proto)
    dense_sites = find_attention(dense).sites
    groups = dense_sites[0].num_kv_heads
    outs = {s.out_proj.weight.name for s, k in zip(refit_sites, kept) if len(k) < groups}
    assert len(outs) == len(refit_sites) - 1
    for v in refit.graph.initializers.values():
        if v.name not in outs:
            np.testing.assert_array_equal(v.const_value.numpy(), plain_w[v.name], err_msg=v.name)
    # Oracle: the refitted rows are the ridge regression of the pruned heads' output on the kept
    # heads' contexts, from E = MatMul(P, V) of the dense model on the calibration inputs.
    tapped, taps = with_taps(dense)
    got = run_ort(save(tapped, tmp_path, "dense.onnx"), f)
    valid = f["attention_mask"].astype(bool)
    for i, (site, k) in enumerate(zip(dense_sites, kept)):
        if len(k) == groups:
            continue
        e = got[taps[i]["e"]].astype(np.float64)
        b, h, s, dh = e.shape
        x = e.transpose(0, 2, 1, 3).reshape(b * s, h * dh)[valid[:, -s:].reshape(-1)]
        g = site.num_heads // site.num_kv_heads
        cols = ((np.array(k)[:, None] * g + np.arange(g)).reshape(-1)[:, None] * dh + np.arange(dh)).reshape(-1)
        w = site.out_proj.weight.const_value.numpy().astype(np.float64)
        w = w.T if site.out_proj.transposed_weight else w
        want = oracle_rows(x, w, cols, PruneHeads.ridge)
        new = refit_sites[i].out_proj.weight.const_value.numpy()
        np.testing.assert_allclose(new.T if site.out_proj.transposed_weight else new, want, atol=1e-4, rtol=1e-4)
        # On the calibration contexts the layer's attention output is closer to the dense one.
        assert np.linalg.norm(x[:, cols] @ want - x @ w) < np.linalg.norm(x[:, cols] @ w[cols] - x @ w)
    path = save(onnx.ModelProto.FromString(_serialized(refit)), tmp_path, "refit.onnx")
    ort_out, ref_out = run_ort(path, f), ReferenceRuntime(path).run(f).outputs
    for key, value in ort_out.items():
        np.testing.assert_allclose(value, ref_out[key], atol=1e-4, rtol=0)


def _serialized(model) -> bytes:
    import onnx_ir as ir

    return ir.serde.serialize_model(model).SerializeToString()


def test_reconstruct_needs_calibration() -> None:
    model = compile_ir(onnx.load(MODELS / "bert_torchscript.onnx"))
    with pytest.raises(OptionError, match="calibrated rule and a calibration file"):
        PruneHeads(keep=0.5, reconstruct=True)(model)
    with pytest.raises(OptionError, match="ridge must be >= 0"):
        PruneHeads(keep=0.5, rule="calibrated", calibration="c.npz", reconstruct=True, ridge=-1)(model)


def test_cli_reconstruct_without_calibration_one_line_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    r = subprocess.run([sys.executable, "-m", "spatten_compiler", str(MODELS / "bert_torchscript.onnx"), "-o", str(out),
                        "--head-keep", "0.5", "--head-reconstruct"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--head-reconstruct needs --head-calibration" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_cli_reconstruct(tmp_path: Path) -> None:
    f, _ = reference_io(load_meta("bert_torchscript"))
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{k: np.concatenate([v] * 3) for k, v in f.items()})
    out = tmp_path / "out.onnx"
    r = subprocess.run([sys.executable, "-m", "spatten_compiler", str(MODELS / "bert_torchscript.onnx"), "-o", str(out),
                        "--head-keep-schedule", "1,0.5", "--head-calibration", str(calib), "--head-reconstruct"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "output projections of layers [1, 2, 3] refitted" in r.stdout + r.stderr
    want = compile_ir(onnx.load(MODELS / "bert_torchscript.onnx"),
                      PruneHeads(schedule=(1.0, 0.5), rule="calibrated", calibration=str(calib), reconstruct=True))
    ref = run_ort(save(onnx.ModelProto.FromString(_serialized(want)), tmp_path, "api.onnx"), f)
    for key, value in run_ort(out, f).items():
        np.testing.assert_allclose(value, ref[key], atol=1e-6, rtol=0)

"""Multi-head latent attention (DeepSeek-V2/V3, Kimi): the key is a last-axis concatenation of a per-head
part and a RoPE part shared by all heads. Hand-built slice writes (``k[..., :d] = a; k[..., d:] = b`` as
TorchScript and dynamo write them) -> Concat, with reasons for non-matches; the committed DeepSeek-V3
fixtures (``models/mla/``, models/_mla.py): discovery, head pruning (kv_b_proj / q_b_proj columns and
o_proj rows sliced, the shared k_pe kept whole, v_head_dim 12 != head size 16), token pruning, exact at
keep 1.0 against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from spatten_compiler.passes.attention_trace import _assembly_pieces
from spatten_compiler.passes.find_attention import find_attention
from spatten_compiler.passes.normalize import Normalize
from spatten_compiler.passes.slice_assign import assembled, slice_writes_to_concat, split_merged_swaps

from spatten_compiler.editor import GraphEditor
from spatten_compiler.match import NoMatch, const_array
from spatten_compiler.modelio import load_model
from spatten_compiler.shapes import infer_shapes

MLA = Path(__file__).resolve().parents[1] / "models" / "mla"
FIXTURES = ["deepseek_v3_torchscript", "deepseek_v3_dynamo"]
REC = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "head_dim": 16, "kv_cache": False}
B, H, S, D = 2, 4, 3, 16


def _const(name: str, a: np.ndarray) -> onnx.NodeProto:
    tensor = helper.make_tensor(name, TensorProto.INT64, a.shape, a.ravel())
    return helper.make_node("Constant", [], [name], value=tensor)


def _slice_scatter(spans: list[tuple[int, int]], last_perm: list[int] | None = None) -> onnx.ModelProto:
    """dynamo's ``k = new_empty(B, H, S, D); k[..., lo:hi] = piece`` per span: Transpose (last axis first),
    ScatterND of rows lo..hi-1, Transpose back (the last one ``last_perm`` when given: onnxscript's optimizer
    merges it with the next Transpose)."""
    perm = [3, 1, 2, 0]
    nodes = [_const("shape", np.array([B, H, S, D])),
             helper.make_node("ConstantOfShape", ["shape"], ["empty"],
                              value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))]
    data, inputs = "empty", []
    for i, (lo, hi) in enumerate(spans):
        inputs.append(helper.make_tensor_value_info(f"p{i}", TensorProto.FLOAT, [B, H, S, hi - lo]))
        nodes += [_const(f"idx{i}", np.arange(lo, hi).reshape(-1, 1)),
                  helper.make_node("Transpose", [data], [f"td{i}"], perm=perm),
                  helper.make_node("Transpose", [f"p{i}"], [f"tp{i}"], perm=perm),
                  helper.make_node("ScatterND", [f"td{i}", f"idx{i}", f"tp{i}"], [f"s{i}"]),
                  helper.make_node("Transpose", [f"s{i}"], [f"w{i}"],
                                   perm=last_perm if last_perm and i == len(spans) - 1 else perm)]
        data = f"w{i}"
    nodes.append(helper.make_node("Identity", [data], ["k"]))
    dims = [[D, H, S, B][i] for i in last_perm] if last_perm else [B, H, S, D]
    graph = helper.make_graph(nodes, "slice_writes", inputs, [helper.make_tensor_value_info("k", TensorProto.FLOAT,
                                                                                            dims)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize(("spans", "last_perm"), [([(8, 16), (0, 8)], None), ([(0, 8), (8, 16)], [3, 1, 0, 2])])
def test_slice_writes_become_concat(spans: list[tuple[int, int]], last_perm: list[int] | None) -> None:
    """Writes tiling the last axis (either order) -> one Concat of the pieces; onnxruntime agrees. Also when
    torch's default export (optimize=True) merged the last write's closing swap with the key's k^T (perm
    [3, 1, 0, 2]): split back first, the Concat then the k^T Transpose."""
    proto = _slice_scatter(spans, last_perm)
    rng = np.random.default_rng(0)
    feeds = {"p0": rng.standard_normal((B, H, S, 8)).astype(np.float32),
             "p1": rng.standard_normal((B, H, S, 8)).astype(np.float32)}
    model = ir.serde.deserialize_model(proto)
    infer_shapes(model)
    assert split_merged_swaps(model, GraphEditor(model, "t")) == (last_perm is not None)
    assert slice_writes_to_concat(model) == 1
    Normalize()(model)
    ops = [n.op_type for n in model.graph]
    assert "ScatterND" not in ops and ops.count("Concat") == 1
    np.testing.assert_array_equal(_run(ir.serde.serialize_model(model), feeds), _run(proto, feeds))


def test_partial_writes_keep_their_scatters() -> None:
    """A gap in the last axis: the empty tensor's zeros are part of the result; not a Concat, and why."""
    model = ir.serde.deserialize_model(_slice_scatter([(0, 8), (8, 12)]))
    infer_shapes(model)
    out = next(n for n in reversed(list(model.graph)) if n.op_type == "Transpose").outputs[0]
    why = assembled(out)
    assert isinstance(why, NoMatch) and "do not tile the last axis [0, 16)" in why.reason
    assert slice_writes_to_concat(model) == 0


def test_concat_of_two_per_head_pieces_is_no_assembly() -> None:
    """No piece broadcast from one head: not a key assembly (the reason names the pieces)."""
    a = ir.Value(name="a", shape=ir.Shape([B, H, S, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    b = ir.Value(name="b", shape=ir.Shape([B, H, S, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Concat", [a, b], attributes=[ir.AttrInt64("axis", -1)])
    node.outputs[0].shape = ir.Shape([B, H, S, D])
    why = _assembly_pieces(node)
    assert isinstance(why, NoMatch) and "pieces: per_head, per_head" in why.reason


@pytest.mark.parametrize("name", FIXTURES)
def test_discovered(name: str) -> None:
    """Two sites of 4 heads, head size 16 (8 per-head + 8 shared RoPE), V's head 12; K from kv_b_proj."""
    model = load_model(MLA / f"{name}.onnx")
    Normalize()(model)
    report = find_attention(model)
    assert len(report.sites) == 2, report.rejected
    for s in report.sites:
        assert (s.num_heads, s.num_kv_heads, s.head_dim, s.v_head_dim) == (4, 4, 16, 12)
        assert s.k.assembly is not None and len(s.k.assembly.shared) == 1 and s.q.assembly is None
        assert s.k.projection.node is s.v.projection.node  # kv_b_proj: [k_nope | v] per head
        assert const_array(s.k.projection.weight).size == 16 * 4 * (8 + 12)
        assert s.own_keys  # Q and K/V read per-token down-projections of one hidden state


@pytest.mark.parametrize("name", FIXTURES)
def test_heads_exact(name: str, tmp_path: Path) -> None:
    """keep 1.0 exact; the last layer without head 0 == its output-projection rows (12 each) zeroed."""
    from bench.coverage import heads

    ok, why = heads(MLA / f"{name}.onnx", dict(np.load(MLA / f"{name}.npz")), tmp_path)
    assert ok, why


def test_heads_narrow_weights(tmp_path: Path) -> None:
    """Head 0 of the last layer removed: kv_b_proj 80 -> 60 columns, q_b_proj 64 -> 48, o_proj 48 -> 36 rows;
    kv_a_proj_with_mqa (the shared k_pe and the latent) keeps its 24 columns."""
    from bench.coverage import _compile
    from spatten_compiler.pipeline import make_pass

    out = tmp_path / "h.onnx"
    _compile(MLA / "deepseek_v3_dynamo.onnx", [make_pass("prune-heads", rule="calibrated", heads=((), (1, 2, 3)))],
             out)
    model = load_model(out)
    Normalize()(model)
    s = find_attention(model).sites[-1]
    width = lambda p: p.weight.shape[0 if p.transposed_weight else 1]  # noqa: E731
    assert (width(s.k.projection), width(s.q.projection)) == (60, 48)
    assert s.out_proj.weight.shape[1 if s.out_proj.transposed_weight else 0] == 36
    shared = s.k.assembly.shared[0]
    assert shared.shape is not None and shared.shape.dims[-1] == 8


@pytest.mark.parametrize("name", FIXTURES)
def test_tokens_exact(name: str, tmp_path: Path) -> None:
    """prune-tokens keep 1.0, and every token selected after layer 0: onnxruntime gives the input model's."""
    from bench.coverage import tokens

    ok, why = tokens(MLA / f"{name}.onnx", dict(np.load(MLA / f"{name}.npz")), tmp_path, REC)
    assert ok, why


KV_FIXTURE = MLA / "deepseek_v3_torchscript_kv.onnx"
PROMPTS = [[5, 17, 33, 2, 9, 11, 40, 7, 21], [8, 3, 50, 42]]


def _evicted(tmp: Path, **options: object) -> Path:
    from spatten_compiler.pipeline import Pipeline, make_pass

    model = ir.load(str(KV_FIXTURE))
    Pipeline([make_pass("normalize"), make_pass("decompose-attention"), make_pass("evict-kv", **options)])(model)
    out = tmp / f"mla-{'-'.join(f'{k}{v}' for k, v in sorted(options.items()))}.onnx"
    ir.save(model, str(out))
    return out


def test_latent_caches_found() -> None:
    """transformers 5 caches the compressed latent before kv_b_proj (``.key``) and the RoPE'd k_pe shared by
    every head (``.value``): no K/V cache at the core, both recorded as the layer's latent caches; the model
    is a decoder (its preset evicts) and ``inspect`` says ``latent``."""
    from spatten_compiler.commands.inspect import inspect_model, render_table, site_costs
    from spatten_compiler.defaults import model_kind

    model = load_model(KV_FIXTURE)
    Normalize()(model)
    sites = find_attention(model).sites
    assert not any(s.kv_cache for s in sites)
    assert [[c.past.name for c in s.caches] for s in sites] == [
        [f"past_key_values.{i}.key", f"past_key_values.{i}.value"] for i in range(2)]
    assert [[c.present.name for c in s.caches] for s in sites] == [
        [f"present.{i}.key", f"present.{i}.value"] for i in range(2)]
    assert [s.latent_past.name for s in sites] == ["past_key_values.0.key", "past_key_values.1.key"]
    assert model_kind(sites) == "decoder"
    assert sites[0].to_dict()["latent_cache"][0] == {"past": "past_key_values.0.key", "present": "present.0.key",
                                                     "axis": -2}
    report = inspect_model(KV_FIXTURE)
    assert all(" latent " in line for line in render_table(report).splitlines()[1:])
    # bytes cached per token: the latent (16) and k_pe (8) widths, not K/V's 2 x 4 heads x 16
    assert [site_costs(s)["kv_bytes_per_token"] for s in report.sites] == [(16 + 8) * 4] * 2


@pytest.mark.parametrize("mode", ["layer", "head", "cascade"])
def test_latent_cache_eviction_full_budget_equals_dense(mode: str, tmp_path: Path) -> None:
    """evict-kv gathers the kept rows of the latent caches: at budget 1.0 every step equals the dense model."""
    from spatten_compiler.decoding import DecoderSession
    from test_evict_kv import _run

    path = _evicted(tmp_path, budget=1.0, sinks=2, recent=2, mode=mode)
    errs = _run(DecoderSession(KV_FIXTURE), DecoderSession(path), steps=10, prompts=PROMPTS)
    assert max(errs) <= 1e-4, errs


@pytest.mark.parametrize("mode", ["head", "cascade"])
def test_latent_cache_eviction_keeps_the_rule(mode: str, tmp_path: Path) -> None:
    """Evicting: onnxruntime equals the reference runtime step by step, each layer's latent caches hold the
    budget, and the kept tokens are the rule's (a NumPy computation from the layer's probabilities; one
    latent shared by every head: per-KV-head eviction is the layer's own decision)."""
    import onnx as onnx_
    from spatten_compiler.decoding import left_pad
    from spatten_compiler.passes.evict_kv import budget_tokens
    from test_evict_kv import numpy_rule, spied_session, step_ort_and_reference

    path = _evicted(tmp_path, budget=0.3, sinks=2, recent=2, mode=mode)
    session = step_ort_and_reference(path, 8, PROMPTS)
    assert session.cache_lengths() == [budget_tokens(0.3, 9 + 8, 2, 2, 10**9)] * 2
    lengths = {o.name: o.type.tensor_type.shape for o in onnx_.load(str(path)).graph.output}
    assert {k for k in lengths if k.startswith("present.")} == {f"present.{i}.{t}" for i in range(2)
                                                                  for t in ("key", "value")}
    proto = onnx_.load(str(path))
    softmax = [n.output[0] for n in proto.graph.node if n.op_type == "Softmax"]
    proto.graph.output.extend(onnx_.helper.make_tensor_value_info(x, onnx_.TensorProto.FLOAT, None) for x in softmax)
    onnx_.save(proto, str(path))
    s, probs, captured = spied_session(path)
    ids, valid_q = left_pad(PROMPTS)
    s.reset(2)
    tok = ids
    for _ in range(6):
        logits = s.step(tok, valid_q)
        above = None
        for layer in range(2):
            got = captured[f"out:present_positions.{layer}"]
            want, _ = numpy_rule(captured[f"out:{probs[layer]}"], captured[f"past_importance.{layer}"].reshape(2, -1),
                                 captured[f"past_positions.{layer}"].reshape(2, -1), captured["position_ids"],
                                 valid_q.astype(np.float32), 0.3, 2, 2, above)
            np.testing.assert_array_equal(got.reshape(2, -1), want)
            above = got.reshape(2, -1) if mode == "cascade" else None
        tok = logits[:, -1].argmax(-1)[:, None]
        valid_q = np.ones_like(tok)


def test_latent_cache_eviction_with_packed_planes(tmp_path: Path) -> None:
    """The CLI: eviction and the latent caches stored as 4+4-bit planes compose; onnxruntime equals the
    reference runtime while evicting."""
    import subprocess
    import sys

    from test_evict_kv import step_ort_and_reference

    out = tmp_path / "kv4.onnx"
    r = subprocess.run([sys.executable, "-m", "spatten_compiler", str(KV_FIXTURE), "-o", str(out), "--kv-budget",
                        "0.4", "--kv-min-keep", "0", "--kv-sinks", "1", "--kv-bits", "4+4"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    outputs = {o.name for o in onnx.load(str(out)).graph.output}
    assert {"present.0.key.msb", "present.0.key.lsb", "present.0.value.scale"} <= outputs
    assert step_ort_and_reference(out, 8, PROMPTS).cache_lengths() == [7, 7]


def test_latent_cache_prompt_pruning_refused(tmp_path: Path) -> None:
    """Prompt token pruning of a latent cache is not written: refused in one line naming the latent past;
    head pruning stays exact on it."""
    from bench.coverage import _compile, heads
    from spatten_compiler.errors import OptionError
    from spatten_compiler.pipeline import make_pass

    with pytest.raises(OptionError, match="past_key_values.0.key"):
        _compile(KV_FIXTURE, [make_pass("prune-tokens", keep=0.5)], tmp_path / "x.onnx")
    ok, why = heads(KV_FIXTURE, dict(np.load(KV_FIXTURE.with_suffix(".npz"))), tmp_path)
    assert ok, why


def test_reordered_write_is_no_slice() -> None:
    """An index that permutes the written positions is not ``k[..., lo:hi] = piece``: no Concat, and why."""
    proto = _slice_scatter([(0, 8), (8, 16)])
    idx = next(n for n in proto.graph.node if n.output[0] == "idx1")
    idx.attribute[0].t.CopyFrom(helper.make_tensor("idx1", TensorProto.INT64, [8, 1], list(range(15, 7, -1))))
    model = ir.serde.deserialize_model(proto)
    infer_shapes(model)
    assert slice_writes_to_concat(model) == 0
    out = next(n for n in reversed(list(model.graph)) if n.op_type == "Transpose").outputs[0]
    why = assembled(out)
    assert isinstance(why, NoMatch) and "not a constant range of rows" in why.reason

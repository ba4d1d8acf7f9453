"""evict-kv on sliding-window caches (Mistral, Gemma 2/3): the Llama fixture given transformers' sliding
window - the mask ``kv <= q and kv > q - W`` and (``sliced``) the present cache sliced to its last
``W - 1`` slots, the past sliced the same way before the concat - with W = 4 < the 9-token prompt, so
the window hides keys at every step. At budget 1.0 evict-kv equals the dense windowed model over
generation steps and keeps at most W - 1 slots per layer (layer and per-KV-head eviction); evicting,
onnxruntime == the reference runtime; a sliced cache the mask does not explain is refused in one line;
GPT-Neo's mask form - a causal ``Where`` over a constant band (``tril``, or ``tril`` minus ``tril(-W)``:
a local window) before the additive mask - is bypassed and rebuilt from positions (the same tests on
the fixture in that form); BLOOM's ALiBi over the mask's positions is recomputed at the kept slots'
original positions (the fixture given it: budget 1.0 == dense; evicting, the term == slope_h * the
kept positions); MPT's form - ``Where(mask, MIN, scores + table[..., C - n:])``, the ALiBi the last ``n``
columns of a constant table, ``n`` the cache length - has the Where's condition rebuilt from the kept
slots and the table gathered at their original positions (the fixture given it: budget 1.0 == dense in
layer and per-KV-head modes, and with the mask as the Where's keep-condition; evicting, the term ==
table[h, C - 1 - (newest - kept position)]; onnxruntime == reference; a table cut by another length
refused), and the committed MPT export (``models/mpt``) likewise; the corpus sliding-window, GPT-Neo,
BLOOM and MPT decoders (``corpus`` marker) at budget 1.0 == dense over steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import spatten_compiler.passes  # noqa: F401  (registers the passes)
from conftest import MODELS
from onnx import helper, numpy_helper
from spatten_compiler.passes.evict_kv import mask_window
from test_evict_kv import step_ort_and_reference
from test_positions_input import lockstep
from test_structural_discovery import CORPUS, _corpus

from spatten_compiler.decoding import DecoderSession
from spatten_compiler.errors import OptionError
from spatten_compiler.pipeline import Pipeline, make_pass

W = 4
MASK = "/model/model/Where_1_output_0"  # the fixture's additive causal+padding mask, read by every layer


def windowed(out: Path, window: int = W, sliced: bool = True, slice_keep: int | None = None,
             in_mask: bool = True) -> Path:
    """The Llama fixture with a sliding window of ``window`` keys: ``Where(kv <= q and kv > q - W,
    mask, MIN)`` (kv = the slot index, q = position_ids: equal without padding), and (``sliced``) each
    present output / past input sliced to the last ``slice_keep`` (default W - 1) slots."""
    proto = onnx.load(str(MODELS / "llama_torchscript.onnx"))
    g = proto.graph
    N = helper.make_node
    c = lambda name, v: g.initializer.append(numpy_helper.from_array(np.array(v), name))  # noqa: E731
    for name, v in (("sw_zero", np.int64(0)), ("sw_one", np.int64(1)), ("sw_w", np.int64(window)),
                    ("sw_ax012", np.array([0, 1, 2], np.int64)), ("sw_ax13", np.array([1, 3], np.int64)),
                    ("sw_min", np.float32(np.finfo(np.float32).min)),
                    ("sw_keep", np.array([-(slice_keep or window - 1)])),
                    ("sw_end", np.array([np.iinfo(np.int64).max])), ("sw_axis", np.array([2], np.int64))):
        c(name, v)
    if in_mask:
        producer = next(n for n in g.node if MASK in n.output)
        producer.output[list(producer.output).index(MASK)] = "sw_mask_in"
        g.node.extend([
            N("Shape", ["attention_mask"], ["sw_t1"], start=1, end=2), N("Squeeze", ["sw_t1"], ["sw_t"]),
            N("Range", ["sw_zero", "sw_t", "sw_one"], ["sw_r"]), N("Unsqueeze", ["sw_r", "sw_ax012"], ["sw_kv"]),
            N("Unsqueeze", ["position_ids", "sw_ax13"], ["sw_q"]),
            N("LessOrEqual", ["sw_kv", "sw_q"], ["sw_causal"]), N("Sub", ["sw_q", "sw_w"], ["sw_lo"]),
            N("Greater", ["sw_kv", "sw_lo"], ["sw_in"]), N("And", ["sw_causal", "sw_in"], ["sw_ok"]),
            N("Where", ["sw_ok", "sw_mask_in", "sw_min"], [MASK])])
    if sliced:
        for present in [o.name for o in g.output if o.name.startswith("present.")]:
            full, past = f"sw_full.{present}", present.replace("present.", "past_key_values.")
            for node in g.node:
                node.input[:] = [full if i == present else f"sw_past.{past}" if i == past else i
                                 for i in node.input]
                node.output[:] = [full if o == present else o for o in node.output]
            g.node.extend([N("Slice", [full, "sw_keep", "sw_end", "sw_axis"], [present]),
                           N("Slice", [past, "sw_keep", "sw_end", "sw_axis"], [f"sw_past.{past}"])])
    nodes = _sorted(g)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(proto, str(out))
    return out


def banded(out: Path, window: int | None = W, m: int = 32, band: np.ndarray | None = None) -> Path:
    """The Llama fixture in GPT-Neo's mask form: ``Add(Where(cond, scores, MIN), mask)``, ``cond`` sliced
    from a constant ``[1, 1, M, M]`` band (rows T - q .. T, columns 0 .. T): ``tril`` minus
    ``tril(-W)`` (a local window), ``tril`` (``window`` None) or ``band`` as given."""
    proto = onnx.load(str(MODELS / "llama_torchscript.onnx"))
    g = proto.graph
    N = helper.make_node
    ones = np.ones((m, m), bool)
    b = band if band is not None else np.tril(ones) & ~np.tril(ones, -window) if window else np.tril(ones)
    for name, v in (("nb_band", b.reshape(1, 1, m, m)), ("nb_zero", np.array([0], np.int64)),
                    ("nb_ax2", np.array([2], np.int64)), ("nb_ax3", np.array([3], np.int64)),
                    ("nb_min", np.float32(np.finfo(np.float32).min))):
        g.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    g.node.extend([N("Shape", ["attention_mask"], ["nb_t"], start=1, end=2),
                   N("Shape", ["input_ids"], ["nb_q"], start=1, end=2), N("Sub", ["nb_t", "nb_q"], ["nb_start"]),
                   N("Slice", ["nb_band", "nb_start", "nb_t", "nb_ax2"], ["nb_rows"]),
                   N("Slice", ["nb_rows", "nb_zero", "nb_t", "nb_ax3"], ["nb_cond"])])
    for i, node in enumerate(list(g.node)):
        if node.op_type == "Add" and MASK in node.input:
            scores = next(x for x in node.input if x != MASK)
            g.node.append(N("Where", ["nb_cond", scores, "nb_min"], [f"nb_{i}"]))
            node.input[:] = [f"nb_{i}" if x == scores else x for x in node.input]
    nodes = _sorted(g)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(proto, str(out))
    return out


SLOPES = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)


def alibi(out: Path) -> Path:
    """The Llama fixture with BLOOM's ALiBi: ``scores + slopes[h] * ((CumSum(mask) - 1) * mask)[b, j]``
    added before the mask, in every layer (node ``ab_add_<i>``)."""
    proto = onnx.load(str(MODELS / "llama_torchscript.onnx"))
    g = proto.graph
    N = helper.make_node
    for name, v in (("ab_slopes", SLOPES.reshape(1, 4, 1, 1)), ("ab_one", np.int64(1)),
                    ("ab_ax12", np.array([1, 2], np.int64))):
        g.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    g.node.extend([N("CumSum", ["attention_mask", "ab_one"], ["ab_cs"]), N("Sub", ["ab_cs", "ab_one"], ["ab_p"]),
                   N("Mul", ["ab_p", "attention_mask"], ["ab_pos"]), N("Cast", ["ab_pos"], ["ab_posf"], to=1),
                   N("Unsqueeze", ["ab_posf", "ab_ax12"], ["ab_pos4"]),
                   N("Mul", ["ab_slopes", "ab_pos4"], ["ab_term"])])
    for i, node in enumerate(list(g.node)):
        if node.op_type == "Add" and MASK in node.input:
            scores = next(x for x in node.input if x != MASK)
            g.node.append(N("Add", [scores, "ab_term"], [f"ab_{i}"], name=f"ab_add_{i}"))
            node.input[:] = [f"ab_{i}" if x == scores else x for x in node.input]
    nodes = _sorted(g)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(proto, str(out))
    return out


def _sorted(g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes in topological order (the appended ones feed earlier nodes)."""
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    todo, done = list(g.node), []
    while todo:
        node = next(n for n in todo if all(i in ready for i in n.input))
        todo.remove(node)
        done.append(node)
        ready.update(node.output)
    return done


def evicted(src: Path, out: Path, **options: object) -> Path:
    model = ir.load(str(src))
    # the CLI's front passes: fused ops (onnxruntime-genai's GroupQueryAttention) are decomposed first
    front = [make_pass("unfuse-ort"), make_pass("normalize"), make_pass("decompose-attention")]
    Pipeline([*front, make_pass("evict-kv", **options)])(model)
    ir.save(model, str(out))
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return windowed(tmp_path_factory.mktemp("win") / "dense.onnx", sliced=False)


@pytest.fixture(scope="module")
def sliding(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return windowed(tmp_path_factory.mktemp("win") / "sliding.onnx")


def test_the_window_is_read_from_the_mask(sliding: Path) -> None:
    model = ir.load(str(sliding))
    mask = next(n.outputs[0] for n in model.graph if n.outputs and n.outputs[0].name == MASK)
    assert mask_window(mask) == W
    assert mask_window(next(n.outputs[0] for n in model.graph if n.outputs[0].name == "sw_mask_in")) is None


def test_the_window_changes_the_model(dense: Path) -> None:
    """Guard: W = 4 hides keys of the 9-token prompt (otherwise the tests below prove nothing)."""
    assert lockstep(DecoderSession(MODELS / "llama_torchscript.onnx"), DecoderSession(dense)) > 1e-3


@pytest.mark.parametrize("mode", ["layer", "head"])
def test_full_budget_equals_dense_windowed_model(dense: Path, sliding: Path, mode: str, tmp_path: Path) -> None:
    session = DecoderSession(evicted(sliding, tmp_path / "e.onnx", budget=1.0, sinks=2, mode=mode))
    assert lockstep(DecoderSession(dense), session, steps=4) <= 1e-5
    assert session.cache_lengths() == [W - 1] * 4  # the exporter's own cache size
    assert json_windows(tmp_path / "e.onnx") == {str(layer): W for layer in range(4)}


def json_windows(path: Path) -> dict:
    return json.loads(ir.load(str(path)).metadata_props["spatten.evict_kv"])["windows"]


def test_unsliced_cache_with_a_window_mask(dense: Path, tmp_path: Path) -> None:
    """A window in the mask, the cache not sliced (a static window): still exact, still <= W - 1 slots."""
    session = DecoderSession(evicted(dense, tmp_path / "e.onnx", budget=1.0))
    assert lockstep(DecoderSession(dense), session, steps=3) <= 1e-5
    assert session.cache_lengths() == [W - 1] * 4


def test_evicting_ort_equals_reference(tmp_path: Path) -> None:
    path = evicted(windowed(tmp_path / "s.onnx", window=6), tmp_path / "e.onnx", budget=0.3, sinks=1, recent=1)
    session = step_ort_and_reference(path, 6)
    assert max(session.cache_lengths()) <= 5


@pytest.mark.parametrize("kwargs, why", [
    (dict(in_mask=False), "no window comparison kv > q - W"),
    (dict(slice_keep=W), f"has window {W}, not {W + 1}")])
def test_a_sliced_cache_the_mask_does_not_explain_is_refused(kwargs: dict, why: str, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=why):
        evicted(windowed(tmp_path / "bad.onnx", **kwargs), tmp_path / "e.onnx", budget=1.0)


@pytest.mark.parametrize("window", [W, None])
def test_gpt_neo_band_mask_full_budget_equals_dense(window: int | None, tmp_path: Path) -> None:
    """GPT-Neo's causal Where over a constant band (local window W, or plain causal): bypassed, rebuilt
    from positions; at budget 1.0 == the dense model, a local window keeps W - 1 slots."""
    dense = banded(tmp_path / "neo.onnx", window)
    session = DecoderSession(evicted(dense, tmp_path / "e.onnx", budget=1.0, sinks=2))
    if window:  # guard: the band hides keys of the 9-token prompt
        assert lockstep(DecoderSession(MODELS / "llama_torchscript.onnx"), DecoderSession(dense)) > 1e-3
    assert lockstep(DecoderSession(dense), session, steps=3) <= 1e-5
    assert session.cache_lengths() == [W - 1 if window else 9 + 3] * 4


def test_gpt_neo_band_evicting_ort_equals_reference(tmp_path: Path) -> None:
    path = evicted(banded(tmp_path / "neo.onnx", 6), tmp_path / "e.onnx", budget=0.3, sinks=1, recent=1)
    assert max(step_ort_and_reference(path, 6).cache_lengths()) <= 5


def test_a_causal_where_that_is_not_a_band_is_refused(tmp_path: Path) -> None:
    odd = np.tril(np.ones((32, 32), bool))
    odd[5, 0] = False  # a hole: not tril minus tril(-W)
    with pytest.raises(OptionError, match="neither a lower triangle nor a band"):
        evicted(banded(tmp_path / "odd.onnx", band=odd), tmp_path / "e.onnx", budget=1.0)


def test_alibi_full_budget_equals_dense(tmp_path: Path) -> None:
    dense = alibi(tmp_path / "alibi.onnx")
    assert lockstep(DecoderSession(MODELS / "llama_torchscript.onnx"), DecoderSession(dense)) > 1e-3  # guard
    session = DecoderSession(evicted(dense, tmp_path / "e.onnx", budget=1.0, sinks=2))
    assert lockstep(DecoderSession(dense), session, steps=3) <= 1e-5


def terms_after_steps(path: Path, prefix: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """Run the evicted model (prefill 9 tokens x 2, then 3 greedy steps) with the score term each node
    named ``prefix<layer>`` adds as an output: (the terms' names by layer, the last step's feeds and
    ``out:<name>`` outputs)."""
    from test_evict_kv import spied_session

    proto = onnx.load(str(path))
    adds = [n for n in proto.graph.node if n.name.startswith(prefix)]  # graph order: layer order
    assert len(adds) == 4
    proto.graph.output.extend(helper.make_tensor_value_info(n.input[1], onnx.TensorProto.FLOAT, None) for n in adds)
    onnx.save(proto, str(path))
    session, _, captured = spied_session(path)
    session.reset(2)
    x = session.step(np.array([[5, 17, 33, 2, 9, 11, 40, 7, 21], [8, 3, 100, 42, 6, 12, 13, 50, 4]]))
    for _ in range(3):
        x = session.step(x[:, -1].argmax(-1)[:, None])
    return [n.input[1] for n in adds], captured


def test_alibi_reads_the_kept_slots_original_positions(tmp_path: Path) -> None:
    """Evicting (slots with gaps), each layer's ALiBi term is slope_h * the ORIGINAL position of each
    kept slot (BLOOM's mask positions of the whole sequence), not the slot index."""
    path = evicted(alibi(tmp_path / "alibi.onnx"), tmp_path / "e.onnx", budget=0.4, sinks=1, recent=1)
    names, captured = terms_after_steps(path, "ab_add_")
    for layer, name in enumerate(names):
        pos = np.concatenate([captured[f"past_positions.{layer}"], captured["position_ids"]], axis=1)
        assert np.diff(pos[0]).max() > 1  # evicted: the kept positions have gaps
        term = captured[f"out:{name}"]  # [B, H, 1, n]
        np.testing.assert_allclose(term[:, :, 0], SLOPES[None, :, None] * pos[:, None, :].astype(np.float32))


def test_alibi_with_per_kv_head_eviction_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="--kv-evict head with a position term"):
        evicted(alibi(tmp_path / "alibi.onnx"), tmp_path / "e.onnx", budget=1.0, mode="head")


C = 32  # the MPT-form table's width (max_seq_len)
TABLE = (SLOPES[:, None] * (np.arange(C) - (C - 1))[None, :]).astype(np.float32).reshape(4, 1, C)  # MPT's ALiBi


def mpt_form(out: Path, hides: bool = True, length: str = "cache") -> Path:
    """The Llama fixture in MPT's mask form: ``Where(MASK < -1, MIN, scores + TABLE[..., C - n:])`` (node
    ``mp_add_<l>`` adds the term) with ``n`` = ``Shape(present.<l>.key)[2]`` (``length`` "cache") or the
    length of ``attention_mask`` ("mask"); ``hides`` False: ``Where(MASK >= -1, scores + term, MIN)``."""
    proto = onnx.load(str(MODELS / "llama_torchscript.onnx"))
    g = proto.graph
    N = helper.make_node
    for name, v in (("mp_table", TABLE), ("mp_c", np.int64(C)), ("mp_two", np.int64(2)), ("mp_onei", np.int64(1)),
                    ("mp_ax0", np.array([0], np.int64)), ("mp_end", np.array([np.iinfo(np.int64).max])),
                    ("mp_ax2", np.array([2], np.int64)), ("mp_step", np.array([1], np.int64)),
                    ("mp_neg1", np.float32(-1)), ("mp_min", np.float32(np.finfo(np.float32).min))):
        g.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    g.node.extend([N("Less", [MASK, "mp_neg1"], ["mp_hide"]), N("Not", ["mp_hide"], ["mp_keep"])])
    for node in [n for n in g.node if n.op_type == "Add" and MASK in n.input]:
        layer = int(node.name.split("layers.")[1].split("/")[0])
        scores, t = next(x for x in node.input if x != MASK), f"mp{layer}"
        src, axis = (f"present.{layer}.key", "mp_two") if length == "cache" else ("attention_mask", "mp_onei")
        shape = [N("Shape", [src], [f"{t}_shape"]), N("Gather", [f"{t}_shape", axis], [f"{t}_n"])]
        where = (N("Where", ["mp_hide", "mp_min", f"{t}_biased"], [node.output[0]]) if hides else
                 N("Where", ["mp_keep", f"{t}_biased", "mp_min"], [node.output[0]]))
        g.node.remove(node)
        g.node.extend([*shape, N("Sub", ["mp_c", f"{t}_n"], [f"{t}_start"]),
                       N("Unsqueeze", [f"{t}_start", "mp_ax0"], [f"{t}_start1"]),
                       N("Slice", ["mp_table", f"{t}_start1", "mp_end", "mp_ax2", "mp_step"], [f"{t}_term"]),
                       N("Add", [scores, f"{t}_term"], [f"{t}_biased"], name=f"mp_add_{layer}"), where])
    nodes = _sorted(g)
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(proto, str(out))
    return out


@pytest.fixture(scope="module")
def mpt_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mpt_form(tmp_path_factory.mktemp("mpt") / "mpt.onnx")


def test_mpt_form_is_found_as_where_plus_bias(mpt_dense: Path) -> None:
    from spatten_compiler.passes.find_attention import find_attention

    model = ir.load(str(mpt_dense))
    Pipeline([make_pass("normalize"), make_pass("decompose-attention")])(model)
    sites = find_attention(model).sites
    assert [s.variant.get("mask") for s in sites] == ["where+bias"] * 4
    assert all(len(s.bias_terms) == 1 for s in sites)
    assert lockstep(DecoderSession(MODELS / "llama_torchscript.onnx"), DecoderSession(mpt_dense)) > 1e-3  # guard


@pytest.mark.parametrize("hides, mode", [(True, "layer"), (True, "head"), (False, "layer")])
def test_mpt_form_full_budget_equals_dense(hides: bool, mode: str, mpt_dense: Path, tmp_path: Path) -> None:
    dense = mpt_dense if hides else mpt_form(tmp_path / "keep.onnx", hides=False)
    path = evicted(dense, tmp_path / "e.onnx", budget=1.0, sinks=2, mode=mode)
    assert lockstep(DecoderSession(dense), DecoderSession(path), steps=3) <= 1e-5
    assert lockstep(DecoderSession(dense, runtime="reference"), DecoderSession(path, runtime="reference"), 2) <= 1e-5


@pytest.mark.parametrize("mode", ["layer", "head"])
def test_mpt_form_reads_the_kept_slots_original_positions(mode: str, mpt_dense: Path, tmp_path: Path) -> None:
    """Evicting (slots with gaps), each layer's term is TABLE[h, 0, C - 1 - (newest - p)] for every kept
    slot's ORIGINAL position p (per KV head: query head h reads KV head h // 2's slots), not the slot's
    distance from the end; the Where hides exactly the empty slots."""
    path = evicted(mpt_dense, tmp_path / "e.onnx", budget=0.4, sinks=1, recent=1, mode=mode)
    names, captured = terms_after_steps(path, "mp_add_")
    newest = captured["position_ids"].max(1)  # [B]
    for layer, name in enumerate(names):
        past = captured[f"past_positions.{layer}"]  # [B, n] or [B, Hkv, n]
        new = np.broadcast_to(captured["position_ids"][:, None] if past.ndim == 3 else captured["position_ids"],
                              (*past.shape[:-1], captured["position_ids"].shape[1]))
        pos = np.concatenate([past, new], axis=-1)
        pos = pos[:, None] if pos.ndim == 2 else np.repeat(pos, 2, axis=1)  # [B, 1 or H, n]
        assert np.diff(pos[0, 0]).max() > 1  # evicted: the kept positions have gaps
        want = TABLE[np.arange(4)[None, :, None], 0, C - 1 - (newest[:, None, None] - pos)]  # [B, H, n]
        np.testing.assert_array_equal(captured[f"out:{name}"][:, :, 0], want)


def test_mpt_form_evicting_ort_equals_reference(mpt_dense: Path, tmp_path: Path) -> None:
    session = step_ort_and_reference(evicted(mpt_dense, tmp_path / "e.onnx", budget=0.3, sinks=1, recent=1), 6)
    assert max(session.cache_lengths()) < 9 + 6


def test_a_table_cut_by_another_length_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="not the last n columns of a table, n read from this layer's cache length"):
        evicted(mpt_form(tmp_path / "m.onnx", length="mask"), tmp_path / "e.onnx", budget=1.0)


MPT = MODELS / "mpt" / "mpt_torchscript_kv.onnx"  # models/_mpt.py: vocabulary 64, ALiBi table [4, 1, 64]
MPT_PROMPTS = [[5, 17, 33, 2, 9, 11, 40, 7, 21], [8, 3, 60, 42]]


@pytest.mark.parametrize("runtime", ["ort", "reference"])
def test_mpt_export_full_budget_equals_dense(runtime: str, tmp_path: Path) -> None:
    """The real MPT export (left-padded batch): budget 1.0 == dense at every step, both runtimes."""
    from spatten_compiler.decoding import left_pad

    path = evicted(MPT, tmp_path / "e.onnx", budget=1.0)
    dense, ours = DecoderSession(MPT, runtime=runtime), DecoderSession(path, runtime=runtime)
    ids, mask = left_pad(MPT_PROMPTS)
    dense.reset(2)
    ours.reset(2)
    a, b = dense.step(ids, mask), ours.step(ids, mask)
    assert np.abs(a - b)[mask.astype(bool)].max() <= 1e-4
    for _ in range(5):
        tok = a[:, -1].argmax(-1)[:, None]
        a, b = dense.step(tok), ours.step(tok)
        assert np.abs(a - b).max() <= 1e-4


def test_mpt_export_evicting_runs_and_generates(tmp_path: Path) -> None:
    path = evicted(MPT, tmp_path / "e.onnx", budget=0.5, sinks=1)
    session = step_ort_and_reference(path, 8, prompts=MPT_PROMPTS)
    assert max(session.cache_lengths()) < 9 + 8  # a cache shorter than the sequence


def _corpus_sliding() -> list:
    return [r for r in _corpus() if r["kv_cache"] and r["family"] in {"mistral", "gemma2", "gemma3_text", "gpt_neo",
                                                                        "bloom", "mpt"}]


@pytest.mark.corpus
@pytest.mark.parametrize("rec", _corpus_sliding() or [None], ids=lambda r: r["name"] if r else "absent")
def test_corpus_sliding_full_budget_equals_dense_over_steps(rec: dict | None, tmp_path: Path) -> None:
    if rec is None:
        pytest.skip("no corpus: run python models/corpus.py")
    src = CORPUS / rec["onnx"]
    assert lockstep(DecoderSession(src), DecoderSession(evicted(src, tmp_path / "e.onnx", budget=1.0)), 4) <= 1e-5

"""onnxruntime CPU kernels behind spattenc's fusion choices: a fused op against the ops it replaces.

Each case is a pair of one-node-or-few-node models run on the same random input in one process,
interleaved, with the benchmark's session settings (intra-op threads, spinning off):

- ``skip-layer-norm``: com.microsoft ``SkipLayerNormalization`` (input, skip, gamma, beta, bias)
  against ``Add`` + ``Add`` + ``LayerNormalization`` - why ``--optimize`` leaves it unfused
  (passes/ort_fusions.py);
- ``softmax-range``: ``Softmax`` over [1, 12, T, T] uniform scores with a row spread of 120 against
  the same scores clipped to a spread of 80: exp results in the float32 subnormal range (below
  e^-87 of the row maximum) make onnxruntime's CPU softmax many times slower. MiniLM's layer 0 has
  spreads up to 200 (0.7% of its results below e^-87), which makes its softmax 2x slower than the
  other layers' - a cost the pruned model's full-length layer 0 keeps (docs/optimize.md 4g);
- ``head-groups``: that wide-range ``Softmax`` over all heads at once against six ``Softmax`` nodes of
  two heads each (a group's scores fit the L2 cache): the subnormal cost is arithmetic, not memory;
- ``key-mask``: ``Add`` of the exporter's ``[1, 1, T, T]`` mask + ``Softmax`` against the same with a
  ``[1, 1, 1, T]`` key mask;
- ``importance-sum``: the probabilities summed over heads and queries by ``ReduceSum(axes=[1, 2])``
  against the ``MatMul`` with a ones row (+ a ``ReduceSum`` over heads) spattenc's importance uses;
- ``attention-probs``: ONNX's own ``Attention`` (opset 23) returning the probabilities
  (``qk_matmul_output_mode=3``, what the importance needs) against the unfused ops (head size 32).

    python -m bench ort_kernels --rows 154,512 --threads 1,2
    python -m bench ort_kernels --cases head-groups,key-mask,importance-sum,attention-probs --rows 512 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import DEFAULT_RESULTS, run_metadata, write_results  # noqa: E402

OPSET = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def _io(*names: str) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]


Case = tuple[onnx.ModelProto, dict[str, np.ndarray]]  # a model and its feeds


def skip_layer_norm(rows: int, hidden: int, rng: np.random.Generator) -> tuple[Case, Case]:
    weights = [numpy_helper.from_array(rng.random(hidden, dtype=np.float32), n) for n in ("g", "b", "bias")]
    fused = helper.make_graph(
        [helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b", "bias"], ["y"], domain="com.microsoft",
                          epsilon=1e-12)], "fused", _io("x", "s"), _io("y"), weights)
    plain = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["xb"]), helper.make_node("Add", ["xb", "s"], ["z"]),
         helper.make_node("LayerNormalization", ["z", "g", "b"], ["y"], axis=-1, epsilon=1e-12)],
        "plain", _io("x", "s"), _io("y"), weights)
    feeds = {k: rng.standard_normal((1, rows, hidden), dtype=np.float32) for k in ("x", "s")}
    return tuple((helper.make_model(g, opset_imports=OPSET), feeds) for g in (fused, plain))


def softmax_range(rows: int, heads: int, rng: np.random.Generator) -> tuple[Case, Case]:
    model = helper.make_model(helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "softmax",
                                                _io("x"), _io("y")), opset_imports=OPSET)
    wide = rng.uniform(-60.0, 60.0, (1, heads, rows, rows)).astype(np.float32)
    return (model, {"x": wide}), (model, {"x": np.clip(wide, -40.0, 40.0)})


def _model(nodes: list[onnx.NodeProto], inputs: list[str], outputs: list[str],
           inits: list[onnx.TensorProto] = (), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "case", _io(*inputs), _io(*outputs), list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), OPSET[1]])


def head_groups(rows: int, heads: int, rng: np.random.Generator) -> tuple[Case, Case]:
    (whole, feeds), _ = softmax_range(rows, heads, rng)
    parts = np.split(feeds["x"], heads // 2, axis=1)
    names = [f"x{i}" for i in range(len(parts))]
    grouped = _model([helper.make_node("Softmax", [n], [f"y{n}"], axis=-1) for n in names], names,
                     [f"y{n}" for n in names])
    return (whole, feeds), (grouped, dict(zip(names, parts)))


def key_mask(rows: int, heads: int, rng: np.random.Generator) -> tuple[Case, Case]:
    model = _model([helper.make_node("Add", ["s", "m"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=-1)],
                   ["s", "m"], ["y"])
    s = 3 * rng.standard_normal((1, heads, rows, rows), dtype=np.float32)
    return ((model, {"s": s, "m": np.zeros((1, 1, rows, rows), np.float32)}),
            (model, {"s": s, "m": np.zeros((1, 1, 1, rows), np.float32)}))


def importance_sum(rows: int, heads: int, rng: np.random.Generator) -> tuple[Case, Case]:
    axes = [numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
            numpy_helper.from_array(np.array([1], np.int64), "heads"),
            numpy_helper.from_array(np.ones((1, 1, 1, rows), np.float32), "ones")]
    reduce = _model([helper.make_node("ReduceSum", ["p", "axes"], ["y"], keepdims=0)], ["p"], ["y"], axes)
    matmul = _model([helper.make_node("MatMul", ["ones", "p"], ["c"]),
                     helper.make_node("ReduceSum", ["c", "heads"], ["y"], keepdims=0)], ["p"], ["y"], axes)
    p = rng.random((1, heads, rows, rows), dtype=np.float32)
    return (reduce, {"p": p}), (matmul, {"p": p})


def attention_probs(rows: int, heads: int, rng: np.random.Generator) -> tuple[Case, Case]:
    scale = [numpy_helper.from_array(np.array(32 ** -0.5, np.float32), "scale")]
    fused = _model([helper.make_node("Attention", ["q", "k", "v", "m"], ["y", "", "", "p"], qk_matmul_output_mode=3)],
                   ["q", "k", "v", "m"], ["y", "p"], opset=23)
    plain = _model([helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                    helper.make_node("MatMul", ["q", "kt"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s1"]),
                    helper.make_node("Add", ["s1", "m"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                    helper.make_node("MatMul", ["p", "v"], ["y"])], ["q", "k", "v", "m"], ["y", "p"], scale, opset=23)
    feeds = {n: rng.standard_normal((1, heads, rows, 32), dtype=np.float32) for n in "qkv"}
    feeds["m"] = np.zeros((1, 1, rows, rows), np.float32)
    return (fused, feeds), (plain, feeds)


CASES: dict[str, tuple[Callable, str, str]] = {
    "skip-layer-norm": (skip_layer_norm, "SkipLayerNormalization", "Add + Add + LayerNormalization"),
    "softmax-range": (softmax_range, "Softmax, row spread 120", "Softmax, row spread 80"),
    "head-groups": (head_groups, "Softmax, all heads", "Softmax per 2 heads"),
    "key-mask": (key_mask, "Add [1,1,T,T] mask + Softmax", "Add [1,1,1,T] mask + Softmax"),
    "importance-sum": (importance_sum, "ReduceSum(axes=[1,2])", "MatMul(ones) + ReduceSum(heads)"),
    "attention-probs": (attention_probs, "Attention (opset 23) + probabilities", "unfused + probabilities"),
}


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_pair(a: Case, b: Case, threads: int, repeats: int) -> tuple[float, float]:
    """Median ms of each (model, feeds), interleaved."""
    (sa, fa), (sb, fb) = ((_session(m, threads), f) for m, f in (a, b))
    ta, tb = [], []
    for _ in range(3):
        sa.run(None, fa), sb.run(None, fb)
    for _ in range(repeats):
        for sess, f, out in ((sa, fa, ta), (sb, fb, tb)):
            start = time.perf_counter()
            sess.run(None, f)
            out.append(time.perf_counter() - start)
    return float(np.median(ta)) * 1e3, float(np.median(tb)) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--rows", default="154,512", help="sequence lengths (154 = 0.3 x 512, MiniLM's kept rows)")
    ap.add_argument("--hidden", type=int, default=384, help="hidden size (skip-layer-norm)")
    ap.add_argument("--heads", type=int, default=12, help="heads (softmax-range)")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {unknown[0]!r} (choose from {', '.join(CASES)})")
    rng = np.random.default_rng(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    threads_list = [int(t) for t in args.threads.split(",")]
    results = []
    for case in cases:
        build, name_a, name_b = CASES[case]
        for rows in rows_list:
            a, b = build(rows, args.hidden if case == "skip-layer-norm" else args.heads, rng)
            for threads in threads_list:
                ms_a, ms_b = time_pair(a, b, threads, args.repeats)
                results.append({"case": case, "a": name_a, "b": name_b, "rows": rows, "threads": threads,
                                "a_ms": ms_a, "b_ms": ms_b, "a_over_b": ms_a / ms_b})
    meta = run_metadata(max(threads_list))
    lines = ["# onnxruntime CPU kernels: a fused op against the ops it replaces", "",
             f"Command: `{meta['command']}`  ",
             f"Date: {meta['date_utc']}, onnxruntime {meta['onnxruntime_version']}, {meta['platform']}, "
             f"load average {meta['load_avg_1m']:.1f}; median of {args.repeats} interleaved runs, spinning off.", "",
             "| case | rows | threads | A | A ms | B | B ms | A / B |", "|---|---:|---:|---|---:|---|---:|---:|"]
    lines += [f"| {r['case']} | {r['rows']} | {r['threads']} | {r['a']} | {r['a_ms']:.3f} | {r['b']} | "
              f"{r['b_ms']:.3f} | {r['a_over_b']:.2f}x |" for r in results]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    if not args.no_save:
        json_path, md_path = write_results(args.out_dir, "ort-kernels", {"meta": meta, "results": results}, markdown)
        print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Self-check of the bench harness without pytest, torch or a real model: ``python bench/selfcheck.py``.

Builds a tiny ONNX "encoder" (an embedding lookup, plus a ``spatten_kept_mask`` output that keeps
even positions) and a word-level tokenizer in a temporary folder, then checks pooling, caching
keys, the cosine/probe protocol on identical models, exact-length WikiText windows, the sidecar
parser and one interleaved latency round. Exits non-zero on the first failure.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common, embed_eval, head_ablation, latency, paired_curve  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(60)] + ["good", "bad", "film"]


def make_tokenizer(folder: Path) -> Path:
    """A whitespace word-level tokenizer with BERT's [CLS] x [SEP] template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def make_model(path: Path, with_kept: bool, dim: int = 8) -> None:
    """last_hidden_state = table[input_ids] (+0*types); kept mask = (position is even)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(1).normal(size=(len(VOCAB), dim)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"])]
    outs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", dim])]
    inits = [numpy_helper.from_array(table, "table")]
    if with_kept:
        inits += [numpy_helper.from_array(np.array(2, np.int64), "two"),
                  numpy_helper.from_array(np.array(0, np.int64), "zero")]
        nodes += [helper.make_node("Shape", ["input_ids"], ["shape"]),
                  helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                                   value=helper.make_tensor("v", TensorProto.INT64, [1], [1])),
                  helper.make_node("CumSum", ["ones", "one_axis"], ["pos1"]),
                  helper.make_node("Mod", ["pos1", "two"], ["odd"]),
                  helper.make_node("Equal", ["odd", "zero"], ["evenpos1"]),
                  helper.make_node("Not", ["evenpos1"], ["even"]),  # position (0-based) is even
                  helper.make_node("Cast", ["even"], ["spatten_kept_mask"], to=TensorProto.FLOAT)]
        inits.append(numpy_helper.from_array(np.array(1, np.int64), "one_axis"))
        outs.append(helper.make_tensor_value_info("spatten_kept_mask", TensorProto.FLOAT, ["b", "s"]))
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]
    graph = helper.make_graph(nodes, "tiny", ins, outs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def make_data(root: Path) -> None:
    rng = np.random.default_rng(0)
    for task, files in {"sst2": ("train.tsv", "dev.tsv"), "imdb": ("train.tsv", "test.tsv")}.items():
        (root / task).mkdir(parents=True)
        for name in files:
            lines = ["sentence\tlabel"]
            for _ in range(40):
                y = int(rng.integers(2))
                words = [f"w{int(i)}" for i in rng.integers(60, size=rng.integers(3, 12))]
                lines.append(" ".join(words + ["good" if y else "bad", "film"]) + f"\t{y}")
            (root / task / name).write_text("\n".join(lines) + "\n")
    (root / "wikitext2").mkdir()
    (root / "wikitext2" / "test.txt").write_text("\n".join(" ".join(f"w{i % 60}" for i in range(k, k + 50))
                                                           for k in range(20)) + "\n")


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"FAIL: {what}")
    print(f"ok   {what}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok_path = make_tokenizer(root)
        make_model(root / "dense.onnx", with_kept=False)
        make_model(root / "cand.onnx", with_kept=True)
        make_data(root / "data")

        cost = np.array([[0.1, 0.2, 0.9], [0.3, 0.4, 0.5], [0.05, 0.6, 0.7]])
        check(head_ablation.global_schedule(cost, 3 / 9)[0] == [1, 3, 2]
              and head_ablation.global_schedule(cost, 3 / 9, (0,)) == ([3, 1, 2], "1,0.3333333333,0.6666666667"),
              "head_ablation: cheapest heads globally, whole layers kept whole")
        h = np.arange(24, dtype=np.float32).reshape(1, 4, 6)
        check(np.allclose(embed_eval.masked_mean(h, np.array([[1, 1, 0, 0]])), h[0, :2].mean(0)),
              "masked mean ignores padded rows")
        a = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
        check(abs(embed_eval.cosine_stats(a, a)["cosine_mean"] - 1) < 1e-6, "cosine of identical = 1")
        check((common.seeded_subset(100, 10, 3) == common.seeded_subset(100, 10, 3)).all(), "seeded subset")

        args = embed_eval.build_parser().parse_args([
            "--dense", str(root / "dense.onnx"), "--candidate", f"same={root / 'dense.onnx'}",
            "--candidate", f"kept={root / 'cand.onnx'}", "--pooling", "mean", "kept",
            "--data-dir", str(root / "data"), "--n-train", "30,imdb=35", "--n-test", "sst2=all",
            "--no-cache", "--no-save"])
        res = embed_eval.run(args)
        check([(t["train"]["n"], t["test"]["n"]) for t in res["tasks"]] == [(30, 40), (35, 40)],
              "per-task --n-train/--n-test sizes")
        for task in res["tasks"]:
            rows = {(r["label"], r["pooling"]): r for r in task["candidates"]}
            same, km, kk = rows[("same", "mean")], rows[("kept", "mean")], rows[("kept", "kept")]
            check(abs(same["cosine_mean"] - 1) < 1e-6 and same["delta_dropin_pts"] == 0
                  and same["delta_refit_pts"] == 0, f"{task['task']}: dense as candidate = dense")
            check(abs(km["cosine_mean"] - 1) < 1e-6, f"{task['task']}: mean pooling ignores kept mask")
            check(kk["cosine_mean"] < 0.999 and 0.3 < kk["kept_fraction_test"] < 0.7,
                  f"{task['task']}: kept pooling uses the mask (kept {kk['kept_fraction_test']:.2f})")
            check(("same", "kept") not in rows, f"{task['task']}: kept pooling skipped without the output")
        check("| sst2 |" in embed_eval.render_markdown(res), "markdown table rendered")
        vargs = embed_eval.build_parser().parse_args([
            "--dense", str(root / "dense.onnx"), "--candidate", f"same={root / 'dense.onnx'}",
            "--candidate", f"kept={root / 'cand.onnx'}", "--data-dir", str(root / "data"), "--cross-fit", "3",
            "--versus", "same", "--task", "imdb", "--no-cache", "--no-save"])
        vrow = {r["label"]: r for r in embed_eval.run(vargs)["tasks"][0]["candidates"]}
        versus = vrow["kept"]["cross_fit"]["versus"]
        check("versus" not in vrow["same"]["cross_fit"] and versus["label"] == "same"
              and abs(versus["delta_refit_pts"] - vrow["kept"]["cross_fit"]["delta_refit_pts"]) < 1e-9
              and "_correct" not in vrow["kept"]["cross_fit"],
              "--versus: deltas against a candidate equal to dense are the deltas against dense")
        fake = {"groups": [{"name": "imdb", "length": None, "models": [
            {"label": label, "role": "dense" if label == "dense" else "candidate", "median_ms": ms}
            for label, ms in (("dense", 40.0), ("a", 20.0), ("c", 15.0), ("b", 10.0))]}]}
        check(paired_curve.mixture_fraction(fake, "imdb", "c", "a", "b")[0] == 0.5,
              "paired_curve: the mixture takes the candidate's time")
        lat_path = root / "lat.json"
        lat_path.write_text(json.dumps(fake))
        dense_spec = root / "dense.onnx"
        pres, _ = paired_curve.run(paired_curve.build_parser().parse_args([
            "--dense", str(dense_spec), "--candidate", f"c={dense_spec}", "--slower", f"a={dense_spec}",
            "--faster", f"b={root / 'cand.onnx'}", "--latency", str(lat_path), "--data-dir", str(root / "data"),
            "--cross-fit", "3", "--no-cache", "--no-save"]))
        m = pres["tasks"]["imdb"]
        check(abs(m["cosine"]["candidate"] - 1) < 1e-6 and abs(m["refit"]["difference"]) < 1e-9
              and abs(m["cosine"]["curve"] - m["cosine"]["candidate"]) < 1e-9,  # b = cand.onnx: same mean-pooled output
              "paired_curve: a model against a curve of itself differs by 0")

        tok = common.load_tokenizer(tok_path, None)
        g = latency.wikitext_group(root / "data" / "wikitext2" / "test.txt", tok, 32, 4)
        check(all(len(x) == 32 and x[0] == 2 and x[-1] == 3 for x in g.ids) and len(g.ids) == 4,
              "WikiText windows have exactly N tokens with [CLS]/[SEP]")
        side = root / "cand.onnx.spatten.json"
        for raw, want in [({"128": 0.5}, 0.5), (0.25, 0.25), ([{"length": 128, "flop_ratio": 0.4}], 0.4)]:
            side.write_text(json.dumps({"flop_ratio": raw}))
            _, ratios = latency.load_flop_ratios(root / "cand.onnx", None)
            m = latency.Model(common.ModelSpec("c", root / "cand.onnx"), None, "", side, ratios)
            grp = latency.InputGroup("wikitext2-128", "", 128, [[2, 3]])
            check(latency.flop_ratio_for(m, grp) == want, f"sidecar flop_ratio form {type(raw).__name__}")
        side.write_text(json.dumps({"flop_ratio": {"16": 0.4}}))
        largs = latency.build_parser().parse_args([
            "--dense", str(root / "dense.onnx"), "--candidate", f"kept={root / 'cand.onnx'}",
            "--data-dir", str(root / "data"), "--tokenizer", str(tok_path), "--lengths", "16,32",
            "--n-inputs", "2", "--n-imdb", "3", "--repeats", "2", "--warmup", "1", "--no-save"])
        lres = latency.run(largs)
        check([g["name"] for g in lres["groups"]] == ["wikitext2-16", "wikitext2-32", "imdb"], "latency groups")
        cand = lres["groups"][0]["models"][1]
        check(cand["kept_fraction"] == 0.5 and cand["flop_ratio"] == 0.4 and cand["speedup"] > 0,
              "latency row has kept fraction, sidecar ratio and speedup")
    print("all bench self-checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reproduce SpAtten's DRAM-access reduction and throughput with the simulator.

    python -m bench.paper_repro [--hw spatten] [--lsb-fraction 0.07] [--out bench/results]

Workloads (attention only, as the paper evaluates it; instruction streams written with the ISA
classes by ``spatten_compiler.sim.workload``, not lowered from ONNX by ``emit``):
- GPT-2-small / -medium: a 993-token prompt then 31 generation steps (32 generated tokens, context
  up to 1024), per-layer keep counts and V keep ratios from the authors' workload files
  (mit-han-lab/spatten ``summary-gpt2-small-wikitext2-per8.csv``, ``summary-gpt2-medium-wikitext2-
  per0-hp-step5...csv``); K 6+4 / 8+4 bits with the LSB refetch, V 6 / 8 bits, Q 16 bits.
- BERT-base: 384 tokens, first 2 layers unpruned, then token keep 0.8 -> 0.4 (the §V-A linear
  schedule, average 0.6), heads 12 -> 10 after 30% of the layers, static 8-bit K/V.
Each model runs dense (fp32, nothing pruned), then adds token + local-V pruning, head pruning and
quantization one at a time; the DRAM ratio between consecutive runs is that feature's factor.
Writes ``<stamp>-paper-repro.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from spatten_compiler.sim.engine import simulate
from spatten_compiler.sim.hw import SimHw, sim_hw
from spatten_compiler.sim.report import SimReport, plot_bytes
from spatten_compiler.sim.workload import Quant, Workload, attention_stream

PAPER = {"dram_reduction_gpt2": 10.0, "tokens": 3.8, "heads": 1.1, "quant": 5.1,
         "tflops_gpt2": 0.43, "tflops_bert": 1.61}
PROMPT, STEPS, MAX = 993, 32, 1024
KV_CATEGORIES = ("k_msb", "k_lsb", "v")


def _gpt2(name: str, layers: int, heads: int, gen_keys: list[int], prompt_heads: list[int], v_keep: float,
          quant: Quant) -> Workload:
    ctx = [PROMPT + i for i in range(STEPS)]
    keys = [[PROMPT] * layers] + [[min(k, c) if k < MAX else c for k in gen_keys] for c in ctx[1:]]
    return Workload(name, layers, heads, 64, ctx, [PROMPT] + [1] * (STEPS - 1), keys,
                    [prompt_heads] * STEPS, v_keep, quant, MAX)


def workloads() -> list[Workload]:
    small = _gpt2("GPT-2-small", 12, 12, [921, 716] + [204] * 4 + [102] * 6, [12] * 12, 0.2,
                  Quant(6, 4, 6, 16, 0.1, True))
    # medium: layers 0-1 keep the whole context (1024 marks "everything")
    medium = _gpt2("GPT-2-medium", 24, 16, [MAX, MAX, 921, 819, 819] + [614] * 6 + [307] * 13,
                   [16] * 16 + [13] * 6 + [10] * 2, 0.3, Quant(8, 4, 8, 16, 0.1, True))
    n, layers = 384, 12
    keep = [1.0, 1.0] + [0.8 - 0.4 * i / 9 for i in range(10)]
    bert = Workload("BERT-base", layers, 12, 64, [n], [n], [[math.ceil(n * k) for k in keep]],
                    [[12] * 4 + [10] * 8], 1.0, Quant(8, 0, 8, 16, 0.1, False), 512)
    return [small, medium, bert]


def phases(w: Workload) -> list[Workload]:
    """GPT-2: the prompt pass (compute-bound) and the 31 generation steps (memory-bound) apart, then
    all 32 iterations; BERT: its one pass."""
    if len(w.context) == 1:
        return [w]

    def cut(sl: slice, label: str) -> Workload:
        return dataclasses.replace(w, name=f"{w.name} {label}", context=w.context[sl], query_rows=w.query_rows[sl],
                                   keys=w.keys[sl], kept_heads=w.kept_heads[sl])
    return [cut(slice(0, 1), "prompt"), cut(slice(1, None), "generation"), cut(slice(None), "all 32")]


def ladder(w: Workload) -> list[tuple[str, Workload]]:
    """dense -> +tokens (and local V) -> +heads -> +quantization."""
    dense = w.dense()
    tokens = dataclasses.replace(dense, keys=w.keys, value_keep=w.value_keep, name=f"{w.name} +tokens")
    heads = dataclasses.replace(tokens, kept_heads=w.kept_heads, name=f"{w.name} +heads")
    return [("dense", dense), ("tokens", tokens), ("heads", heads), ("quant", dataclasses.replace(w, quant=w.quant))]


def kv_bytes(r: SimReport) -> int:
    return sum(r.dram_bytes.get(c, 0) for c in KV_CATEGORIES)


def kv_requested(r: SimReport) -> int:
    """K/V bytes asked for, before rounding each row out to whole 32-byte transactions."""
    return sum(r.dram_requested.get(c, 0) for c in KV_CATEGORIES)


def run(hw: SimHw, lsb_fraction: float) -> dict:
    out: dict = {}
    for w in (p for model in workloads() for p in phases(model)):
        rows: dict[str, dict] = {}
        reports: dict[str, SimReport] = {}
        for step, wl in ladder(w):
            if w.name.endswith("all 32") and step in ("tokens", "heads"):
                continue  # the whole run only for the speed figure and the end-to-end speedup
            stream = attention_stream(wl)
            rep = simulate(stream, hw, lsb_fraction=lsb_fraction)
            reports[step] = rep
            rows[step] = {"cycles": rep.cycles, "seconds": rep.seconds, "flops": rep.flops,
                          "dram_bytes": rep.dram_bytes, "kv_bytes": kv_bytes(rep), "instructions": rep.instructions,
                          "sim_seconds": rep.sim_seconds, "counters": rep.counters,
                          "stage_busy": rep.stage_busy}
        full, dense = reports["quant"], reports["dense"]
        full.compare(dense)
        steps = [s for s in ("dense", "tokens", "heads", "quant") if s in reports]
        factors = {}
        if len(steps) == 4:  # the whole ladder ran
            factors = {b: kv_bytes(reports[a]) / kv_bytes(reports[b]) for a, b in zip(steps, steps[1:])}
            factors["quant_requested"] = kv_requested(reports["heads"]) / kv_requested(full)
        out[w.name] = {"runs": rows, "factors": factors,
                       "kv_reduction": kv_bytes(dense) / kv_bytes(full),
                       "total_reduction": dense.total_bytes / full.total_bytes,
                       "speedup": dense.cycles / full.cycles,
                       "tflops": full.flops_per_s / 1e12,
                       "dense_equiv_tflops": dense.flops / full.seconds / 1e12,
                       "instr_per_s": full.instructions / full.sim_seconds}
        out[w.name]["_reports"] = reports
    return out


def render(res: dict, hw: SimHw, lsb_fraction: float, cmd: str, elapsed: float) -> str:
    lines = [f"# SpAtten paper reproduction ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
             f"Command: `{cmd}`  ", f"Hardware: {hw.name} ({hw.qk_multipliers}+{hw.pv_multipliers} multipliers, "
             f"{hw.dram_gbps:g} GB/s, {hw.clock_ghz:g} GHz); LSB refetch fraction {lsb_fraction} of head-rows  ",
             f"Machine: {platform.node()} {os.cpu_count()} cores, shared with other jobs; simulator single-threaded, "
             f"whole run {elapsed:.1f} s", "",
             "| model | DRAM K/V reduction | tokens (+local V) | heads | quant (requested bytes) | all DRAM "
             "| speedup vs dense | TFLOP/s executed | TFLOP/s dense-equiv. | sim instr/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        f = {k: f"{v:.2f}x" for k, v in r["factors"].items()}
        lines.append(f"| {name} | {r['kv_reduction']:.1f}x | {f.get('tokens', '-')} | {f.get('heads', '-')} | "
                     f"{f.get('quant', '-')} ({f.get('quant_requested', '-')}) | {r['total_reduction']:.1f}x | "
                     f"{r['speedup']:.1f}x | {r['tflops']:.2f} | "
                     f"{r['dense_equiv_tflops']:.2f} | {r['instr_per_s']:,.0f} |")
    gpt = [r for n, r in res.items() if n.startswith("GPT") and n.endswith("generation")]
    avg = lambda key: math.prod(r[key] for r in gpt) ** (1 / len(gpt))  # noqa: E731
    avgf = lambda key: math.prod(r["factors"][key] for r in gpt) ** (1 / len(gpt))  # noqa: E731
    med = res.get("GPT-2-medium all 32")
    if med:
        q = med["runs"]["quant"]
        lines += ["", f"Simulator speed: GPT-2-medium, all 32 iterations, timing mode: {q['instructions']:,} "
                  f"instructions in {q['sim_seconds']:.1f} s "
                  f"({q['instructions'] / q['sim_seconds']:,.0f} instructions/s)."]
    lines += ["", "| figure | paper | simulated (GPT-2: geo-mean of the generation steps of small and medium) |",
              "|---|---:|---:|",
              f"| DRAM access reduction, GPT-2 (paper: 3.8 x 1.1 x 5.1) | 21.3x | {avg('kv_reduction'):.1f}x |",
              f"| DRAM access reduction, average of 30 benchmarks | {PAPER['dram_reduction_gpt2']}x | GPT-2 "
              f"{avg('kv_reduction'):.1f}x, BERT-base {res['BERT-base']['kv_reduction']:.1f}x |",
              f"| from tokens | {PAPER['tokens']}x | {avgf('tokens'):.2f}x |",
              f"| from heads | {PAPER['heads']}x | {avgf('heads'):.2f}x |",
              f"| from quantization | {PAPER['quant']}x | {avgf('quant'):.2f}x ({avgf('quant_requested'):.2f}x before "
              "rounding rows to 32-byte transactions) |",
              f"| throughput GPT-2 (TFLOP/s) | {PAPER['tflops_gpt2']} | {avg('tflops'):.2f} executed |",
              f"| throughput BERT (TFLOP/s) | {PAPER['tflops_bert']} | {res['BERT-base']['tflops']:.2f} executed |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hw", default="spatten", help="built-in hardware name or TOML file (default: spatten)")
    p.add_argument("--lsb-fraction", type=float, default=0.07,
                   help="head-rows that refetch K LSBs (the authors' GPT-2 workload: 7%%)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    hw = sim_hw(args.hw)
    started = time.perf_counter()
    res = run(hw, args.lsb_fraction)
    elapsed = time.perf_counter() - started
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"{stamp}-paper-repro"
    cmd = "python -m bench.paper_repro " + shlex.join(argv if argv is not None else sys.argv[1:])
    md = render(res, hw, args.lsb_fraction, cmd.strip(), elapsed)
    panels = {n: {"dense": v["_reports"]["dense"], "SpAtten": v["_reports"]["quant"]} for n, v in res.items()
              if not n.endswith(("all 32", "prompt"))}
    plot_bytes(panels,
               base.with_suffix(".png"), "DRAM bytes: dense vs SpAtten (GPT-2: 31 generation steps; BERT: 1 pass)")
    md += f"\n![DRAM bytes by category]({base.name}.png)\n"
    base.with_suffix(".md").write_text(md)
    for v in res.values():
        v.pop("_reports")
    base.with_suffix(".json").write_text(json.dumps({"command": cmd, "hw": dataclasses.asdict(hw),
                                                      "lsb_fraction": args.lsb_fraction, "results": res}, indent=2))
    print(md)
    print(f"wrote {base}.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

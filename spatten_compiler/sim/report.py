"""The simulator's report: cycles, time, FLOP/s, DRAM bytes by category and layer, and the
comparison with the dense stream of the same model; JSON and a PNG chart of bytes by category."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from spatten_compiler.sim.dram import CATEGORIES


@dataclasses.dataclass
class SimReport:
    mode: str
    hw: str
    cycles: float
    clock_ghz: float
    instructions: int
    flops: float  # arithmetic actually executed (multiply-add = 2)
    dram_bytes: dict[str, int]  # by category (whole transactions)
    dram_bytes_by_layer: dict[int, dict[str, int]]
    dram_requested: dict[str, int] = dataclasses.field(default_factory=dict)
    stage_busy: dict[str, float] = dataclasses.field(default_factory=dict)
    counters: dict[str, float] = dataclasses.field(default_factory=dict)  # kept tokens, LSB rows, ...
    sim_seconds: float = 0.0  # wall time of the simulation itself
    baseline: dict[str, Any] | None = None  # the dense stream's cycles / bytes / flops

    @property
    def seconds(self) -> float:
        return self.cycles / (self.clock_ghz * 1e9)

    @property
    def total_bytes(self) -> int:
        return int(sum(self.dram_bytes.values()))

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds if self.cycles else 0.0

    def compare(self, dense: SimReport) -> None:
        """Record the dense stream's numbers: speedup, DRAM reduction, dense-equivalent FLOP/s."""
        self.baseline = {
            "cycles": dense.cycles, "dram_bytes": dense.dram_bytes, "flops": dense.flops,
            "speedup": dense.cycles / self.cycles if self.cycles else None,
            "dram_reduction": dense.total_bytes / self.total_bytes if self.total_bytes else None,
            # the dense model's work done in our time: the figure papers quote for pruned accelerators
            "dense_equivalent_flops_per_s": dense.flops / self.seconds if self.cycles else None,
        }

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dram_bytes_by_layer"] = {str(k): v for k, v in self.dram_bytes_by_layer.items()}
        d |= {"seconds": self.seconds, "total_dram_bytes": self.total_bytes, "flops_per_s": self.flops_per_s,
              "instructions_per_s": self.instructions / self.sim_seconds if self.sim_seconds else None}
        return d

    def write_json(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    def render(self) -> str:
        lines = [
            f"{self.mode} run on {self.hw}: {self.instructions} instructions, {self.cycles:,.0f} cycles "
            f"= {_duration(self.seconds)} at {self.clock_ghz:g} GHz",
            f"arithmetic {self.flops / 1e9:,.3f} GFLOP -> {self.flops_per_s / 1e12:.3f} TFLOP/s achieved",
            f"DRAM {self.total_bytes / 2**20:,.2f} MiB: "
            + ", ".join(f"{c} {b / 2**20:,.2f}" for c, b in self.dram_bytes.items() if b),
        ]
        layers = {k: v for k, v in self.dram_bytes_by_layer.items() if k >= 0}
        if layers:
            lines.append("DRAM by layer (MiB): " + ", ".join(
                f"{k}: {sum(v.values()) / 2**20:,.2f}" for k, v in sorted(layers.items())))
        if self.stage_busy:
            lines.append("stage busy: " + ", ".join(f"{s} {b / max(self.cycles, 1):.0%}"
                                                   for s, b in self.stage_busy.items()))
        if self.baseline:
            b = self.baseline
            lines.append(f"vs dense stream: {b['speedup']:.2f}x faster, {b['dram_reduction']:.2f}x less DRAM, "
                         f"dense-equivalent {b['dense_equivalent_flops_per_s'] / 1e12:.3f} TFLOP/s")
        if self.sim_seconds:
            lines.append(f"simulated in {self.sim_seconds:.2f} s ({self.instructions / self.sim_seconds:,.0f} instr/s)")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:,.2f} {unit}"
    return f"{seconds * 1e9:,.0f} ns"


def plot_bytes(panels: dict[str, dict[str, SimReport]], path: Path, title: str = "DRAM bytes by category") -> Path:
    """One panel per model (own y scale), stacked bars per run (e.g. dense vs SpAtten), MiB per category;
    each bar is labelled with its total and, after the first, the reduction against the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 3.2 * len(panels)), 4.4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    shown: dict[str, object] = {}
    for ax, (panel, reports) in zip(axes[0], panels.items()):
        names = list(reports)
        bottom = [0.0] * len(names)
        for ci, cat in enumerate(CATEGORIES):
            vals = [reports[n].dram_bytes.get(cat, 0) / 2**20 for n in names]
            if not any(vals):
                continue
            shown[cat] = ax.bar(names, vals, bottom=bottom, color=cmap(ci), label=cat)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for x, total in enumerate(bottom):
            label = f"{total:,.1f}" + (f"\n({bottom[0] / total:.1f}x less)" if x and total else "")
            ax.annotate(label, (x, total), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(bottom) * 1.25 if max(bottom) else 1)
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel("MiB moved (32-byte transactions)" if ax is axes[0][0] else "")
    fig.legend(list(shown.values()), list(shown), loc="lower center", ncol=min(len(shown), 4), fontsize=8,
               frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05 * (1 + (len(shown) - 1) // 4) + 0.02, 1, 1))
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path

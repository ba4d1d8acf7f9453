"""Keep schedules: the fraction of the input's tokens (or heads) each layer runs on.

SpAtten's schedule (paper §V-A): the first ``unpruned`` fraction of layers keep everything; the
rest get ratios interpolated linearly from ``r_start`` to ``r_end`` with ``r_start + r_end =
2 * average``. The paper gives no slope; we take ``r_start = min((1 + R) / 2, 1.5 R)`` so that the
first pruned layer keeps more than the average and the last keeps at least half of it. Ratios are
cumulative fractions of the original length and never increase (a pruned token stays pruned).
The calibrated head rule picks each layer's heads alone at compile time, so its explicit schedule
is taken per layer as given (:func:`full_schedule`): no cascade, and layer 0 may be pruned.
"""

from __future__ import annotations

import math

from spatten_compiler.errors import OptionError


def spatten_schedule(layers: int, average: float, unpruned: float = 0.15, shape: str = "linear") -> list[float]:
    """``shape`` linear: SpAtten's ramp; flat: every pruned layer keeps ``average``."""
    if shape not in ("linear", "flat"):
        raise OptionError(f"schedule shape must be linear or flat, got {shape!r}")
    if not 0 < average <= 1:
        raise OptionError(f"keep ratio must be in (0, 1], got {average}")
    if layers <= 0:
        return []
    first = min(layers, max(1, math.ceil(unpruned * layers)))
    rest = layers - first
    if rest == 0 or average == 1:
        return [1.0] * layers
    if shape == "flat":
        return [1.0] * first + [average] * rest
    r_start = min((1 + average) / 2, 1.5 * average)
    r_end = 2 * average - r_start
    step = 0.0 if rest == 1 else (r_end - r_start) / (rest - 1)
    ratios = [average] if rest == 1 else [r_start + i * step for i in range(rest)]
    return [1.0] * first + [round(r, 6) for r in ratios]


def full_schedule(schedule: list[float], layers: int) -> list[float]:
    """One ratio per layer, each in (0, 1]; missing trailing entries repeat the last one
    (``0.5,1`` on six layers: layer 0 keeps half, layers 1-5 keep everything)."""
    if len(schedule) > layers:
        raise OptionError(f"keep schedule has {len(schedule)} entries but the model has {layers} attention layers")
    for r in schedule:
        if not 0 < r <= 1:
            raise OptionError(f"keep ratio must be in (0, 1], got {r}")
    return list(schedule) + [schedule[-1] if schedule else 1.0] * (layers - len(schedule))


def check_schedule(schedule: list[float], layers: int) -> list[float]:
    """A cascade schedule: the first layer keeps 1.0 and no layer keeps more than an earlier one."""
    full = full_schedule(schedule, layers)
    if schedule and schedule[0] != 1.0:
        raise OptionError(
            f"keep schedule starts with {schedule[0]}: the first layer must keep 1.0 "
            "(token scores come from its attention)"
        )
    # Cascade: a later layer never keeps more than an earlier one.
    return [min(full[: i + 1]) for i in range(layers)]

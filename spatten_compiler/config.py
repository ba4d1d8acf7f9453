"""Compile options: one dataclass, filled from a JSON config file and/or command-line flags.

``--config spatten.json`` takes the same keys as the flags (``token_keep``, ``token_keep_schedule``,
...); flags given on the command line win. :meth:`CompileConfig.passes` turns the options into the
pass pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import types
import typing
from pathlib import Path
from typing import Any

from spatten_compiler.errors import OptionError
from spatten_compiler.eviction_form import CACHE_OPTIONS, FORMS, check_form, form_of
from spatten_compiler.pipeline import Pass, make_pass

# Token-pruning presets. "paper" is SpAtten as published; "spattenc" is the rule that wins on
# models used without fine-tuning (bench/README.md, token pruning section).
TOKEN_RULES: dict[str, dict[str, str]] = {
    "paper": {"token_importance": "sum", "token_protect": "first", "token_schedule_shape": "linear",
              "restore": "stale", "token_min_keep": 1, "token_prune_point": "layer-input"},
    # Short inputs (SST-2, ~20 tokens) lose up to 9 points when pruned and save little: keep >= 64.
    # Pruning right after the deciding layer's softmax gives the kept tokens identical outputs and
    # skips that layer's P@V rows, output projection and FFN for the dropped ones. Value-norm weighted
    # importance beat the plain per-layer mean on cosine, drop-in and refit at keep 0.3 and 0.4 on the
    # full IMDB split (bench/results/*tokens-full-spattenc-value-*).
    "spattenc": {"token_importance": "value", "token_protect": "first+last", "token_schedule_shape": "flat",
                 "restore": "mean", "token_min_keep": 64, "token_prune_point": "after-attention"},
}


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    token_keep: float | None = None  # average keep ratio with SpAtten's schedule
    token_keep_schedule: tuple[float, ...] = ()  # or an explicit per-layer list
    token_unpruned: float = 0.15  # fraction of leading layers left unpruned by the schedule
    token_min_keep: int | None = None  # never keep fewer tokens (preset: paper 1, spattenc 64)
    token_rule: str = "spattenc"  # preset for the options below (bench: wins on MiniLM); each can be overridden
    token_importance: str | None = None  # sum (paper) | mean (per-layer normalized) | value (mean, value-norm weighted)
    token_protect: str | None = None  # first (CLS) | first+last (CLS and SEP) | none
    token_schedule_shape: str | None = None  # linear (paper) | flat
    restore: str | None = None  # stale | zero | mean
    token_prune_point: str | None = None  # layer-input (next layer's input) | after-attention (in-layer)
    emit_kept: bool = False
    head_keep: float | None = None  # cascade head pruning, SpAtten schedule (first 30% unpruned)
    head_keep_schedule: tuple[float, ...] = ()
    head_rule: str | None = None  # paper (run time) | calibrated (compile time); default: calibrated iff a file is given
    head_calibration: str | None = None  # .npz of input feeds for the calibrated rule
    head_importance: str = "layer"  # calibrated rule: layer (each layer's own scores) | cascade (SpAtten's) | ablation
    head_reconstruct: bool = False  # calibrated rule: refit each pruned layer's output projection (least squares)
    value_keep: float | None = None  # local value pruning (per query row, not cascaded)
    kv_bits: str | None = None  # progressive quantization: "6+4" (MSB+LSB) or "8" (static MSB only)
    lsb_threshold: float | None = None  # the rule's threshold (default: the rule's own, quantize_kv.RULES)
    kv_rule: str | None = None  # confidence rule: peak (quantize-kv's default) | fixed (paper) | uniform | min
    kv_granularity: str | None = None  # scale per token | head | channel | tensor (default token)
    kv_factor: float | None = None  # rule min: LSBs when max p <= min(threshold, factor / n_keys)
    kv_stats: bool = False  # diagnostic outputs: LSB rows per layer, LSB fraction
    prune_min_length: int | None = None  # inputs of at most N tokens run without token and head pruning
    preset: str | None = None  # measured defaults (spatten_compiler/defaults.py); applied by defaults.resolve
    no_token_pruning: bool = False  # off-switches for the preset's parts (kv_bits "none" for K/V)
    no_head_pruning: bool = False
    no_value_pruning: bool = False
    no_kv_eviction: bool = False
    optimize: bool = False  # then onnxruntime's transformer fusions (passes/ort_fusions.py)
    weights: str | None = None  # then onnxruntime weight quantization: int8 (dynamic) | int4 (MatMulNBits)
    kv_budget: float | None = None  # decoders: cache budget per layer, fraction of the length so far or tokens
    kv_sinks: int | None = None  # decoders: first real tokens never evicted (evict-kv default)
    kv_recent: int | str | None = None  # decoders: most recent tokens never evicted: N tokens or "P%" of the budget
    kv_evict: str | None = None  # decoders: layer (H2O-style, default) | cascade (SpAtten) | head (per KV head)
    kv_score: str | None = None  # decoders: evict-kv's scoring rule (passes/evict_kv.py SCORES)
    kv_min_keep: int | None = None  # decoders: no eviction while a layer's cache holds at most N tokens
    kv_slack: int | None = None  # decoders: block eviction, a layer may hold budget + N tokens (0: every step)
    kv_cache: str | None = None  # decoders: graph (default) | shared; the plan resolves it (eviction_form.FORMS)

    def __post_init__(self) -> None:
        if self.token_rule not in TOKEN_RULES:
            raise OptionError(f"--token-rule must be one of {', '.join(TOKEN_RULES)}, got {self.token_rule!r}")
        for flag, value in (("--head-keep", self.head_keep), ("--value-keep", self.value_keep)):
            if value is not None and not 0 < value <= 1:
                raise OptionError(f"{flag} must be in (0, 1], got {value}")
        if self.head_rule not in (None, "paper", "calibrated"):
            raise OptionError(f"--head-rule must be paper or calibrated, got {self.head_rule!r}")
        if self.head_importance not in ("layer", "cascade", "ablation"):
            raise OptionError(f"--head-importance must be layer, cascade or ablation, got {self.head_importance!r}")
        if self.head_importance != "layer" and not self.head_calibration:
            raise OptionError(f"--head-importance {self.head_importance} needs --head-calibration FILE.npz "
                              "(it ranks heads on calibration data)")
        if self.head_reconstruct and not self.head_calibration:
            raise OptionError("--head-reconstruct needs --head-calibration FILE.npz (it fits on calibration data)")
        if self.head_rule == "calibrated" and not self.head_calibration:
            raise OptionError("--head-rule calibrated needs --head-calibration FILE.npz")
        if self.head_calibration and self.head_rule == "paper":
            raise OptionError("--head-calibration is for --head-rule calibrated (paper picks heads at run time)")
        if self.head_calibration and not Path(self.head_calibration).is_file():
            raise OptionError(f"--head-calibration {self.head_calibration}: no such file")
        if self.token_keep is not None and not 0 < self.token_keep <= 1:
            raise OptionError(f"--token-keep must be in (0, 1], got {self.token_keep}")
        for r in self.token_keep_schedule:
            if not 0 < r <= 1:
                raise OptionError(f"--token-keep-schedule ratios must be in (0, 1], got {r}")
        if self.token_keep is not None and self.token_keep_schedule:
            raise OptionError("give --token-keep or --token-keep-schedule, not both")
        if self.token_min_keep is not None and self.token_min_keep < 1:
            raise OptionError(f"--token-min-keep must be >= 1, got {self.token_min_keep}")
        self._check_kv()
        self._check_gate()
        self._check_preset()
        self._check_ort()

    def _check_preset(self) -> None:
        from spatten_compiler.defaults import PARTS, PRESET_NAMES

        if self.preset is not None and self.preset not in PRESET_NAMES:
            raise OptionError(f"--preset must be one of {', '.join(PRESET_NAMES)}, got {self.preset!r}")
        options = dataclasses.asdict(self)
        for part in PARTS.values():
            given = part.given(options, part.amount)
            if part.is_off(options) and given and part.off_key not in part.amount:
                raise OptionError(f"{part.off_flag} turns {part.name} off, but --{given[0].replace('_', '-')} "
                                  "asks for it; give one or the other")

    def _check_ort(self) -> None:
        from spatten_compiler.passes.ort_quantize import WEIGHTS

        if self.weights is not None and self.weights not in WEIGHTS:
            raise OptionError(f"--weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if not isinstance(self.optimize, bool):
            raise OptionError(f"optimize must be true or false, got {self.optimize!r}")

    def _check_gate(self) -> None:
        n = self.prune_min_length
        if n is None:
            return
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise OptionError(f"--prune-min-length must be a whole number of tokens >= 1, got {n!r}")
        if not (self.prunes_tokens or self.prunes_heads):
            raise OptionError("--prune-min-length gates token and head pruning; give --token-keep or --head-keep too")
        if self.emit_kept:
            raise OptionError("--prune-min-length cannot be combined with --emit-kept (the unpruned branch has "
                              "no kept-token outputs)")

    def _check_kv(self) -> None:
        from spatten_compiler.passes.quantize_kv import GRANULARITY, RULES

        for flag, value, allowed in (("--kv-rule", self.kv_rule, RULES),
                                     ("--kv-granularity", self.kv_granularity, tuple(GRANULARITY))):
            if value is not None and value not in allowed:
                raise OptionError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        for flag, value in (("--lsb-threshold", self.lsb_threshold), ("--kv-factor", self.kv_factor)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise OptionError(f"{flag} must be a number, got {value!r}")
        given = [f for f, v in (("--kv-rule", self.kv_rule), ("--kv-granularity", self.kv_granularity),
                                ("--kv-factor", self.kv_factor), ("--kv-stats", self.kv_stats or None),
                                ("--lsb-threshold", self.lsb_threshold)) if v is not None]
        if given and self.kv_bits in (None, "none"):
            off = " (--kv-bits none turns K/V quantization off)" if self.kv_bits == "none" else ""
            raise OptionError(f"{given[0]} needs --kv-bits{off}")
        evict = [f for f, v in (("--kv-sinks", self.kv_sinks), ("--kv-recent", self.kv_recent),
                               ("--kv-evict", self.kv_evict), ("--kv-score", self.kv_score),
                               ("--kv-min-keep", self.kv_min_keep), ("--kv-slack", self.kv_slack),
                               ("--kv-cache", self.kv_cache)) if v is not None]
        if evict and self.kv_budget is None:
            raise OptionError(f"{evict[0]} needs --kv-budget")
        if self.kv_evict == "head" and self.kv_budget is not None and self.prunes_heads:
            raise OptionError("--kv-evict head with head pruning is not supported yet: a pruned layer's kept query "
                              "heads would be scored into K/V heads by rank, not by group (use --kv-evict layer)")
        if self.kv_cache is not None and self.kv_cache not in (*CACHE_OPTIONS, *FORMS):
            raise OptionError(f"--kv-cache must be one of {', '.join(CACHE_OPTIONS)}, got {self.kv_cache!r}")
        check_form(self)
        n = self.kv_min_keep
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise OptionError(f"--kv-min-keep must be a whole number of tokens >= 0, got {n!r}")
        n = self.kv_slack
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise OptionError(f"--kv-slack must be a whole number of tokens >= 0, got {n!r}")

    @property
    def prunes_tokens(self) -> bool:
        return self.token_keep is not None or bool(self.token_keep_schedule)

    @property
    def prunes_heads(self) -> bool:
        return self.head_keep is not None or bool(self.head_keep_schedule)

    def unpruned(self) -> CompileConfig:
        """The options for the length gate's short-input branch: everything but token and head
        pruning (value pruning and K/V quantization do not depend on the length)."""
        return dataclasses.replace(
            self, token_keep=None, token_keep_schedule=(), token_min_keep=None, head_keep=None,
            head_keep_schedule=(), head_rule=None, head_calibration=None, head_importance="layer",
            head_reconstruct=False, emit_kept=False, prune_min_length=None)

    def passes(self) -> list[Pass]:
        """unfuse-ort, normalize, decompose-attention, then prune-heads, prune-tokens, prune-values, quantize-kv
        (each if asked), then onnxruntime's fusions and weight quantization (each if asked).

        Order matters: each later pass finds attention again in the graph the earlier ones wrote.
        """
        passes: list[Pass] = []
        if self.prunes_heads:
            rule = self.head_rule or ("calibrated" if self.head_calibration else "paper")
            passes.append(make_pass("prune-heads", keep=self.head_keep if self.head_keep is not None else 1.0,
                                    schedule=tuple(self.head_keep_schedule), rule=rule,
                                    calibration=str(self.head_calibration or ""), importance=self.head_importance,
                                    reconstruct=self.head_reconstruct))
        if self.prunes_tokens:
            passes.append(self._token_pass())
        if self.value_keep is not None:
            passes.append(make_pass("prune-values", keep=self.value_keep))
        if self.kv_budget is not None:  # before quantize-kv: it finds the attention it rewrites
            passes.append(self.eviction_pass())
        if self.kv_bits not in (None, "none"):
            opts: dict[str, Any] = {"bits": self.kv_bits}
            for key, value in (("threshold", self.lsb_threshold), ("rule", self.kv_rule),
                               ("granularity", self.kv_granularity), ("factor", self.kv_factor)):
                if value is not None:
                    opts[key] = value
            opts["emit_stats"] = self.kv_stats
            passes.append(make_pass("quantize-kv", **opts))
            # decoders: the cache itself crosses steps as packed planes (a no-op on encoders)
            passes.append(make_pass("pack-kv-cache", bits=self.kv_bits, granularity=self.kv_granularity or "token"))
        if self.kv_budget is not None and form_of(self.kv_cache).fused:  # the fused attention kept as it is
            return [*passes, *self.ort_passes()]
        front = [make_pass("unfuse-ort"), make_pass("normalize"), make_pass("decompose-attention")]
        return [*front, *passes, *self.ort_passes()] if passes else self.ort_passes()

    def eviction_pass(self) -> Pass:
        """evict-kv, or evict-gqa on the fused attention (the form the plan chose: eviction_form.py), with
        the --kv-* options; every option goes to either pass (evict-gqa takes evict-kv's, or refuses)."""
        form = form_of(self.kv_cache)
        return make_pass(form.pass_name, budget=float(self.kv_budget or 1.0), **dict(form.options), **{
            k: v for k, v in (("sinks", self.kv_sinks), ("mode", self.kv_evict), ("score", self.kv_score),
                              ("min_keep", self.kv_min_keep), ("slack", self.kv_slack), *_recent(self.kv_recent))
            if v is not None})

    def ort_passes(self) -> list[Pass]:
        """With --optimize: fold-key-mask (pruned models), then onnxruntime's fusions; then its weight
        quantization (its recommended order)."""
        post: list[Pass] = []
        if self.optimize:
            if self.prunes_tokens:  # the layers whose probabilities feed the importance: their key mask
                post.append(make_pass("fold-key-mask"))
            post.append(make_pass("ort-fusions", attention="no-attention" if self.prunes_heads else "all"))
        if self.weights is not None:
            post.append(make_pass("ort-quantize", weights=self.weights))
        return post

    def token_options(self) -> dict[str, Any]:
        """The preset's choices with explicit options applied on top."""
        chosen = dict(TOKEN_RULES[self.token_rule])
        for key in chosen:
            value = getattr(self, key)
            if value is not None:
                chosen[key] = value
        return chosen

    def _token_pass(self) -> Pass:
        rule = self.token_options()
        return make_pass(
                "prune-tokens",
                importance=rule["token_importance"],
                protect=rule["token_protect"],
                shape=rule["token_schedule_shape"],
                keep=self.token_keep if self.token_keep is not None else 1.0,
                schedule=tuple(self.token_keep_schedule),
                unpruned=self.token_unpruned,
                min_keep=rule["token_min_keep"],
                restore=rule["restore"],
                prune_point=rule["token_prune_point"],
                prune_point_fallback=self.token_prune_point is None,
                emit_kept=self.emit_kept,
            )

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, Any]) -> CompileConfig:
        return cls.build(cls.read_options(path, overrides))

    @classmethod
    def build(cls, data: dict[str, Any]) -> CompileConfig:
        """The config from ``data`` (field names), every value checked against its field's type first."""
        return cls(**check_types(data))

    @classmethod
    def read_options(cls, path: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
        """The JSON file's keys with the command line's non-None values on top (no preset applied)."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = json.loads(Path(path).read_text())
            except OSError as e:
                raise OptionError(f"--config {path}: cannot read: {e.strerror}") from e
            except json.JSONDecodeError as e:
                raise OptionError(f"--config {path}: not valid JSON: {e.msg} at line {e.lineno}") from e
            except UnicodeDecodeError as e:
                raise OptionError(f"--config {path}: not a JSON text file (byte {e.start} is not UTF-8)") from e
            if not isinstance(data, dict):
                raise OptionError(f"--config {path}: expected a JSON object")
            data = check_types(data, f"--config {path}", noun="key")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return check_types(data)


def check_types(data: dict[str, Any], source: str = "", noun: str = "option") -> dict[str, Any]:
    """``data`` with every key a :class:`CompileConfig` field and every value of that field's type
    (ratio lists as tuples of floats, paths as strings), or an :class:`OptionError` naming ``source``
    (e.g. the config file), the key, the type wanted and the value given - for config files and API
    callers alike, before any option's own checks compare or parse the value."""
    hints = typing.get_type_hints(CompileConfig)
    where = f"{source}: " if source else ""
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise OptionError(f"{where}unknown {noun} {unknown[0]!r}; {noun}s: {', '.join(sorted(hints))}")
    return {key: _typed(value, hints[key], f"{where}{key}") for key, value in data.items()}


def _typed(value: Any, hint: Any, what: str) -> Any:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for t in typing.get_args(hint) if union else (hint,):
        converted = _CONVERT.get(typing.get_origin(t) or t, lambda v: _NO)(value)
        if converted is not _NO:
            return converted
    raise OptionError(f"{what} must be {_describe(hint)}, got {value!r}")


_NO = object()  # a value the type does not take


def _ratio_list(v: Any) -> Any:
    if isinstance(v, (list, tuple)) and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v):
        return tuple(float(x) for x in v)
    return _NO


_CONVERT: dict[Any, Any] = {  # field type -> value in that type, or _NO
    type(None): lambda v: None if v is None else _NO,
    bool: lambda v: v if isinstance(v, bool) else _NO,
    int: lambda v: int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else _NO,
    float: lambda v: float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else _NO,
    str: lambda v: v if isinstance(v, str) else os.fspath(v) if isinstance(v, os.PathLike) else _NO,
    tuple: _ratio_list,
}
_NAMES = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
          tuple: "a list of numbers"}


def _describe(hint: Any) -> str:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    names = [_NAMES[typing.get_origin(t) or t] for t in (typing.get_args(hint) if union else (hint,))]
    return " or ".join(names)


def _recent(value: int | str | None) -> list[tuple[str, Any]]:
    """--kv-recent N (tokens) or P% (of the kept slots after the sinks)."""
    if value is None:
        return []
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return [("recent_share", float(text[:-1]) / 100)]
        return [("recent", int(text))]
    except ValueError as e:
        raise OptionError(f"--kv-recent takes a number of tokens or a percentage of the budget (50%), "
                          f"got {text!r}") from e


def parse_ratio_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise OptionError(f"expected comma-separated ratios, got {text!r}") from e

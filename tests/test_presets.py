"""Presets (#20): a compile with no options applies the measured default for the model's kind, the
summary says what it applied, explicit options override entries, off-switches remove parts, and bad
values are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS, fixture_names, load_meta, run_ort
from spatten_compiler.runtime.reference import ReferenceRuntime
from test_evict_kv import PROMPTS
from test_long_inputs import long_feeds

from spatten_compiler.cli import main
from spatten_compiler.decoding import DecoderSession, left_pad
from spatten_compiler.defaults import PARTS, PRESET_NAMES, PRESETS, model_kind, resolve
from spatten_compiler.errors import OptionError

ROOT = MODELS.parent
ENCODERS = [n for n in fixture_names() if load_meta(n)["kind"] == "encoder"]
DECODERS = [n for n in fixture_names() if load_meta(n)["kind"] == "decoder" and load_meta(n)["kv_cache"]]
NOCACHE_DECODERS = [n for n in fixture_names() if load_meta(n)["kind"] == "decoder" and not load_meta(n)["kv_cache"]]
SEQ = 100  # over the spattenc rule's 64-token floor, so the default's keep 0.4 really drops tokens
NO_CACHE = frozenset({"own_keys"})  # model_features of a decoder whose cache misses some layers (or has none)


def compile_(src: Path, out: Path, *flags: str) -> dict:
    report = out.with_suffix(".json")
    assert main([str(src), "-o", str(out), "-q", "--report", str(report), *flags]) == 0
    return json.loads(report.read_text())


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("name", ENCODERS)
def test_no_option_compile_prunes_tokens_and_quantizes_kv_on_encoders(name: str, tmp_path: Path) -> None:
    """No options: tokens shrink in onnxruntime (kept mask of the same compile plus --emit-kept: 64
    of 100 and of 75 real tokens reach the last layer, the floor above 0.4 x length), and K/V run
    from split planes."""
    src = MODELS / f"{name}.onnx"
    report = compile_(src, tmp_path / "plain.onnx")
    assert report["preset"]["name"] == "default" and report["preset"]["kind"] == "encoder"
    assert report["token_schedule"][1:] == [0.4] * (report["layers"] - 1)
    assert {"QuantizeSplit", "DequantizeMSB", "DequantizeSplit"} <= op_types(tmp_path / "plain.onnx")
    compile_(src, tmp_path / "kept.onnx", "--emit-kept")
    feeds = long_feeds(SEQ, 90)
    kept = run_ort(tmp_path / "kept.onnx", feeds)
    plain = run_ort(tmp_path / "plain.onnx", feeds)
    real = feeds["attention_mask"].sum(axis=1)
    assert list(real) == [SEQ, SEQ * 3 // 4]
    np.testing.assert_array_equal(kept["spatten_kept_mask"].sum(axis=1), [64, 64])
    for key, value in plain.items():  # --emit-kept only adds outputs
        np.testing.assert_array_equal(kept[key], value, err_msg=key)
    dense = run_ort(src, feeds)
    for key, value in dense.items():
        assert plain[key].shape == value.shape and np.isfinite(plain[key]).all()


DEFAULT_DECODER = {s.key: s.value for s in PRESETS[("decoder", "default")].settings}
EVICT_KEYS = ("kv_budget", "kv_sinks", "kv_recent", "kv_evict", "kv_min_keep", "kv_slack")
EXPLICIT = ["--kv-budget", str(DEFAULT_DECODER["kv_budget"]), "--kv-sinks", str(DEFAULT_DECODER["kv_sinks"]),
            "--kv-recent", DEFAULT_DECODER["kv_recent"], "--kv-evict", DEFAULT_DECODER["kv_evict"],
            "--kv-min-keep", str(DEFAULT_DECODER["kv_min_keep"]), "--kv-slack", str(DEFAULT_DECODER["kv_slack"])]


def _has_cache(src: Path) -> bool:
    return any(i.name.startswith("past_key_values.") for i in onnx.load(str(src), load_external_data=False).graph.input)


@pytest.mark.parametrize("name", DECODERS)
def test_no_option_compile_evicts_on_decoders(name: str, tmp_path: Path) -> None:
    """Decoders with a KV cache get the default preset's eviction (budget, sinks, window, floor) and no
    K/V bits; the model is the one the explicit options give, and since the fixtures' sequences stay
    under the floor, it computes the dense logits (<= 1e-4) at every step."""
    src = MODELS / f"{name}.onnx"
    assert _has_cache(src)
    report = compile_(src, tmp_path / "out.onnx")
    assert report["preset"] == {"kind": "decoder", "name": "default", "off": [], "replaced": [],
                                "applied": {"evict": {k: DEFAULT_DECODER[k] for k in EVICT_KEYS}}, "skipped": []}
    assert "token_schedule" not in report and not any(p.startswith("quantize-kv") for p in report["passes"])
    assert any(p.startswith("evict-kv{budget=0.5;") for p in report["passes"])
    ops = op_types(tmp_path / "out.onnx")
    assert "QuantizeSplit" not in ops and "TokenImportance" not in ops
    assert main([str(src), "-o", str(tmp_path / "explicit.onnx"), "-q", *EXPLICIT]) == 0
    before, after, explicit_out = _decode([src, tmp_path / "out.onnx", tmp_path / "explicit.onnx"])
    assert "past_importance.0" in DecoderSession(tmp_path / "out.onnx").state
    np.testing.assert_array_equal(after["logits"], explicit_out["logits"])
    np.testing.assert_allclose(after["logits"], before["logits"], atol=1e-4, rtol=0)


NOCACHE_KEEP = 0.4  # an explicit prompt pruning on a no-cache decoder (in no preset: measured far over the bound)
DEFAULT_NOCACHE = {s.key: s.value for s in PRESETS[("decoder-nocache", "default")].settings}


def _kv_flags(values: dict) -> list[str]:
    """The explicit options a preset's K/V part stands for."""
    names = {"kv_bits": "--kv-bits", "kv_rule": "--kv-rule", "lsb_threshold": "--lsb-threshold"}
    return [x for k, v in values.items() for x in (names[k], str(v))]


def test_every_decoder_fixture_is_covered() -> None:
    assert len(DECODERS) >= 4 and len(NOCACHE_DECODERS) >= 2


@pytest.mark.parametrize("name", NOCACHE_DECODERS)
def test_no_option_compile_quantizes_kv_on_nocache_decoders(name: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A causal model without a KV cache is kind decoder-nocache; its no-option compile applies that
    kind's default (K/V bits only: prompt token pruning measured far over the bound), the model its
    explicit options give, K/V planes present, runs in onnxruntime close to the dense logits; the
    summary names it."""
    src = MODELS / f"{name}.onnx"
    assert not _has_cache(src)
    assert main([str(src), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "out.json")]) == 0
    err = capsys.readouterr().err
    assert "preset default for a decoder without a KV cache" in err and "K/V in every layer" in err
    assert "--kv-bits none" in err and "no rewrite applied" not in err
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["preset"] == {"kind": "decoder-nocache", "name": "default", "off": [], "replaced": [],
                                "applied": {"kv": DEFAULT_NOCACHE}, "skipped": []}
    assert "token_schedule" not in report and report["kv_byte_ratio"]["512"][0] > 1
    kv = next(p for p in report["passes"] if p.startswith("quantize-kv"))
    assert f"bits={DEFAULT_NOCACHE['kv_bits']};" in kv
    ops = op_types(tmp_path / "out.onnx")
    assert ({"QuantizeSplit", "DequantizeSplit"} if "+" in DEFAULT_NOCACHE["kv_bits"] else {"Quantize"}) <= ops
    assert "TokenImportanceValue" not in ops
    assert main([str(src), "-o", str(tmp_path / "explicit.onnx"), "-q", *_kv_flags(DEFAULT_NOCACHE)]) == 0
    feeds = long_feeds(SEQ, 90)
    got, explicit = run_ort(tmp_path / "out.onnx", feeds), run_ort(tmp_path / "explicit.onnx", feeds)
    np.testing.assert_array_equal(got["logits"], explicit["logits"])
    # onnxruntime == reference runtime for these K/V ops is test_quantize_kv's (op by op: end to end a
    # 1e-7 upstream difference can land on a rounding tie of a 10-bit per-token grid, ~1e-2 here)
    dense = run_ort(src, feeds)["logits"]
    assert got["logits"].shape == dense.shape and np.isfinite(got["logits"]).all()
    real = feeds["attention_mask"].astype(bool)
    assert np.abs(got["logits"] - dense)[real].max() < 0.1 * np.abs(dense[real]).max()  # still the model


@pytest.mark.parametrize("name", NOCACHE_DECODERS)
def test_nocache_decoders_prune_the_prompt(name: str, tmp_path: Path) -> None:
    """Explicit prompt token pruning on a no-cache decoder shrinks the tokens in onnxruntime: 64 of 100
    and of 75 real tokens reach the last layer (the floor), the last real token among them, equal to
    the reference runtime; under the floor the dense logits."""
    src = MODELS / f"{name}.onnx"
    report = compile_(src, tmp_path / "plain.onnx", "--token-keep", str(NOCACHE_KEEP))
    assert "preset" not in report  # an explicit rewrite option: no preset
    assert report["token_schedule"][1:] == [NOCACHE_KEEP] * (report["layers"] - 1)
    assert not any(p.startswith("quantize-kv") for p in report["passes"])  # an explicit option: exactly that
    compile_(src, tmp_path / "kept.onnx", "--token-keep", str(NOCACHE_KEEP), "--emit-kept")
    feeds = long_feeds(SEQ, 90)
    kept, plain = run_ort(tmp_path / "kept.onnx", feeds), run_ort(tmp_path / "plain.onnx", feeds)
    real = feeds["attention_mask"].sum(axis=1)
    np.testing.assert_array_equal(kept["spatten_kept_mask"].sum(axis=1), [64, 64])
    np.testing.assert_array_equal(kept["spatten_kept_mask"][np.arange(2), real - 1], [1, 1])  # the last token
    for key, value in plain.items():
        np.testing.assert_array_equal(kept[key], value, err_msg=key)
    ref = ReferenceRuntime(tmp_path / "plain.onnx").run(feeds).outputs
    np.testing.assert_allclose(ref["logits"], plain["logits"], atol=1e-4, rtol=0)
    short = {k: v[:, :40] for k, v in feeds.items()}  # under the floor: nothing pruned, the dense logits
    short["attention_mask"] = np.ones_like(short["input_ids"])
    np.testing.assert_allclose(run_ort(tmp_path / "plain.onnx", short)["logits"], run_ort(src, short)["logits"],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama_dynamo", "gpt2_kv_torchscript"])
def test_decoder_preset_evicts_past_its_floor(name: str, tmp_path: Path) -> None:
    """The preset's floor keeps a short prompt whole (every token seen stays cached); with the floor
    lowered (a detail: the preset's budget, sinks and window stay) the same compile evicts to half the
    length."""
    src = MODELS / f"{name}.onnx"
    compile_(src, tmp_path / "floor.onnx", "--preset", "default")
    low = compile_(src, tmp_path / "low.onnx", "--kv-min-keep", "4", "--kv-slack", "0")  # evict every step
    assert low["preset"]["applied"]["evict"] == {**{k: DEFAULT_DECODER[k] for k in
                                                    ("kv_budget", "kv_sinks", "kv_recent", "kv_evict")}}
    lengths = {}
    for tag in ("floor", "low"):
        s = DecoderSession(tmp_path / f"{tag}.onnx")
        ids, mask = left_pad(PROMPTS)
        s.reset(len(PROMPTS))
        logits = s.step(ids, mask)
        for _ in range(10):
            logits = s.step(logits[:, -1].argmax(-1)[:, None])
        lengths[tag] = s.cache_lengths()
    seen = len(PROMPTS[0]) + 10  # the longest row's tokens so far
    assert DEFAULT_DECODER["kv_min_keep"] >= seen and lengths["floor"] == [seen] * 4
    assert lengths["low"] == [int(np.ceil(DEFAULT_DECODER["kv_budget"] * seen))] * 4


@pytest.mark.parametrize("name", ["llama_torchscript", "gpt2_kv_dynamo"])
def test_decoder_preset_at_full_budget_equals_dense(name: str, tmp_path: Path) -> None:
    """The preset with its budget replaced by a full one computes the dense logits."""
    src = MODELS / f"{name}.onnx"
    report = compile_(src, tmp_path / "full.onnx", "--preset", "default", "--kv-budget", "1")
    assert report["preset"]["replaced"] == ["evict"] and report["preset"]["applied"] == {}
    dense, full = _decode([src, tmp_path / "full.onnx"], steps=8)
    np.testing.assert_allclose(full["logits"], dense["logits"], atol=1e-4, rtol=0)


def _decode(paths: list[Path], steps: int = 6) -> list[dict[str, np.ndarray]]:
    """Each model's logits rows, as one output: the prompt's real tokens, then ``steps`` steps of the
    first (dense) model's greedy tokens, fed to every model alike."""
    sessions = [DecoderSession(p) for p in paths]
    ids, mask = left_pad(PROMPTS)
    rows: list[list[np.ndarray]] = [[] for _ in paths]
    for s in sessions:
        s.reset(len(PROMPTS))
    for step in range(steps + 1):
        logits = [s.step(ids, mask if step == 0 else None) for s in sessions]
        for out, x in zip(rows, logits):
            out.append(x[mask.astype(bool)] if step == 0 else x[:, -1])
        ids = logits[0][:, -1].argmax(-1)[:, None]
    return [{"logits": np.concatenate(r)} for r in rows]


def test_summary_names_what_it_applied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(MODELS / "bert_torchscript.onnx"), "-o", str(tmp_path / "e.onnx")]) == 0
    err = capsys.readouterr().err
    assert "spattenc: preset default for an encoder" in err
    assert "tokens kept per layer (of the input length, at least 64): 1.00, 0.40 x3" in err
    assert "K/V in every layer: 4-bit MSB + 1-bit LSB planes" in err and "threshold 0.3" in err
    assert "fewer FLOPs" in err and "fewer K/V bytes" in err
    assert "--no-token-pruning, --kv-bits none" in err and "--pipeline normalize" in err
    assert err.strip().splitlines()[-1].startswith("wrote ")
    assert main([str(MODELS / "gpt2_kv_torchscript.onnx"), "-o", str(tmp_path / "d.onnx")]) == 0
    err = capsys.readouterr().err
    assert "preset default for a decoder" in err and "tokens kept" not in err
    assert "ideal at 128 / 512 / 2048 tokens so far: 1.0x / 2.0x / 2.0x smaller KV cache held" in err
    floor = DEFAULT_DECODER["kv_min_keep"]
    assert ("KV cache per layer kept within 50% of the length so far across generation steps (per-KV-head eviction by "
            "accumulated attention; the first 4 tokens and a recent window of 50% of the kept slots never evicted; "
            f"nothing evicted while a layer holds at most {floor} tokens; evicted in blocks: a layer grows to its "
            f"budget + {DEFAULT_DECODER['kv_slack']} tokens, then evicts back)") in err
    assert "--no-kv-eviction" in err and "--kv-min-keep N" in err and "K/V in every layer" not in err
    assert main([str(MODELS / "gpt2_torchscript.onnx"), "-o", str(tmp_path / "n.onnx")]) == 0
    err = capsys.readouterr().err
    assert "preset default for a decoder without a KV cache" in err and "tokens kept" not in err
    assert "K/V in every layer" in err and "--kv-bits none" in err and "eviction" not in err
    assert main([str(MODELS / "llama_dynamo.onnx"), "-o", str(tmp_path / "x.onnx"), "--kv-budget", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "your options only" in err and "drop --kv-budget" in err and "K/V in every layer" not in err
    assert main([str(MODELS / "bert_torchscript.onnx"), "-o", str(tmp_path / "q.onnx"), "-q"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("model, flags, why", [
    ("bert_torchscript", ["--pipeline", "normalize"], "--pipeline normalize has no rewriting pass"),
    ("bert_torchscript", ["--no-token-pruning", "--kv-bits", "none"], "every part is switched off"),
    ("llama_dynamo", ["--pipeline", "normalize"], "--pipeline normalize has no rewriting pass"),
    ("llama_dynamo", ["--no-kv-eviction", "--kv-bits", "none"], "every part is switched off"),
    ("gpt2_torchscript", ["--pipeline", "normalize"], "--pipeline normalize has no rewriting pass"),
    ("gpt2_dynamo", ["--kv-bits", "none"], "every part is switched off"),
])
def test_identity_compile_says_so(model: str, flags: list[str], why: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    src, out = MODELS / f"{model}.onnx", tmp_path / "o.onnx"
    assert main([str(src), "-o", str(out), *flags]) == 0
    err = capsys.readouterr().err
    assert "no rewrite applied" in err and why in err
    if model.startswith("llama"):  # the decoder's interface is unchanged: no eviction state, float cache
        names = lambda p: [i.name for i in onnx.load(str(p)).graph.input]  # noqa: E731
        assert names(out) == names(src)


def test_no_attention_model_is_written_unchanged_and_says_so(tiny_path: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tiny_path), "-o", str(tmp_path / "o.onnx")]) == 0
    assert "no attention found" in capsys.readouterr().err


def test_presets_differ_as_documented(tmp_path: Path) -> None:
    """Each encoder preset compiles to the registry's values; the three differ in tokens and K/V."""
    seen = set()
    for name in PRESET_NAMES:
        report = compile_(MODELS / "bert_torchscript.onnx", tmp_path / f"{name}.onnx", "--preset", name)
        values = {s.key: s.value for s in PRESETS[("encoder", name)].settings}
        assert report["token_schedule"][-1] == values["token_keep"]
        kv = next(p for p in report["passes"] if p.startswith("quantize-kv"))
        assert f"bits={values['kv_bits']};" in kv and f"threshold={values['lsb_threshold']};" in kv
        seen.add((values["token_keep"], values["kv_bits"], values["lsb_threshold"]))
        assert report["flop_ratio"]["512"] > 1 and report["kv_byte_ratio"]["512"][0] > 1
    assert len(seen) == 3
    keeps = [PRESETS[("encoder", n)].values("tokens")["token_keep"] for n in PRESET_NAMES]
    assert keeps == sorted(keeps, reverse=True)  # conservative keeps the most


def test_decoder_presets_differ_as_documented(tmp_path: Path) -> None:
    """Each decoder preset compiles to the registry's eviction values (no K/V bits); budgets shrink from
    conservative to aggressive, the floor is the same (it protects short prompts, not a quality knob)."""
    budgets, floors = [], set()
    for name in PRESET_NAMES:
        values = {s.key: s.value for s in PRESETS[("decoder", name)].settings}
        report = compile_(MODELS / "llama_dynamo.onnx", tmp_path / f"{name}.onnx", "--preset", name)
        evict = next(p for p in report["passes"] if p.startswith("evict-kv"))
        assert f"budget={values['kv_budget']};sinks=4;" in evict and f"min_keep={values['kv_min_keep']};" in evict
        assert f"recent_share=0.5;mode={values['kv_evict']};" in evict and f"slack={values['kv_slack']}" in evict
        assert not any(p.startswith("quantize-kv") for p in report["passes"])
        budgets.append(values["kv_budget"])
        floors.add(values["kv_min_keep"])
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) == 3 and len(floors) == 1


def test_nocache_presets_differ_as_documented(tmp_path: Path) -> None:
    """Each registered no-cache decoder preset compiles to its K/V bits and nothing else; fewer K/V
    bytes from conservative to aggressive."""
    ratios = []
    for name in [n for n in PRESET_NAMES if ("decoder-nocache", n) in PRESETS]:
        values = PRESETS[("decoder-nocache", name)].values("kv")
        assert {s.part for s in PRESETS[("decoder-nocache", name)].settings} == {"kv"}
        report = compile_(MODELS / "gpt2_dynamo.onnx", tmp_path / f"{name}.onnx", "--preset", name)
        assert report["preset"]["applied"] == {"kv": values} and "token_schedule" not in report
        kv = next(p for p in report["passes"] if p.startswith("quantize-kv"))
        assert f"bits={values['kv_bits']};" in kv
        ratios.append(report["kv_byte_ratio"]["512"][0])
    assert len(ratios) >= 2 and ratios == sorted(ratios) and len(set(ratios)) == len(ratios)


def test_every_setting_cites_a_recorded_result() -> None:
    docs = (ROOT / "docs" / "presets.md").read_text()
    for preset in PRESETS.values():
        assert preset.kind in ("encoder", "decoder", "decoder-nocache") and preset.name in PRESET_NAMES
        if preset.together:
            assert (ROOT / preset.together).is_file() and Path(preset.together).name in docs
        for s in preset.settings:
            assert (ROOT / s.evidence).is_file(), s.evidence
            assert Path(s.evidence).name in docs, s.evidence
            assert s.part in PARTS


@pytest.mark.parametrize("flags, tokens, kv", [
    (["--no-token-pruning"], None, "bits=4+1;threshold=0.3;"),
    (["--kv-bits", "none"], 0.4, None),
    (["--token-keep", "0.5"], 0.5, None),  # an explicit rewrite option: exactly that, no preset
    (["--kv-bits", "4"], None, "bits=4;"),
    (["--preset", "aggressive", "--token-keep", "0.5"], 0.5, "bits=4+1;threshold=0.5;"),
    (["--preset", "conservative", "--kv-bits", "none"], 0.5, None),
    (["--kv-rule", "fixed"], 0.4, "bits=4+1;threshold=None;granularity=token;rule=fixed;"),
    (["--lsb-threshold", "0.5"], 0.4, "bits=4+1;threshold=0.5;granularity=token;rule=peak;"),
    (["--token-min-keep", "8"], 0.4, "bits=4+1;"),
])
def test_overrides_and_off_switches(flags: list[str], tokens: float | None, kv: str | None, tmp_path: Path) -> None:
    report = compile_(MODELS / "bert_torchscript.onnx", tmp_path / "o.onnx", *flags)
    assert (report["token_schedule"][-1] if "token_schedule" in report else None) == tokens
    passes = [p for p in report["passes"] if p.startswith("quantize-kv")]
    assert (passes[0] if passes else None) is None if kv is None else kv in passes[0], passes
    if "--token-min-keep" in flags:
        assert "min_keep=8;" in next(p for p in report["passes"] if p.startswith("prune-tokens"))


def test_config_file_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"preset": "aggressive", "kv_bits": "none"}))
    report = compile_(MODELS / "bert_torchscript.onnx", tmp_path / "o.onnx", "--config", str(cfg))
    assert report["token_schedule"][-1] == 0.3 and not any(p.startswith("quantize-kv") for p in report["passes"])
    cfg.write_text(json.dumps({"no_token_pruning": True}))
    report = compile_(MODELS / "bert_torchscript.onnx", tmp_path / "o.onnx", "--config", str(cfg))
    assert "token_schedule" not in report and any(p.startswith("quantize-kv") for p in report["passes"])


def test_kind_comes_from_the_sites_not_the_name(tmp_path: Path) -> None:
    src = tmp_path / "gpt2_llama_decoder.onnx"
    shutil.copy(MODELS / "bert_torchscript.onnx", src)
    assert compile_(src, tmp_path / "o.onnx")["preset"]["kind"] == "encoder"


@pytest.mark.parametrize("flags, message", [
    (["--preset", "fast"], "invalid choice: 'fast'"),
    (["--no-token-pruning", "--token-keep", "0.5"], "--no-token-pruning turns token pruning off, but --token-keep"),
    (["--preset", "default", "--pipeline", "normalize"], "--pipeline runs exactly the passes it names"),
    (["--no-token-pruning", "--pipeline", "normalize"], "--pipeline runs exactly the passes it names"),
    (["--kv-bits", "none", "--kv-rule", "fixed"], "--kv-rule needs --kv-bits (--kv-bits none turns"),
    (["--kv-bits", "3+x"], "--kv-bits must look like"),
    (["--no-kv-eviction", "--kv-budget", "0.5"], "--no-kv-eviction turns KV-cache eviction off, but --kv-budget"),
    (["--no-kv-eviction", "--pipeline", "normalize"], "--pipeline runs exactly the passes it names"),
    (["--kv-min-keep", "16"], "--kv-min-keep needs --kv-budget"),  # an encoder: no preset eviction to refine
])
def test_bad_values_one_line_exit_2(flags: list[str], message: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    try:
        code = main([str(MODELS / "bert_torchscript.onnx"), "-o", str(out), *flags])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_bad_config_preset_and_preset_without_attention(tiny_path: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"preset": "fast"}))
    out = tmp_path / "o.onnx"
    assert main([str(MODELS / "bert_torchscript.onnx"), "-o", str(out), "--config", str(cfg)]) == 2
    assert "--preset must be one of conservative, default, aggressive" in capsys.readouterr().err
    assert main([str(tiny_path), "-o", str(out), "--preset", "default"]) == 2
    assert "no attention found" in capsys.readouterr().err
    assert not out.exists()


def test_resolve_rules() -> None:
    """The precedence rules on plain option dicts (no model)."""
    opts, res = resolve({}, "encoder")
    assert opts["token_keep"] == 0.4 and opts["kv_bits"] == "4+1" and res.preset.name == "default"
    opts, res = resolve({"token_keep": 0.3}, "encoder")
    assert res.preset is None and "kv_bits" not in opts
    opts, res = resolve({"preset": "default", "token_keep_schedule": (1.0, 0.5)}, "encoder")
    assert "token_keep" not in opts and res.replaced == ("tokens",) and opts["kv_bits"] == "4+1"
    opts, res = resolve({"kv_granularity": "head"}, "encoder")
    assert opts["kv_bits"] == "4+1" and "lsb_threshold" not in opts and opts["token_keep"] == 0.4
    opts, res = resolve({}, "decoder")
    assert opts["kv_budget"] == 0.5 and opts["kv_min_keep"] == DEFAULT_DECODER["kv_min_keep"] and not res.skipped
    assert opts["kv_slack"] == DEFAULT_DECODER["kv_slack"] > 0  # block eviction
    opts, res = resolve({"preset": "default", "kv_bits": "8"}, "decoder")  # a packed cache: evicted in blocks too
    assert opts["kv_budget"] == 0.5 and opts["kv_bits"] == "8" and opts["kv_slack"] == DEFAULT_DECODER["kv_slack"]
    opts, res = resolve({}, "decoder", features=NO_CACHE)  # a KV cache in only some layers
    assert "kv_budget" not in opts and res.skipped == ("evict",) and "kv_bits" not in opts
    opts, res = resolve({"kv_sinks": 8}, "decoder")  # eviction's details are independent knobs
    assert opts["kv_sinks"] == 8 and opts["kv_budget"] == 0.5 and opts["kv_min_keep"] == DEFAULT_DECODER["kv_min_keep"]
    opts, res = resolve({"kv_budget": 0.3}, "decoder")  # an explicit rewrite option: exactly that
    assert res.preset is None and "kv_bits" not in opts and "kv_min_keep" not in opts
    opts, res = resolve({"preset": "aggressive", "kv_budget": 0.3}, "decoder")
    assert res.replaced == ("evict",) and "kv_min_keep" not in opts and "kv_bits" not in opts
    opts, res = resolve({}, "decoder-nocache", features=NO_CACHE)  # K/V bits only, no eviction to skip
    assert opts == DEFAULT_NOCACHE and res.applied == {"kv": DEFAULT_NOCACHE} and not res.skipped
    opts, res = resolve({"token_keep": 0.5}, "decoder-nocache", features=NO_CACHE)
    assert res.preset is None and "kv_bits" not in opts
    for name in PRESET_NAMES:  # the measured points; the others say which are
        if ("decoder-nocache", name) in PRESETS:
            assert resolve({"preset": name}, "decoder-nocache", features=NO_CACHE)[1].preset.name == name
        else:
            measured = ", ".join(n for n in PRESET_NAMES if ("decoder-nocache", n) in PRESETS)
            with pytest.raises(OptionError, match="no measured preset for a decoder without a KV cache .* yet; "
                                                  f"measured: {measured}"):
                resolve({"preset": name}, "decoder-nocache", features=NO_CACHE)
    assert resolve({}, "none")[1].preset is None
    assert resolve({}, "encoder", pipeline="normalize")[1].preset is None


def test_heads_folded_into_the_batch_get_per_layer_eviction() -> None:
    """BLOOM and XGLM fold the heads into the batch ([B*H, q, n] probabilities): the decoder preset's
    per-KV-head eviction becomes per-layer eviction there (an explicit --kv-evict head refuses)."""
    from types import SimpleNamespace

    from spatten_compiler.passes.evict_kv import kv_heads

    from spatten_compiler.defaults import FEATURES

    folded = [SimpleNamespace(variant={"layout": "folded"}, layer=0, kv_cache=True, caches=["K", "V"],
                               own_keys=True)]
    features = frozenset(k for k, f in FEATURES.items() if f.has(folded))
    assert "head_scores" not in features and "kv_cache" in features
    assert resolve({}, "decoder")[0]["kv_evict"] == "head"
    opts, res = resolve({}, "decoder", features=features)
    assert opts["kv_evict"] == res.applied["evict"]["kv_evict"] == "layer" and opts["kv_budget"] == 0.5
    assert resolve({"kv_evict": "head"}, "decoder", features=features)[0]["kv_evict"] == "head"
    with pytest.raises(OptionError, match="folds the heads into the batch .* use --kv-evict layer"):
        kv_heads(folded[0])


def test_plan_takes_a_compile_config(tmp_path: Path) -> None:
    """The Python API's form (a CompileConfig whose unset fields are None) resolves as the CLI's dict."""
    import onnx_ir as ir

    from spatten_compiler.config import CompileConfig
    from spatten_compiler.plan import plan

    model = ir.load(MODELS / "bert_torchscript.onnx")
    config, res, _ = plan(CompileConfig(), model, "bert")
    assert res.preset.name == "default" and config.token_keep == 0.4 and config.kv_bits == "4+1"
    config, res, _ = plan(CompileConfig(token_keep=0.5), model, "bert")
    assert res.preset is None and config.kv_bits is None


def test_model_kind() -> None:
    class Site:
        def __init__(self, kv: bool, mask: str) -> None:
            self.kv_cache, self.mask_kind = kv, mask
            self.caches = ["K", "V"] if kv else []  # the cache concats a step extends

    assert model_kind([]) == "none"
    assert model_kind([Site(False, "padding")]) == "encoder"
    assert model_kind([Site(False, "padding"), Site(False, "causal+padding")]) == "decoder-nocache"
    assert model_kind([Site(False, "causal")]) == "decoder-nocache"
    assert model_kind([Site(True, "none")]) == "decoder"
    assert model_kind([Site(True, "causal"), Site(False, "causal")]) == "decoder"  # a cache in some layers


def test_a_registered_nocache_preset_applies_by_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry is keyed by kind: an entry for decoder-nocache is what its no-option compile gets."""
    from spatten_compiler import defaults

    entry = defaults.Preset("decoder-nocache", "default", (defaults.Setting("tokens", "token_keep", NOCACHE_KEEP,
                                                                            "x", "x"),))
    monkeypatch.setitem(defaults.PRESETS, ("decoder-nocache", "default"), entry)
    opts, res = resolve({}, "decoder-nocache", features=NO_CACHE)
    assert opts["token_keep"] == NOCACHE_KEEP and res.applied == {"tokens": {"token_keep": NOCACHE_KEEP}}
    assert resolve({}, "encoder")[0]["token_keep"] == 0.4 and "token_keep" not in resolve({}, "decoder")[0]


def test_a_preset_part_the_model_refuses_is_left_out(tmp_path: Path, monkeypatch, capsys) -> None:
    """The default preset tries its token pruning on a probe first: where prune-tokens refuses a layout
    only while rewriting (DeBERTa's position terms computed from activations), the preset leaves token
    pruning out, applies the rest and says why; an explicit --token-keep still refuses (exit 2)."""
    from spatten_compiler.passes import prune_tokens

    def refuse(sites):
        raise OptionError("layer 1: a layout the test refuses")

    monkeypatch.setattr(prune_tokens, "_check_sites", refuse)
    src = str(MODELS / "bert_torchscript.onnx")
    assert main([src, "-o", str(tmp_path / "p.onnx")]) == 0
    err = capsys.readouterr().err
    assert "(token pruning skipped: layer 1: a layout the test refuses)" in err
    ops = {n.op_type for n in onnx.load(tmp_path / "p.onnx").graph.node}
    assert "TokenSelect" not in ops and "QuantizeSplit" in ops  # K/V quantization still applied
    assert main([src, "-o", str(tmp_path / "e.onnx"), "--token-keep", "0.5"]) == 2
    assert "a layout the test refuses" in capsys.readouterr().err


def test_a_decoder_preset_evicts_only_where_evict_kv_takes_the_layout(tmp_path: Path, monkeypatch, capsys) -> None:
    """The decoder preset tries its eviction on a probe too (MPT's ALiBi beside a Where mask is refused
    by evict-kv): left out with the reason, exit 0; an explicit --kv-budget still refuses."""
    from spatten_compiler.passes import evict_kv

    def refuse(sites, positions_why=None):
        raise OptionError("layer 0: mask form the test refuses")

    monkeypatch.setattr(evict_kv, "_check", refuse)
    src = str(MODELS / "gpt2_kv_torchscript.onnx")
    assert main([src, "-o", str(tmp_path / "p.onnx")]) == 0
    err = capsys.readouterr().err
    assert "KV-cache eviction is skipped: layer 0: mask form the test refuses" in err
    assert "positions-input" not in err  # the trial is quiet
    assert main([src, "-o", str(tmp_path / "e.onnx"), "--kv-budget", "0.5"]) == 2
    assert "mask form the test refuses" in capsys.readouterr().err


@pytest.mark.parametrize("serving", [{"optimize": True}, {"weights": "int8"}, {"optimize": True, "weights": "int8"}])
def test_serving_options_skip_kv_planes_without_a_cache(serving: dict) -> None:
    """--optimize / --weights make the output an onnxruntime model: an encoder's transient K/V planes would
    cost time there and save no memory, so the preset skips them (and says how to add them back)."""
    out, res = resolve({**serving}, "encoder", features=frozenset({"own_keys"}))
    assert "kv" in res.skipped and out.get("kv_bits") is None
    assert out["token_keep"] == PRESETS[("encoder", "default")].values("tokens")["token_keep"]
    reason = dict(res.refusals)["kv"]
    assert all(f"--{k}" in reason for k in serving) and "--preset default --kv-bits M+L" in reason
    # asked for explicitly, they stay; and a model with a KV cache keeps the preset's planes
    out, res = resolve({**serving, "preset": "default", "kv_bits": "4+1"}, "encoder", features=frozenset({"own_keys"}))
    assert out["kv_bits"] == "4+1" and "kv" in res.replaced
    out, res = resolve({**serving}, "encoder", features=frozenset({"own_keys", "kv_cache"}))
    assert out["kv_bits"] == PRESETS[("encoder", "default")].values("kv")["kv_bits"] and not res.skipped


def test_serving_options_give_the_fused_int8_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`spattenc m.onnx -o out.onnx --optimize --weights int8` with no other option: the default preset's
    token pruning, no K/V planes, onnxruntime's fused attention after the decision - and the summary says
    why the planes are off."""
    out = tmp_path / "out.onnx"
    assert main([str(MODELS / "bert_torchscript.onnx"), "-o", str(out), "--optimize", "--weights", "int8"]) == 0
    err = capsys.readouterr().err
    assert "K/V quantization skipped: --optimize/--weights target onnxruntime" in err
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "QAttention" in ops  # onnxruntime's int8 fused attention
    assert not ops & {"Quantize", "QuantizeSplit", "DequantizeMSB", "DequantizeSplit"}  # no K/V planes

"""Hugging Face Optimum (optimum-onnx) as a corpus exporter: the exports users most often bring.

Runs under its own venv: optimum-onnx pins transformers < 5, the project venv has transformers 5
(docs/coverage.md, "The optimum corpus", says how to make it). ``models/corpus.py --exporters
optimum,optimum_merged --optimum-python PY`` runs this file with that python; it also runs alone:

    /work/venvs/optimum/bin/python models/_optimum.py --only gpt2,llama --out DIR [--resume]

For every family of :data:`corpus.FAMILIES` that optimum has an ONNX config for, the same tiny
random-weight model as ``corpus.py`` (seed 0, :data:`corpus.TINY`) is saved with ``save_pretrained``
and exported with ``optimum.exporters.onnx.main_export`` as ``optimum-cli export onnx`` would:

* encoders, vision, raw-waveform audio: the default task (``feature-extraction``) ->
  ``<family>_optimum``; seq2seq text and Whisper: the default (``text2text-generation`` /
  ``automatic-speech-recognition``) export's ``encoder_model.onnx`` -> ``<family>_optimum``;
* decoders: ``text-generation`` (no past) -> ``<family>_optimum``; ``text-generation-with-past``
  (the single ``model.onnx`` optimum-onnx writes) -> ``<family>_optimum_kv``; the legacy pair
  ``decoder_model`` + ``decoder_with_past_model`` merged by optimum into
  ``decoder_model_merged.onnx`` (an ``If`` on ``use_cache_branch``) -> ``<family>_optimum_merged_kv``
  (exporter ``optimum_merged``). optimum-onnx dropped ``legacy=True``; its decoder config still
  merges when it is handed the two submodels, so :func:`legacy_decoders` hands it them.

Each export is checked against torch (the model loaded back from the saved folder): the main output
(``last_hidden_state`` / ``logits``) within 1e-4 on the reference inputs, which are ``<name>.npz``
(the graph's input names exactly): batch 2, 7 tokens; with past, a 7-token step after a random
3-token past. Merged: both branches, ``use_cache_branch`` False with an empty past
(``<name>.prompt.npz``) and True with the 3-token past (``<name>.npz``). One JSON line per model is
appended to ``manifest.jsonl`` in ``corpus.py``'s format.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _export_core as core  # noqa: E402
from corpus import (  # noqa: E402
    ATOL,
    FAMILIES,
    FAMILIES_BY_TYPE,
    SEED,
    Family,
    append_record,
    expected_dims,
    make_config,
    read_manifest,
)

log = logging.getLogger("spattenc.corpus.optimum")
EXPORTERS = ("optimum", "optimum_merged")
BATCH, SEQ, PAST = 2, 7, 3
# --fixture: committed-size test fixtures (< 400 KB): the corpus's layers, heads, KV heads and head
# dim, a smaller vocabulary and MLP (their weights are most of a tiny model's bytes).
# Applied where the config has the attribute (GPT-2: n_inner, n_positions).
FIXTURE = {"vocab_size": 64, "intermediate_size": 32, "n_inner": 32, "max_position_embeddings": 32}
# (exporter, kind) -> manifest name suffix; kinds: plain (no cache), kv (with past), merged
SUFFIX = {"plain": "", "kv": "_kv", "merged": "_kv"}


def optimum_tasks(model_type: str) -> list[str]:
    """The ONNX tasks optimum has for ``model_type`` ([] when it has no ONNX config)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the configs
    from optimum.exporters.tasks import TasksManager

    try:
        return list(TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers"))
    except KeyError:
        return []


def kinds_for(fam: Family, exporters: tuple[str, ...]) -> list[tuple[str, str]]:
    """(exporter, kind) pairs to produce for ``fam``."""
    out = []
    if "optimum" in exporters:
        out.append(("optimum", "plain"))
        if fam.kind == "decoder" and fam.kv:
            out.append(("optimum", "kv"))
    if "optimum_merged" in exporters and fam.kind == "decoder" and fam.kv:
        out.append(("optimum_merged", "merged"))
    return out


def model_name(fam: Family, exporter: str, kind: str) -> str:
    return f"{fam.model_type.replace('-', '_')}_{exporter}{SUFFIX[kind]}"


def fix_config_v4(config: Any, fam: Family) -> None:
    """What :func:`corpus.make_config` (written for transformers 5) leaves inconsistent under
    transformers 4: attributes that 4.x derives once in ``__init__`` from the sizes it overrides."""
    n = getattr(config, "num_hidden_layers", None)
    if isinstance(getattr(config, "layer_types", None), list):  # save_pretrained validates its length
        config.layer_types = config.layer_types[:n]
    if hasattr(config, "attention_types") and hasattr(config, "attention_layers"):  # GPT-Neo: 24 layer types
        config.attention_types = [[["global", "local"], max(1, int(config.num_layers) // 2)]]
        config.attention_layers = config.expand_attention_types_params(config.attention_types)
    if hasattr(config, "qk_head_dim"):  # DeepSeek-V3 (MLA): nope + rope, fixed at the defaults' 192
        config.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    if hasattr(config, "stage_names") and hasattr(config, "out_features"):  # backbone configs: 12 stages
        stages = len(config.depths) if isinstance(getattr(config, "depths", None), list) else n
        config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, stages + 1)]
        config.out_features = None  # the setter aligns out_features / out_indices on the last stage
    if fam.model_type == "yolos":  # 4.x indexes image_size as (height, width)
        config.image_size = [config.image_size] * 2 if isinstance(config.image_size, int) else config.image_size
    if fam.kind == "seq2seq-encoder" and getattr(config, "tie_word_embeddings", None) is False:
        # 4.x drops the tied encoder/decoder embed_tokens on save and does not retie them on load
        # with tie_word_embeddings False: they come back random. Every real checkpoint ties them.
        config.tie_word_embeddings = True


def save_model(fam: Family, folder: Path) -> tuple[Any, Any]:
    """The corpus's tiny model for ``fam`` (seed 0), saved with ``save_pretrained`` the way a user's
    checkpoint is: a task head where optimum's default task needs one. Returns the model loaded back
    from ``folder`` (as optimum loads it: the default attention implementation) and its config."""
    torch.manual_seed(SEED)
    config = make_config(fam)
    fix_config_v4(config, fam)
    auto = {"decoder": transformers.AutoModelForCausalLM, "seq2seq-encoder": transformers.AutoModelForSeq2SeqLM,
            "audio-encoder": transformers.AutoModelForSpeechSeq2Seq}.get(fam.kind, transformers.AutoModel)
    model = auto.from_config(config).eval()
    model.save_pretrained(folder)
    if fam.model_type == "dinov2":  # optimum's DINOv2 dummy input reads the checkpoint's image processor
        size = int(config.image_size)  # (and fails without one); every real checkpoint has one
        transformers.BitImageProcessor(size={"shortest_edge": size},
                                       crop_size={"height": size, "width": size}).save_pretrained(folder)
    loaded = type(model).from_pretrained(folder).eval()
    saved, back = model.state_dict(), loaded.state_dict()
    changed = [k for k in saved if k not in back or not torch.equal(saved[k], back[k])]
    if changed:  # optimum would export other weights than the reference has
        raise RuntimeError(f"save_pretrained/from_pretrained does not round-trip {', '.join(changed[:3])}")
    return loaded, config


@contextmanager
def legacy_decoders() -> Iterator[None]:
    """Make optimum-onnx export a decoder as the legacy pair ``decoder_model`` (no past in, present out)
    and ``decoder_with_past_model``, which its ``TextDecoderOnnxConfig.post_process_exported_models``
    merges into ``decoder_model_merged.onnx`` (what optimum 1.x's ``legacy=True`` did)."""
    import optimum.exporters.utils as eu

    original = eu.get_decoder_models_for_export

    def pair(model: Any, config: Any) -> dict[str, tuple[Any, Any]]:
        kw = {"task": config.task, "int_dtype": config.int_dtype, "float_dtype": config.float_dtype}
        return {"decoder_model": (model, config.__class__(model.config, use_past=True, use_past_in_inputs=False,
                                                          **kw)),
                "decoder_with_past_model": (model, config.__class__(model.config, use_past=True,
                                                                    use_past_in_inputs=True, **kw))}

    eu.get_decoder_models_for_export = pair
    try:
        yield
    finally:
        eu.get_decoder_models_for_export = original


TASKS = {("decoder", "plain"): "text-generation", ("decoder", "kv"): "text-generation-with-past",
         ("decoder", "merged"): "text-generation-with-past", ("seq2seq-encoder", "plain"): "text2text-generation",
         ("audio-encoder", "plain"): "automatic-speech-recognition"}


def run_optimum(hf: Path, out: Path, fam: Family, kind: str) -> Path:
    """Export ``hf`` with optimum; return the ONNX file that is the corpus model."""
    from optimum.exporters.onnx import main_export
    from transformers import AutoConfig

    task = TASKS.get((fam.kind, kind), "feature-extraction")
    supported = optimum_tasks(fam.model_type)
    if task not in supported:
        raise ValueError(f"optimum-onnx has no task {task} for {fam.model_type} (has {', '.join(supported)})")
    shapes = {}
    if fam.kind == "audio-encoder":  # optimum-cli --nb_max_frames: its dummy input has 3000 frames by default
        shapes["nb_max_frames"] = 2 * int(AutoConfig.from_pretrained(hf).max_source_positions)
    with legacy_decoders() if kind == "merged" else _nothing():
        main_export(str(hf), out, task=task, library_name="transformers", framework="pt", local_files_only=True,
                    do_validation=False, **shapes)
    files = {"merged": "decoder_model_merged.onnx"}.get(kind) or (
        "encoder_model.onnx" if fam.kind in ("seq2seq-encoder", "audio-encoder") else "model.onnx")
    if not (out / files).exists():
        raise FileNotFoundError(f"optimum wrote no {files} (wrote {', '.join(sorted(p.name for p in out.iterdir()))})")
    return out / files


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def graph_inputs(path: Path) -> list[tuple[str, int, list[int | str]]]:
    """(name, onnx elem type, dims: int or dim_param) of the graph's real inputs."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
        out.append((vi.name, tt.elem_type, dims))
    return out


def reference_feeds(path: Path, config: Any, fam: Family, past: int, rng: np.random.Generator,
                    cache_branch: bool | None = None) -> dict[str, np.ndarray]:
    """Inputs for every graph input: ``past`` cached positions (0: the prompt, no cache)."""
    vocab = min(int(getattr(config, "vocab_size", 256) or 256), 256)
    ids = rng.integers(3, vocab, size=(BATCH, SEQ), dtype=np.int64)
    sizes = {"batch_size": BATCH, "sequence_length": SEQ, "past_sequence_length": past,
             "past_sequence_length + sequence_length": past + SEQ, "past_sequence_length + 1": past + 1}
    feeds: dict[str, np.ndarray] = {}
    for name, _elem, dims in graph_inputs(path):
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            mask = np.ones((BATCH, past + SEQ), dtype=np.int64)
            if fam.kind != "decoder":  # encoders: a padded row, as corpus.py's reference inputs
                mask[-1, -2:] = 0
            feeds[name] = mask
        elif name == "token_type_ids":
            feeds[name] = np.zeros((BATCH, SEQ), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(past, past + SEQ, dtype=np.int64), (BATCH, SEQ)).copy()
        elif name == "bbox":  # LayoutLM: one valid box per token
            feeds[name] = np.broadcast_to(np.array([10, 20, 30, 40], np.int64), (BATCH, SEQ, 4)).copy()
        elif name in ("xpath_tags_seq", "xpath_subs_seq"):  # MarkupLM
            feeds[name] = np.zeros((BATCH, SEQ, int(config.max_depth)), dtype=np.int64)
        elif name == "pixel_values":
            size = config.image_size if isinstance(config.image_size, list) else [config.image_size] * 2
            feeds[name] = rng.standard_normal((BATCH, int(config.num_channels), *map(int, size))).astype(np.float32)
        elif name == "input_values":
            feeds[name] = rng.standard_normal((BATCH, 400)).astype(np.float32)
        elif name == "input_features":
            shape = (BATCH, int(config.num_mel_bins), 2 * int(config.max_source_positions))
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
        elif name == "use_cache_branch":
            feeds[name] = np.array([bool(cache_branch)])
        elif name.startswith("past_key_values."):
            shape = []
            for d in dims:
                if isinstance(d, str):
                    if d not in sizes:
                        raise ValueError(f"input {name}: unknown dim {d!r}")
                    shape.append(sizes[d])
                else:
                    shape.append(int(d))
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
        else:
            raise ValueError(f"no reference input for graph input {name!r}")
    return feeds


def torch_reference(model: Any, fam: Family, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The main output of the torch model on ``feeds`` (past as a DynamicCache)."""
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items() if k != "use_cache_branch"}
    with torch.no_grad():
        if fam.kind in ("seq2seq-encoder", "audio-encoder"):
            return model.get_encoder()(**t).last_hidden_state.numpy()
        if fam.kind != "decoder":
            return model(**t).last_hidden_state.numpy()
        past = sorted((k for k in t if k.startswith("past_key_values.")), key=lambda k: int(k.split(".")[1]))
        kwargs = {k: v for k, v in t.items() if not k.startswith("past_key_values.")}
        layers = sorted({int(k.split(".")[1]) for k in past})
        if layers and t[past[0]].shape[-2] > 0:
            legacy = tuple((t[f"past_key_values.{i}.key"], t[f"past_key_values.{i}.value"]) for i in layers)
            kwargs["past_key_values"] = transformers.DynamicCache.from_legacy_cache(legacy)
        return model(**kwargs, use_cache=bool(layers)).logits.numpy()


def main_output(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.output[0].name


def export_one(fam: Family, exporter: str, kind: str, out: Path) -> dict[str, Any]:
    import onnx

    name = model_name(fam, exporter, kind)
    record: dict[str, Any] = {"name": name, "family": fam.model_type, "exporter": exporter, "kind": fam.kind,
                              "kv_cache": kind != "plain", "onnx": f"{name}.onnx"}
    path = out / f"{name}.onnx"
    t0 = time.perf_counter()
    try:
        rng = np.random.default_rng(SEED)
        with tempfile.TemporaryDirectory(prefix="corpus-optimum-") as tmp:
            hf, onnx_dir = Path(tmp) / "hf", Path(tmp) / "onnx"
            model, config = save_model(fam, hf)
            record.update(expected_dims(config, fam))
            exported = run_optimum(hf, onnx_dir, fam, kind)
            onnx.save(onnx.load(str(exported)), str(path))  # weights inline, one file per model
        output = main_output(path)
        cases = [(PAST if kind != "plain" else 0, True if kind == "merged" else None)]
        if kind == "merged":
            cases.append((0, False))
        diffs, all_feeds = [], []
        for past, branch in cases:
            feeds = reference_feeds(path, config, fam, past, rng, branch)
            want = torch_reference(model, fam, feeds)
            got = core.run_onnx(path, feeds)[output]
            if got.shape != want.shape:
                raise AssertionError(f"{output} shape {got.shape} != torch {want.shape}")
            diffs.append(float(np.abs(want.astype(np.float64) - got).max()))
            all_feeds.append(feeds)
        record["max_abs_diff"] = diff = max(diffs)
        if not np.isfinite(diff) or diff > ATOL:
            branches = f"; use_cache_branch True/False: {diffs[0]:.2g}/{diffs[1]:.2g}" if kind == "merged" else ""
            raise AssertionError(f"onnxruntime differs from torch by {diff:.3g} ({output}{branches})")
        np.savez(out / f"{name}.npz", **all_feeds[0])
        if kind == "merged":
            np.savez(out / f"{name}.prompt.npz", **all_feeds[1])
        record["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - every failure is recorded with its reason
        core.record_failure(record, path, e)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated model_types (default: every family optimum exports)")
    p.add_argument("--exporters", default=",".join(EXPORTERS), help="optimum, optimum_merged")
    p.add_argument("--kinds", default="plain,kv,merged", help="plain, kv, merged (a subset to export)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="skip models already in the manifest")
    p.add_argument("--fixture", action="store_true",
                   help=f"test-fixture sizes: {FIXTURE} over each family's config (same names)")
    p.add_argument("-v", "--verbose", action="store_true", help="log failures' tracebacks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    import optimum.exporters.onnx  # noqa: F401 - before set_offline quiets the loggers it configures

    core.set_offline()
    for noisy in ("optimum", "optimum.exporters", "optimum.exporters.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    exporters = tuple(e for e in args.exporters.split(",") if e)
    if set(exporters) - set(EXPORTERS):
        p.error(f"--exporters takes {', '.join(EXPORTERS)}")
    kinds = set(args.kinds.split(","))
    done = {r["name"] for r in read_manifest(args.out)} if args.resume else set()
    fams = [FAMILIES_BY_TYPE[t] for t in args.only.split(",")] if args.only else FAMILIES
    if args.fixture:
        fams = [dataclasses.replace(f, overrides={**f.overrides, **{k: v for k, v in FIXTURE.items() if hasattr(
            transformers.AutoConfig.for_model(f.model_type), k)}}) for f in fams]
    with (args.out / "manifest.jsonl").open("a") as manifest:
        for fam in fams:
            if not optimum_tasks(fam.model_type):
                log.info("%-32s skipped: optimum-onnx has no ONNX config for %s", fam.model_type, fam.model_type)
                continue
            for exporter, kind in kinds_for(fam, exporters):
                name = model_name(fam, exporter, kind)
                if kind not in kinds or name in done:
                    continue
                rec = export_one(fam, exporter, kind, args.out)
                append_record(manifest, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())

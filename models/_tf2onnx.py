"""tf2onnx as a corpus exporter: TensorFlow/Keras transformers as their users convert them.

Runs under its own venv without torch (TensorFlow 2.15 CPU, transformers 4.x with its TF classes,
tf2onnx 1.17; docs/coverage.md, "The tf2onnx corpus", says how to make it).
``models/corpus.py --exporters tf2onnx --tf-python PY`` runs this file with that python; it also runs alone:

    /work/venvs/tf/bin/python models/_tf2onnx.py --only bert,gpt2 --out DIR [--resume] [--fixture]

For every family with a transformers TF class (:data:`TF_FAMILIES`), the corpus's tiny random-weight
model (:data:`corpus.TINY` over the family's config, TF's own seed-0 initialisation) is converted with
``tf2onnx.convert.from_function`` on a ``tf.function`` with dynamic batch and sequence dims (what
``from_keras`` does for a subclassed Keras model, with the graph's input names fixed):

* encoders: ``input_ids``, ``attention_mask`` (int32, as TF tokenizers give them) -> ``last_hidden_state``;
* decoders: the LM head model (no past) -> ``logits``;
* seq2seq text / Whisper: the encoder -> ``last_hidden_state``; vision: ``pixel_values`` (NCHW, as the
  HF TF vision models take it and transpose to NHWC inside) -> ``last_hidden_state``.

Each conversion is checked against TensorFlow (<= 1e-4) on the reference inputs, ``<name>.npz``
(batch 2, 7 tokens, the last row's 2 last tokens padded, as ``corpus.py``'s); one JSON line per model is
appended to ``manifest.jsonl`` in ``corpus.py``'s format (exporter ``tf2onnx``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("spattenc.corpus.tf2onnx")
HERE = Path(__file__).resolve().parent
EXPORTER = "tf2onnx"
BATCH, SEQ = 2, 7
OPSET = 15  # tf2onnx 1.17's default
FIXTURE = {"vocab_size": 64, "intermediate_size": 32, "n_inner": 32, "max_position_embeddings": 32,
           "encoder_ffn_dim": 32, "d_ff": 32, "dff": 32}


def _import_corpus() -> types.ModuleType:
    """``corpus.py`` for its families and config helpers (transformers only). Its torch exporters are
    never called here, and this venv has no torch: stand-ins let its module-level imports resolve,
    and are removed again (transformers probes for torch later)."""
    import transformers  # noqa: F401 - imported before the stand-ins: it probes for torch on import

    sys.path.insert(0, str(HERE))
    stand_ins = {}
    if importlib.util.find_spec("torch") is None:
        stand_ins = {name: types.ModuleType(name) for name in ("torch", "_export_core", "_genai", "_wrappers")}
        for attr in ("_NamedInputs", "KVCacheLM", "Logits"):
            setattr(stand_ins["_wrappers"], attr, object)
    sys.modules.update(stand_ins)
    try:
        import corpus
    finally:
        for name in stand_ins:
            del sys.modules[name]
    return corpus


corpus = _import_corpus()


@dataclasses.dataclass(frozen=True)
class TFFamily:
    model_type: str
    tf_class: str  # the transformers TF class the user loads
    part: str = ""  # "encoder": the model's get_encoder() (seq2seq, Whisper)
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def _tf(model_type: str, tf_class: str, part: str = "", **overrides: Any) -> TFFamily:
    return TFFamily(model_type, tf_class, part, overrides)


# Families transformers 4.x has a TF class for (the corpus family's overrides apply; ``overrides``
# here add what the TF class needs).
TF_FAMILIES: list[TFFamily] = [
    *[_tf(t, c) for t, c in (("bert", "TFBertModel"), ("roberta", "TFRobertaModel"), ("electra", "TFElectraModel"),
                             ("distilbert", "TFDistilBertModel"), ("xlm-roberta", "TFXLMRobertaModel"),
                             ("mpnet", "TFMPNetModel"), ("roformer", "TFRoFormerModel"), ("esm", "TFEsmModel"),
                             ("albert", "TFAlbertModel"), ("deberta", "TFDebertaModel"),
                             ("deberta-v2", "TFDebertaV2Model"), ("camembert", "TFCamembertModel"),
                             ("layoutlm", "TFLayoutLMModel"), ("roberta-prelayernorm", "TFRobertaPreLayerNormModel"),
                             ("xlm", "TFXLMModel"), ("flaubert", "TFFlaubertModel"), ("rembert", "TFRemBertModel"),
                             ("mobilebert", "TFMobileBertModel"), ("convbert", "TFConvBertModel"))],
    _tf("opt", "TFOPTForCausalLM", word_embed_proj_dim=64),
    *[_tf(t, c) for t, c in (("gpt2", "TFGPT2LMHeadModel"), ("gptj", "TFGPTJForCausalLM"),
                             ("mistral", "TFMistralForCausalLM"), ("xglm", "TFXGLMForCausalLM"),
                             ("ctrl", "TFCTRLLMHeadModel"), ("openai-gpt", "TFOpenAIGPTLMHeadModel"))],
    *[_tf(t, c, "encoder") for t, c in (("t5", "TFT5EncoderModel"), ("bart", "TFBartModel"),
                                        ("pegasus", "TFPegasusModel"), ("marian", "TFMarianModel"),
                                        ("mt5", "TFMT5EncoderModel"), ("mbart", "TFMBartModel"),
                                        ("blenderbot", "TFBlenderbotModel"), ("whisper", "TFWhisperModel"))],
    *[_tf(t, c) for t, c in (("vit", "TFViTModel"), ("deit", "TFDeiTModel"), ("clip_vision_model", "TFCLIPVisionModel"),
                             ("data2vec-vision", "TFData2VecVisionModel"))],
]
TF_BY_TYPE = {f.model_type: f for f in TF_FAMILIES}


def family(tf_fam: TFFamily) -> Any:
    """The corpus family (its kind, overrides, expected dims) for ``tf_fam``; a decoder one for
    families the torch corpus does not have (OpenAI GPT)."""
    fam = corpus.FAMILIES_BY_TYPE.get(tf_fam.model_type) or corpus.Family(tf_fam.model_type, "decoder")
    return dataclasses.replace(fam, overrides={**fam.overrides, **tf_fam.overrides})


def build(tf_fam: TFFamily, fixture: bool) -> tuple[Any, Any, Any, dict[str, np.ndarray], str]:
    """(callable on named int32/float32 tensors, config, corpus family, reference feeds, output name)."""
    import tensorflow as tf
    import transformers

    fam = family(tf_fam)
    if fixture:
        base = transformers.AutoConfig.for_model(fam.model_type)
        fam = dataclasses.replace(fam, overrides={**fam.overrides,
                                                  **{k: v for k, v in FIXTURE.items() if hasattr(base, k)}})
    tf.keras.utils.set_random_seed(corpus.SEED)
    config = corpus.make_config(fam)
    if fam.kind == "seq2seq-encoder" and getattr(config, "tie_word_embeddings", None) is False:
        config.tie_word_embeddings = True  # TF seq2seq models share the embedding between encoder and decoder
    model = getattr(transformers, tf_fam.tf_class)(config)
    rng = np.random.default_rng(corpus.SEED)
    if fam.kind == "vision":
        size = int(config.image_size)
        feeds = {"pixel_values": rng.standard_normal((BATCH, int(config.num_channels), size, size)).astype(np.float32)}
    elif fam.kind == "audio-encoder":
        shape = (BATCH, int(config.num_mel_bins), 2 * int(config.max_source_positions))
        feeds = {"input_features": rng.standard_normal(shape).astype(np.float32)}
    else:
        vocab = min(int(getattr(config, "vocab_size", 256) or 256), 256)
        ids = rng.integers(3, vocab, size=(BATCH, SEQ)).astype(np.int32)
        mask = np.ones((BATCH, SEQ), dtype=np.int32)
        if fam.kind != "decoder":
            mask[-1, -2:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask}
    net = model.get_encoder() if tf_fam.part == "encoder" else model
    output = "logits" if fam.kind == "decoder" else "last_hidden_state"
    net(**{k: tf.constant(v) for k, v in feeds.items()})  # builds the weights
    randomize_zero_matrices(net, float(getattr(config, "initializer_range", 0.02)), rng)
    return net, config, fam, feeds, output


def randomize_zero_matrices(model: Any, std: float, rng: np.random.Generator) -> None:
    """Some TF classes leave a matrix at zero until ``from_pretrained`` loads it (TFOPT's shared token
    embedding): its outputs would be constant, and any rewrite would look exact. Such matrices get
    N(0, std) values (biases and norms keep their zeros and ones)."""
    for w in model.weights:
        if len(w.shape) >= 2 and not np.any(w.numpy()):
            w.assign(rng.normal(0.0, std, size=w.shape).astype(w.dtype.as_numpy_dtype))


def convert(net: Any, feeds: dict[str, np.ndarray], output: str, path: Path, opset: int) -> None:
    import onnx
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec([None] * v.ndim if v.ndim == 2 else [None, *v.shape[1:]], tf.as_dtype(v.dtype), name=k)
            for k, v in feeds.items()]
    names = list(feeds)

    def forward(*args: Any) -> dict[str, Any]:
        return {output: getattr(net(**dict(zip(names, args, strict=True))), output)}

    fn = tf.function(forward, input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset)
    onnx.save(constant_captures(proto, fn.get_concrete_function(), len(spec)), str(path))


def constant_captures(proto: Any, concrete: Any, n_args: int) -> Any:
    """tf2onnx 1.17 lists the tensors a function captures that are not variables (GPT-J's sinusoidal
    table, XGLM's and CTRL's position tables: ``tf.constant`` built in ``__init__``) as graph inputs
    that nobody can feed. They are the function's trailing inputs; each becomes an initializer with
    its captured value, as freezing does for variables."""
    import onnx
    import tensorflow as tf

    values = {t.name: v.numpy() for t, v in zip(concrete.inputs[n_args:], concrete.captured_inputs, strict=True)
              if v.dtype != tf.resource}
    graph = proto.graph
    captured = [i for i in graph.input if i.name in values]
    for vi in captured:
        graph.input.remove(vi)
        graph.initializer.append(onnx.numpy_helper.from_array(values[vi.name], vi.name))
    return proto


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def export_one(tf_fam: TFFamily, out: Path, fixture: bool, opset: int) -> dict[str, Any]:
    import tensorflow as tf

    fam = family(tf_fam)
    name = f"{fam.model_type.replace('-', '_')}_{EXPORTER}"
    record: dict[str, Any] = {"name": name, "family": fam.model_type, "exporter": EXPORTER, "kind": fam.kind,
                              "kv_cache": False, "onnx": f"{name}.onnx", "tf_class": tf_fam.tf_class, "opset": opset}
    path = out / f"{name}.onnx"
    t0 = time.perf_counter()
    try:
        net, config, fam, feeds, output = build(tf_fam, fixture)
        record.update(corpus.expected_dims(config, fam))
        want = getattr(net(**{k: tf.constant(v) for k, v in feeds.items()}), output).numpy()
        if not want.std() > 0:
            raise AssertionError(f"{output} is constant: a check against it would prove nothing")
        convert(net, feeds, output, path, opset)
        got = run_onnx(path, feeds)[output]
        if got.shape != want.shape:
            raise AssertionError(f"{output} shape {got.shape} != TensorFlow {want.shape}")
        record["max_abs_diff"] = diff = float(np.abs(want.astype(np.float64) - got).max())
        if not np.isfinite(diff) or diff > corpus.ATOL:
            raise AssertionError(f"onnxruntime differs from TensorFlow by {diff:.3g}")
        np.savez(out / f"{name}.npz", **feeds)
        record["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - every failure is recorded with its reason
        path.unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        record.update(status="failed", reason=f"{type(e).__name__}: {first}")
        log.debug("%s", traceback.format_exc())
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated model_types (default: every family in TF_FAMILIES)")
    p.add_argument("--out", type=Path)
    p.add_argument("--opset", type=int, default=OPSET)
    p.add_argument("--resume", action="store_true", help="skip models already in the manifest")
    p.add_argument("--fixture", action="store_true", help=f"test-fixture sizes: {FIXTURE} where the config has them")
    p.add_argument("-v", "--verbose", action="store_true", help="log failures' tracebacks")
    p.add_argument("--list", action="store_true", help="print the model_types of TF_FAMILIES and exit")
    args = p.parse_args(argv)
    if args.list:
        print(" ".join(TF_BY_TYPE))
        return 0
    if args.out is None:
        p.error("--out is required")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("tf2onnx", "tensorflow", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    unknown = set(args.only.split(",")) - set(TF_BY_TYPE) if args.only else set()
    if unknown:
        p.error(f"no TF family {', '.join(sorted(unknown))} (have {', '.join(TF_BY_TYPE)})")
    fams = [TF_BY_TYPE[t] for t in args.only.split(",")] if args.only else TF_FAMILIES
    args.out.mkdir(parents=True, exist_ok=True)
    done = {r["name"] for r in corpus.read_manifest(args.out)} if args.resume else set()
    with (args.out / "manifest.jsonl").open("a") as manifest:
        for tf_fam in fams:
            if f"{tf_fam.model_type.replace('-', '_')}_{EXPORTER}" in done:
                continue
            rec = export_one(tf_fam, args.out, args.fixture, args.opset)
            corpus.append_record(manifest, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())

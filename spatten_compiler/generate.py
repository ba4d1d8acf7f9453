"""Text generation over a (rewritten) decoder: tokenize, prefill, sample, stream, stop at EOS.

Only ``tokenizers`` and the runtime are needed (no torch, no transformers): the tokenizer folder is
what ``models/export.py --real smollm2`` writes (``tokenizer.json``, ``tokenizer_config.json`` for
the EOS token, ``chat_template.jinja`` for ``--chat``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from spatten_compiler.decoding import DecoderSession
from spatten_compiler.errors import OptionError

logger = logging.getLogger(__name__)


class TextTokenizer:
    """A ``tokenizers`` tokenizer plus the special tokens generation needs."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        path = folder / "tokenizer.json" if folder.is_dir() else folder
        if not path.is_file():
            raise OptionError(f"--tokenizer {folder}: no tokenizer.json")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover
            raise OptionError("generate needs the tokenizers package (pip install tokenizers)") from e
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
            raise OptionError(f"--tokenizer {path}: not a tokenizers file ({str(e).splitlines()[0]})") from e
        config_path = path.parent / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.eos_ids = {i for i in (self._id(config.get("eos_token")), self._id("<|endoftext|>"),
                                    self._id("</s>"), self._id("<|im_end|>")) if i is not None}
        template = path.parent / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def _id(self, token: object) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return self.tok.token_to_id(token) if isinstance(token, str) else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat(self, prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if self.chat_template:
            try:
                import jinja2

                return jinja2.Template(self.chat_template).render(messages=messages, add_generation_prompt=True)
            except ImportError:
                pass
        return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"  # ChatML


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature <= 0, else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cut = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
    keep = order[:cut]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


def open_session(model: str | Path, runtime: str = "ort", threads: int | None = None):
    """The session that steps ``model``: SharedCacheSession for a shared-buffer eviction model
    (evict-gqa{in_graph=false}, onnxruntime only), DecoderSession for every other decoder."""
    from spatten_compiler.shared_cache import SharedCacheSession

    if not SharedCacheSession.wants(model):
        return DecoderSession(model, runtime=runtime, threads=threads)
    if runtime != "ort":
        raise OptionError(f"{model}: a shared-buffer eviction model runs on onnxruntime only (--runtime ort)")
    return SharedCacheSession(model, threads=threads)


def generate_ids(session: DecoderSession, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, eos_ids: set[int] | None = None) -> Iterator[int]:
    """Yield new token ids one by one (prefill the prompt, then one token per step)."""
    if not prompt_ids:
        raise OptionError("the prompt is empty after tokenization")
    rng = np.random.default_rng(seed)
    session.reset(1)
    logits = session.step(np.array([prompt_ids], np.int64))[0, -1]
    for _ in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, rng)
        if eos_ids and tok in eos_ids:
            return
        yield tok
        logits = session.step(np.array([[tok]], np.int64))[0, -1]


def generate(model: str | Path, tokenizer: str | Path, prompt: str, max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, chat: bool = False,
             runtime: str = "ort", threads: int | None = None, stream: Callable[[str], None] | None = None) -> str:
    """Generate text after ``prompt``; ``stream`` receives each new piece of text as it is decoded."""
    if max_new_tokens < 0:
        raise OptionError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not 0 < top_p <= 1:
        raise OptionError(f"--top-p must be in (0, 1], got {top_p}")
    tok = TextTokenizer(tokenizer)
    session = open_session(model, runtime, threads)
    if session.vocab is not None and tok.vocab_size > session.vocab:
        raise OptionError(f"the tokenizer has {tok.vocab_size} tokens but the model's logits cover {session.vocab}: "
                          "this tokenizer does not belong to this model")
    ids = tok.encode(tok.chat(prompt) if chat else prompt)
    out: list[int] = []
    text = ""
    for t in generate_ids(session, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          eos_ids=tok.eos_ids):
        out.append(t)
        new = tok.decode(out)
        if stream is not None and len(new) > len(text) and not new.endswith("\ufffd"):
            stream(new[len(text):])
            text = new
    final = tok.decode(out)
    if stream is not None and len(final) > len(text):
        stream(final[len(text):])
    return final

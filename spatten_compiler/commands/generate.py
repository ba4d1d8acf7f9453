"""``spattenc generate``: stream text from a decoder (dense or rewritten by evict-kv)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spatten_compiler.commands import Command, register


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="decoder ONNX model with a KV cache (dense, or compiled with --kv-budget)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="folder with tokenizer.json (the export's folder; default: the model's folder)")
    p.add_argument("--prompt", required=True, help="prompt text (required)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate at most (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="sampling seed (default: a fresh random seed; greedy decoding ignores it)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--runtime", choices=("ort", "reference"), default="ort",
                   help="onnxruntime (default) or the NumPy reference runtime")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="onnxruntime intra-op threads (default: onnxruntime's choice)")


def run(args: argparse.Namespace) -> int:
    from spatten_compiler.errors import OptionError
    from spatten_compiler.generate import generate

    if not args.model.is_file():
        raise OptionError(f"{args.model}: no such file")
    tokenizer = args.tokenizer
    if tokenizer is None:
        tokenizer = args.model.parent
        if not (tokenizer / "tokenizer.json").is_file():
            raise OptionError(f"no tokenizer.json next to {args.model}: pass --tokenizer FOLDER (the export's folder)")

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate(args.model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, seed=args.seed, chat=args.chat, runtime=args.runtime, threads=args.threads,
             stream=stream)
    sys.stdout.write("\n")
    return 0


register(
    Command(
        name="generate",
        help="generate text with a decoder (streams tokens, stops at EOS)",
        add_arguments=add_arguments,
        run=run,
        epilog="example:\n  spattenc generate smollm2.kv.onnx --tokenizer models/cache/smollm2 "
        "--prompt 'What is gravity?' --chat --max-new-tokens 64",
    )
)

"""Shared helpers for the bench harness: data files, tokenizer, onnxruntime sessions, run metadata.

Both ``embed_eval.py`` and ``latency.py`` import this module. It deliberately depends only on
numpy, onnxruntime and tokenizers so that importing it is cheap; scikit-learn is only needed by
``embed_eval.py``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

log = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_RESULTS = BENCH_DIR / "results"
CACHE_DIR = BENCH_DIR / ".cache"
KEPT_OUTPUT = "spatten_kept_mask"
HIDDEN_OUTPUT = "last_hidden_state"


@dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: a short label for tables plus the ONNX path."""

    label: str
    path: Path


def parse_model_spec(text: str, default_label: str | None = None) -> ModelSpec:
    """Parse ``LABEL=PATH`` or ``PATH`` (label: parent folder + file stem) into a :class:`ModelSpec`."""
    label, sep, path = text.partition("=")
    if not sep:
        path, label = text, ""
    p = Path(path)
    if not label:
        label = default_label or (f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem)
    return ModelSpec(label=label, path=p)


def read_labeled_tsv(path: Path) -> tuple[list[str], np.ndarray]:
    """Read a ``sentence<TAB>label`` file with a header line; the label is after the LAST tab."""
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as fh:
        next(fh)  # header
        for lineno, line in enumerate(fh, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            text, sep, label = line.rpartition("\t")
            if not sep:
                raise ValueError(f"{path}:{lineno}: no tab in line")
            texts.append(text)
            labels.append(int(label))
    return texts, np.asarray(labels, dtype=np.int64)


def seeded_subset(n_total: int, n: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of size ``n`` (all rows when n is None or >= n_total), sorted."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=n, replace=False))


def find_tokenizer(model_path: Path, explicit: Path | None = None) -> Path:
    """``explicit`` if given, else ``tokenizer.json`` next to the model (or one folder up)."""
    if explicit is not None:
        return explicit
    for folder in (model_path.parent, model_path.parent.parent):
        cand = folder / "tokenizer.json"
        if cand.exists():
            return cand
    raise FileNotFoundError(f"no tokenizer.json next to {model_path}; pass --tokenizer")


def load_tokenizer(path: Path, max_len: int | None) -> Tokenizer:
    """Load ``tokenizer.json``: truncation at ``max_len`` (None: none) and no padding (we pad per batch)."""
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    if max_len is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length=max_len)
    return tok


def pad_id_of(tok: Tokenizer) -> int:
    """The id of ``[PAD]`` (BERT vocabularies), else 0."""
    pid = tok.token_to_id("[PAD]")
    return 0 if pid is None else pid


def pad_encodings(encs: Sequence[Any], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad tokenizer ``Encoding`` objects to the longest one into int64 model inputs."""
    width = max(len(e.ids) for e in encs)
    n = len(encs)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    for row, e in enumerate(encs):
        k = len(e.ids)
        ids[row, :k] = e.ids
        mask[row, :k] = e.attention_mask
        types[row, :k] = e.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def make_session(
    model: Path, threads: int, spin: bool = True, custom_op_libs: Sequence[Path] = (),
    disabled_optimizers: Sequence[str] = (), spin_idle: bool = False,
) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads and one inter-op thread (sequential);
    ``disabled_optimizers``: onnxruntime graph transformers the session must not apply.

    ``spin``: the intra-op threads spin while a run is in progress (onnxruntime's default), and stop
    when it returns (``session.force_spinning_stop``) unless ``spin_idle``. A benchmark holds several
    sessions in one process; an idle session whose threads keep spinning takes a core from the one
    that runs next, which costs a short model far more than a long one (docs/optimize.md 4n)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif not spin_idle:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    for lib in custom_op_libs:
        so.register_custom_ops_library(str(lib))
    sess = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers) or None)
    log.debug("session %s: inputs %s outputs %s", model, input_names(sess), output_names(sess))
    return sess


def input_names(sess: ort.InferenceSession) -> list[str]:
    return [i.name for i in sess.get_inputs()]


def output_names(sess: ort.InferenceSession) -> list[str]:
    return [o.name for o in sess.get_outputs()]


def feeds_for(sess: ort.InferenceSession, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Select the tokenizer arrays the model actually takes (some exports lack token_type_ids)."""
    names = input_names(sess)
    missing = [n for n in names if n not in batch]
    if missing:
        raise ValueError(f"model wants inputs {missing} that the tokenizer does not produce")
    return {n: batch[n] for n in names}


def file_sha256(path: Path) -> str:
    """SHA-256 of the model file plus any external-data files next to it (``<name>.data``, ``<name>_data``)."""
    h = hashlib.sha256()
    extras = [path.with_name(path.name + ".data"), path.with_name(path.name + "_data"),
              path.with_suffix(".onnx.data"), path.with_suffix(".data")]
    seen: set[Path] = set()
    for p in [path, *extras]:
        if p in seen or not p.is_file():
            continue
        seen.add(p)
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def run_metadata(threads: int) -> dict[str, Any]:
    """Where/when/how a result was produced: exact command, versions, threads, machine."""
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "cwd": os.getcwd(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "onnxruntime_version": ort.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "intra_op_threads": threads,
        "inter_op_threads": 1,
    }


def slug(text: str) -> str:
    """File-name-safe version of ``text``."""
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text.lower())
    return "-".join(part for part in keep.split("-") if part)[:80]


def write_results(out_dir: Path, what: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<UTC date>-<what>.json`` and ``.md`` into ``out_dir``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = f"{stamp}-{slug(what)}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")
    md_path.write_text(markdown if markdown.endswith("\n") else markdown + "\n", encoding="utf-8")
    return json_path, md_path


def _json_default(obj: object) -> object:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by both scripts (threads, tokenizer, data dir, output dir, logging)."""
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--max-len", type=int, default=512, help="truncate inputs at this many tokens")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.json (default: next to the dense model)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                        help=f"evaluation data folder (default {DEFAULT_DATA})")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS,
                        help="where the JSON + markdown result files go")
    parser.add_argument("--name", default=None, help="what was measured (used in the result file names)")
    parser.add_argument("--no-save", action="store_true", help="print the table, write no result files")
    parser.add_argument("--custom-op-lib", type=Path, action="append", default=[],
                        help="onnxruntime custom-op library to register (repeatable)")
    parser.add_argument("--ort-disable", action="append", default=[], metavar="TRANSFORMER",
                        help="an onnxruntime graph transformer every session skips, dense and candidates "
                             "alike (repeatable; e.g. SkipLayerNormFusion, whose CPU kernel is slower "
                             "than the ops it fuses)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def fmt(x: float | None, spec: str = ".4f") -> str:
    """Format a number for a markdown table; empty for None."""
    return "" if x is None else format(x, spec)

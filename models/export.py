"""Export the spattenc test models to ONNX.

    python models/export.py                      # every committed fixture
    python models/export.py --only bert_dynamo,gpt2_torchscript
    python models/export.py --list
    python models/export.py --real minilm [--exporter dynamo]   # into models/cache/ (ignored)
    python models/export.py --real smollm2 [--exporter dynamo]
    python models/export.py --real smollm2-nocache            # no KV cache: input_ids, attention_mask -> logits
    python models/export.py --synthetic gpt2-small     # paper-shaped, random weights, into models/cache/
    python models/export.py --synthetic llama-1b       # 1.5B params, weights streamed to external data

Fixtures are tiny random-weight Hugging Face models built from configs (no hub access); each
produces ``models/<name>.onnx`` and a sidecar ``models/<name>.json`` (see models/README.md).
A fixture that fails to export is reported and recorded in ``models/manifest.jsonl`` with
``"status": "failed"`` and the reason; the others still run. Exit status: 0 all good, 1 some export failed, 2 a required
package is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
# JSON Lines (one object per fixture), deliberately not *.json: models/*.json are the sidecars.
MANIFEST = MODELS_DIR / "manifest.jsonl"
log = logging.getLogger("spattenc.models")


class MissingPackage(RuntimeError):
    """A package needed for an export is not installed (reported with exit status 2)."""


def _require(*modules: str, hint: str = "pip install 'spattenc[export]'", dist: str | None = None) -> None:
    """Raise :class:`MissingPackage` for the first of ``modules`` that cannot be imported.

    The message names ``dist`` (the PyPI distribution) if given, else the module.
    """
    import importlib.util

    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingPackage(f"{dist or module} is not installed: {hint}")


def _load_manifest() -> dict[str, dict[str, object]]:
    """The manifest's records by fixture name (empty if there is none yet)."""
    if not MANIFEST.exists():
        return {}
    records = (json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip())
    return {r["name"]: r for r in records}


def _save_manifest(records: dict[str, dict[str, object]], order: list[str]) -> None:
    """Write the records in fixture order, one compact JSON object per line."""
    rank = {name: i for i, name in enumerate(order)}
    names = sorted(records, key=lambda n: (rank.get(n, len(rank)), n))
    MANIFEST.write_text("".join(json.dumps(records[n], separators=(", ", ": ")) + "\n" for n in names))


def export_fixtures(names: list[str] | None, out_dir: Path) -> int:
    """Export the named fixtures (all if ``names`` is None); return the number that failed."""
    _require("torch", "transformers", "onnx", "onnxruntime", "onnxscript")
    try:
        from . import _fixtures
        from ._build import build_fixture
        from ._export_core import set_offline
    except ImportError:  # script mode: models/ is sys.path[0]
        import _fixtures  # type: ignore[no-redef]
        from _build import build_fixture  # type: ignore[no-redef]
        from _export_core import set_offline  # type: ignore[no-redef]

    set_offline()
    specs = _fixtures.FIXTURES if names is None else [_fixtures.FIXTURES_BY_NAME[n] for n in names]
    manifest = _load_manifest() if out_dir == MODELS_DIR else {}
    failures = 0
    for i, spec in enumerate(specs, 1):
        start = time.perf_counter()
        try:
            res = build_fixture(spec, out_dir)
        except Exception as exc:  # keep going: every failure is reported and recorded
            failures += 1
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            log.error("[%d/%d] %s FAILED: %s", i, len(specs), spec.name, reason)
            log.debug("%s", traceback.format_exc())
            manifest[spec.name] = {"name": spec.name, "status": "failed", "exporter": spec.exporter, "reason": reason}
            continue
        log.info(
            "[%d/%d] %-30s %7.1f KB  opset %d  max|diff| %.2e  (%.1fs)",
            i,
            len(specs),
            spec.name,
            res.size_bytes / 1024,
            res.facts.opset,
            res.max_abs_diff,
            time.perf_counter() - start,
        )
        manifest[spec.name] = {
            "name": spec.name,
            "status": "ok",
            "exporter": spec.exporter,
            "opset": res.facts.opset,
            "onnx": res.onnx_path.name,
            "size_bytes": res.size_bytes,
            "max_abs_diff": res.max_abs_diff,
            "max_abs_diff_incl_padding": res.max_abs_diff_all,
            "dynamic_shape_diffs": res.extra_diffs,
            "softmax_nodes": res.facts.softmax_count,
            "attention_nodes": res.facts.attention_count,
        }
    if out_dir == MODELS_DIR:
        _save_manifest(manifest, [s.name for s in _fixtures.FIXTURES])
    return failures


def list_fixtures() -> None:
    """Print one line per fixture: name, exporter/opset and why it exists."""
    try:
        from ._fixtures import FIXTURES
    except ImportError:
        from _fixtures import FIXTURES  # type: ignore[no-redef]
    for spec in FIXTURES:
        opset = spec.opset if spec.opset is not None else "default"
        print(f"{spec.name:30s} {spec.exporter:11s} opset {opset!s:7s} {spec.purpose}")


def export_real(which: str, exporter: str) -> None:
    """Export a real trained model into models/cache/ (never committed)."""
    _require("torch", "transformers", "onnx", "onnxruntime", "onnxscript")
    try:
        from . import _real
    except ImportError:
        import _real  # type: ignore[no-redef]

    _real.export_real(which, exporter, MODELS_DIR / "cache", require=_require)


def export_synthetic(name: str) -> None:
    """Export a paper-shaped random-weight model (``_synthetic.SYNTHETIC``) into models/cache/."""
    _require("torch", "transformers", "onnx", "onnxruntime", "onnxscript")
    try:
        from . import _synthetic
    except ImportError:
        import _synthetic  # type: ignore[no-redef]

    log.info("synthetic %s -> %s", name, _synthetic.export_synthetic(name, MODELS_DIR / "cache"))


def _synthetic_names() -> tuple[str, ...]:
    try:
        from ._synthetic import LARGE, SYNTHETIC
    except ImportError:
        from _synthetic import LARGE, SYNTHETIC  # type: ignore[no-redef]
    return (*SYNTHETIC, *LARGE)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--list", action="store_true", help="list the fixtures and exit")
    group.add_argument("--only", metavar="NAME[,NAME]", help="export only these fixtures")
    group.add_argument("--real", choices=("minilm", "smollm2", "smollm2-nocache"), help="export a real trained model into models/cache/")
    group.add_argument("--synthetic", choices=_synthetic_names(), help="export a paper-shaped random-weight model")
    parser.add_argument(
        "--exporter",
        choices=("torchscript", "dynamo"),
        default="torchscript",
        help="exporter for --real (default: torchscript)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=MODELS_DIR,
        help="where fixtures are written (default: models/; the manifest is only updated there)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.list:
            list_fixtures()
            return 0
        if args.real:
            try:
                export_real(args.real, args.exporter)
            except MissingPackage:
                raise
            except Exception as exc:
                log.debug("%s", traceback.format_exc())
                log.error("%s export failed: %s: %s (-v for the traceback)", args.real, type(exc).__name__, exc)
                return 1
            return 0
        if args.synthetic:
            export_synthetic(args.synthetic)
            return 0
        names = None
        if args.only:
            names = [n.strip() for n in args.only.split(",") if n.strip()]
            try:
                from ._fixtures import FIXTURES_BY_NAME
            except ImportError:
                from _fixtures import FIXTURES_BY_NAME  # type: ignore[no-redef]
            unknown = [n for n in names if n not in FIXTURES_BY_NAME]
            if unknown:
                parser.error(f"unknown fixture(s) {unknown}; see --list")
        return 1 if export_fixtures(names, args.out_dir.resolve()) else 0
    except MissingPackage as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

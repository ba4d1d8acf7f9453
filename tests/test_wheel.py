"""Packaging: every package directory is in pyproject's list, and the built wheel works on its own.

The wheel test builds offline (``python -m build --no-isolation``), installs the wheel into a fresh
venv outside the repository (``--no-deps --no-index``; the dependencies come from this environment's
site-packages through a ``.pth`` file) and runs the installed ``spattenc`` from another directory,
so a package missing from the wheel cannot hide behind the editable install or the repo on sys.path.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from conftest import MODELS, ROOT

tomllib = pytest.importorskip("tomllib")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_dirs() -> dict[str, Path]:
    """Dotted package name -> source directory, for every folder with __init__.py under a mapped dir."""
    setup = _pyproject()["tool"]["setuptools"]
    found: dict[str, Path] = {}
    for name, rel in setup["package-dir"].items():
        base = ROOT / rel
        for init in base.rglob("__init__.py"):
            parts = init.parent.relative_to(base).parts
            found[".".join((name, *parts))] = init.parent
    return found


def test_every_package_directory_is_listed() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    missing = sorted(set(_package_dirs()) - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repo(tmp_path: Path) -> None:
    if importlib.util.find_spec("build") is None:
        pytest.skip("the `build` package is not installed (it is in the dev extra)")
    # Build from a copy of the packaged sources: setuptools reuses build/ in the source tree, where a
    # stale module could slip into the wheel, and the repository stays untouched.
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    for rel in {str(d) for d in _pyproject()["tool"]["setuptools"]["package-dir"].values()}:
        shutil.copytree(ROOT / rel, src / rel, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)], cwd=tmp_path)
    wheels = list(dist.glob("spattenc-*.whl"))
    assert len(wheels) == 1, wheels

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).stdout.strip())
    # The dependencies (onnx, onnxruntime, ...) from this environment, but not the repo itself; the
    # .pth lines come after the venv's own site-packages, so the installed wheel wins.
    # (CI's .venv lives inside the repository, so site-packages folders are taken wherever they are;
    # the repository root itself, which is on sys.path under pytest, is not.)
    deps = [p for p in sys.path if p and Path(p).is_dir() and "site-packages" in p]
    deps.append(sysconfig.get_paths()["purelib"])
    (site / "zz_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheels[0])], cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    exe = str(env_dir / "bin" / "spattenc")
    where = _run([str(py), "-c", "import spatten_compiler; print(spatten_compiler.__file__)"], work, env).stdout
    assert Path(where.strip()).is_relative_to(env_dir), f"spatten_compiler imported from {where}"

    assert _run([exe, "--version"], work, env).stdout.startswith("spattenc ")
    model = MODELS / "bert_torchscript.onnx"
    table = _run([exe, "inspect", str(model)], work, env).stdout
    assert "attention sites" in table
    _run([exe, str(model), "-o", "out.onnx", "--token-keep", "0.5", "-q"], work, env)
    assert (work / "out.onnx").stat().st_size > 0

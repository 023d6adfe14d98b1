"""Packaging: the wheel ships the library only, and the library needs only its core dependencies."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest
import tomllib

import sensprune

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Packages that only the experiment package (or tests) may import.
_EXTRAS_ONLY = ("experiments", "configs", "tests", "tensorflow_datasets", "ml_collections", "matplotlib",
                "tensorboardX", "tqdm", "mlxtend", "sklearn", "pandas", "pytest")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_a_release_string():
    parts = sensprune.__version__.split(".")
    assert len(parts) >= 2 and all(p.isdigit() for p in parts[:2]), sensprune.__version__


def test_core_dependencies_cover_what_import_needs():
    """Importing sensprune (and every submodule) never reaches an extras-only package."""
    blocker = (
        "import sys, importlib.abc\n"
        f"BLOCKED = {_EXTRAS_ONLY!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'sensprune imported {name}, which is not a core dependency')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pkgutil, importlib, sensprune\n"
        "for m in pkgutil.walk_packages(sensprune.__path__, 'sensprune.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('ok', sensprune.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"ok {sensprune.__version__}"


def test_library_never_imports_the_experiment_package():
    offenders = [
        f"{path.relative_to(ROOT)}:{i}"
        for path in sorted((ROOT / "sensprune").rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if line.strip().startswith(("import experiments", "from experiments", "import configs", "from configs"))
    ]
    assert not offenders, offenders


@pytest.mark.slow
def test_wheel_ships_only_the_library(tmp_path):
    """`pip wheel .` builds a wheel whose only top-level package is `sensprune`, at __version__."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    if build.returncode != 0 and "No matching distribution" in build.stderr:
        pytest.skip("the build backend could not be fetched from the package index")
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("sensprune-*.whl")
    assert wheel.name.startswith(f"sensprune-{sensprune.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        top = {name.split("/")[0] for name in zf.namelist()}
        metadata = zf.read(f"sensprune-{sensprune.__version__}.dist-info/METADATA").decode()
    assert top == {"sensprune", f"sensprune-{sensprune.__version__}.dist-info"}, top
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert sorted(core) == sorted(_pyproject()["project"]["dependencies"]), core
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Provides-Extra:")}
    assert {"experiments", "test"} <= extras

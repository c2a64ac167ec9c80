"""Packaging: the recipes in data/ install as `tfdp.recipes`, never as a
top-level `data` package, which would shadow a user's own `data` package or
be shadowed by it. Checked on setup.py's declaration, on the installed
(editable) tfdp, and on a wheel built from a copy of the sources."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("tfdp", "trainer")


def _setup_arguments(monkeypatch) -> dict:
    """The keyword arguments setup.py passes to setuptools.setup, caught
    instead of run (setup.py finds packages relative to its own folder)."""
    caught = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: caught.update(kwargs))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    return caught


def test_setup_installs_the_recipes_under_tfdp(monkeypatch):
    arguments = _setup_arguments(monkeypatch)
    packages = arguments["packages"]
    assert not [p for p in packages if p.split(".")[0] not in TOP_LEVEL], packages
    assert "tfdp.recipes" in packages and arguments["package_dir"] == {"tfdp.recipes": "data"}
    # A tfdp/recipes/ folder as well would make the wheel and the editable
    # install disagree about which files `tfdp.recipes` is.
    assert not (ROOT / "tfdp" / "recipes").exists()


_PROBE = """
import importlib.util, json
import tfdp.recipes
spec = importlib.util.find_spec("data")
print(json.dumps({"recipes": tfdp.recipes.__file__, "data": spec and spec.origin}))
"""


def test_installed_recipes_are_this_checkouts_data_folder(tmp_path):
    """From outside the repository (so the checkout itself is not on
    sys.path), `tfdp.recipes` is data/ and no `data` package comes from tfdp.
    If this fails after a change to setup.py: pip install -e . again."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    recipes = Path(found["recipes"]).parent
    if recipes != ROOT / "data":  # a regular install: a copy of data/
        assert _py_files(recipes) == _py_files(ROOT / "data"), recipes
    assert found["data"] is None or Path(found["data"]).parent != ROOT / "data", found


def _py_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.py")}


def test_wheel_holds_tfdp_recipes_and_no_data_package(tmp_path):
    """Built from a copy, so no build/ folder lands in the checkout; offline
    and with the test environment's own setuptools (TensorFlow needs it)."""
    source = tmp_path / "src"
    for name in ("tfdp", "trainer", "data"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                             "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                             str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("tfdp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == set(TOP_LEVEL), top
    recipes = {n.removeprefix("tfdp/recipes/") for n in names if n.startswith("tfdp/recipes/")}
    assert recipes == set(_py_files(ROOT / "data")), recipes

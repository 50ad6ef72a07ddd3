"""Packaging: installed, textmill claims one import name (`textmill`); the card's folders map under it, and a wheel
carries every module and data file (issue 12 item 8)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from fnmatch import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARD_FOLDERS = ("pipelines", "training", "convert", "serving")
STATIC = REPO / "serving" / "static"


def setuptools_table() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_under_textmill():
    """A new subpackage that pyproject.toml does not list would be missing from wheels (and break serving nodes)."""
    table = setuptools_table()
    on_disk = {"textmill"} | {
        "textmill." + ".".join(init.parent.relative_to(REPO).parts)
        for folder in CARD_FOLDERS for init in (REPO / folder).rglob("__init__.py")}
    assert set(table["packages"]) == on_disk
    assert table["package-dir"] == {"textmill": "textmill", **{f"textmill.{f}": f for f in CARD_FOLDERS}}


def test_no_module_imports_a_card_folder_as_a_top_level_package():
    """Every module is imported as textmill.<folder>...; a stray `import serving` would load a second copy of a
    module (two metrics registries, two engine tables) in a checkout and fail outright when installed."""
    modules = sorted("textmill." + ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                     for folder in CARD_FOLDERS for p in (REPO / folder).rglob("*.py"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {CARD_FOLDERS!r})\n"
            "assert not bad, bad\n")
    # cwd outside the checkout, so a top-level `serving` could only come from a stray import path, not from ''
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_wheel_has_one_top_level_package_and_ships_the_static_files(tmp_path):
    """A wheel built from the project (not an editable install): only `textmill/` at the top, every card folder under
    it, and every file the playground page and the precision check need."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("textmill", *CARD_FOLDERS):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    globs = setuptools_table()["package-data"]["textmill.serving"]
    assert all(any(fnmatch(f"static/{f.name}", g) for g in globs) for f in STATIC.iterdir())
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("textmill-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert zf.read(top_level).decode().split() == ["textmill"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"textmill"}
    for folder in CARD_FOLDERS:
        assert f"textmill/{folder}/__init__.py" in names
    assert {f"textmill/serving/static/{f.name}" for f in STATIC.iterdir()} <= names
    assert "textmill/serving/quality_sample.txt" in names
    assert "textmill/training/pt/trainer.py" in names and "textmill/serving/engines/batching.py" in names

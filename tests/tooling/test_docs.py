"""The documentation's code runs: guide-page doctests (Sphinx), module docstring examples, and
the HTML build with warnings as errors.

Equivalent commands, from the repository root::

    python -m sphinx -b doctest docs docs/_build/doctest
    python -m pytest --doctest-modules nblosses/__init__.py nblosses/functional.py nblosses/nn.py
    python -m sphinx -W --keep-going -b html docs docs/_build/html

Sphinx runs in a subprocess (it registers toy backends and changes the default backend while it
runs the guide's examples, which must not leak into this process). The Sphinx tests are skipped
when the ``docs`` extra (sphinx, numpydoc, pydata-sphinx-theme) is not installed.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

#: Modules whose docstring examples must pass (the public API; the torch and JAX front ends
#: where those libraries are installed, as the test extra does).
DOCSTRING_MODULES = ["nblosses", "nblosses.functional", "nblosses.nn", "nblosses._registry",
                     "nblosses.torch", "nblosses.jax"]

needs_sphinx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None
        for m in ("sphinx", "numpydoc", "pydata_sphinx_theme")),
    reason="the docs extra (sphinx, numpydoc, pydata-sphinx-theme) is not installed",
)


def _sphinx(builder: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sphinx", "-b", builder, "-d", str(out / "doctrees"),
           *extra, str(DOCS), str(out / builder)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name", DOCSTRING_MODULES)
def test_module_docstring_examples(name: str) -> None:
    if name in ("nblosses.torch", "nblosses.jax"):
        pytest.importorskip(name.rpartition(".")[2])
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False,
                             report=True)
    assert result.attempted > 0 or name == "nblosses._registry", f"{name}: no examples found"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name} (see stdout)"


@needs_sphinx
def test_sphinx_doctests(tmp_path: Path) -> None:
    """Every ``.. doctest::`` block of the guide pages.

    The docstring examples that the API pages also show are left to
    :func:`test_module_docstring_examples` here (``doctest_test_doctest_blocks`` off), so that a
    failure is reported once; the plain ``sphinx -b doctest`` command runs both.
    """
    proc = _sphinx("doctest", tmp_path, "-q", "-D", "doctest_test_doctest_blocks=")
    report = tmp_path / "doctest" / "output.txt"
    summary = report.read_text() if report.exists() else ""
    assert proc.returncode == 0, (
        f"sphinx doctest failed (exit {proc.returncode})\n{proc.stdout[-20000:]}\n"
        f"{proc.stderr[-20000:]}\n{summary[-20000:]}")
    assert "0 failures in tests" in summary, summary[-20000:]


@needs_sphinx
def test_html_build_has_no_warnings(tmp_path: Path) -> None:
    """The HTML build, warnings as errors (a few seconds)."""
    proc = _sphinx("html", tmp_path, "-W", "--keep-going", "-q")
    assert proc.returncode == 0, f"sphinx -W html build failed:\n{proc.stderr[-20000:]}"

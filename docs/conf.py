"""Sphinx configuration for the nblosses documentation.

Build (warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Run every code example in the guide pages::

    python -m sphinx -b doctest docs docs/_build/doctest
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import nblosses  # noqa: E402
from nblosses import _codegen  # noqa: E402

# The signature table and the API page's lists, printed from the op specs that generate the
# front ends (api.rst includes them), so the docs cannot drift from the code.
_generated = os.path.join(os.path.dirname(__file__), "_generated")
os.makedirs(_generated, exist_ok=True)
_API_LISTS = _codegen.api_lists()
for _name, _text in {"signatures.rst": _codegen.signature_table(), **_API_LISTS}.items():
    with open(os.path.join(_generated, _name), "w") as _f:
        _f.write(_text)


def _api_stubs(app: object) -> None:
    """autosummary's stub pages for the generated lists: api.rst includes them, and autosummary
    scans only documents for the pages to write (the lists are not documents), so the pages
    are written here, where api.rst's ``:toctree: generated`` looks for them."""
    from sphinx.ext.autosummary.generate import generate_autosummary_docs

    generate_autosummary_docs([os.path.join(_generated, name) for name in _API_LISTS],
                              output_dir=os.path.join(os.path.dirname(__file__), "generated"),
                              app=app)


def setup(app: object) -> None:
    app.connect("builder-inited", _api_stubs)  # type: ignore[attr-defined]

project = "nblosses"
author = "the nblosses developers"
copyright = "the nblosses developers"
release = nblosses.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "numpydoc",
]

# No network: no intersphinx, and MathJax is loaded by the reader's browser only.
templates_path = ["_templates"]
# perf_table.rst is not a page of its own: performance.rst includes it.
exclude_patterns = ["_build", "_generated", "perf_table.rst", "Thumbs.db", ".DS_Store"]
root_doc = "index"
source_suffix = {".rst": "restructuredtext"}
default_role = "code"
pygments_style = "sphinx"

# -- autodoc / autosummary / numpydoc ----------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options: dict[str, object] = {}
autodoc_typehints = "none"          # numpydoc "Parameters" sections carry the types
autodoc_preserve_defaults = True
add_module_names = False
numpydoc_show_class_members = False  # the class template lists methods itself
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

# -- doctest ------------------------------------------------------------------------------------
# Every guide page runs under `sphinx -b doctest`. Shared imports; each page may add more.
doctest_global_setup = """
import warnings
import numpy as np
np.set_printoptions(legacy=False)
import nblosses as nbl
from nblosses import functional as F, nn
try:
    import torch
except ImportError:  # torch is optional: comparisons with it are skipped without it
    torch = None
try:  # examples marked ":skipif: not HAS_CUDA" need CuPy and a GPU
    import cupy
    HAS_CUDA = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:
    HAS_CUDA = False
"""
doctest_global_cleanup = """
nbl.set_backend("auto")
"""
# Module docstrings are tested by tests/test_docs.py (pytest --doctest-modules), not here.
doctest_test_doctest_blocks = "default"

# -- HTML ---------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"nblosses {release}"
html_static_path: list[str] = []
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_sidebars = {"**": ["sidebar-nav-bs"]}
html_show_sourcelink = False

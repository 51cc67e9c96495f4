"""The generated front ends (:mod:`nblosses.functional`, :mod:`nblosses.nn`) match the op specs
(regenerate with ``python -m nblosses._codegen``), and a type checker reads the result arity
from their annotations."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nblosses
from nblosses import _codegen

PACKAGE = Path(nblosses.__file__).parent


@pytest.mark.parametrize("name", sorted(_codegen.GENERATED))
def test_generated_module_is_current(name):
    assert (PACKAGE / name).read_text() == _codegen.GENERATED[name](), \
        f"{name} is out of date: run python -m nblosses._codegen"


def test_generated_modules_define_every_public_name():
    from nblosses import functional, nn

    assert all(f"def {n}(" in _codegen.functional_source() for n in functional.__all__)
    generated = _codegen.nn_source()
    assert all(f"class {n}(" in generated or n in nblosses._modules.__all__ for n in nn.__all__)


def test_no_public_function_is_built_by_exec():
    """Every public function and module constructor is a ``def`` of a real file."""
    from nblosses import functional, nn

    for name in functional.__all__:
        code = getattr(functional, name).__code__
        assert code.co_filename == functional.__file__, name
    for name in nn.__all__:
        init = getattr(nn, name).__init__
        assert init.__code__.co_filename in (nn.__file__, nblosses._modules.__file__), name


@pytest.mark.skipif(shutil.which("mypy") is None
                    and not Path(sys.executable).with_name("mypy").exists(),
                    reason="mypy is not installed (pip install -e '.[lint]')")
def test_type_checker_sees_return_grad_pair(tmp_path):
    code = tmp_path / "use.py"
    code.write_text(
        "import numpy as np\n"
        "from nblosses import functional as F, nn\n"
        "x = np.zeros((2, 3)); t = np.array([0, 1])\n"
        "loss, grad = F.cross_entropy(x, t, return_grad=True)\n"
        "loss, grad, lse = F.cross_entropy(x, t, return_grad=True, return_lse=True)\n"
        "single = F.cross_entropy(x, t)\n"
        "n = nn.NLLLoss(label_smoothing=0.1)  # not an NLLLoss option\n"
        "m = nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)\n"
        "reveal_type(F.cross_entropy(x, t, return_grad=True))\n")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental",
                           "--follow-imports=silent", str(code)],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert 'Revealed type is "tuple[Any, Any]"' in out, out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and ":7:" in errors[0] and "label_smoothing" in errors[0], out

"""The type stubs of the generated front ends match the op table (regenerate with
``python -m nblosses._stubs``), and a type checker reads the result arity from them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nblosses
from nblosses import _stubs

PACKAGE = Path(nblosses.__file__).parent


@pytest.mark.parametrize("name", sorted(_stubs.STUBS))
def test_stub_is_current(name):
    assert (PACKAGE / name).read_text() == _stubs.STUBS[name](), \
        f"{name} is out of date: run python -m nblosses._stubs"


def test_stubs_declare_every_public_name():
    from nblosses import functional, nn

    assert all(f"def {n}(" in _stubs.functional_stub() for n in functional.__all__)
    assert all(f"class {n}" in _stubs.nn_stub() for n in nn.__all__)


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

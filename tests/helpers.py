"""Shared test helpers: the tolerance table, ``assert_close``, backend conversions and torch
references.

Every parity test compares an nblosses result with torch's, computed from the *same* data
(``torch.from_numpy``, upcast to float64: see ``REF_DTYPE``), in NumPy. Tolerances live in one
table, per dtype, for values and for gradients; tests that need looser bounds for a documented
reason (values of magnitude ~1e4) scale ``atol`` explicitly with ``scale=``.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# ----------------------------------------------------------------------------- tolerances
#: One table: ``rtol``/``atol`` for forward values, ``grad_rtol``/``grad_atol`` for gradients.
#: float16 / bfloat16 results are computed in float32 and rounded once, so the bound is about
#: one to two units in the last place of the storage type.
TOLERANCES: dict[str, dict[str, float]] = {
    "float64": dict(rtol=1e-10, atol=1e-12, grad_rtol=1e-9, grad_atol=1e-12),
    "float32": dict(rtol=2e-5, atol=1e-6, grad_rtol=5e-5, grad_atol=2e-6),
    "float16": dict(rtol=2e-3, atol=1e-3, grad_rtol=4e-3, grad_atol=2e-3),
    "bfloat16": dict(rtol=1.6e-2, atol=1e-2, grad_rtol=3.2e-2, grad_atol=2e-2),
}


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    if isinstance(dtype, str):
        return dtype
    return np.dtype(dtype).name


def tolerance(dtype: Any, kind: str = "value") -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype``; ``kind`` is ``"value"`` or ``"grad"``."""
    t = TOLERANCES[_dtype_name(dtype)]
    if kind == "grad":
        return t["grad_rtol"], t["grad_atol"]
    if kind != "value":
        raise ValueError(kind)
    return t["rtol"], t["atol"]


# ----------------------------------------------------------------------------- backends
def to_backend(array: Any, backend: str) -> Any:
    """``array`` (NumPy) on ``backend``: unchanged for ``"cpu"``, a CuPy array for ``"cuda"``."""
    if array is None or backend == "cpu":
        return array
    if backend == "cuda":
        import cupy  # lazily: CPU-only machines never import it

        return cupy.asarray(array)
    raise ValueError(f"no test conversion for backend {backend!r}")


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy array from a NumPy/CuPy array, a torch tensor or a scalar."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if type(x).__module__.partition(".")[0] == "cupy":
        return x.get()
    return np.asarray(x)


def is_backend_array(x: Any, backend: str) -> bool:
    """Whether ``x`` is the array type ``backend`` returns (NumPy for cpu, CuPy for cuda)."""
    if backend == "cpu":
        return isinstance(x, np.ndarray)  # an ndarray (0-d for reduced losses), not a scalar
    import cupy

    return isinstance(x, cupy.ndarray)


# ----------------------------------------------------------------------------- comparison
def assert_close(actual: Any, expected: Any, dtype: Any, what: str = "", *, kind: str = "value",
                 scale: float = 1.0, rscale: float = 1.0, check_dtype: bool = True,
                 equal_nan: bool = True) -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance of ``dtype``.

    NaN must sit where expected has NaN (``equal_nan``), infinities must match exactly, and the
    finite elements must satisfy ``|a - e| <= atol * scale + rtol * |e|``. ``actual`` must have
    ``dtype`` unless ``check_dtype=False``. ``scale`` / ``rscale`` multiply ``atol`` / ``rtol``
    where a test documents why (cancellation of terms of size ``scale``; long float32 sums,
    where torch's own float32 result carries the same error). On failure the message names the
    worst element (index, both values, absolute and relative error) and counts the mismatches.
    """
    a_raw = to_numpy(actual)
    e_raw = to_numpy(expected)
    label = f"{what}: " if what else ""
    if check_dtype and a_raw.dtype != np.dtype(_dtype_name(dtype)):
        raise AssertionError(f"{label}dtype {a_raw.dtype} != expected {_dtype_name(dtype)}")
    if a_raw.shape != e_raw.shape:
        raise AssertionError(f"{label}shape {a_raw.shape} != expected shape {e_raw.shape}")
    rtol, atol = tolerance(dtype, kind)
    atol, rtol = atol * scale, rtol * rscale
    a = a_raw.astype(np.float64)
    e = e_raw.astype(np.float64)
    if a.size == 0:
        return
    a_nan, e_nan = np.isnan(a), np.isnan(e)
    both_inf = np.isinf(a) & np.isinf(e)
    with np.errstate(invalid="ignore", over="ignore"):
        abs_err = np.abs(a - e)
        rel_err = abs_err / np.maximum(np.abs(e), np.finfo(np.float64).tiny)
        ok = (abs_err <= atol + rtol * np.abs(e)) & np.isfinite(a) & np.isfinite(e)
    ok |= both_inf & (np.sign(a) == np.sign(e))
    if equal_nan:
        ok |= a_nan & e_nan
    # Rank mismatches: NaN/inf disagreements first, then by how far past the tolerance.
    with np.errstate(invalid="ignore", over="ignore"):
        excess = abs_err - (atol + rtol * np.abs(e))
    excess = np.where(np.isfinite(excess), excess, np.inf)
    excess = np.where(ok, -np.inf, excess)
    bad = ~ok
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    flat = int(np.argmax(excess.reshape(-1)))
    idx = np.unravel_index(flat, a.shape) if a.ndim else ()
    raise AssertionError(
        f"{label}{n_bad} of {a.size} elements differ beyond rtol={rtol:g}, atol={atol:g} "
        f"({_dtype_name(dtype)}, {kind}); worst at index {tuple(int(i) for i in idx)}: "
        f"actual {a_raw[idx]!r}, expected {e_raw[idx]!r}, abs err {abs_err[idx]:.3g}, "
        f"rel err {rel_err[idx]:.3g}"
    )


# ----------------------------------------------------------------------------- torch references
#: The dtype torch computes the reference in, per tested dtype. Always float64, from the very
#: values of the tested dtype: the reference is then torch's exact result for those inputs,
#: rounded once to the tested dtype by the caller, and the tolerance table bounds nblosses's own
#: error. (torch's float32 results carry errors of their own: a float32 cross-entropy gradient
#: with label smoothing over 1e5 classes is off by ~3e-6 absolute, where nblosses is within
#: 2e-8, so a float32 reference would fail correct results or need looser tolerances.)
REF_DTYPE = {"float64": torch.float64, "float32": torch.float64, "float16": torch.float64,
             "bfloat16": torch.float64}


def tt(array: Any, dtype: Any = None, requires_grad: bool = False) -> torch.Tensor | None:
    """A torch tensor of ``array`` (NumPy), in the reference dtype of ``dtype`` when given."""
    if array is None:
        return None
    a = np.asarray(array)
    if a.dtype.kind in "iu":
        t = torch.from_numpy(a.astype(np.int64))
    else:
        t = torch.from_numpy(a if a.flags.c_contiguous else a.copy())  # keeps 0-d shapes
        if dtype is not None:
            t = t.to(REF_DTYPE[_dtype_name(dtype)])
    if requires_grad:
        t.requires_grad_(True)
    return t


def torch_loss_and_grad(fn: Callable[..., torch.Tensor], x: np.ndarray, dtype: Any,
                        grad_output: Any = None, **kwargs: Any):
    """``fn(x_t, **kwargs)`` and the gradient of ``sum(grad_output * loss)`` w.r.t. ``x``.

    Array-valued keyword arguments must already be torch tensors.
    """
    xt = tt(x, dtype, requires_grad=True)
    loss = fn(xt, **kwargs)
    if grad_output is None:
        g = torch.ones_like(loss)
    else:
        g = torch.as_tensor(np.asarray(grad_output), dtype=loss.dtype).reshape(loss.shape)
    loss.backward(g)
    return to_numpy(loss), to_numpy(xt.grad)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def param_id(value: Any) -> str:
    """pytest id for shapes and tuples: no spaces."""
    return str(value).replace(" ", "")


def to_backend_all(backend: str, *arrays: Any) -> list[Any]:
    """Each array on ``backend``."""
    return [to_backend(a, backend) for a in arrays]


#: Every (size_average, reduce) pair of torch's legacy arguments.
LEGACY = list(itertools.product([None, True, False], [None, True, False]))


def with_warnings(fn: Callable[[], Any]) -> tuple[Any, list[warnings.WarningMessage]]:
    """``fn()`` and the UserWarnings it raised."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in rec if issubclass(w.category, UserWarning)]


def ce_options_composite(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                         *, label_smoothing: float = 0.0, reduction: str = "mean",
                         z_loss: float = 0.0, softcap: float | None = None,
                         ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's composite of cross-entropy with nblosses' options: ``(loss, lse)``.

    ``xc = c tanh(x / c)`` (soft cap), ``lse = logsumexp(xc)`` over axis 1, per position
    ``ce(xc) + z lse^2`` where the target is kept (every position for probability targets),
    reduced like the loss: ``mean`` divides by the sum of ``weight[t]`` over kept positions
    (their count without weights), or by the number of positions for probability targets.
    """
    xc = softcap * torch.tanh(logits / softcap) if softcap else logits
    lse = torch.logsumexp(xc, dim=1)
    probs = target.is_floating_point()
    kw = {} if probs else {"ignore_index": ignore_index}
    per = torch.nn.functional.cross_entropy(xc, target, weight, reduction="none",
                                            label_smoothing=label_smoothing, **kw)
    keep = torch.ones_like(lse) if probs else (target != ignore_index).to(lse.dtype)
    per = per + z_loss * lse ** 2 * keep
    if reduction == "none":
        return per, lse
    if reduction == "sum":
        return per.sum(), lse
    if probs:
        return per.sum() / float(per.numel()), lse
    kept = keep if weight is None else weight[target.clamp(min=0)] * keep
    return per.sum() / kept.sum(), lse


# ----------------------------------------------------------------------------- op specs
# The generic tests (tests/api/test_specs.py, test_host_sync_specs.py, tests/dask/
# test_dask_specs.py, tests/interop/test_interop_specs.py) run every spec's samples; these
# helpers turn a Sample into calls and a call's result into its named parts.

def spec_samples(spec: Any) -> list[Any]:
    """``spec.samples(rng)`` with an rng seeded by the op's name (the same arrays in every
    process and whatever ops come before), or ``[]`` for a spec without samples."""
    if spec.samples is None:
        return []
    return list(spec.samples(np.random.default_rng(zlib.crc32(spec.name.encode()))))


def sample_params(specs: Any, where: Callable[[Any, Any], bool] = lambda spec, s: True,
                  *, fast_samples: int | None = None) -> list[Any]:
    """pytest parameters ``(spec, sample)``, one per sample of each spec for which
    ``where(spec, sample)`` holds, with ids ``op-index-label``. ``fast_samples=k``: each op's
    first ``k`` of them stay in the fast tier, the others are marked ``slow`` (for front ends
    whose every call compiles: JAX's jit, the fake device's kernels)."""
    import pytest

    out = []
    for spec in specs.values():
        kept = [(i, s) for i, s in enumerate(spec_samples(spec)) if where(spec, s)]
        for j, (i, sample) in enumerate(kept):
            slow = fast_samples is not None and j >= fast_samples
            out.append(pytest.param(spec, sample, id=f"{spec.name}-{i}-{sample.label}",
                                    marks=[pytest.mark.slow] if slow else []))
    return out


def map_arrays(value: Any, fn: Callable[[np.ndarray], Any]) -> Any:
    """``value`` with ``fn`` applied to every NumPy array in it (tuple-valued arguments such
    as a top-k ``teacher=(indices, log_probs)`` included); other values unchanged."""
    if isinstance(value, np.ndarray):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_arrays(v, fn) for v in value)
    return value


def map_call(args: tuple, kwargs: dict, fn: Callable[[np.ndarray], Any]) -> tuple[tuple, dict]:
    """A call's ``(args, kwargs)`` (a sample's, for instance) with ``fn`` applied to every
    array."""
    return (tuple(map_arrays(a, fn) for a in args),
            {k: map_arrays(v, fn) for k, v in kwargs.items()})


def cast_float(dtype: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Float arrays to ``dtype`` (a copy, C-contiguous); integer arrays unchanged (copied)."""
    return lambda a: a.astype(dtype) if a.dtype.kind == "f" else a.copy()


def to_torch_ref(a: np.ndarray) -> torch.Tensor:
    """The reference's tensor of a (cast) sample array: float64, or int64 for integers."""
    return torch.from_numpy(a.astype(np.int64 if a.dtype.kind in "iu" else np.float64))


def leaves(result: Any) -> list[Any]:
    """The arrays of a result, nested tuples flattened in order, ``None`` entries kept."""
    if isinstance(result, tuple):
        return [leaf for r in result for leaf in leaves(r)]
    return [result]


def result_parts(spec: Any, result: Any, flags: dict[str, Any]) -> dict[str, Any]:
    """A call's result by part: ``"out"`` (the op's value), then one entry per flag of
    ``spec.results`` that ``flags`` (the call's keywords) sets, keyed by the flag's name.

    Each flag adds one result, in the order of ``spec.results`` (``cross_entropy(...,
    return_grad=True, return_lse=True)`` is ``(loss, grad, lse)``); a lone result is not a
    tuple. The gradient part of an LM head is itself a tuple.
    """
    names = ["out", *(f for f in spec.results if flags.get(f))]
    if len(names) == 1:
        return {"out": result}
    assert isinstance(result, tuple) and len(result) == len(names), (
        f"{spec.name}: expected {len(names)} results {names}, got "
        f"{len(result) if isinstance(result, tuple) else type(result).__name__}")
    return dict(zip(names, result))


def assert_unwritten(call: tuple[tuple, dict], copy: tuple[tuple, dict], what: str) -> None:
    """Every array of ``call`` (``(args, kwargs)`` after the call) equals its copy in ``copy``
    (made before, by :func:`map_call` with ``np.copy``), bit for bit: the call wrote to none of
    its inputs. Arrays of any kind (torch, JAX...) are compared through NumPy."""
    after = leaves((*call[0], *call[1].values()))
    before = leaves((*copy[0], *copy[1].values()))
    for a, b in zip(after, before):
        if isinstance(b, np.ndarray):
            assert np.array_equal(to_numpy(a), b, equal_nan=b.dtype.kind == "f"), (
                f"{what}: an input was written to")


#: The CPUs whose code the assembly probes inspect (AVX2; AVX-512 with 256-bit tuning; AVX-512).
PROBE_CPUS = ("haswell", "skylake-avx512", "znver4")


def run_asm_probes(script: str, cache_root: Path) -> dict[str, Any]:
    """``{cpu: counts}``: ``script`` run once per CPU of :data:`PROBE_CPUS`, all at once, each
    compiling for that CPU (``NUMBA_CPU_NAME``, its own feature set, a fresh Numba cache under
    ``cache_root``) with the tree under test first on the path; the JSON of its last stdout
    line."""
    tests = Path(__file__).resolve().parent
    procs = {}
    for cpu in PROBE_CPUS:
        env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="",
                   NUMBA_CACHE_DIR=str(cache_root / f"numba-{cpu}"),
                   PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests),
                                               str(tests / "kernels")]))
        env.pop("PROBE_ONLY", None)
        procs[cpu] = subprocess.Popen([sys.executable, script], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {}
    for cpu, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{cpu} probe failed:\n{stderr[-3000:]}"
        results[cpu] = json.loads(stdout.strip().splitlines()[-1])
    return results

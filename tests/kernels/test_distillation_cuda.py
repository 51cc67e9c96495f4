"""CUDA kernels of kl_div and distillation_loss, checked without a GPU (and against the CPU
backend where one is present).

Without a device: NVRTC compiles every instantiation of ``kl_div.cu`` and ``distillation.cu``
for every element type; ptxas (inside NVRTC, sm_90) keeps the long-row kernels within the
64-register budget of two 512-thread blocks per SM without spilling; and every launch the host
glue makes, over shapes, dtypes, options, reductions, alignments and in-place gradients, is
checked against the compiled kernel's parameter list and launch bounds with fake device arrays
(the fixtures of ``test_cuda_compile.py``). With a device, the ``cuda``-marked tests compare
the kernels with the CPU backend, and bad indices / ``+inf`` log-targets with the device error
record.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from test_cuda_compile import (  # the shared fixtures of the CUDA checks
    CTYPES,
    DTYPES,
    FAKE_CUPY,
    FIXED_BLOCKS,
    LAUNCHES,
    VECTOR_ARGS,
    _unaligned,
    check_launches,
    compiled,
    fa,
    fake_device,  # noqa: F401  (a fixture)
    ptxas_usage,
)

import nblosses
from nblosses.backends.cuda import _kernels as K
from nblosses.backends.cuda import distillation as D
from nblosses.backends.cuda import kl_div as KL

SOURCES = (KL.SRC, D.SRC)
needs_device = pytest.mark.skipif(
    "cuda" not in nblosses.available_backends(), reason="no CUDA device")


@pytest.fixture
def fake(fake_device, monkeypatch):  # noqa: F811
    """``fake_device`` extended to these modules and kernels."""
    for mod in (KL, D):
        monkeypatch.setattr(mod, "cupy", FAKE_CUPY)
    for kernel in ("kl_div_fwd", "distill_cols"):
        monkeypatch.setitem(FIXED_BLOCKS, kernel, 256)
    monkeypatch.setitem(VECTOR_ARGS, "distill_rows", ("x", "teacher", "gx"))
    return fake_device


# ----------------------------------------------------------------------------- NVRTC
@pytest.mark.parametrize("ct", CTYPES)
@pytest.mark.parametrize("src", SOURCES)
def test_nvrtc_compiles_every_instantiation(src, ct):
    ptx, lowered = compiled(src, ct, debug=True)
    names = K.instantiations(src, ct)
    assert len(names) == len(set(names)) and set(lowered) == set(names)
    assert all(f".entry {lowered[n]}(" in ptx for n in names)


@pytest.mark.parametrize("src", SOURCES)
def test_nvrtc_compiles_optimised(src):
    ptx, lowered = compiled(src, "float", debug=False)
    assert all(f".entry {v}(" in ptx for v in lowered.values())


@pytest.mark.parametrize("ct", ["float", "__half"])
def test_long_rows_keep_half_occupancy_without_spills(ct):
    """The 512-thread rows (vocabulary-sized rows) of every divergence and the top-k teacher
    fit 64 registers (two blocks per SM, as the streamed cross-entropy rows) without spilling,
    at both access widths, and the short-row groups of the logits teachers (no register bound)
    do not spill either. (Not yet bfloat16 with 16-byte vectors: its 512-thread rows spill
    40 bytes at 64 registers, ptxas sm_90.)"""
    long = [D.rows_name(ct, m, v, K.LONG_ROW_G, K.LONG_ROW_G) for m in D.MODES
            for v in K.vec_choices(ct)]
    short = [D.rows_name(ct, m, v, 32, K.ROW_BLOCK) for m in D.MODES if m != D.TOPK
             for v in K.vec_choices(ct)]
    usage = ptxas_usage(D.SRC, ct, long + short)
    assert set(usage) == set(long + short)
    for n, (regs, spill) in usage.items():
        assert spill == 0 and (regs <= 64 or n in short), (n, regs, spill)


def test_every_row_length_has_an_instantiation():
    for ct in CTYPES:
        names = set(K.instantiations(D.SRC, ct))
        for vec in K.vec_choices(ct):
            for nvec in (1, 3, 7, 40, 257, 1000, 8000, 10 ** 6):
                g, block = K.looped_config(nvec)
                for mode in D.MODES:
                    assert D.rows_name(ct, mode, vec, g, block) in names


# ----------------------------------------------------------------------------- launches
def _loss_shape_ok(loss, grad, reduction, want_grad, loss_shape, x):
    assert loss.shape == (loss_shape if reduction == "none" else ()) and loss.dtype == x.dtype
    assert (grad is None) == (not want_grad)
    if want_grad:
        assert grad.shape == x.shape and grad.dtype == x.dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_div_launches(fake, dtype):
    rng = np.random.default_rng(0)
    for n in (1, 7, 1000, 4099):
        for make in (fa, lambda a: _unaligned(a.shape, a.dtype)):
            x, t = make(rng.random(n).astype(dtype)), make(rng.random(n).astype(dtype))
            for reduction in ("none", "mean", "sum"):
                for want_grad in (False, True):
                    g = (make(np.ones(n, dtype)) if reduction == "none" else 0.5) \
                        if want_grad else None
                    for log_target in (False, True):
                        for buf in ((None, x) if want_grad else (None,)):
                            loss, grad = KL.kl_div(x, t, log_target=log_target,
                                                   reduction=reduction, want_grad=want_grad,
                                                   grad_output=g, grad_buffer=buf)
                            _loss_shape_ok(loss, grad, reduction, want_grad, (n,), x)
                            assert buf is None or grad is buf
    check_launches(100)
    names = {x[2] for x in LAUNCHES if len(x) > 2}
    ct = K.CTYPES[np.dtype(dtype).name]
    assert names == set(KL._instantiations(ct))  # both widths, both target kinds
    # the error record goes to log-target launches only, its copy-back queued after them
    for launch in LAUNCHES:
        if len(launch) > 2:
            err = dict(zip((n for n, _ in K.PARAMS["kl"]), launch[5]))["err"]
            assert isinstance(err, np.ndarray) == launch[2].endswith(", 1>"), launch[2]
    LAUNCHES.clear()
    loss, _ = KL.kl_div(fa(np.zeros(0, dtype)), fa(np.zeros(0, dtype)), log_target=False,
                        reduction="mean", want_grad=False, grad_output=None, grad_buffer=None)
    assert np.isnan(loss) and not [x for x in LAUNCHES if len(x) > 2]


SHAPES = [(4, 10, 1), (3, 1000, 1), (2, 32000, 1), (1, 128256, 1), (3, 5, 7), (2, 1, 1)]
OPTIONS = [dict(beta=0.0, temperature=1.0, hard_weight=0.0, softcap=0.0),
           dict(beta=1.0, temperature=2.0, hard_weight=0.3, softcap=5.0),
           dict(beta=0.5, temperature=1.0, hard_weight=0.2, softcap=0.0)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_distillation_launches(fake, dtype):
    rng = np.random.default_rng(1)
    ct = K.CTYPES[np.dtype(dtype).name]
    for n, C, inner in SHAPES:
        x = fa(rng.standard_normal((n, C, inner)).astype(dtype))
        y = fa(rng.standard_normal((n, C, inner)).astype(dtype))
        k = min(C, 4)
        idx = fa(rng.integers(0, C, (n, k, inner)).astype(np.int64))
        lp = fa(rng.standard_normal((n, k, inner)).astype(dtype))
        t = rng.integers(0, C, (n, inner)).astype(np.int64)
        t.reshape(-1)[0] = -100
        for target in (None, fa(t)):
            for reduction in ("none", "mean", "sum"):
                for want_grad in (False, True):
                    g = (fa(np.ones((n, inner), dtype)) if reduction == "none" else 2.0) \
                        if want_grad else None
                    for opts in OPTIONS:
                        if target is None and opts["hard_weight"]:
                            continue
                        kw = dict(ignore_index=-100, reduction=reduction, want_grad=want_grad,
                                  grad_output=g, grad_buffer=None)
                        loss, grad = D.distillation(x, y, target, **opts, **kw)
                        _loss_shape_ok(loss, grad, reduction, want_grad, (n, inner), x)
                        topk = {k_: v for k_, v in opts.items() if k_ != "beta"}
                        loss, grad = D.distillation_topk(x, idx, lp, target, **topk, **kw)
                        _loss_shape_ok(loss, grad, reduction, want_grad, (n, inner), x)
        # unaligned logits: scalar access
        xu = _unaligned((n, C, inner), dtype)
        D.distillation(xu, y, None, **OPTIONS[0], ignore_index=-100, reduction="mean",
                       want_grad=True, grad_output=1.0, grad_buffer=None)
    check_launches(200)
    kernels = {x[2] for x in LAUNCHES if len(x) > 2}
    for mode in D.MODES:  # every divergence, rows and columns
        assert any(k_.startswith(f"distill_rows<{ct}, {mode}, ") for k_ in kernels)
        assert D.cols_name(ct, mode) in kernels
    assert any(k_.startswith("class_prep<") for k_ in kernels)


def test_one_launch_and_the_prep_only_when_needed(fake):
    """``mean`` with targets and a gradient: class_prep first (g / D on the device); otherwise
    one launch, whose reduction divides by the count it sums (rmode 1) or the host's count."""
    x = fa(np.random.default_rng(2).standard_normal((64, 100, 1)).astype(np.float32))
    t = fa(np.arange(64, dtype=np.int64) % 100)
    names = [n for n, _ in K.PARAMS["distill"]]

    def launches(target, **kw):
        LAUNCHES.clear()
        D.distillation(x, x, target, beta=0.0, temperature=1.0, ignore_index=-100,
                       hard_weight=0.0, softcap=0.0, grad_buffer=None, **kw)
        return [(l_[2].split("<")[0], dict(zip(names, l_[5]))) for l_ in LAUNCHES
                if len(l_) > 2]

    grad = dict(want_grad=True, grad_output=1.0)
    fwd = dict(want_grad=False, grad_output=None)
    (prep, _), (main, args) = launches(t, reduction="mean", **grad)
    assert (prep, main) == ("class_prep", "distill_rows") and args["rmode"] == 1
    [(main, args)] = launches(t, reduction="mean", **fwd)
    assert main == "distill_rows" and args["rmode"] == 1 and args["scal"] == 0
    [(main, args)] = launches(None, reduction="mean", **grad)
    assert args["rmode"] == 0 and args["div"] == 64 and args["g_scalar"] == 1.0 / 64
    [(main, args)] = launches(t, reduction="sum", **grad)
    assert args["rmode"] == 0 and args["div"] == 1.0
    assert ("poll",) in LAUNCHES  # the error record's copy-back follows the launch


def test_in_place_gradient_of_a_capped_top_k_teacher_goes_through_a_fresh_array(fake):
    """The top-k terms re-read the logits after the gradient pass: in place with a soft cap
    the kernel writes a fresh gradient, copied into the logits after it."""
    rng = np.random.default_rng(3)
    x = fa(rng.standard_normal((3, 50, 1)).astype(np.float32))
    idx = fa(rng.integers(0, 50, (3, 4, 1)).astype(np.int64))
    lp = fa(rng.standard_normal((3, 4, 1)).astype(np.float32))
    names = [n for n, _ in K.PARAMS["distill"]]
    for softcap in (0.0, 5.0):
        LAUNCHES.clear()
        _, grad = D.distillation_topk(x, idx, lp, None, temperature=1.0, ignore_index=-100,
                                      hard_weight=0.0, softcap=softcap, reduction="sum",
                                      want_grad=True, grad_output=1.0, grad_buffer=x)
        assert grad is x
        [args] = [dict(zip(names, l_[5])) for l_ in LAUNCHES if len(l_) > 2]
        assert (args["gx"] is x) == (softcap == 0.0)


def test_kernel_signatures_match_the_cpu_backend():
    import nblosses.backends.cpu as cpu

    for op in ("kl_div", "distillation", "distillation_topk"):
        ours = inspect.signature(getattr({"kl_div": KL}.get(op, D), op)).parameters
        theirs = inspect.signature(inspect.unwrap(cpu.KERNELS[op])).parameters
        assert list(ours) == list(theirs), op


# ----------------------------------------------------------------------------- device
def _pairs(cupy, *arrays):
    return [None if a is None else cupy.asarray(a) for a in arrays]


@pytest.mark.cuda
@needs_device
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_device_matches_cpu(dtype):
    import cupy
    from helpers import assert_close

    from nblosses import functional as F

    rng = np.random.default_rng(4)
    for shape in [(16, 10), (8, 1000), (4, 40000), (3, 6, 5)]:
        x = (rng.standard_normal(shape) * 3).astype(dtype)
        y = (rng.standard_normal(shape) * 3).astype(dtype)
        c = shape[1]
        t = rng.integers(0, c, shape[:1] + shape[2:])
        t.reshape(-1)[0] = -100
        ax_idx = np.argsort(-y, axis=1)[:, :min(c, 5)]
        lp = np.take_along_axis(y - y.max(1, keepdims=True), ax_idx, axis=1)
        for kw in (dict(), dict(beta=1.0, temperature=2.0, hard_weight=0.3, softcap=5.0),
                   dict(beta=0.3, hard_weight=0.5)):
            for reduction in ("mean", "sum", "none"):
                want = F.distillation_loss(x, y, t, reduction=reduction, return_grad=True,
                                           **kw)
                got = F.distillation_loss(*_pairs(cupy, x, y, t), reduction=reduction,
                                          return_grad=True, **kw)
                for g_, w_ in zip(got, want):
                    assert_close(g_, w_, dtype, f"{shape} {kw} {reduction}", scale=10.0)
                kw_k = {k_: v for k_, v in kw.items() if k_ != "beta"}
                want = F.distillation_loss(x, (ax_idx, lp), t, reduction=reduction,
                                           return_grad=True, **kw_k)
                got = F.distillation_loss(cupy.asarray(x), tuple(_pairs(cupy, ax_idx, lp)),
                                          cupy.asarray(t), reduction=reduction,
                                          return_grad=True, **kw_k)
                for g_, w_ in zip(got, want):
                    assert_close(g_, w_, dtype, f"top-k {shape} {kw_k} {reduction}",
                                 scale=10.0)
        p = rng.random(shape).astype(dtype)
        for log_target in (False, True):
            want = F.kl_div(x, p, reduction="batchmean", log_target=log_target,
                            return_grad=True)
            got = F.kl_div(*_pairs(cupy, x, p), reduction="batchmean", log_target=log_target,
                           return_grad=True)
            for g_, w_ in zip(got, want):
                assert_close(g_, w_, dtype, f"kl_div {shape}", scale=10.0)


@pytest.mark.cuda
@needs_device
def test_device_bad_indices_are_deferred():
    """Top-k indices and targets outside [0, C): NaN at their position, IndexError at the next
    poll or synchronize, nothing read on the host by the call."""
    import cupy

    from nblosses import functional as F
    from nblosses.backends.cuda import _device_errors

    _device_errors.synchronize()
    x = cupy.asarray(np.random.default_rng(5).standard_normal((6, 40)))
    idx = cupy.asarray(np.tile(np.arange(3), (6, 1)))
    idx[2, 1] = 45
    loss = F.distillation_loss(x, (idx, cupy.zeros((6, 3)) - 1.0), reduction="none")
    assert bool(cupy.isnan(loss[2])) and int(cupy.isnan(loss).sum()) == 1
    with pytest.raises(IndexError, match="Target 45 is out of bounds"):
        _device_errors.synchronize()
    t = cupy.asarray(np.array([0, 1, 99, 2, 3, 4]))
    loss = F.distillation_loss(x, x, t, hard_weight=0.5, reduction="none")
    with pytest.raises(IndexError, match="Target 99 is out of bounds"):
        _device_errors.synchronize()
    assert bool(cupy.isnan(loss[2]))

"""Running one op call: option checks, backend, canonical arguments, kernel, results.

Every public function of :mod:`nblosses.functional` is ``call(op, arguments)`` with its
:class:`~nblosses._ops.Op`. Calls with a Dask array among their arrays go to
:mod:`nblosses._dask` (imported only then). Each op family has one runner here that turns
canonical arguments (:mod:`nblosses._args`) into one kernel call and the kernel's results into
the caller's shapes and dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _args
from ._ops import CONTEXT, Op
from ._registry import Runtime, array_module, resolve_backend

Values = dict[str, Any]
# Array modules the backends take as they are (no DLPack round trip).
_NATIVE = frozenset({"numpy", "cupy", "builtins"})


def call(op: Op, values: Values) -> Any:
    """Run ``op`` on the caller's ``values`` (parameter name -> value, every parameter)."""
    arrays = [values[n] for n in op.array_params]
    for a in arrays:
        module = array_module(a)
        if module in _NATIVE:
            continue
        if module == "dask":
            from . import _dask

            return _dask.call(op, values, checked_options(op, values))
        if hasattr(a, "__dlpack__"):  # torch, JAX, array-API arrays: in and out by DLPack
            from . import _interop

            return _interop.call(op, values, call)
    opts = checked_options(op, values)
    be = resolve_backend(values["backend"], *arrays)
    be.poll_errors()
    return _RUNNERS[op.family](be, op, values, opts)


def checked_options(op: Op, values: Values) -> Values:
    """The op's checked options (canonical scalars), by name."""
    opts = {}
    for p, default in op.checked:
        value = values[p.name]
        if value is p.default and default is not CONTEXT:
            opts[p.name] = default
        else:
            opts[p.name] = p.check(op.name, value)  # type: ignore[misc]
    return opts


def kernel_options(op: Op, opts: Values) -> Values:
    """Options the kernel takes as keywords, left out while at their defaults so kernels
    without them (third-party backends) still serve the default call."""
    return {k: opts[k] for k, default in op.kernel_options if opts[k] != default}


# ----------------------------------------------------------------------------- activations
def _softmax(be: Runtime, op: Op, v: Values, opts: Values) -> Any:
    a = _args.softmax_args(be, op.name, v["input"], v["dim"], v["dtype"])
    return _back(be.kernel(op.name)(*a.arrays), a)


def _softmax_backward(be: Runtime, op: Op, v: Values, opts: Values) -> Any:
    a = _args.softmax_backward_args(be, op.name, v["grad_output"], v["output"], v["dim"])
    return _back(be.kernel(op.name)(*a.arrays), a)


def _activation(be: Runtime, op: Op, v: Values, opts: Values) -> Any:
    a = _args.elementwise_args(be, op.name, v["input"])
    return _back(be.kernel(op.name)(*a.arrays), a)


def _activation_backward(be: Runtime, op: Op, v: Values, opts: Values) -> Any:
    a = _args.elementwise_args(be, op.name, v["grad_output"], v["output"])
    return _back(be.kernel(op.name)(*a.arrays), a)


def _back(result: Any, a: _args.ArrayArgs) -> Any:
    return result.reshape(a.shape).astype(a.dtype, copy=False)


# ----------------------------------------------------------------------------- losses
def _class_loss(be: Runtime, op: Op, v: Values, opts: Values) -> Any:
    reduction = _args.reduction_from(v["size_average"], v["reduce"], v["reduction"])
    ignore_index = opts["ignore_index"]
    check_indices = "class_index" not in be.kernel_checks or opts["validate"] == "sync"
    a = _args.class_loss_args(be, op.name, v["input"], v["target"], v["weight"], ignore_index,
                              allow_probs=op.name == "cross_entropy",
                              check_indices=check_indices)
    n, _, inner = a.layout.shape3
    cdt = a.x3.dtype
    want_grad = bool(v["return_grad"])
    kw = kernel_options(op, opts)
    if "label_smoothing" in opts:
        kw["label_smoothing"] = opts["label_smoothing"]
    if not a.layout.probs:
        kw["ignore_index"] = ignore_index
    lse = be.xp.empty((n, inner), dtype=cdt) if v.get("return_lse") else None
    if lse is not None:
        kw["lse_out"] = lse
    grad_output = grad_buffer = None
    if want_grad:
        grad_output = _args.grad_output_arg(be, v["grad_output"], reduction, a.layout.loss_shape,
                                            cdt, (n, inner))
        grad_buffer = _args.grad_buffer_arg(be, v["grad_buffer"], a.layout.input_shape,
                                            a.x3.shape, cdt)
    kernel = be.kernel("cross_entropy_probs" if a.layout.probs else op.name)
    grad_output, device_scale = _device_scale(grad_output)
    loss, grad = kernel(a.x3, a.target, a.weight, reduction=reduction, want_grad=want_grad,
                        grad_output=grad_output, grad_buffer=grad_buffer, **kw)
    _rescale(be, (grad,), device_scale)
    out = [_loss_back(loss, a.layout.loss_shape, a.dtype)]
    if want_grad:
        out.append(v["grad_buffer"] if v["grad_buffer"] is not None
                   else grad.reshape(a.layout.input_shape).astype(a.dtype, copy=False))
    if lse is not None:  # float32 at least: a half-precision logsumexp loses the z-loss
        out.append(lse.reshape(a.layout.loss_shape).astype(_at_least_float32(lse.dtype),
                                                           copy=False))
    return out[0] if len(out) == 1 else tuple(out)


def _device_scale(grad_output: Any) -> tuple[Any, Any]:
    """``(grad_output for the kernel, device scale or None)``: a reduced loss's upstream
    gradient held on the device (a 0-d array, see :func:`_args.grad_output_arg`) is never read
    back: the kernel runs with 1.0 and :func:`_rescale` multiplies the gradients by it where
    they are (one more pass over them, only for such calls)."""
    if getattr(grad_output, "ndim", None) == 0:
        return 1.0, grad_output
    return grad_output, None


def _rescale(be: Runtime, grads: tuple[Any, ...], scale: Any) -> None:
    if scale is None:
        return
    for g in grads:
        if g is not None:
            be.xp.multiply(g, scale.astype(g.dtype), out=g)


def _at_least_float32(dtype: Any) -> Any:
    return dtype if dtype.itemsize >= 4 else "float32"


def _linear_ce(be: Runtime, op: Op, v: Values, opts: Values) -> Any:
    reduction = _args.reduction_from(None, None, v["reduction"])
    check_indices = "class_index" not in be.kernel_checks or opts["validate"] == "sync"
    a = _args.linear_ce_args(be, op.name, v["input"], v["linear_weight"], v["target"],
                             v["linear_bias"], v["weight"], opts["ignore_index"],
                             check_indices=check_indices)
    lay = a.layout
    want_grad, want_lse = bool(v["return_grad"]), bool(v["return_lse"])
    loss_shape = () if lay.squeeze else (lay.n, *lay.out_features)
    g = (_args.grad_output_arg(be, v["grad_output"], reduction, loss_shape, a.x2.dtype,
                               (lay.n, *lay.out_features)) if want_grad else None)
    ignore = -100 if opts["ignore_index"] is None else opts["ignore_index"]
    g, device_scale = _device_scale(g)
    options = dict(ignore_index=ignore, label_smoothing=opts["label_smoothing"],
                   z_loss=opts["z_loss"], softcap=opts["softcap"], reduction=reduction,
                   want_grad=want_grad, grad_output=g, want_lse=want_lse)
    if lay.out_features:
        loss, lse, grads = _linear_ce_materialised(be, a, **options)
    else:
        loss, lse, grads = be.kernel(op.name)(a.x2, a.w2, a.bias, a.target, a.weight,
                                              chunk_rows=opts["options"], **options)
    out = [_loss_back(loss, loss_shape, a.dtype)]
    if want_grad:
        _rescale(be, grads, device_scale)
        gx, gw, gb = grads
        gx = gx.reshape(v["input"].shape if lay.squeeze else gx.shape)
        out.append(tuple(None if t is None else t.astype(a.dtype, copy=False)
                         for t in (gx, gw, gb)))
    if want_lse:
        out.append(lse.reshape(loss_shape))
    return out[0] if len(out) == 1 else tuple(out)


def _linear_ce_materialised(be: Runtime, a: _args.LinearCEArgs, *, ignore_index: int,
                            label_smoothing: float, z_loss: float, softcap: float,
                            reduction: str, want_grad: bool, grad_output: Any,
                            want_lse: bool) -> tuple[Any, Any, Any]:
    """torch's K-dimensional loss (``linear_weight`` ``(V, o1, ..., ok, d)``): the logits
    ``(N, V, o1, ..., ok)`` are formed (as torch does for it) and go through the fused
    cross-entropy kernel; the gradients are two more products."""
    from . import functional

    F: Any = functional  # called with canonical (already checked) arguments, typed as str
    lay, xp = a.layout, be.xp
    w_flat = a.w2.reshape(-1, lay.d)
    logits = (a.x2 @ w_flat.T).reshape(lay.n, lay.v, *lay.out_features)
    if a.bias is not None:
        logits += a.bias
    result = F.cross_entropy(logits, a.target, a.weight, ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=label_smoothing,
                             z_loss=z_loss, softcap=softcap or None, return_grad=want_grad,
                             grad_output=grad_output, grad_buffer=logits if want_grad else None,
                             return_lse=want_lse, backend=be.name)
    result = result if isinstance(result, tuple) else (result,)
    loss, lse = result[0], (result[-1] if want_lse else None)
    grads = None
    if want_grad:
        g = logits.reshape(lay.n, -1)
        gb = None if a.bias is None else g.sum(axis=0).reshape(a.bias.shape)
        grads = (g @ w_flat, (g.T @ a.x2).reshape(a.w2.shape), gb)
    if reduction == "none":
        loss = loss.reshape(lay.n, *lay.out_features)
    return loss, (None if lse is None else xp.asarray(lse)), grads


def _binary_loss(be: Runtime, op: Op, v: Values, opts: Values) -> Any:
    reduction = _args.reduction_from(v["size_average"], v["reduce"], v["reduction"])
    probabilities = op.name == "binary_cross_entropy"
    check_range = ("probability_range" not in be.kernel_checks
                   or opts.get("validate") == "sync")
    a = _args.binary_loss_args(be, op.name, v["input"], v["target"], v["weight"],
                               v.get("pos_weight"), probabilities, check_range)
    want_grad = bool(v["return_grad"])
    g = (_args.grad_output_arg(be, v["grad_output"], reduction, a.shape, a.x.dtype, a.x.shape)
         if want_grad else None)
    extra = () if probabilities else (a.pos_weight,)
    g, device_scale = _device_scale(g)
    loss, grad = be.kernel(op.name)(a.x, a.y, a.weight, *extra, reduction=reduction,
                                    want_grad=want_grad, grad_output=g)
    _rescale(be, (grad,), device_scale)
    loss = _loss_back(loss, a.shape, a.dtype)
    return (loss, grad.reshape(a.shape).astype(a.dtype, copy=False)) if want_grad else loss


def _loss_back(loss: Any, loss_shape: tuple[int, ...], dtype: Any) -> Any:
    return loss.reshape(loss_shape if loss.ndim else ()).astype(dtype, copy=False)


_RUNNERS: dict[str, Callable[[Runtime, Op, Values, Values], Any]] = {
    "softmax": _softmax,
    "softmax_backward": _softmax_backward,
    "activation": _activation,
    "activation_backward": _activation_backward,
    "class_loss": _class_loss,
    "binary_loss": _binary_loss,
    "linear_ce": _linear_ce,
}

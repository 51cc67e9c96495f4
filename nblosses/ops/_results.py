"""What every runner does after its kernel: results back in the caller's shapes and dtype, and
an upstream gradient held on a device applied where the gradients are."""

from __future__ import annotations

from typing import Any


def back(result: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """A kernel's array in the caller's ``shape`` and ``dtype``."""
    return result.reshape(shape).astype(dtype, copy=False)


def loss_back(loss: Any, loss_shape: tuple[int, ...], dtype: Any) -> Any:
    """A kernel's loss (0-d, or per position) in the caller's shape and dtype."""
    return loss.reshape(loss_shape if loss.ndim else ()).astype(dtype, copy=False)


def class_loss_shape(values: dict[str, Any]) -> tuple[Any, ...]:
    """``OpSpec.loss_shape`` of a loss over a class axis: 0-d when reduced, else the input's
    shape without axis 1 (a ``(C,)`` input is one position)."""
    shape = tuple(values["input"].shape)
    return shape[:1] + shape[2:] if values["reduction"] == "none" and len(shape) > 1 else ()


def at_least_float32(dtype: Any) -> Any:
    """``dtype``, or float32 for a half type (statistics that must not lose digits)."""
    return dtype if dtype.itemsize >= 4 else "float32"


def device_scale(grad_output: Any) -> tuple[Any, Any]:
    """``(grad_output for the kernel, device scale or None)``: a reduced loss's upstream
    gradient held on the device (a 0-d array, see :func:`nblosses._args.grad_output_arg`) is
    never read back: the kernel runs with 1.0 and :func:`rescale` multiplies the gradients by it
    where they are (one more pass over them, only for such calls)."""
    if getattr(grad_output, "ndim", None) == 0:
        return 1.0, grad_output
    return grad_output, None


def rescale(xp: Any, grads: tuple[Any, ...], scale: Any) -> None:
    """Multiply each gradient (``None`` skipped) by the device scalar ``scale``, in place."""
    if scale is None:
        return
    for g in grads:
        if g is not None:
            xp.multiply(g, scale.astype(g.dtype), out=g)


def results(out: list[Any]) -> Any:
    """The result of a call: its one array alone, several as a tuple."""
    return out[0] if len(out) == 1 else tuple(out)

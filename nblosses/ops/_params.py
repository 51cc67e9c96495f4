"""Parameters and docstring sections that several ops share."""

from __future__ import annotations

from .. import _args
from .._spec import Param, Role


def array_input(name: str, doc: str) -> Param:
    """An array a module's ``forward`` takes."""
    return Param(name, doc=doc, role=Role.INPUT)


BACKEND = Param("backend", None, """str, optional
    ``"cpu"``, ``"cuda"``, another registered name or ``"auto"`` (by array type); default:
    the current default (:func:`nblosses.use_backend`, :func:`nblosses.set_backend`).""",
                keyword_only=True, torch=False)
WEIGHT = Param("weight", None, """array_like, optional
    Per-class weights of shape ``(C,)``.""")
SIZE_AVERAGE = Param("size_average", None, """bool, optional
    Deprecated (as in torch); with ``reduce``, when given, it sets ``reduction`` and warns.""")
REDUCE = Param("reduce", None, """bool, optional
    Deprecated (as in torch); see ``size_average``.""")
REDUCTION = Param("reduction", "mean", """{"mean", "sum", "none"}
    How per-element losses are combined.""")
IGNORE_INDEX = Param("ignore_index", -100, """int
    Target value that contributes neither to the loss, nor to the gradient, nor to the
    ``mean`` denominator.""", check=_args.check_ignore_index)
LABEL_SMOOTHING = Param("label_smoothing", 0.0, r"""float
    :math:`\epsilon \in [0, 1]`: the target becomes :math:`(1-\epsilon)\,y + \epsilon / C`.""",
                        check=_args.check_label_smoothing)
Z_LOSS = Param("z_loss", 0.0, r"""float
    Adds :math:`z \cdot \mathrm{lse}^2` to each non-ignored position's loss (PaLM's z-loss,
    not class-weighted), reduced like the loss; :math:`\mathrm{lse}` is the logsumexp of the
    (soft-capped) logits. Not in torch.""", keyword_only=True, check=_args.check_z_loss,
               kernel=True, torch=False)
SOFTCAP = Param("softcap", None, r"""float, optional
    Soft-caps the logits first, :math:`c \tanh(x / c)` (Gemma 2), with the chain rule in the
    gradient. Not in torch.""", keyword_only=True, check=_args.check_softcap, kernel=True,
                torch=False)
RETURN_LSE = Param("return_lse", False, """bool
    Also return the per-position logsumexp of the (soft-capped) logits, shaped like the
    unreduced loss (float32 for half-precision input). Not in torch.""", keyword_only=True,
                   role=Role.CONFIG, torch=False)
RETURN_GRAD = Param("return_grad", False, """bool
    Also return the gradient of ``sum(grad_output * loss)`` with respect to ``input``,
    computed in the same pass as the loss.""", keyword_only=True, role=Role.CALL, torch=False)
GRAD_OUTPUT = Param("grad_output", None, """scalar or array, optional
    Upstream gradient; 1 (or ones of the loss's shape for ``"none"``) by default.""",
                    keyword_only=True, role=Role.CALL, torch=False)
GRAD_BUFFER = Param("grad_buffer", None, """array, optional
    Where to write the gradient: an array of the input's shape and compute dtype,
    C-contiguous; it may be ``input`` itself, which then holds the gradient instead of the
    logits (saves the gradient's memory; only when the logits are not needed again).""",
                    keyword_only=True, role=Role.CALL, torch=False)
VALIDATE = Param("validate", None, """{"async", "sync"}, optional
    How class indices are checked on a device backend: ``"async"`` inside the kernels, with
    the ``IndexError`` raised by a later call or :func:`nblosses.synchronize` (the host never
    waits); ``"sync"`` before the kernel, eagerly (waits for the device). Default: the current
    default (:func:`nblosses.use_validation`), ``"async"``. The CPU backend always checks
    eagerly.""", keyword_only=True, check=_args.check_validate, torch=False,
                 context_default=True)
LOSS_TAIL = (RETURN_GRAD, GRAD_OUTPUT)

# Parameters only nblosses.torch's functions have (OpSpec.torch_params).
INPLACE_GRAD = Param("inplace_grad", False, """bool
    Write the gradient into ``input``'s memory instead of a new tensor (saves the gradient's
    memory; Liger-Kernel's trick). ``input`` then holds the gradient, so nothing else may
    use it afterwards (the output of the last linear layer is the usual case); eager mode
    only (ignored under ``torch.compile``, which traces the regular op), and the compute
    dtype must be ``input``'s (float32 / float64 on the CPU).""", keyword_only=True,
                     role=Role.CALL, torch=False)
PROCESS_GROUP = Param("process_group", None, """ProcessGroup, optional
    A ``torch.distributed`` group over which the classes (the vocabulary) are sharded: each
    rank holds its slice of the class axis, and the call is
    :mod:`nblosses.torch.distributed`'s vocabulary-parallel loss.""", keyword_only=True,
                      role=Role.CALL, torch=False)

CLASS_RAISES = """
IndexError
    A target outside ``[0, C)`` that is not ``ignore_index`` (on a device backend reported
    asynchronously unless ``validate="sync"``).
ValueError
    Mismatched shapes, bad weight length, bad ``reduction`` or option value.
TypeError
    Non-float input or a target of the wrong kind."""
LOSS_RETURNS = """
loss : array
    0-d for ``mean`` / ``sum``, else the unreduced shape. All ignored with ``mean`` -> NaN.
grad : array
    Only with ``return_grad=True``: the gradient, shaped as ``input``."""

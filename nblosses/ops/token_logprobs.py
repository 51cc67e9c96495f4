"""token_logprobs: each position's log-probability of its target token and the entropy of its
distribution at a sampling temperature, with the logits' gradient fused (the statistics of
reinforcement-learning fine-tuning: PPO, GRPO)."""

from __future__ import annotations

import math
from typing import Any

from .. import _args
from .._registry import Runtime
from .._spec import Autograd, BenchCase, Group, ModuleKind, OpSpec, Param, Role, Sample
from . import _params as P
from ._results import at_least_float32, results
from .class_losses import ClassLossArgs, class_loss_args


# ----------------------------------------------------------------------------- arguments
def check_temperature(op: str, value: Any) -> float:
    """``temperature``: a finite float > 0."""
    t = _args._real(op, "temperature", value)
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {value!r}")
    return t


def upstream_arg(be: Runtime, name: str, what: str, value: Any, loss_shape: tuple[int, ...],
                 flat_shape: tuple[int, ...], dtype: Any) -> Any:
    """A per-position upstream gradient for the kernel: ``None`` (its default), else an array
    of ``flat_shape`` in ``dtype``; the caller's value is a scalar (every position) or an
    array of ``loss_shape``."""
    if value is None:
        return None
    g = _args.as_array(be, value, what)
    if g.ndim and tuple(g.shape) != tuple(loss_shape):
        raise ValueError(f"{name}: {what} shape {tuple(g.shape)} does not match the positions' "
                         f"shape {tuple(loss_shape)} (the input's shape without the class axis)")
    if not _args.is_float(g.dtype):
        raise TypeError(f"{name}: {what} must be floating point, got dtype {g.dtype.name}")
    if g.ndim:
        return _args.to_compute(be, g, dtype).reshape(flat_shape)
    return be.xp.full(flat_shape, g.astype(dtype), dtype)  # where g is: no host read


def upstream_args(be: Runtime, name: str, grad_output: Any, grad_entropy: Any,
                  loss_shape: tuple[int, ...], flat_shape: tuple[int, ...],
                  dtype: Any) -> tuple[Any, Any]:
    """Both upstream gradients, ``(grad_output, grad_entropy)``, checked and made kernel
    arguments by :func:`upstream_arg`."""
    return (upstream_arg(be, name, "grad_output", grad_output, loss_shape, flat_shape, dtype),
            upstream_arg(be, name, "grad_entropy", grad_entropy, loss_shape, flat_shape, dtype))


def statistics(logp: Any, ent: Any, grad: Any, shape: tuple[int, ...], *, want_entropy: bool,
               want_grad: bool) -> list:
    """A kernel's results as ``execute`` returns them: ``[logp, entropy?, grad?]``, the
    statistics reshaped to the positions' ``shape``, ``grad`` as the kernel gave it."""
    out = [logp.reshape(shape)]
    if want_entropy:
        out.append(ent.reshape(shape))
    if want_grad:
        out.append(grad)
    return out


# ----------------------------------------------------------------------------- running
def execute(be: Runtime, a: ClassLossArgs, *, ignore_index: int, temperature: float,
            softcap: float, want_entropy: bool, want_grad: bool, grad_output: Any,
            grad_entropy: Any, grad_buffer: Any) -> list:
    """One kernel call on canonical arrays: ``[logp, entropy?, grad?]``, the statistics in the
    positions' shape (float32 at least), the gradient canonical ``(N, C, inner)``.

    ``grad_output`` / ``grad_entropy``: the caller's values (checked here); ``grad_buffer``: a
    checked canonical view or ``None``. A Dask plan may run it on each block of rows.
    """
    n, _, inner = a.layout.shape3
    loss_shape = a.layout.loss_shape
    stats_dtype = at_least_float32(a.x3.dtype)
    go = ge = None
    if want_grad:
        go, ge = upstream_args(be, "token_logprobs", grad_output, grad_entropy, loss_shape,
                               (n, inner), stats_dtype)
    logp, ent, grad = be.kernel("token_logprobs")(
        a.x3, a.target, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        want_entropy=want_entropy, want_grad=want_grad, grad_output=go, grad_entropy=ge,
        grad_buffer=grad_buffer)
    return statistics(logp, ent, grad, loss_shape, want_entropy=want_entropy,
                      want_grad=want_grad)


def run(be: Runtime, spec: OpSpec, v: dict, opts: dict) -> Any:
    """The runner: the class losses' argument checks (index targets, no weight), then one
    kernel call."""
    check_indices = "class_index" not in be.kernel_checks or opts["validate"] == "sync"
    a = class_loss_args(be, spec.name, v["input"], v["target"], None, opts["ignore_index"],
                        allow_probs=False, check_indices=check_indices)
    want_grad = bool(v["return_grad"])
    buffer = None
    if want_grad:
        buffer = _args.grad_buffer_arg(be, v["grad_buffer"], a.layout.input_shape, a.x3.shape,
                                       a.x3.dtype)
    out = execute(be, a, ignore_index=opts["ignore_index"], temperature=opts["temperature"],
                  softcap=opts["softcap"], want_entropy=bool(v["return_entropy"]),
                  want_grad=want_grad, grad_output=v["grad_output"],
                  grad_entropy=v["grad_entropy"], grad_buffer=buffer)
    if want_grad:
        out[-1] = (v["grad_buffer"] if v["grad_buffer"] is not None
                   else out[-1].reshape(a.layout.input_shape).astype(a.dtype, copy=False))
    return results(out)


# ----------------------------------------------------------------------------- reference
def _reference(torch: Any, input: Any, target: Any, *, temperature: float = 1.0,
               softcap: float | None = None, ignore_index: int = -100,
               return_entropy: bool = False) -> Any:
    """The torch composite: ``log_softmax(cap(x) / T)``, gathered at the targets, and
    ``-sum(p log p)``; 0 where the target is ``ignore_index``."""
    axis = 1 if input.dim() > 1 else 0
    y = softcap * torch.tanh(input / softcap) if softcap else input
    lp = torch.log_softmax(y / temperature, dim=axis)
    keep = target != ignore_index
    picked = lp.gather(axis, target.clamp(min=0).unsqueeze(axis)).squeeze(axis)
    logp = torch.where(keep, picked, torch.zeros_like(picked))
    if not return_entropy:
        return logp
    ent = -(lp.exp() * lp).sum(axis)
    return logp, torch.where(keep, ent, torch.zeros_like(ent))


def _samples(rng: Any) -> list[Sample]:
    import numpy as np

    t = np.array([0, 4, 2, -100, 1])
    x = rng.standard_normal((5, 6)) * 3
    return [Sample((x, t), {}),
            Sample((x, t), {"temperature": 0.7, "return_entropy": True},
                   dask_chunks={"input": (3, 3), "target": (3,)}),
            Sample((x, t), {"temperature": 1.5, "softcap": 4.0, "return_entropy": True}),
            Sample((rng.standard_normal((3, 4, 5)), rng.integers(0, 4, (3, 5))),
                   {"return_entropy": True}, dask_chunks={"input": (2, 2, 3), "target": (2, 3)})]


# ----------------------------------------------------------------------------- bench
#: The vocabulary-sized rows issue 25 states its target on (one smaller shape for --quick).
SHAPES = ("4096x[1000]", "512x[32000]", "64x[128256]")
QUICK_SHAPES = ("32x[32000]",)


def _bench_upstream(shape: tuple[int, ...]) -> tuple[Any, Any]:
    """The benchmark's upstream gradients, shaped as the targets: ones for the
    log-probabilities and an entropy bonus's coefficient."""
    import numpy as np

    return np.ones(shape, np.float32), np.full(shape, -0.01, np.float32)


def _bench_run(F: Any, a: dict, d: int, backend: Any) -> Any:
    go, ge = _bench_upstream(a["t"].shape)
    return F.token_logprobs(a["x"], a["t"], return_entropy=True, return_grad=True,
                            grad_output=go.astype(a["x"].dtype),
                            grad_entropy=ge.astype(a["x"].dtype), backend=backend)


def _bench_torch(F: Any, torch: Any, t: dict, d: int) -> Any:
    """torch's composite, forward and backward: ``log_softmax``, ``gather``, the entropy, and
    ``torch.autograd.grad`` of both with their upstream gradients."""
    leaf = t["x"].detach().requires_grad_(True)
    go, ge = (torch.from_numpy(g).to(leaf.dtype) for g in _bench_upstream(tuple(t["t"].shape)))

    def run() -> Any:
        lp = F.log_softmax(leaf, dim=1)
        logp = lp.gather(1, t["t"].unsqueeze(1)).squeeze(1)
        ent = -(lp.exp() * lp).sum(1)
        (gx,) = torch.autograd.grad((logp, ent), leaf, (go, ge))
        return logp.detach(), ent.detach(), gx

    return run


# ----------------------------------------------------------------------------- spec
SPEC = OpSpec(
    "token_logprobs",
    (P.array_input("input", """array_like
        Logits, ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (the class axis is 1, as for
        :func:`cross_entropy`)."""),
     P.array_input("target", """array_like of int
        The token of each position, in ``[0, C)`` or ``ignore_index``: shape ``()``, ``(N,)``
        or ``(N, d1, ..., dk)``."""),
     Param("temperature", 1.0, r"""float
        :math:`T > 0`: the distribution is :math:`\mathrm{softmax}(x / T)` (the sampling
        temperature).""", keyword_only=True, check=check_temperature, torch=False),
     P.SOFTCAP.replace(doc=r"""float, optional
        Soft-caps the logits first, :math:`c \tanh(x / c)` (Gemma 2), before the temperature;
        the gradient has the chain rule."""),
     P.IGNORE_INDEX.replace(doc="""int
        Target value whose positions give log-probability 0, entropy 0 and gradient 0.""",
                            keyword_only=True, torch=False),
     Param("return_entropy", False, """bool
        Also return each position's entropy :math:`-\\sum_c p_c \\log p_c`.""",
           keyword_only=True, torch=False),
     P.RETURN_GRAD.replace(doc="""bool
        Also return the gradient of ``sum(grad_output * logp + grad_entropy * entropy)``
        with respect to ``input``, from the same sweep over the logits."""),
     P.GRAD_OUTPUT.replace(doc="""scalar or array, optional
        Upstream gradient of the log-probabilities, per position (an array of the positions'
        shape) or one scalar for all; ones by default."""),
     Param("grad_entropy", None, """scalar or array, optional
        Upstream gradient of the entropy, as ``grad_output``; zeros by default (the entropy
        is then not part of the differentiated sum, returned or not).""", keyword_only=True,
           role=Role.CALL, torch=False),
     P.GRAD_BUFFER, P.VALIDATE, P.BACKEND),
    "Log-probability of each position's target token and, optionally, the entropy of its "
    "distribution, at a temperature: no log-probability array is formed.",
    run, ("token_logprobs",), "token_logprobs", Group.LOSS, "rl",
    description=r"""With :math:`z = \mathrm{cap}(x) / T` and :math:`p = \mathrm{softmax}(z)`
    over the class axis, each position gives :math:`\log p_t` and (``return_entropy``)
    :math:`H = -\sum_c p_c \log p_c`: the per-token statistics of PPO / GRPO policy losses.
    One sweep over the logits gives both and, with ``return_grad=True``, the gradient; the
    ``(N, C)`` log-probabilities are never stored.""",
    returns="""
    logp : array
        Log-probability of each position's target, the positions' shape (the input's without
        the class axis), float32 at least (float64 for float64 input; half-precision input is
        accumulated in float32); 0 at ignored positions; never positive.
    entropy : array
        Only with ``return_entropy=True``: each position's entropy, as ``logp``, in
        ``[0, log C]``; 0 at ignored positions.
    grad : array
        Only with ``return_grad=True``: the gradient, the input's shape and dtype (or
        ``grad_buffer`` itself).""",
    raises="""
    IndexError
        A target outside ``[0, C)`` that is not ``ignore_index`` (on a device backend reported
        asynchronously unless ``validate="sync"``).
    ValueError
        Mismatched shapes (targets, ``grad_output``, ``grad_entropy``, ``grad_buffer``), a
        temperature that is not > 0, a bad soft cap.
    TypeError
        Non-float input or upstream gradient, or a target that is not integer.""",
    notes="""
    The result order is ``logp``, then ``entropy`` (``return_entropy``), then ``grad``
    (``return_grad``). The gradient formula: with ``p = softmax(z)``, ``d log p_t / dz =
    onehot_t - p`` and ``dH / dz = -p (log p + H)``, times ``1 / T`` and the soft cap's slope.
    ``nblosses.torch.token_logprobs`` makes both outputs differentiable in torch (see
    :doc:`/rl`).""",
    examples="""
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> x = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> logp, ent = F.token_logprobs(x, np.array([0, -100]), return_entropy=True)
    >>> logp.round(4), ent.round(4)
    (array([-0.2395,  0.    ]), array([0.6656, 0.    ]))
    >>> logp, grad = F.token_logprobs(x, np.array([0, 2]), temperature=2.0, return_grad=True)
    >>> grad.round(4)
    array([[ 0.2119, -0.106 , -0.106 ],
           [-0.1667, -0.1667,  0.3333]])""",
    module_kind=ModuleKind.NONE, results=("return_entropy", "return_grad"), dask="token_logprobs",
    autograd=Autograd.CUSTOM, reference=_reference, samples=_samples,
    bench=(BenchCase(
        "token_logprobs_grad", "class", True, "token_logprobs + entropy fwd+grad",
        "log_softmax, gather, entropy + autograd.grad", run=_bench_run, torch=_bench_torch,
        groups=("grad", "rl"), writes=True, shapes=SHAPES, quick_shapes=QUICK_SHAPES),),
)
SPECS = (SPEC,)

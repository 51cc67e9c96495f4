"""linear_token_logprobs: ``token_logprobs`` of a language-model head's logits ``input @
linear_weight.T + linear_bias``, never forming the ``(N, V)`` logits, with the gradients of the
input, the weight and the bias."""

from __future__ import annotations

from typing import Any

from .. import _args
from .._registry import Runtime
from .._spec import Autograd, BenchCase, Group, ModuleKind, OpSpec, Param, Role, Sample
from . import _params as P
from . import token_logprobs as TLP
from ._results import at_least_float32, results
from .linear_ce import LinearCEArgs, LinearCELayout, check_linear_ce, linear_ce_args


# ----------------------------------------------------------------------------- arguments
def _head_only(name: str, w: Any, t: Any) -> None:
    """What ``linear_cross_entropy``'s checks allow and this op does not: torch's
    K-dimensional weights and probability targets."""
    if w.ndim != 2:
        raise ValueError(f"{name}: expected linear_weight of shape (V, d), got shape "
                         f"{tuple(w.shape)}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer target of class indices, got dtype "
                        f"{t.dtype.name} with shape {tuple(t.shape)}")


def check_linear_token_logprobs(be: Runtime, name: str, x: Any, w: Any, t: Any,
                                b: Any) -> LinearCELayout:
    """Metadata checks (dtypes and shapes only: Dask arrays pass unevaluated): ``input``
    ``(N, d)`` or ``(d,)``, ``linear_weight`` ``(V, d)``, ``linear_bias`` ``(V,)``, an integer
    ``target`` ``(N,)`` (``()`` for one row)."""
    _head_only(name, w, t)
    return check_linear_ce(be, name, x, w, t, b, None, None)


def linear_token_logprobs_args(be: Runtime, name: str, v: dict, ignore_index: int, *,
                               check_indices: bool) -> LinearCEArgs:
    """Validated canonical arrays (``x2`` ``(N, d)``, ``w2``, ``bias``, ``target`` ``(N,)``
    int64; ``check_indices``: class indices checked here, eagerly)."""
    w = _args.as_array(be, v["linear_weight"], "linear_weight")
    t = _args.as_array(be, v["target"], "target")
    _head_only(name, w, t)
    return linear_ce_args(be, name, v["input"], w, t, v["linear_bias"], None, ignore_index,
                          check_indices=check_indices)


# ----------------------------------------------------------------------------- running
def execute(be: Runtime, a: LinearCEArgs, *, ignore_index: int, temperature: float,
            softcap: float, want_entropy: bool, want_grad: bool, grad_output: Any,
            grad_entropy: Any, chunk_rows: Any = None) -> list:
    """One kernel call on canonical arrays: ``[logp, entropy?, grads?]``, the statistics in
    the rows' shape (``()`` for one squeezed row), float32 at least; the gradients
    ``(grad_x2, grad_w2, grad_bias)`` of the compute dtype, canonical. ``grad_output`` /
    ``grad_entropy``: the caller's values (checked here). A Dask plan runs it on each block
    of rows."""
    lay = a.layout
    rows = () if lay.squeeze else (lay.n,)
    go = ge = None
    if want_grad:
        go, ge = TLP.upstream_args(be, "linear_token_logprobs", grad_output, grad_entropy, rows,
                                   (lay.n,), at_least_float32(a.x2.dtype))
    logp, ent, grads = be.kernel("linear_token_logprobs")(
        a.x2, a.w2, a.bias, a.target, ignore_index=ignore_index, temperature=temperature,
        softcap=softcap, want_entropy=want_entropy, want_grad=want_grad, grad_output=go,
        grad_entropy=ge, chunk_rows=chunk_rows)
    return TLP.statistics(logp, ent, grads, rows, want_entropy=want_entropy,
                          want_grad=want_grad)


def run(be: Runtime, spec: OpSpec, v: dict, opts: dict) -> Any:
    """The runner: the LM head's argument checks, one kernel call, results shaped as the
    input's rows (the gradients as the input, the weight and the bias)."""
    check_indices = "class_index" not in be.kernel_checks or opts["validate"] == "sync"
    ignore = opts["ignore_index"]
    a = linear_token_logprobs_args(be, spec.name, v, ignore, check_indices=check_indices)
    want_grad = bool(v["return_grad"])
    out = execute(be, a, ignore_index=ignore, temperature=opts["temperature"],
                  softcap=opts["softcap"], want_entropy=bool(v["return_entropy"]),
                  want_grad=want_grad, grad_output=v["grad_output"],
                  grad_entropy=v["grad_entropy"], chunk_rows=opts["options"])
    if want_grad:
        gx, gw, gb = out[-1]
        out[-1] = (gx.reshape(v["input"].shape).astype(a.dtype, copy=False),
                   gw.astype(a.dtype, copy=False),
                   None if gb is None else gb.astype(a.dtype, copy=False))
    return results(out)


# ----------------------------------------------------------------------------- reference
def _reference(torch: Any, input: Any, linear_weight: Any, target: Any, *,
               linear_bias: Any = None, options: Any = None, **kwargs: Any) -> Any:
    """``F.linear``, then ``token_logprobs``' torch composite."""
    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
    return TLP._reference(torch, logits, target, **kwargs)


def _samples(rng: Any) -> list[Sample]:
    import numpy as np

    x, w = rng.standard_normal((6, 5)), rng.standard_normal((9, 5))
    t = np.array([0, 8, 2, -100, 1, 4])
    chunks = {"input": (3, 5), "linear_weight": (4, 5)}
    return [Sample((x, w, t), {"linear_bias": rng.standard_normal(9)}),
            Sample((x, w, t), {"temperature": 0.7, "return_entropy": True}, dask_chunks=chunks),
            Sample((x * 3, w, t), {"temperature": 1.5, "softcap": 4.0, "return_entropy": True,
                                   "linear_bias": rng.standard_normal(9)},
                   dask_chunks=chunks),
            Sample((x[0], w, np.array(3)), {"return_entropy": True}, dask_chunks={})]


# ----------------------------------------------------------------------------- bench
def _bench_run(F: Any, a: dict, d: int, backend: Any) -> Any:
    go, ge = TLP._bench_upstream(a["t"].shape)
    return F.linear_token_logprobs(a["x"], a["w"], a["t"], return_entropy=True,
                                   return_grad=True, grad_output=go.astype(a["x"].dtype),
                                   grad_entropy=ge.astype(a["x"].dtype), backend=backend)


def _bench_torch(F: Any, torch: Any, t: dict, d: int) -> Any:
    """torch's reference, forward and backward: ``F.linear``, ``log_softmax``, ``gather``, the
    entropy, and ``torch.autograd.grad`` of both with their upstream gradients, with respect
    to the input and the weight."""
    x = t["x"].detach().requires_grad_(True)
    w = t["w"].detach().requires_grad_(True)
    go, ge = (torch.from_numpy(g).to(x.dtype) for g in TLP._bench_upstream(tuple(t["t"].shape)))

    def run() -> Any:
        lp = F.log_softmax(F.linear(x, w), dim=1)
        logp = lp.gather(1, t["t"].unsqueeze(1)).squeeze(1)
        ent = -(lp.exp() * lp).sum(1)
        gx, gw = torch.autograd.grad((logp, ent), (x, w), (go, ge))
        return logp.detach(), ent.detach(), (gx, gw)

    return run


# ----------------------------------------------------------------------------- spec
SPEC = OpSpec(
    "linear_token_logprobs",
    (P.array_input("input", """array_like
        Features ``(N, d)`` (the last hidden states of ``N`` tokens) or ``(d,)``."""),
     P.array_input("linear_weight", """array_like
        The output layer's weight, ``(V, d)``."""),
     P.array_input("target", """array_like of int
        The token of each row, in ``[0, V)`` or ``ignore_index``: ``(N,)`` (``()`` for a
        ``(d,)`` input)."""),
     Param("linear_bias", None, """array_like, optional
        The output layer's bias, ``(V,)``.""", keyword_only=True, role=Role.INPUT,
           torch=False),
     *(p for p in TLP.SPEC.params if p.name in ("temperature", "softcap", "ignore_index",
                                                "return_entropy")),
     Param("options", None, """object, optional
        torch's ``LinearCrossEntropyOptions``: its ``batch_chunk_size``, when set, is the
        rows per block of the whole vocabulary (as for :func:`linear_cross_entropy`);
        nblosses picks its chunks itself otherwise.""", keyword_only=True,
           check=_args.check_chunking, torch=False),
     P.RETURN_GRAD.replace(doc="""bool
        Also return the gradients of ``sum(grad_output * logp + grad_entropy * entropy)``
        with respect to ``input``, ``linear_weight`` and ``linear_bias``."""),
     *(p for p in TLP.SPEC.params if p.name in ("grad_output", "grad_entropy", "validate")),
     P.BACKEND),
    "Log-probability of each row's target token under an LM head's logits at a temperature "
    "and, optionally, the entropy: no logits array is formed.",
    run, ("linear_token_logprobs",), "linear_token_logprobs", Group.LM_HEAD, "rl",
    description=r""":func:`token_logprobs` of ``input @ linear_weight.T + linear_bias``:
    with :math:`z = \mathrm{cap}(x W^\top + b) / T` and :math:`p = \mathrm{softmax}(z)`, each
    row gives :math:`\log p_t` and (``return_entropy``) :math:`H = -\sum_c p_c \log p_c`. The
    vocabulary is processed in blocks of rows (BLAS / cuBLAS products, then fused kernels for
    the blocks' statistics and, with ``return_grad=True``, their gradient in place), as
    :func:`linear_cross_entropy` does, so the extra memory stays within 5% of the ``(N, V)``
    logits whatever the vocabulary.""",
    returns="""
    logp : array
        Log-probability of each row's target, ``(N,)`` (``()`` for a ``(d,)`` input), float32
        at least (float64 for float64 input); 0 for ignored rows; never positive.
    entropy : array
        Only with ``return_entropy=True``: each row's entropy, as ``logp``, in ``[0, log V]``;
        0 for ignored rows.
    grads : tuple of array
        Only with ``return_grad=True``: ``(grad_input, grad_linear_weight, grad_linear_bias)``
        (the last ``None`` without a bias), in the input's dtype.""",
    raises="""
    IndexError
        A target outside ``[0, V)`` that is not ``ignore_index`` (on a device backend reported
        asynchronously unless ``validate="sync"``).
    ValueError
        Mismatched shapes (input and weight, bias, targets, ``grad_output``,
        ``grad_entropy``), a temperature that is not > 0, a bad soft cap.
    TypeError
        Non-float input or upstream gradient, or a target that is not integer.""",
    notes="""
    The gradients come from the logits' gradient of :func:`token_logprobs`, block by block:
    ``grad_input = G @ W``, ``grad_linear_weight = G.T @ input``, ``grad_linear_bias =
    G.sum(0)``. ``nblosses.torch.linear_token_logprobs`` makes both outputs differentiable in
    torch; its backward, which only then knows both upstream gradients, computes the logits
    again block by block (see :doc:`/rl`).""",
    examples="""
    >>> import numpy as np
    >>> from nblosses import functional as F
    >>> r = np.random.default_rng(0)
    >>> x, w = r.standard_normal((4, 8)), r.standard_normal((50, 8))
    >>> t = np.array([3, 0, 49, -100])
    >>> logp, ent = F.linear_token_logprobs(x, w, t, temperature=0.8, return_entropy=True)
    >>> bool(np.allclose(logp, F.token_logprobs(x @ w.T, t, temperature=0.8)))
    True
    >>> logp, (gx, gw, gb) = F.linear_token_logprobs(x, w, t, return_grad=True)
    >>> gx.shape, gw.shape, gb is None
    ((4, 8), (50, 8), True)""",
    module_kind=ModuleKind.NONE, results=("return_entropy", "return_grad"),
    dask="linear_token_logprobs", autograd=Autograd.CUSTOM, reference=_reference, samples=_samples,
    bench=(BenchCase(
        "linear_token_logprobs_grad", "linear", True,
        "linear_token_logprobs + entropy fwd+grad",
        "F.linear, log_softmax, gather, entropy + autograd.grad", run=_bench_run,
        torch=_bench_torch, groups=("slow",), writes=True,
        shapes=("2048x256x[32000]", "512x256x[151936]"), quick_shapes=("256x128x[4096]",)),),
)
SPECS = (SPEC,)

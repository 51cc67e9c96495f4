"""Hugging Face transformers causal language models whose training loss never forms the logits.

:func:`patch` makes a ``*ForCausalLM`` model compute its loss, whenever ``labels`` are given,
with :func:`nblosses.torch.linear_cross_entropy` on the hidden states that enter its output
layer: the ``(N, V)`` logits, their float32 copy and their gradient are never formed. The loss
and every gradient are those of the unpatched model (transformers' ``ForCausalLMLoss``: labels
shifted, ``ignore_index=-100``, ``shift_labels``, ``num_items_in_batch``), Gemma 2/3's
``final_logit_softcapping`` included. Without ``labels`` (generation, evaluation of logits) the
model runs unchanged.

How it stays model-agnostic: the model's own ``forward`` runs, as written, up to its output
layer (``get_output_embeddings()``, a ``torch.nn.Linear``; tied to the input embeddings or not,
with a bias or not), so whatever the architecture does to the hidden states, ``logits_to_keep``
included, is kept. For that one call the output layer hands back an empty stand-in for the
logits and the model's loss function (its ``loss_function``, which must be transformers'
causal-LM loss) records its arguments instead of computing; a :class:`torch.overrides.
TorchFunctionMode` records what the forward does to the stand-in in between. nblosses then
computes the loss from the recorded hidden states, labels and keyword arguments. A forward may
scale the logits by constants (Cohere's ``logit_scale``, Granite's ``logits_scaling``) and then
soft-cap them as Gemma does (``logits / c``, ``tanh``, ``* c``); one that does anything else to
them, adds to the loss (a router's auxiliary loss), or computes its loss without its
``loss_function`` raises :class:`NotImplementedError` naming what it saw: never a silently
different loss.

Half-precision models: the logits are computed in float32 from the half-precision hidden states
and weights (transformers rounds them to the model's dtype before its float32 loss), and the loss
comes back in the model's dtype.

Examples
--------
>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from nblosses.torch.transformers import patch, unpatch
>>> config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
...                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
>>> model = LlamaForCausalLM(config)
>>> ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
>>> reference = model(input_ids=ids, labels=ids).loss
>>> out = patch(model)(input_ids=ids, labels=ids)
>>> out.logits is None, torch.allclose(out.loss, reference)
(True, True)
>>> model(input_ids=ids).logits.shape  # no labels: the model as it was
torch.Size([2, 8, 100])
>>> unpatch(model) is model
True
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree

from .._args import chunking
from ..backends._lm_head import SPLIT_BELOW_ROWS
from . import linear_cross_entropy

try:
    from transformers.loss.loss_utils import ForCausalLMLoss
except ImportError as exc:  # pragma: no cover - the transformers extra installs it
    raise ImportError("nblosses.torch.transformers needs Hugging Face transformers: "
                      "pip install 'nblosses[transformers]'") from exc

__all__ = ["patch", "unpatch"]

#: patch()'s default ``block_memory``: at most 32 MiB of float32 logits per block of rows. At
#: V=32000, d=256, 2048 tokens (tiny Llama, 2 threads; scripts/training_stack_bench.py) the
#: training step took 0.867 s with it against 1.053 s unpatched (1.14-1.21x in four runs); in
#: another run the default plan's took 1.04 s against 1.14 s.
BLOCK_MEMORY = 32 << 20
#: The model attribute holding a patch's state (a :class:`_Patch`).
_STATE = "_nblosses_patch"
#: The signature of transformers' causal-LM loss, to read the call the model makes.
_LOSS_SIGNATURE = inspect.signature(ForCausalLMLoss)

# What a forward may do to the logits between its output layer and its loss (see _logit_map):
# scalar products and quotients, Gemma's final-logit softcapping, upcasts.
_DIV = {torch.Tensor.div, torch.Tensor.__truediv__, torch.div, torch.true_divide}
_TANH = {torch.Tensor.tanh, torch.tanh}
_MUL = {torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.mul}
_UPCAST = {torch.Tensor.float}


@dataclasses.dataclass
class _Patch:
    """A patched model's state: the option, the instance-level ``forward`` the patch replaced
    (another wrapper's, e.g. accelerate's) or None for the class's, and the class's ``forward``
    signature (to find ``labels`` among a call's arguments)."""

    keep_logits: bool
    block_memory: int | None
    previous: Callable[..., Any] | None
    signature: inspect.Signature


# ----------------------------------------------------------------------------- public API
def patch(model: nn.Module, *, keep_logits: bool = False,
          block_memory: int | None = BLOCK_MEMORY) -> nn.Module:
    """Make ``model`` compute its causal-LM loss without forming the logits.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal language model (``*ForCausalLM``, ``GPT2LMHeadModel``, ...) whose output layer
        (``get_output_embeddings()``) is a ``torch.nn.Linear`` and whose loss is transformers'
        causal-LM loss. Patched in place; patching again replaces the option.
    keep_logits : bool
        Also return the logits when ``labels`` are given (computed from the same hidden states,
        differentiable; they cost the memory the patch otherwise saves). By default ``logits``
        is ``None`` in the output whenever ``labels`` are given.
    block_memory : int or None
        Bytes the float32 logits of one block of rows (each over the whole vocabulary) may
        take: the loss then computes each logit once (three matrix products, as the unpatched
        model), where :func:`nblosses.torch.linear_cross_entropy`'s own plan (blocks within 5%
        of the logits' memory) splits a large vocabulary and computes the logits twice. The
        default, 32 MiB, is small beside a training step's activations (the unpatched step
        holds several copies of the whole ``(N, V)`` logits) and is used when it holds at least
        128 rows (fewer make slow products: the default plan then). ``None``: always the
        default plan.

    Returns
    -------
    transformers.PreTrainedModel
        ``model``.

    Raises
    ------
    NotImplementedError
        A model this cannot reproduce: an output layer that is not ``torch.nn.Linear``, an
        encoder-decoder model, another loss function; at the first forward with ``labels``, a
        forward that does more to the logits than Gemma's softcapping, or more to its loss.
    """
    _output_layer(model)
    loss_function = getattr(model, "loss_function", None)
    if loss_function is not ForCausalLMLoss:
        raise NotImplementedError(f"nblosses.torch.transformers: {type(model).__name__}'s loss "
                                  f"is {getattr(loss_function, '__name__', loss_function)!r}, "
                                  "not transformers' causal-LM loss (ForCausalLMLoss)")
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError(f"nblosses.torch.transformers: {type(model).__name__} is an "
                                  "encoder-decoder model; only causal LMs are supported")
    unpatch(model)
    cls_forward = type(model).forward

    # A function per patched model, bound as a method: deep copies of the model rebind it to
    # the copy, and its signature (followed through __wrapped__) stays the class's, which
    # transformers' Trainer reads to choose the dataset's columns and loss keywords.
    @functools.wraps(cls_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _forward(self, args, kwargs)

    if block_memory is not None and (type(block_memory) is not int or block_memory < 1):
        raise ValueError(f"nblosses.torch.transformers: block_memory must be a positive int or "
                         f"None, got {block_memory!r}")
    setattr(model, _STATE, _Patch(keep_logits, block_memory, model.__dict__.get("forward"),
                                  inspect.signature(cls_forward)))
    model.forward = types.MethodType(forward, model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (nothing to undo is fine).

    Parameters
    ----------
    model : transformers.PreTrainedModel

    Returns
    -------
    transformers.PreTrainedModel
        ``model``, computing its loss as transformers does.
    """
    state = model.__dict__.pop(_STATE, None)
    if state is not None:
        if state.previous is None:
            del model.forward
        else:
            model.forward = state.previous
    return model


# ----------------------------------------------------------------------------- the forward
def _output_layer(model: nn.Module) -> nn.Linear:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise NotImplementedError(f"nblosses.torch.transformers: {type(model).__name__}'s "
                                  f"output layer is {type(head).__name__}, not torch.nn.Linear")
    return head


def _forward(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    state: _Patch = getattr(model, _STATE)
    call = state.previous or functools.partial(type(model).forward, model)
    labels = state.signature.bind_partial(model, *args, **kwargs).arguments.get("labels")
    if labels is None:
        return call(*args, **kwargs)
    head = _output_layer(model)
    want_dict = kwargs.pop("return_dict", None)
    if want_dict is None:
        want_dict = getattr(model.config, "return_dict", True)
    with _Intercepted(model, head) as seen:
        out = call(*args, return_dict=True, **kwargs)
    logit_map = seen.verify(out)
    hidden = seen.hidden
    assert hidden is not None and seen.loss_call is not None
    loss = _causal_lm_loss(hidden, head, logit_map, seen.loss_call, state.block_memory)
    logits = None
    if state.keep_logits:  # the forward's own operations, replayed: the same rounding
        logits = nn.functional.linear(hidden, head.weight, head.bias)
        for func, args in logit_map.ops:
            logits = func(logits, *args[1:])
    out = dataclasses.replace(out, loss=loss, logits=logits)
    return out if want_dict else out.to_tuple()


def _causal_lm_loss(hidden: Tensor, head: nn.Linear, logit_map: _LogitMap,
                    call: inspect.BoundArguments, block_memory: int | None) -> Tensor:
    """transformers' ``ForCausalLMLoss`` on ``head(hidden)`` mapped by ``logit_map``, by
    :func:`nblosses.torch.linear_cross_entropy` (a scale multiplies the hidden states and the
    bias instead of the logits)."""
    a = call.arguments
    labels, shift_labels = a["labels"], a.get("shift_labels")
    ignore_index = a.get("ignore_index", -100)
    num_items = a.get("num_items_in_batch")
    if a["vocab_size"] != head.out_features:
        raise NotImplementedError(f"nblosses.torch.transformers: the loss's vocab_size "
                                  f"{a['vocab_size']} is not the output layer's "
                                  f"{head.out_features} classes")
    if shift_labels is None:  # tokens < n predict n
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h, bias = hidden.reshape(-1, hidden.shape[-1]), head.bias  # type: Tensor, Tensor | None
    if logit_map.scale != 1.0:
        h = h * logit_map.scale
        bias = None if bias is None else bias * logit_map.scale
    loss = linear_cross_entropy(h, head.weight, shift_labels.reshape(-1).to(h.device),
                                linear_bias=bias, ignore_index=ignore_index,
                                reduction="mean" if num_items is None else "sum",
                                softcap=logit_map.softcap,
                                options=_row_blocks(block_memory, head.out_features))
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return loss


def _row_blocks(block_memory: int | None, vocab: int) -> Any:
    """Chunking options asking for blocks of the whole vocabulary that take at most
    ``block_memory`` bytes of float32 logits, or None (nblosses' default plan) where that is
    fewer rows than the planner itself would take whole (its ``SPLIT_BELOW_ROWS``: fewer make
    slow products)."""
    rows = 0 if block_memory is None else block_memory // (4 * vocab)
    return chunking(rows) if rows >= SPLIT_BELOW_ROWS else None


class _Tracer(TorchFunctionMode):
    """Records the torch operations that read the logits' stand-in or a tensor derived from
    it, and whether any reads the stand-in loss."""

    def __init__(self, stand_in: Tensor) -> None:
        super().__init__()
        # Tensors kept alive, so their ids are not reused while tracing.
        self.derived: dict[int, Tensor] = {id(stand_in): stand_in}
        self.ops: list[tuple[Any, tuple[Any, ...], Tensor]] = []
        self.loss: Tensor | None = None
        self.loss_used = False

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "__get__":  # .shape, .dtype, .device: reads only
            return out
        tensors = [t for t in _pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        if self.loss is not None and any(t is self.loss for t in tensors):
            self.loss_used = True
        outputs = [t for t in _pytree.tree_leaves(out) if isinstance(t, Tensor)]
        if outputs and any(id(t) in self.derived for t in tensors):
            self.ops.append((func, args, outputs[0]))
            self.derived.update((id(t), t) for t in outputs)
        return out


class _Intercepted:
    """For one forward: the output layer returns an empty stand-in for the logits (recording
    its input), the loss function records its call, and a :class:`_Tracer` records what happens
    in between."""

    def __init__(self, model: Any, head: nn.Linear) -> None:
        self.model, self.head = model, head  # model: a transformers model (untyped)
        self.hidden: Tensor | None = None
        self.stand_in: Tensor | None = None
        self.tracer: _Tracer | None = None
        self.head_calls = 0
        self.loss_call: inspect.BoundArguments | None = None
        self.loss_calls = 0

    def __enter__(self) -> _Intercepted:
        self.head.forward = self._head  # type: ignore[method-assign, assignment]
        self.had_loss_function = "_loss_function" in self.model.__dict__
        self.old_loss_function = self.model.__dict__.get("_loss_function")
        self.model.loss_function = self._loss
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tracer is not None:
            self.tracer.__exit__(None, None, None)
        del self.head.forward
        if self.had_loss_function:
            self.model.loss_function = self.old_loss_function
        else:
            del self.model._loss_function

    def _head(self, hidden: Tensor) -> Tensor:
        self.head_calls += 1
        if self.head_calls > 1:  # the first call's stand-in and tracer stay the ones checked
            return nn.Linear.forward(self.head, hidden)
        self.hidden = hidden
        self.stand_in = hidden.new_empty((*hidden.shape[:-1], 0))
        self.tracer = _Tracer(self.stand_in)
        self.tracer.__enter__()
        return self.stand_in

    def _loss(self, *args: Any, **kwargs: Any) -> Tensor:
        self.loss_calls += 1
        self.loss_call = _LOSS_SIGNATURE.bind(*args, **kwargs)
        self.loss_call.apply_defaults()
        loss = torch.zeros(())
        if self.tracer is not None:
            self.tracer.loss = loss
        return loss

    def verify(self, out: Any) -> _LogitMap:
        """What the forward did to the logits, or NotImplementedError with what it did that
        nblosses cannot reproduce."""
        name = type(self.model).__name__

        def refuse(what: str) -> NotImplementedError:
            return NotImplementedError(f"nblosses.torch.transformers: {name}'s forward {what}; "
                                       "unpatch the model (nblosses.torch.transformers.unpatch)")

        if self.head_calls != 1 or self.tracer is None:
            raise refuse(f"called its output layer {self.head_calls} times (once expected)")
        if self.loss_calls != 1 or self.loss_call is None:
            raise refuse(f"called its loss_function {self.loss_calls} times (once expected)")
        tracer = self.tracer
        if tracer.loss_used or getattr(out, "loss", None) is not tracer.loss:
            raise refuse("changed the loss after its loss_function (an auxiliary loss?)")
        found = _logit_map(tracer.ops, self.stand_in)
        if found is None or found[1] is not self.loss_call.arguments["logits"]:
            ops = ", ".join(getattr(f, "__name__", str(f)) for f, _, _ in tracer.ops)
            raise refuse(f"computed its loss from logits other than its output layer's, or "
                         f"applied operations to them other than scalings and Gemma's "
                         f"softcapping ({ops or 'none'})")
        return found[0]


@dataclasses.dataclass
class _LogitMap:
    """What the forward did to the output layer's logits before its loss: ``softcap(scale *
    logits)``; ``ops`` (function, arguments) replays it exactly."""

    scale: float
    softcap: float | None
    ops: list[tuple[Any, tuple[Any, ...]]]


def _logit_map(ops: list[tuple[Any, tuple[Any, ...], Tensor]],
               stand_in: Tensor | None) -> tuple[_LogitMap, Tensor | None] | None:
    """The recorded operations as a :class:`_LogitMap` and their result, when each takes the
    previous result and they are scalar products and quotients (Cohere's ``logit_scale``,
    Granite's ``logits_scaling``) then, optionally, Gemma's softcapping (``x / c``, ``tanh``,
    ``x * c``), upcasts allowed anywhere; else None."""
    chain, steps = stand_in, []
    for func, args, out in ops:
        if not args or args[0] is not chain:
            return None
        chain = out
        scalar = len(args) == 2 and isinstance(args[1], (int, float)) \
            and not isinstance(args[1], bool)
        if func in _UPCAST and len(args) == 1:
            continue
        if func in _TANH and len(args) == 1:
            steps.append(("tanh", 0.0))
        elif scalar and (func in _DIV or func in _MUL):
            steps.append(("div" if func in _DIV else "mul", float(args[1])))
        else:
            return None
    softcap = None
    if any(kind == "tanh" for kind, _ in steps):
        *steps, (k1, c1), (k2, _), (k3, c3) = [("", 0.0)] * 3 + steps
        if (k1, k2, k3) != ("div", "tanh", "mul") or c1 != c3 or c1 <= 0 \
                or any(kind in ("", "tanh") for kind, _ in steps[3:]):
            return None
        steps, softcap = steps[3:], c1
    scale = 1.0
    for kind, value in steps:
        scale = scale * value if kind == "mul" else scale / value
    return _LogitMap(scale, softcap, [(f, a) for f, a, _ in ops]), chain

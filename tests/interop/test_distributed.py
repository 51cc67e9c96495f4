"""nblosses.torch.distributed: the vocabulary-parallel losses on 2 and 3 CPU processes (gloo),
each holding a slice of the classes of uneven width, against torch autograd on the whole
vocabulary in one process: the loss on every rank, each rank's shard of the gradient (and, for
the linear head, the whole input gradient), for every reduction, with class weights, label
smoothing, z-loss, softcap and ignore_index; out-of-range targets and misshapen shards raise on
every rank.

One group of processes per group size runs every case (a process start and its imports cost
seconds); the parent runs every case in a group of one first, which compiles nblosses' kernels,
so the workers load them from Numba's cache instead of each compiling them. Every wait is
bounded: the collectives time out, and the processes are killed past a deadline.
"""

from __future__ import annotations

import datetime
import json
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

import nblosses.torch as nbt  # noqa: E402
from nblosses.torch import distributed as vp  # noqa: E402

# V: every shard is at least nblosses.backends.cpu._blocks.SMALL_C classes wide, so the
# kernels do not specialise by the width (each width would compile its own).
N, V, D = 10, 100, 6
#: Seconds a whole group may take (spawn, imports, every case), and a collective.
DEADLINE_S, COLLECTIVE_S = 55, 30

# name -> (head, reduction, keyword arguments). "head": "logits" is cross_entropy on (N, V)
# logits, "logits3" on (N, V, 3), "logits1" on (V,), "linear" the linear head with a bias,
# "linear1" the head of one (d,) row. Each option and shape meets each reduction somewhere; the
# upstream gradient is random per position ("none") or 1.7.
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "plain": ("logits", "mean", {}),
    "weights_smoothing": ("logits", "mean", {"weight": True, "label_smoothing": 0.2}),
    "smoothing": ("logits", "sum", {"label_smoothing": 0.3}),
    "zloss_softcap": ("logits", "none", {"z_loss": 1e-2, "softcap": 3.0}),
    "everything": ("logits", "mean", {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3,
                                      "softcap": 2.5}),
    "everything_none": ("logits", "none", {"weight": True, "label_smoothing": 0.1,
                                           "z_loss": 1e-3, "softcap": 2.5}),
    "ignore_a_class": ("logits", "sum", {"ignore_index": 4, "label_smoothing": 0.1}),
    "in_place": ("logits", "mean", {"inplace_grad": True, "weight": True}),
    "in_place_none": ("logits", "none", {"inplace_grad": True, "label_smoothing": 0.1}),
    "kdim": ("logits3", "mean", {"weight": True, "label_smoothing": 0.2, "softcap": 4.0}),
    "one_row": ("logits1", "none", {"z_loss": 1e-2}),
    "float32": ("logits", "mean", {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3,
                                   "softcap": 2.5, "dtype": "float32"}),
    "linear": ("linear", "mean", {}),
    "linear_everything": ("linear", "mean", {"weight": True, "label_smoothing": 0.15,
                                             "z_loss": 1e-3, "softcap": 2.0}),
    "linear_everything_sum": ("linear", "sum", {"weight": True, "label_smoothing": 0.15,
                                                "z_loss": 1e-3, "softcap": 2.0}),
    "linear_smoothing_none": ("linear", "none", {"label_smoothing": 0.3, "softcap": 3.0,
                                                 "ignore_index": 2}),
    "linear_one_row": ("linear1", "none", {"weight": True, "z_loss": 1e-2}),
    "linear_float32": ("linear", "mean", {"label_smoothing": 0.1, "softcap": 3.0,
                                          "dtype": "float32"}),
    # nblosses.torch's functions with process_group= (they call the distributed ones)
    "front_end": ("logits", "mean", {"front_end": True, "label_smoothing": 0.1}),
    "front_end_linear": ("linear", "sum", {"front_end": True, "softcap": 3.0}),
}
TOLERANCE = {"float64": 1e-10, "float32": 2e-5}


# ----------------------------------------------------------------------------- reference
def _reference(logits: Any, target: Any, weight: Any, reduction: str, ignore_index: int,
               label_smoothing: float = 0.0, z_loss: float = 0.0,
               softcap: float | None = None) -> Any:
    """torch's cross-entropy with nblosses' extensions: ``y = c tanh(x / c)``, per position
    ``ce(y) + z lse(y)^2`` where the target is kept, reduced as the loss."""
    y = softcap * torch.tanh(logits / softcap) if softcap else logits
    lse = torch.logsumexp(y, dim=1 if y.dim() > 1 else 0)
    per = torch.nn.functional.cross_entropy(y, target, weight, reduction="none",
                                            ignore_index=ignore_index,
                                            label_smoothing=label_smoothing)
    keep = (target != ignore_index).to(lse.dtype)
    per = per + z_loss * lse ** 2 * keep
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    kept = keep if weight is None else weight[target.clamp(min=0)] * keep
    return per.sum() / kept.sum()


def _widths(world: int) -> list[int]:
    """Uneven slices of the V classes, in rank order."""
    widths = [V // world + (r < V % world) for r in range(world)]
    if world > 1:
        widths[0], widths[-1] = widths[0] + 2, widths[-1] - 2
    return widths


def _errors(world: int, rank: int, name: str) -> dict[str, float]:
    """One case on this rank: the loss's and each gradient shard's largest error, relative to
    the reference's largest magnitude (at least 1), and the case's tolerance."""
    head, reduction, kw = CASES[name]
    kw = dict(kw)
    dtype = getattr(torch, kw.pop("dtype", "float64"))
    use_weight, in_place = kw.pop("weight", False), kw.pop("inplace_grad", False)
    api = nbt if kw.pop("front_end", False) else vp
    ignore_index = kw.pop("ignore_index", -100)
    g = torch.Generator().manual_seed(0)
    widths = _widths(world)
    lo = sum(widths[:rank])
    cols = slice(lo, lo + widths[rank])
    shape = {"logits3": (N, V, 3), "logits1": (V,)}.get(head, (N, V))
    target = torch.randint(0, V, (shape[0], *shape[2:]) if len(shape) > 1 else (),
                           generator=g)
    if target.dim():
        target.view(-1)[::4] = ignore_index
    cw = (torch.rand(V, generator=g, dtype=dtype) + 0.5) if use_weight else None
    upstream = (torch.rand(target.shape, generator=g, dtype=dtype) if reduction == "none"
                else torch.tensor(1.7, dtype=dtype))
    group = dist.group.WORLD
    if head.startswith("logits"):
        x = (torch.randn(shape, generator=g, dtype=dtype) * 3).requires_grad_()
        ref = _reference(x, target, cw, reduction, ignore_index, **kw)
        (ref * upstream).sum().backward()
        assert x.grad is not None
        shard = x.detach()[..., cols, :] if x.dim() == 3 else x.detach()[..., cols]
        shard = shard.contiguous().requires_grad_()
        loss = api.cross_entropy(shard, target, None if cw is None else cw[cols],
                                ignore_index=ignore_index, reduction=reduction,
                                inplace_grad=in_place, process_group=group, **kw)
        (loss * upstream).sum().backward()
        want = x.grad[..., cols, :] if x.dim() == 3 else x.grad[..., cols]
        grads = {"input": (shard.grad, want)}
    else:
        one_row = head == "linear1"
        h = torch.randn((D,) if one_row else (N, D), generator=g, dtype=dtype)
        w = torch.randn(V, D, generator=g, dtype=dtype)
        b = torch.randn(V, generator=g, dtype=dtype)
        if one_row:  # the first position is ignored: take the second
            target, upstream = target[1], upstream[1] if reduction == "none" else upstream
        full = [t.clone().requires_grad_() for t in (h, w, b)]
        ref = _reference(full[0] @ full[1].T + full[2], target, cw, reduction, ignore_index,
                         **kw)
        (ref * upstream).sum().backward()
        mine = [t.clone().requires_grad_() for t in (h, w[cols], b[cols])]
        loss = api.linear_cross_entropy(mine[0], mine[1], target, linear_bias=mine[2],
                                       weight=None if cw is None else cw[cols],
                                       ignore_index=ignore_index, reduction=reduction,
                                       process_group=group, **kw)
        (loss * upstream).sum().backward()
        grads = {"input": (mine[0].grad, full[0].grad),
                 "linear_weight": (mine[1].grad, full[1].grad[cols]),
                 "linear_bias": (mine[2].grad, full[2].grad[cols])}
    errors = {"loss": _relative_error(loss, ref)}
    errors |= {key: _relative_error(got, want) for key, (got, want) in grads.items()}
    errors["tolerance"] = TOLERANCE[str(dtype).removeprefix("torch.")]
    return errors


def _relative_error(got: Any, want: Any) -> float:
    if got is None:
        return float("inf")
    scale = max(1.0, want.detach().abs().max().item())
    return (got.detach() - want.detach()).abs().max().item() / scale


def _raises(rank: int, world: int) -> dict[str, str]:
    """The errors every rank must raise, by name of the misuse."""
    group = dist.group.WORLD
    width = _widths(world)[rank]
    x = torch.randn(4, width, dtype=torch.float64)
    tries = {
        "target_out_of_range": lambda: vp.cross_entropy(x, torch.tensor([0, 1, V, 2]),
                                                        process_group=group),
        "weight_not_a_shard": lambda: vp.cross_entropy(x, torch.tensor([0, 1, 2, 3]),
                                                       torch.ones(width + 1,
                                                                  dtype=torch.float64),
                                                       process_group=group),
        "probability_target": lambda: vp.cross_entropy(x, torch.rand(4, width),
                                                       process_group=group),
        "linear_bias_not_a_shard": lambda: vp.linear_cross_entropy(
            torch.randn(4, D, dtype=torch.float64), torch.randn(width, D, dtype=torch.float64),
            torch.tensor([0, 1, 2, 3]), linear_bias=torch.zeros(width + 1, dtype=torch.float64),
            process_group=group),
    }
    raised = {}
    for name, call in tries.items():
        try:
            call()
            raised[name] = "nothing"
        except Exception as exc:
            raised[name] = type(exc).__name__
    return raised


def _run_cases(world: int, rank: int) -> dict[str, Any]:
    """Every case, then the misuses, on this rank of the default group."""
    results: dict[str, Any] = {}
    for name in CASES:
        try:
            results[name] = _errors(world, rank, name)
        except Exception:
            results[name] = traceback.format_exc()
    results["raises"] = _raises(rank, world)
    return results


def _worker(rank: int, world: int, store: str, out: str) -> None:
    """One spawned rank: :func:`_run_cases`, written to ``out``/rank.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_S))
    try:
        Path(out, f"{rank}.json").write_text(json.dumps(_run_cases(world, rank)))
    finally:
        dist.destroy_process_group()


def _run_group(world: int, tmp_path: Path) -> dict[int, dict[str, Any]]:
    """Every rank's results; fails the test past the deadline (the processes are killed)."""
    out = tmp_path / "results"
    out.mkdir()
    ctx = mp.start_processes(_worker, (world, str(tmp_path / "store"), str(out)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-process group did not finish within {DEADLINE_S} s")
    return {r: json.loads((out / f"{r}.json").read_text()) for r in range(world)}


def _check(results: dict[int, dict[str, Any]]) -> None:
    failures = []
    for rank, cases in results.items():
        assert set(cases) == set(CASES) | {"raises"}
        assert cases["raises"] == {
            "target_out_of_range": "IndexError", "weight_not_a_shard": "ValueError",
            "probability_target": "NotImplementedError",
            "linear_bias_not_a_shard": "ValueError"}, f"rank {rank}"
        for case, errors in cases.items():
            if isinstance(errors, str):
                failures.append(f"rank {rank} {case}: raised\n{errors}")
            elif case != "raises":
                tolerance = errors.pop("tolerance")
                bad = {k: e for k, e in errors.items() if not e <= tolerance}
                if bad:
                    failures.append(f"rank {rank} {case}: {bad} > {tolerance}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """Every case in a group of one in this process (its default group set up and torn down
    here). It also compiles the kernels the spawned workers then load from Numba's cache,
    instead of each compiling them."""
    store = dist.FileStore(str(tmp_path_factory.mktemp("one_rank") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        return {0: _run_cases(1, 0)}
    finally:
        dist.destroy_process_group()


def test_one_rank_is_the_unsharded_loss(one_rank: dict[int, dict[str, Any]]) -> None:
    _check(one_rank)
    assert not dist.is_initialized()


# The 3-process group (whose middle rank has classes on both sides of its shard) is in the slow
# tier (tests/conftest.py): ~20 s more on a shared 2-core machine.
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_sharded_losses_match_the_whole_vocabulary(
        world: int, tmp_path: Path, one_rank: dict[int, dict[str, Any]]) -> None:
    _check(_run_group(world, tmp_path))


def test_weight_gradient_refused_before_any_collective() -> None:
    """No process group is set up here: the refusal comes first."""
    x = torch.randn(2, 3, dtype=torch.float64)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="weight"):
        vp.cross_entropy(x, torch.tensor([0, 1]), w, process_group=None)

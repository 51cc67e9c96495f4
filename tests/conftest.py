"""Fixtures shared by the whole suite, and the split of the suite into two tiers.

``backend`` parametrises every parity test over ``"cpu"`` and ``"cuda"``; the CUDA half is
marked ``cuda`` and skipped, with the reason, when ``nblosses.available_backends()`` lacks it,
so one suite runs unchanged on a GPU machine (``pytest -m cuda`` there runs the GPU half).

Tiers
-----
A plain ``pytest`` runs the fast tier (``addopts`` in ``pyproject.toml`` has ``-m "not
slow"``): every op, both float dtypes, the main kernel layouts, errors, interop, Dask, the
fake-device and tooling checks, in a few minutes with a cold Numba cache. ``pytest -m slow``
runs the slow tier, which ``.ci/run`` runs after the fast one, so every test still runs in CI:
the Sphinx build and doctests, asv and bench-CLI runs, NVRTC of every CUDA instantiation, the
vectorisation assembly checks, the exhaustive layout and option sweeps (most of their cost is
Numba compiling a kernel per dtype, option set and class-count factorisation), and the
large-memory checks. ``pytest -m "slow or not slow"`` runs both.

A test is in the slow tier when it carries the ``slow`` marker itself (``pytestmark`` or a
decorator) or when a rule of :data:`SLOW` below names it: the rules mark tests of files that
are edited by others, by path, test function and, for sweeps, the parameters that stay in the
fast tier (a fair sample of the sweep). ``tests/tooling/test_tiers.py`` checks that every rule
names tests that exist.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import nblosses

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "nblosses", deadline=None, max_examples=40, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "nblosses"))
except ImportError:  # pragma: no cover - hypothesis is a test requirement
    pass

try:
    import torch

    torch.set_num_threads(1)  # the machine is shared; the reference needs no parallelism
except ImportError:  # pragma: no cover
    pass


def _cuda_available() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return "cuda" in nblosses.available_backends()


CUDA_AVAILABLE = _cuda_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def backend(request) -> str:
    """The backend under test: ``"cpu"``, or ``"cuda"`` where a CUDA device is usable."""
    if request.param == "cuda" and not CUDA_AVAILABLE:
        pytest.skip("backend 'cuda' not available here (no CuPy or no CUDA device)")
    return request.param


@pytest.fixture
def restore_backend_default():
    """Reset the process-wide default backend after a test that changes it."""
    before = nblosses.get_backend()
    yield
    nblosses.set_backend(before)


# ----------------------------------------------------------------------------- tiers
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Slow:
    """A rule putting tests in the slow tier.

    Parameters
    ----------
    path : str
        The test file, relative to the repository root.
    why : str
        What makes them slow (measured, cold Numba cache, 2 cores).
    tests : tuple of str
        Test function names (``fnmatch`` patterns); ``("*",)``: every test of the file.
    fast : callable, optional
        ``fast(params) -> bool`` on a parametrised test's parameters (``item.callspec.params``):
        the cases that stay in the fast tier (a sample of a sweep); ``None``: none does.
    keep : int, optional
        With ``keep = k > 1``, one case in about ``k`` stays in the fast tier (of those ``fast``
        keeps, or of all): a fixed pseudo-random sample, chosen by a CRC of the case's id, so
        that every run of a tier runs the same cases.
    """

    path: str
    why: str
    tests: tuple[str, ...] = ("*",)
    fast: Callable[[dict[str, Any]], bool] | None = None
    keep: int = 1

    def sampled(self, item: Any) -> bool:
        """Whether ``item`` is in the ``keep`` sample."""
        spec = getattr(item, "callspec", None)
        key = spec.id if spec is not None else item.name
        return self.keep <= 1 or zlib.crc32(key.encode()) % self.keep == 0

    def matches(self, item: pytest.Item) -> bool:
        """Whether ``item`` is one of the slow tests this rule names."""
        name = getattr(item, "originalname", item.name)
        if not any(fnmatch.fnmatchcase(name, t) for t in self.tests):
            return False
        params = item.callspec.params if hasattr(item, "callspec") else {}
        try:
            if self.keep > 1:
                return not ((self.fast is None or self.fast(params)) and self.sampled(item))
            return self.fast is None or not self.fast(params)
        except (KeyError, ValueError) as exc:  # a parameter renamed or a value added
            raise pytest.UsageError(
                f"tests/conftest.py: the slow-tier rule for {self.path}::{name} cannot read "
                f"the parameters of {item.nodeid} ({exc!r}); update the rule") from exc


#: The slow tier's tests named here (the others carry the marker themselves, as
#: tests/kernels/test_memory.py does). ``why`` gives each rule's cost as measured in one run
#: with a cold Numba cache on a shared 2-core machine (wall times under ~3x load; the
#: fast tier compiles most kernels before these run, so their own cost is lower there).
SLOW: tuple[Slow, ...] = (
    Slow("tests/kernels/test_vectorise.py",
         "compiles every kernel from scratch under three CPU names and reads the assembly"),
    Slow("tests/kernels/test_cuda_compile.py",
         "NVRTC of every instantiation for every element type (~95 s); the fast tier keeps "
         "float's", ("test_nvrtc_compiles_every_instantiation",),
         fast=lambda p: p["ct"] == "float"),
    Slow("tests/kernels/test_cuda_compile.py",
         "NVRTC's optimised builds (~48 s) and the ptxas occupancy checks (~30 s)",
         ("test_nvrtc_compiles_optimised", "test_looped_kernels_keep_half_occupancy_without_spills",
          "test_packed_half_rows_keep_half_occupancy_without_spills")),
    Slow("tests/kernels/test_layouts.py",
         "exhaustive layout sweeps (~130 s): rows 1, 63 and 64 around the 64-row tiles, and "
         "the split kernels compile per class-count factorisation and option set; the fast "
         "tier keeps a ragged 130-row tail at C = 67 (softmax, long rows) and 23 (class "
         "losses, gathering tiles) and one middle-axis shape with ragged blocks",
         ("test_softmax_family_layouts", "test_class_losses_layouts"),
         fast=lambda p: p["shape"] in ((130, 67), (130, 23), (2, 7, 257))
         and (len(p["shape"]) == 3) == (p["dtype"] == "float64")
         and (len(p["shape"]) == 3 or (p["shape"][1] == 67) == ("op" in p))),
    Slow("tests/kernels/test_layouts.py",
         "every C from 1 to 23 (~4 s of compilation per C and option set, ~45 s); the fast "
         "tier keeps C = 10 in float32", ("test_short_rows_every_class_count",
                                          "test_cross_entropy_short_rows_every_class_count"),
         fast=lambda p: p["n_classes"] == 10 and p["dtype"] == "float32"
         and p.get("case", "weighted_smoothed") == "weighted_smoothed"),
    Slow("tests/kernels/test_ce_options_kernels.py",
         "every option set x reduction x layout x target kind x dtype (~160 s, a compile per "
         "option set); the fast tier keeps the richest options (z-loss and soft cap) with "
         "the mean on every layout, target kind and dtype",
         ("test_options_match_torch",), fast=lambda p: p["z"] == 0.02 and p["reduction"] == "mean"),
    Slow("tests/kernels/test_ce_options_kernels.py",
         "every smoothing x weight x layout x target kind (~20 s)",
         ("test_options_in_place_gradient",), fast=lambda p: p["smoothing"] and p["weighted"]),
    Slow("tests/tooling/test_docs.py",
         "the Sphinx doctest builder (~130 s) and the html build with -W (~30 s); the module "
         "docstring examples stay fast",
         ("test_sphinx_doctests", "test_html_build_has_no_warnings")),
    Slow("tests/tooling/test_asv.py",
         "one call of every asv benchmark with its smallest parameters (~90 s)",
         ("test_dry_run",)),
    Slow("tests/tooling/test_cli.py",
         "`nblosses bench` runs in subprocesses, each importing torch and timing (~210 s)",
         ("test_bench_quick_softmax", "test_bench_quick_linear_cross_entropy",
          "test_bench_check_exit_status", "test_bench_skip_result_check")),
    Slow("tests/dask/test_dask.py", "a 2-process distributed.LocalCluster (~60 s)",
         ("test_distributed_local_cluster",)),
    Slow("tests/interop/test_jax.py",
         "jit compiles per shape x reduction x option set (~80 s); the fast tier keeps the "
         "2-d shape", ("test_cross_entropy_value_and_grad_under_jit",),
         fast=lambda p: p["shape"] == (6, 5)),
    Slow("tests/interop/test_torch_autograd.py",
         "every reduction x bias x target kind x weight x dtype (~55 s); the fast tier keeps "
         "the bias with (indices, unweighted) and (probabilities, weighted)",
         ("test_linear_cross_entropy_parity_with_torch",),
         fast=lambda p: p["bias"] and p["weighted"] == p["probs"]),
    # Sweeps of the API tests: a pairwise sample stays fast (every pair of option values
    # still meets, on every shape and dtype), the full product is slow.
    Slow("tests/api/test_class_losses.py",
         "the full ignore x smoothing x reduction product (1080 cases, ~60 s)",
         ("test_cross_entropy_forward_and_grad",),
         fast=lambda p: (["none", "class2", "neg1"].index(p["ignore"])
                         + [0.0, 0.1, 1.0].index(p["eps"])
                         + ["none", "mean", "sum"].index(p["reduction"])) % 3 == 0),
    Slow("tests/api/test_ce_options.py",
         "every option set x reduction x target kind (~50 s); the fast tier keeps each option "
         "set with one reduction per target kind",
         ("test_options_match_torch_composite",),
         fast=lambda p: ["mean", "sum", "none"].index(p["reduction"])
         == ([1e-2, 0.0, 1e-3].index(p["z"]) + p["probs"]) % 3),
    Slow("tests/api/test_distillation.py",
         "every option set x reduction (~80 s); the fast tier keeps each option set with one "
         "reduction, on every shape and dtype", ("test_matches_torch_composite",),
         fast=lambda p: round(10 * sum(v for v in p["options"] if v is not None)) % 3
         == ["mean", "sum", "none"].index(p["reduction"]), keep=16),
    # Large inputs (seconds of arithmetic each, or peak-memory measurements), as
    # tests/kernels/test_memory.py.
    Slow("tests/api/test_class_losses.py",
         "rows of 100000 classes (~50 s)", ("test_cross_entropy_long_rows",)),
    Slow("tests/api/test_softmax.py", "rows of 100000 and 50000 classes (~10 s)",
         ("test_long_rows",)),
    Slow("tests/api/test_distillation.py", "long float32 rows", ("test_long_rows_float32",)),
    Slow("tests/api/test_linear_cross_entropy.py", "peak memory of an LM head (~25 s)",
         ("test_extra_memory_under_five_percent_of_logits",)),
    # Assembly and NVRTC checks of the ops being added (as test_vectorise.py and
    # test_cuda_compile.py above).
    Slow("tests/api/test_token_logprobs.py",
         "compiles its kernels under three CPU names and reads the assembly (~90 s)",
         ("test_kernel_loops_are_packed",)),
    Slow("tests/kernels/test_distillation_cuda.py",
         "NVRTC of every instantiation but float's, the optimised builds and ptxas (~45 s)",
         ("test_nvrtc_compiles_every_instantiation",), fast=lambda p: p["ct"] == "float"),
    Slow("tests/kernels/test_distillation_cuda.py", "NVRTC optimised builds and ptxas",
         ("test_nvrtc_compiles_optimised", "test_long_rows_keep_half_occupancy_without_spills")),
    Slow("tests/interop/test_distributed.py",
         "torch.distributed process groups of 2 processes (~80 s)",
         ("test_sharded_losses_match_the_whole_vocabulary",)),
    # Sampled sweeps (measured 2026-12-07, cold Numba cache, 2 shared cores: the fast tier
    # took 15-22 min; the README's command has 6 min with the install). Each keeps a fixed
    # sample of its cases fast; the whole sweep runs in the slow tier.
    Slow("tests/api/test_properties.py",
         "hypothesis searches over shapes and options (~70 s); every op's parity stays in the "
         "fast tier through the API sweeps"),
    Slow("tests/api/test_distillation.py", "hypothesis search (~15 s)",
         ("test_hypothesis_shapes_and_options",)),
    Slow("tests/api/test_distillation.py", "top-k teacher sweep (~50 s)", ("test_topk_teacher",),
         keep=16),
    Slow("tests/api/test_class_losses.py", "target kinds x options x layouts (~60 s)",
         ("test_cross_entropy_probability_targets", "test_nll_loss_forward_and_grad"), keep=12),
    Slow("tests/api/test_class_losses.py", "the pairwise sample of the ignore x smoothing x "
         "reduction sweep, sampled again (~45 s)", ("test_cross_entropy_forward_and_grad",),
         keep=16),
    Slow("tests/api/test_binary_losses.py", "dtype x shape x weight x reduction (~50 s)",
         ("test_bce_with_logits_matches_torch", "test_bce_matches_torch"), keep=12),
    Slow("tests/api/test_softmax.py", "op x dtype x shape x dim (~30 s)",
         ("test_softmax_backward_matches_torch", "test_forward_matches_torch"), keep=6),
    Slow("tests/api/test_kl_div.py", "dtype x shape x reduction x log_target (~22 s)",
         ("test_matches_torch",), keep=6),
    Slow("tests/api/test_token_logprobs.py", "options x layouts x dtypes (~18 s)",
         ("test_matches_torch_composite",), keep=3),
    Slow("tests/api/test_linear_cross_entropy.py", "options x chunkings x dtypes (~19 s)",
         ("test_parity_with_torch",), keep=12),
    Slow("tests/api/test_errors.py", "every op x dtype x layout left unwritten (~24 s)",
         ("test_inputs_are_never_modified",), keep=12),
    Slow("tests/api/test_ce_options.py", "the option sample, sampled again (~28 s)",
         ("test_options_match_torch_composite",), keep=8),
    Slow("tests/dask/test_dask_plans.py", "class-chunked cross-entropy per shape x reduction "
         "(~37 s); the fast tier keeps the 2-d mean",
         ("test_cross_entropy_options_across_class_chunks",),
         fast=lambda p: p["reduction"] == "mean" and len(p["shape"]) == 2),
    Slow("tests/interop/test_jax.py", "jit of cross-entropy per reduction and options (~20 s)",
         ("test_cross_entropy_value_and_grad_under_jit",), keep=3),
    Slow("tests/kernels/test_threads.py", "two subprocesses importing torch and timing the "
         "LM head (~7 s)", ("test_lm_head_after_torch_is_as_fast_as_without",)),
    Slow("tests/tooling/test_cli.py", "subprocesses importing the CLI and torch (~7 s each); "
         "the fast tier keeps the entry point and the JSON report",
         ("test_info_text", "test_info_needs_no_benchmark_harness")),
    Slow("tests/interop/test_jax.py", "jit and grad of every derived op (~26 s) and vmap, "
         "softmax family dims (~7 s each)",
         ("test_derived_function_matches_the_reference_under_jit_and_grad",
          "test_derived_function_under_vmap", "test_softmax_family_value_and_grad"), keep=6),
    Slow("tests/kernels/test_layouts.py", "binary losses' lengths (~9 s)",
         ("test_binary_losses_lengths",), keep=3),
    Slow("tests/kernels/test_logsumexp.py", "shapes x dtypes (~8 s)", ("test_cpu_matches_torch",),
         keep=3),
    Slow("tests/kernels/test_ce_options_kernels.py", "the option sample, sampled again (~8 s)",
         ("test_options_match_torch",), keep=2),
    Slow("tests/dask/test_dask.py", "chunkings x ops (~7 s)", ("test_class_losses_match_numpy",),
         keep=2),
    Slow("tests/api/test_linear_distillation.py", "torch's gradcheck, opcheck and "
         "torch.compile of the LM-head op (dynamo and float64 kernels, ~15 s); the fast tier "
         "keeps its autograd parity", ("test_torch_gradcheck", "test_torch_opcheck",
                                       "test_torch_compile_fullgraph")),
    Slow("tests/interop/test_torch_autograd.py", "every derived op's sample calls through "
         "autograd, gradcheck and the loss-shape check (~24 s, ~34 s, ~32 s: each sample's "
         "upstream-gradient and float64 kernels)",
         ("test_derived_function_matches_the_reference", "test_derived_function_gradcheck",
          "test_loss_shape_is_the_ops"), keep=2),
    Slow("tests/interop/test_torch_autograd.py", "each derived op's sample calls through its "
         "registered torch custom op (~19 s: a torch.library registration and the kernels' "
         "upstream-gradient builds per sample)", ("test_derived_op_registration",), keep=2),
    Slow("tests/api/test_distillation.py", "finite differences per option set (~15 s)",
         ("test_finite_differences",), keep=3),
    Slow("tests/interop/test_jax_token_logprobs.py", "a jit of their own each (~3 s); the fast "
         "tier keeps values and gradients under jit", ("test_vmap_over_a_leading_batch_axis",
                                                        "test_entropy_only_objective")),
)


def slow_rule(item: pytest.Item) -> Slow | None:
    """The rule of :data:`SLOW` that puts ``item`` in the slow tier, if any."""
    try:
        path = item.path.resolve().relative_to(ROOT).as_posix()
    except ValueError:  # a test outside the repository (pytest run on another tree)
        return None
    return next((r for r in SLOW if r.path == path and r.matches(item)), None)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests :data:`SLOW` names ``slow``."""
    for item in items:
        if slow_rule(item) is not None:
            item.add_marker(pytest.mark.slow)

"""The cache of large CPU outputs: reuse only of memory no live array uses, the limit, the API.

Arrays of ``MIN_BYTES`` (4 MiB) or more come from the cache; smaller ones are plain arrays.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import nblosses
from nblosses import _output_cache as oc
from nblosses import functional as F

BIG = (1024, 1024)  # float32: exactly MIN_BYTES


@pytest.fixture
def cache():
    """A private cache in place of the process's one, restored afterwards."""
    saved = oc.output_cache
    oc.output_cache = fresh = oc.OutputCache(64 << 20)
    try:
        yield fresh
    finally:
        oc.output_cache = saved


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_process_cache_is_public():
    assert isinstance(nblosses.output_cache, nblosses.OutputCache)
    assert nblosses.output_cache is oc.output_cache
    assert {"limit", "held_bytes", "blocks", "hits", "misses"} <= set(oc.output_cache.info())


def test_small_outputs_are_plain_arrays(cache):
    a = oc.empty((1023, 1024), np.float32)
    assert a.flags.owndata and cache.info()["misses"] == 0


def test_block_returns_when_the_array_goes_and_is_reused(cache):
    a = oc.empty(BIG, np.float32)
    assert a.shape == BIG and a.dtype == np.float32 and a.flags.c_contiguous
    assert a.flags.writeable and not a.flags.owndata
    ptr = _ptr(a)
    del a
    assert cache.held_bytes == 4 << 20 and cache.info()["blocks"] == 1
    b = oc.empty((2, 512, 1024), np.float32)  # same size class, other shape
    assert _ptr(b) == ptr and cache.held_bytes == 0
    assert cache.info()["hits"] == 1 and cache.info()["misses"] == 1


def test_a_view_keeps_the_block_out_of_the_cache(cache):
    a = oc.empty(BIG, np.float64)
    a[...] = 7.0
    views = [a[3:], a.T, a.reshape(-1), memoryview(a)]
    del a
    assert cache.held_bytes == 0
    b = oc.empty(BIG, np.float64)
    b[...] = -1.0
    assert not np.shares_memory(views[0], b)
    assert (views[0] == 7).all() and (np.asarray(views[3]) == 7).all()
    del views
    assert cache.held_bytes == 8 << 20


def test_a_reference_cycle_returns_the_block_when_collected(cache):
    a = oc.empty(BIG, np.float32)
    holder: list = [a]
    holder.append(holder)
    del a, holder
    gc.collect()
    assert cache.info()["blocks"] == 1


def test_live_arrays_never_share_memory_across_threads(cache):
    errors: list[str] = []

    def work(seed: int) -> None:
        live = []
        for k in range(40):
            a = oc.empty(BIG, np.float32)
            a.fill(seed)
            live.append(a)
            if k % 3 == 2:
                live.pop(0)
            if any((x != seed).any() for x in live):
                errors.append(f"thread {seed}: an array it holds was overwritten")
                return

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.held_bytes <= cache.limit


def test_limit_evicts_oldest_and_drops_oversized(cache):
    cache.set_limit(10 << 20)
    a, b, c = (oc.empty(BIG, np.float32) for _ in range(3))
    first = _ptr(a)
    del a, b, c  # 3 x 4 MiB into a 10 MiB cache: the oldest one goes
    assert cache.held_bytes == 8 << 20
    assert first not in {_ptr(x) for x in cache._free}
    big = oc.empty((3, 1024, 1024), np.float32)  # 12 MiB > limit: never cached
    assert big.flags.owndata
    assert cache.set_limit(4 << 20) == 10 << 20
    assert cache.held_bytes == 4 << 20
    cache.free_all()
    assert cache.held_bytes == 0 and cache.info()["blocks"] == 0


def test_limit_zero_turns_it_off(cache):
    cache.set_limit(0)
    assert oc.empty(BIG, np.float32).flags.owndata
    assert cache.info() == {"limit": 0, "held_bytes": 0, "blocks": 0, "hits": 0, "misses": 0}


@pytest.mark.parametrize("bad", [-1, "-5"])
def test_negative_limit_is_refused(cache, bad):
    with pytest.raises(ValueError, match=">= 0"):
        cache.set_limit(bad)


@pytest.mark.parametrize(("text", "expected"), [("", oc.DEFAULT_LIMIT), ("0", 0),
                                                ("123456", 123456)])
def test_limit_from_environment(monkeypatch, text, expected):
    monkeypatch.setenv(oc.ENV_LIMIT, text)
    assert oc._limit_from_env() == expected


@pytest.mark.parametrize("text", ["lots", "-1", "1.5"])
def test_bad_environment_limit_says_which_variable(monkeypatch, text):
    monkeypatch.setenv(oc.ENV_LIMIT, text)
    with pytest.raises(ValueError, match=oc.ENV_LIMIT):
        oc._limit_from_env()


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_kernels_write_every_element_of_a_reused_block(cache, op):
    """A reused block holds the previous call's values: the result must not depend on them."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 700), dtype=np.float32)  # 5.5 MB: from the cache
    first = getattr(F, op)(x, dim=1)
    expected = first.copy()
    del first
    poison = oc.empty(x.shape, x.dtype)  # the same block, filled with NaN
    poison.fill(np.nan)
    del poison
    again = getattr(F, op)(x, dim=1)
    assert cache.info()["hits"] >= 2
    np.testing.assert_array_equal(again, expected)


def test_losses_and_gradients_use_it(cache):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2048, 600), dtype=np.float32)
    t = rng.integers(0, 600, 2048)
    _, grad = F.cross_entropy(x, t, return_grad=True)
    assert not grad.flags.owndata
    out = F.binary_cross_entropy_with_logits(x, (x > 0).astype(np.float32), reduction="none")
    assert not out.flags.owndata
    del grad, out
    assert cache.info()["blocks"] == 2


def test_torch_and_dlpack_holders_keep_the_block(cache):
    torch = pytest.importorskip("torch")
    a = oc.empty(BIG, np.float32)
    a.fill(3.0)
    t = torch.from_numpy(a)
    capsule_holder = np.from_dlpack(a)  # a DLPack import of it
    del a
    assert cache.held_bytes == 0
    b = oc.empty(BIG, np.float32)
    b.fill(-1.0)
    assert bool((t == 3.0).all()) and (capsule_holder == 3.0).all()
    del t, capsule_holder
    assert cache.held_bytes == 4 << 20

"""The comparison helper itself: it must fail where results differ and say where."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TOLERANCES, assert_close, tolerance


def test_table_covers_every_dtype_and_is_ordered():
    assert set(TOLERANCES) == {"float16", "bfloat16", "float32", "float64"}
    order = ["float64", "float32", "float16", "bfloat16"]
    for kind in ("value", "grad"):
        rtols = [tolerance(d, kind)[0] for d in order]
        assert rtols == sorted(rtols)
    for d in order:
        assert tolerance(d, "grad")[0] >= tolerance(d, "value")[0]


def test_passes_within_tolerance():
    e = np.array([1.0, -2.0, np.nan, np.inf, -np.inf, 0.0])
    a = e * (1 + 1e-12)
    assert_close(a, e, "float64")
    assert_close(e.astype(np.float32) * np.float32(1 + 1e-6), e, "float32")


def test_reports_worst_element():
    e = np.zeros((3, 4))
    a = e.copy()
    a[1, 2] = 0.5
    a[2, 3] = 1e-3
    with pytest.raises(AssertionError) as info:
        assert_close(a, e, "float64", "demo")
    msg = str(info.value)
    assert "demo" in msg and "2 of 12" in msg and "(1, 2)" in msg and "0.5" in msg


@pytest.mark.parametrize("a,e", [([np.nan], [1.0]), ([1.0], [np.nan]), ([np.inf], [-np.inf]),
                                 ([np.inf], [1e308])])
def test_nan_and_inf_must_match(a, e):
    with pytest.raises(AssertionError):
        assert_close(np.array(a), np.array(e), "float64")


def test_dtype_and_shape_are_checked():
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(np.zeros(2, np.float32), np.zeros(2), "float64")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.zeros((2, 1)), np.zeros(2), "float64")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.zeros(()), np.zeros(1), "float64")

r"""asv benchmarks for nblosses, one module per family. Shared setup lives in :mod:`.common`; the
ops and shapes come from ``nblosses/_bench/cases.py`` in this working tree, so ``nblosses bench``
and asv measure the same cases.

asv's ``-b REGEX`` is searched (``re.search``) in ``module.Class.method(param, ...)``, the
parameters included: ``-b softmax`` also matches every benchmark with a ``'softmax'`` op
parameter. Anchor the module name to select one family:

====================  ==============================================================
``-b``                selects
====================  ==============================================================
``'^softmax\.'``      softmax, log_softmax forward (nblosses, torch, SciPy, cupyx)
``'^backward\.'``     softmax_backward, log_softmax_backward (nblosses, torch)
``'^sigmoid\.'``      sigmoid, sigmoid_backward (nblosses, torch, SciPy, cupyx)
``'^losses\.'``       cross_entropy, nll_loss, binary losses, forward and fused grad
``'^layouts\.'``      softmax, log_softmax, cross_entropy(+grad) per CPU kernel path
``'^gate\.'``         the float32 half of layouts, sampled less: CI and history runs
``'^first_call\.'``   first-call latency in a fresh process, cold and warm cache
``'^peakmem\.'``      peak and extra memory of one call
``'^bench_dask\.'``   chunked (dask) cross_entropy
``'^overhead\.'``     per-call Python cost of each function (no-op kernels)
``'^linear_ce\.'``    linear_cross_entropy forward and gradients (nblosses, torch)
====================  ==============================================================

Within a family, a parameter narrows further: ``-b '^softmax\.Softmax.*float64'``.
"""

from pathlib import Path as _Path

#: The ``-b`` regex of each module (tests check each selects exactly its module, and that the
#: table above documents it).
FAMILIES = {p.stem: rf"^{p.stem}\." for p in sorted(_Path(__file__).parent.glob("*.py"))
            if p.stem not in ("__init__", "common")}

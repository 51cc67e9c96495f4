r"""asv benchmarks for nblosses, one module per family. Shared setup lives in :mod:`.common`; the
cases and shapes come from ``nblosses/_bench/cases.py`` in this working tree, which reads them
from the op specs (each spec's ``bench``): ``nblosses bench`` and asv measure the same cases,
and a new op's cases land in a module below by their layout, without an edit here.

asv's ``-b REGEX`` is searched (``re.search``) in ``module.Class.method(param, ...)``, the
parameters included: ``-b softmax`` also matches every benchmark with a ``'softmax'`` op
parameter. Anchor the module name to select one family:

====================  ==============================================================
``-b``                selects
====================  ==============================================================
``'^softmax\.'``      softmax-layout forward cases (nblosses, torch, SciPy, cupyx)
``'^backward\.'``     softmax-layout gradient cases (nblosses, torch)
``'^sigmoid\.'``      elementwise cases that are not losses (nblosses, torch, SciPy, cupyx)
``'^losses\.'``       class-index, elementwise, pair and top-k losses, forward and grad
``'^layouts\.'``      the ``layouts`` group's cases per CPU kernel path
``'^gate\.'``         the float32 half of layouts, sampled less: CI and history runs
``'^first_call\.'``   first-call latency in a fresh process, cold and warm cache
``'^peakmem\.'``      peak and extra memory of one call
``'^bench_dask\.'``   chunked (dask) class-index cases
``'^overhead\.'``     per-call Python cost of each case (replayed kernels)
``'^linear_ce\.'``    LM heads, forward and gradients (nblosses, torch, torch chunked)
====================  ==============================================================

Within a family, a parameter narrows further: ``-b '^softmax\.Softmax.*float64'``.
"""

from pathlib import Path as _Path

#: The ``-b`` regex of each module (tests check each selects exactly its module, and that the
#: table above documents it).
FAMILIES = {p.stem: rf"^{p.stem}\." for p in sorted(_Path(__file__).parent.glob("*.py"))
            if p.stem not in ("__init__", "common")}

"""Benchmark support for ``nblosses bench`` and ``asv_bench/`` (not public API).

- :mod:`.cases`: ops x shapes and their inputs (NumPy + nblosses' public API only);
- :mod:`.peers`: torch / SciPy / cupyx references, imported lazily and optional;
- :mod:`.timing`: round-robin median timer with device sync, copy bandwidth;
- :mod:`.memory`: extra peak memory of one call; :mod:`.firstcall`: fresh-process latency;
- :mod:`.runner`: the ``nblosses bench`` run; :mod:`.report`: tables, JSON, plot.

Nothing here is imported by ``import nblosses``; torch, SciPy, CuPy, tqdm and matplotlib are
imported only inside the functions that need them.
"""

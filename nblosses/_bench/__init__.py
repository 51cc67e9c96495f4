"""Benchmark support for ``nblosses bench`` and ``asv_bench/`` (not public API).

- :mod:`.cases`: ops x shapes and their inputs (NumPy + nblosses' public API only);
- :mod:`.config`: peers and performance targets, read from ``targets.json`` (data, not code);
- :mod:`.peers`: how torch / SciPy / cupyx are called, imported lazily and optional;
- :mod:`.timing`: round-robin median timer with device sync, copy bandwidth;
- :mod:`.memory`: extra peak memory of one call; :mod:`.firstcall`: fresh-process latency;
- :mod:`.runner`: the ``nblosses bench`` run; :mod:`.targets`: the targets, evaluated;
- :mod:`.report`: tables, JSON, plot.

Machine facts (CPU model, ISA level, torch's and Numba's view of the CPU) come from
:mod:`nblosses._sysinfo`, which ``nblosses info`` uses without this package. Nothing here is
imported by ``import nblosses``; torch, SciPy, CuPy, tqdm and matplotlib are imported only
inside the functions that need them.
"""

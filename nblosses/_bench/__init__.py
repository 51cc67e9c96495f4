"""Benchmark support for ``nblosses bench``, ``asv_bench/`` and ``scripts/gpu_bench.py`` (not
public API).

- :mod:`.cases`: the case table, read from the op specs' ``bench`` entries, the shapes, and
  each case's inputs per layout (NumPy + nblosses' public API);
- :mod:`.config`: peers and performance targets, read from ``targets.json`` (data, not code);
- :mod:`.peers`: which peers are installed, and each case's torch / SciPy / cupyx call, made
  on converted arrays (imported lazily, optional);
- :mod:`.timing`: round-robin median timer with device sync, copy bandwidth;
- :mod:`.memory`: extra peak memory of one call; :mod:`.firstcall`: fresh-process latency;
- :mod:`.runner`: the ``nblosses bench`` run; :mod:`.targets`: the targets, evaluated;
- :mod:`.report`: tables, JSON, plot.

Machine facts (CPU model, ISA level, torch's and Numba's view of the CPU) come from
:mod:`nblosses._sysinfo`, which ``nblosses info`` uses without this package. Nothing here is
imported by ``import nblosses``; torch, SciPy, CuPy, tqdm and matplotlib are imported only
inside the functions that need them.
"""

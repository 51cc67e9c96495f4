"""asv benchmarks for nblosses: one module per area (softmax, losses, backward, first_call,
peakmem). Shared setup lives in :mod:`.common`; the ops and shapes come from
``nblosses/_bench/cases.py`` in this working tree, so ``nblosses bench`` and asv measure the same
cases."""

"""The CI gate and the subset for history runs (select with ``-b '^gate\\.'``): the float32
half of ``layouts.Layouts`` (the ``layouts`` group's cases, 4 today, x 4 CPU layouts), sampled
less, so a run takes about a minute even on a busy 2-core machine.

``asv run --quick`` takes one sample per benchmark (a smoke test: CI runs that); ``asv
continuous -f 1.2 -b '^gate\\.' A B`` compares two commits with the settings below.
"""

# ruff: noqa: RUF012  (asv reads params / param_names as plain class-level lists)

# The module, not the class: asv would list a class imported here as gate.Layouts too.
from . import layouts


class Gate(layouts.Layouts):
    params = [layouts.LAYOUT_OPS, list(layouts.LAYOUTS), ["float32"]]
    # A sample lasts >= 20 ms; 3-8 samples in each of 2 rounds, at most ~1 s per benchmark.
    sample_time = 0.02
    repeat = (3, 8, 1.0)
    rounds = 2
    warmup_time = 0.05

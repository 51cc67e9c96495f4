"""``python -m nblosses.backends.cuda._warm [--jobs N] [dtype ...]``: fill CuPy's kernel cache.

A module entry point (not a heredoc or ``python -``) so that the ``spawn`` workers of
:func:`nblosses.backends.cuda._loader.warm_cache` can start: they import the parent's
``__main__``, which must be a file. Needs a device (NVRTC compiles for its architecture).
"""

from __future__ import annotations

import argparse
import time

from ._loader import include_dirs, warm_cache


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="compile every nblosses CUDA kernel into CuPy's "
                                             "on-disk cache")
    ap.add_argument("--jobs", type=int, default=None, help="processes (default: one per CPU)")
    ap.add_argument("dtypes", nargs="*", default=["float16", "bfloat16", "float32", "float64"])
    args = ap.parse_args(argv)
    t = time.time()
    print("half headers:", include_dirs() or "none found outside the CUDA toolkit")
    n = warm_cache(tuple(args.dtypes), jobs=args.jobs)
    print(f"{n} kernels compiled or loaded in {time.time() - t:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

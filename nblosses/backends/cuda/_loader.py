"""Compile-on-first-use loader for the CUDA sources (``*.cu`` shipped as package data).

A source is compiled by NVRTC (``cupy.RawModule(code=..., options=..., name_expressions=[...])``)
per element type, lazily: the first call that needs a template instantiation compiles the
source for that instantiation only (see :func:`kernel`), and both this module (in memory) and
CuPy (on disk, ``~/.cupy/kernel_cache``) cache the result. The instantiations a source may be
asked for are exactly :func:`nblosses.backends.cuda._kernels.instantiations`; CI compiles all of
them at once with :func:`nvrtc_compile` (no device needed). Importing this module touches
neither NVRTC nor the device.

Half types need ``cuda_fp16.h`` / ``cuda_bf16.h``, which CuPy's own include folder lacks: they
come from a CUDA toolkit (CuPy passes its include folder itself) or from the pip package
``nvidia-cuda-runtime-cu12`` (``nvidia/cuda_runtime/include``), which :func:`include_dirs` finds
and passes with ``-I``. ``NBLOSSES_CUDA_INCLUDE`` (a path list) overrides the search.

Note: CuPy appends ``-ftz=true`` to every NVRTC compile, so float32 denormal results flush to
zero (torch keeps them); float64 arithmetic is unaffected.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import cupy
import numpy as np

from . import _kernels as K

_DIR = Path(__file__).resolve().parent
_LOCK = threading.RLock()
_MODULES: dict[tuple[int, str, str, str], cupy.RawModule] = {}
_KERNELS: dict[tuple[int, str, str, str], cupy.RawKernel] = {}

_HALF_PRELUDE = {
    "__half": "#include <cuda_fp16.h>\n#define NBL_HAS_HALF 1\n",
    "__nv_bfloat16": "#include <cuda_bf16.h>\n#define NBL_HAS_BF16 1\n",
}


# ----------------------------------------------------------------------------- sources
@functools.cache
def read_source(filename: str) -> str:
    return (_DIR / filename).read_text()


def source_for(filename: str, ctype: str) -> str:
    """The full translation unit NVRTC compiles for ``filename`` and element type ``ctype``.

    One string (no ``#include`` of our own files), so CuPy's cache key covers every line. The
    kernels' parameter lists come first, as ``NBL_PARAMS_*`` macros generated from
    :data:`nblosses.backends.cuda._kernels.PARAMS` (the table :func:`~._kernels.pack` follows).
    """
    return (_HALF_PRELUDE.get(ctype, "") + f"// nblosses: {filename} for {ctype}\n"
            + K.params_prelude(filename) + read_source("_common.cu") + "\n" + read_source(filename))


def _nvrtc_major() -> int | None:
    try:
        from cupy_backends.cuda.libs import nvrtc
        return int(nvrtc.getVersion()[0])
    except Exception:  # NVRTC missing: the compile itself will say so
        return None


@functools.cache
def include_dirs() -> tuple[str, ...]:
    """Folders holding ``cuda_fp16.h`` and ``cuda_bf16.h`` for the NVRTC in use."""
    env = os.environ.get("NBLOSSES_CUDA_INCLUDE")
    if env:
        return tuple(p for p in env.split(os.pathsep) if p)
    candidates: list[Path] = []
    try:
        cuda_path = cupy.cuda.get_cuda_path()
    except Exception:
        cuda_path = None
    if cuda_path:
        candidates.append(Path(cuda_path) / "include")
    major = _nvrtc_major()
    try:
        import nvidia  # namespace package of the pip CUDA components
        roots = [Path(p) for p in getattr(nvidia, "__path__", [])]
    except ImportError:
        roots = []
    subdirs = ["cuda_runtime/include", "cu13/include", "cu12/include"]
    if major is not None and major >= 13:
        subdirs = [f"cu{major}/include", *subdirs]
    for root in roots:
        candidates += [root / sub for sub in subdirs]
    for c in candidates:
        if (c / "cuda_fp16.h").is_file() and (c / "cuda_bf16.h").is_file():
            return (str(c),)
    return ()


def options_for(ctype: str) -> tuple[str, ...]:
    opts = ["--std=c++17"]
    if ctype in _HALF_PRELUDE:
        opts += [f"-I{d}" for d in include_dirs()]
    return tuple(opts)


# ----------------------------------------------------------------------------- device-free check
def nvrtc_compile(filename: str, ctype: str, arch: str = "compute_90",
                  extra_options: tuple[str, ...] = ()) -> tuple[str, dict[str, str]]:
    """Compile ``filename`` for ``ctype`` with NVRTC directly (no device needed).

    Returns the PTX and the lowered (mangled) name of every instantiation. Raises
    ``RuntimeError`` with the NVRTC log on failure. Options mirror what CuPy's RawModule passes
    (``-ftz=true`` included), with an explicit ``--gpu-architecture``.
    """
    from cupy_backends.cuda.libs import nvrtc

    names = K.instantiations(filename, ctype)
    prog = nvrtc.createProgram(source_for(filename, ctype), filename, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        opts = [f"--gpu-architecture={arch}", *options_for(ctype), "-ftz=true", *extra_options]
        try:
            nvrtc.compileProgram(prog, opts)
        except Exception as exc:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"NVRTC failed on {filename} for {ctype} ({' '.join(opts)}):\n"
                               f"{log}") from exc
        ptx = nvrtc.getPTX(prog)
        if isinstance(ptx, bytes):
            ptx = ptx.decode()
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
    finally:
        nvrtc.destroyProgram(prog)
    return ptx, lowered


# ----------------------------------------------------------------------------- runtime
def _module(filename: str, dtype_name: str, name: str) -> cupy.RawModule:
    ctype = K.ctype_of(dtype_name)
    if name not in K.instantiations(filename, ctype):
        raise KeyError(f"{name} is not an instantiation of {filename}")
    return cupy.RawModule(code=source_for(filename, ctype), options=options_for(ctype),
                          name_expressions=[name])


def kernel(filename: str, dtype, name: str) -> cupy.RawKernel:
    """The compiled kernel ``name`` of ``filename`` for ``dtype`` on the current device.

    Compiled on first use, one instantiation per RawModule: NVRTC then spends 0.2-2 s on the
    kernel a call needs (with ``-arch=sm_XX``, i.e. ptxas included), instead of 5-20 s on every
    configuration of the source. CuPy's disk cache (keyed on source, options and name
    expression) makes later processes skip NVRTC.
    """
    device = cupy.cuda.runtime.getDevice()
    key = (device, filename, dtype.name, name)
    k = _KERNELS.get(key)
    if k is not None:
        return k
    with _LOCK:
        k = _KERNELS.get(key)
        if k is None:
            try:
                mod = _MODULES.get(key)
                if mod is None:
                    mod = _MODULES[key] = _module(filename, dtype.name, name)
                k = mod.get_function(name)
            except cupy.cuda.compiler.CompileException as exc:
                if K.ctype_of(dtype.name) in _HALF_PRELUDE and not include_dirs():
                    raise RuntimeError(
                        f"compiling the {dtype.name} CUDA kernels needs cuda_fp16.h / "
                        f"cuda_bf16.h: install a CUDA toolkit or 'pip install "
                        f"nvidia-cuda-runtime-cu12', or set NBLOSSES_CUDA_INCLUDE"
                    ) from exc
                raise
            _KERNELS[key] = k
    return k


def on_input_device(fn):
    """Run a kernel function with its first array's device current: outputs are allocated and
    kernels launched where the input lives (CuPy allocates on the current device)."""
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        with first.device:
            return fn(first, *args, **kwargs)

    return wrapper


def launch(filename: str, dtype, name: str, grid: int, block: int, args: tuple) -> None:
    """Launch on the current stream (asynchronous)."""
    kernel(filename, dtype, name)((int(grid),), (int(block),), args)


@functools.cache
def _sm_count(device: int) -> int:
    return int(cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])


def sm_count() -> int:
    return _sm_count(cupy.cuda.runtime.getDevice())


def grid_for(units: int, per_block: int, block: int) -> int:
    """Blocks for ``units`` work items, ``per_block`` per block iteration, capped at a full
    device's worth (the kernels loop); at least 1."""
    need = -(-units // per_block)
    cap = sm_count() * max(1, K.THREADS_PER_SM // block)
    return max(1, min(need, cap))


def aligned(*arrays) -> bool:
    """Whether every given array (``None`` skipped) starts on a 16-byte boundary."""
    return all(a is None or a.data.ptr % K.VEC_BYTES == 0 for a in arrays)


# ----------------------------------------------------------------------------- cache warm-up
def _warm_chunk(tasks) -> int:
    for filename, dtype_name, name in tasks:
        kernel(filename, np.dtype(dtype_name), name)
    return len(tasks)


def warm_cache(dtypes=("float16", "float32", "float64"), sources=K.SOURCES,
               jobs: int | None = None) -> int:
    """Compile every instantiation of ``sources`` for ``dtypes`` into CuPy's on-disk kernel
    cache, in ``jobs`` processes (default: one per CPU). Needs a device (NVRTC compiles for its
    architecture). Returns the number of kernels. Later processes then start without NVRTC.
    """
    tasks = [(src, dt, n) for src in sources for dt in dtypes
             for n in K.instantiations(src, K.ctype_of(dt))]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    if jobs == 1:
        return _warm_chunk(tasks)
    import multiprocessing

    chunks = [tasks[i::jobs] for i in range(jobs)]  # round robin: heavy kernels spread out
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return sum(pool.map(_warm_chunk, chunks))


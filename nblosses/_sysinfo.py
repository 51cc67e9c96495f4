"""What ``nblosses info`` reports: versions, backends, threading, caches, the CPU and the GPU.

Shipped with the library (the benchmark harness is optional and may be absent): ``nblosses
info`` and the header of ``nblosses bench`` both read their facts here. Uses only nblosses'
public API, NumPy, and the threading layer of the CPU backend. torch, CuPy and SciPy are
imported only when installed, and only inside the functions that report on them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

__all__ = ["collect_info", "cpu_facts"]

#: x86-64 micro-architecture levels (psABI), highest first, by the flags Linux reports.
_X86_LEVELS = (
    ("x86-64-v4", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
    ("x86-64-v3", ("avx2", "avx", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm")),
    ("x86-64-v2", ("sse4_2", "sse4_1", "ssse3", "popcnt", "cx16")),
)
#: SIMD flags worth naming in a one-line summary, widest first.
_SIMD_FLAGS = ("avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx2", "fma", "avx",
               "sse4_2", "asimd", "sve", "sve2")


def _version(module: str) -> str | None:
    """``module.__version__``; ``None`` when not installed; never raises."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception as exc:  # a report never fails on a broken optional package
        return f"unusable ({type(exc).__name__}: {exc})"


def _cpuinfo() -> dict[str, str]:
    """The first processor's block of ``/proc/cpuinfo`` (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _isa_level(flags: set[str]) -> str | None:
    """``x86-64-v4`` ... ``x86-64-v1`` from the CPU flags; ``None`` off x86-64."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    for level, needs in _X86_LEVELS:
        if all(f in flags for f in needs):
            return level
    return "x86-64-v1"


def _cache_bytes(level: int) -> int | None:
    """Total bytes of the level-``level`` data caches of all cores (Linux sysfs)."""
    seen: dict[str, int] = {}
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if int((index / "level").read_text()) != level:
                continue
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip().upper()
            shared = (index / "shared_cpu_list").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        seen[shared] = int(size.rstrip("KMG")) * scale  # one entry per physical cache
    return sum(seen.values()) or None


#: x86 vector registers, widest first, and the instruction set whose integer adds use them.
_VECTOR_REGISTERS = (("zmm", "AVX-512"), ("ymm", "AVX2"), ("xmm", "SSE"))
#: A 16-lane integer add: LLVM emits it in the widest integer vectors the target has.
_PROBE_IR = """define <16 x i32> @probe(<16 x i32> %a, <16 x i32> %b) {
  %c = add <16 x i32> %a, %b
  ret <16 x i32> %c
}"""


def _numba_code_isa() -> str | None:
    """The widest vector ISA of the code Numba emits (``AVX-512``, ``AVX2``, ``SSE``), asked of
    Numba's own target machine: the CPU name *and* features it compiles for. The features
    matter: ``NUMBA_CPU_NAME=haswell`` alone still passes the host's, AVX-512 included, unless
    ``NUMBA_CPU_FEATURES`` is set too. ``None`` off x86."""
    import llvmlite.binding as llvm
    from numba.core.registry import cpu_target

    codegen: Any = cpu_target.target_context.codegen()  # its target machine is not public
    asm = codegen._tm.emit_assembly(llvm.parse_assembly(_PROBE_IR))
    return next((isa for reg, isa in _VECTOR_REGISTERS if reg in asm), None)


def _numba_target() -> dict[str, Any]:
    """The CPU Numba compiles for, the ISA of its code, whether the host features include
    AVX-512F / AVX2, and the environment variables that override the target."""
    env = " ".join(f"{k}={os.environ[k]}" for k in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")
                   if os.environ.get(k)) or None
    try:
        import llvmlite.binding as llvm
        import numba

        config: Any = numba.core.config  # set from the environment at import; untyped
        features = llvm.get_host_cpu_features()
        return {"numba_cpu_name": config.CPU_NAME or llvm.get_host_cpu_name(),
                "numba_code_isa": _numba_code_isa(),
                "numba_cpu_env": env,
                "numba_avx512f": bool(features.get("avx512f", False)),
                "numba_avx2": bool(features.get("avx2", False))}
    except Exception as exc:  # a report never fails on a broken optional package
        return {"numba_cpu_name": f"unknown ({type(exc).__name__})", "numba_code_isa": None,
                "numba_cpu_env": env}


def _torch_capability() -> str | None:
    """``torch.backends.cpu.get_cpu_capability()`` (e.g. ``AVX512``) when torch is installed."""
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception as exc:  # a report never fails on a broken optional package
        return f"unknown ({type(exc).__name__})"


def _blas() -> dict[str, Any]:
    """The BLAS of the linear cross-entropy's products and an ``OPENBLAS_CORETYPE`` override."""
    try:
        from .backends.cpu.linear_ce_blas import blas_facts

        facts: dict[str, Any] = dict(blas_facts())
    except Exception as exc:  # a report never fails on a broken optional package
        facts = {"blas": f"unknown ({type(exc).__name__})", "blas_core": None}
    facts["openblas_coretype_env"] = os.environ.get("OPENBLAS_CORETYPE")
    return facts


def cpu_facts() -> dict[str, Any]:
    """CPU model, ISA level, SIMD flags, L2 size, torch's and Numba's view of the CPU (the ISA
    of Numba's code included), the BLAS kernel family."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    model = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:  # "AMD EPYC" alone does not say which
        model += f" (family {info['cpu family']}, model {info['model']})"
    facts: dict[str, Any] = {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "isa_level": _isa_level(flags),
        "simd_flags": [f for f in _SIMD_FLAGS if f in flags],
        "l2_bytes": _cache_bytes(2),
        "torch_cpu_capability": _torch_capability(),
    }
    facts.update(_numba_target())
    facts.update(_blas())
    return facts


def _backends() -> dict[str, str]:
    """``name -> "available" | "unavailable: why"`` for the CPU and CUDA backends."""
    import nblosses

    available = nblosses.available_backends()
    out = {name: "available" for name in available}
    for name in ("cpu", "cuda"):
        if name not in out:
            out[name] = "unavailable: " + _why_unavailable(name)
    return out


def _why_unavailable(name: str) -> str:
    if name != "cuda":
        return "failed to load (run a function with backend='cpu' to see the error)"
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        return f"CuPy sees {n} CUDA device(s)"
    except Exception as exc:  # a report never fails on a broken optional package
        return f"{type(exc).__name__}: {exc}".strip()[:200]


def _numba_cache_dir() -> str:
    """Where Numba stores nblosses' compiled CPU kernels."""
    import numba

    config: Any = numba.config  # set from the environment at import; untyped
    if config.CACHE_DIR:
        return f"{config.CACHE_DIR} (NUMBA_CACHE_DIR)"
    try:
        from nblosses.backends.cpu import _parallel

        touch: Any = _parallel._touch  # the Dispatcher's on-disk cache is not in its stubs
        return str(touch._cache._cache_path)
    except Exception:  # a report never fails on a broken optional package
        return "unknown"


def _threads(info: dict[str, Any]) -> None:
    """Numba's threading layer and thread counts, and torch's (in place)."""
    import numba

    from nblosses.backends.cpu import _parallel

    info["numba_threading_layer"] = _parallel.threading_layer()
    info["numba_threads"] = numba.get_num_threads()
    config: Any = numba.config  # set from the environment at import; untyped
    info["numba_max_threads"] = config.NUMBA_NUM_THREADS
    info["numba_cache_dir"] = _numba_cache_dir()
    if info["torch"] and not str(info["torch"]).startswith("unusable"):
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_cuda"] = bool(torch.cuda.is_available())


def _cuda_device(info: dict[str, Any]) -> None:
    """Name, runtime and driver versions of the current CUDA device (in place)."""
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        info["cuda_device"] = name.decode() if isinstance(name, bytes) else str(name)
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception as exc:  # a report never fails on a broken optional package
        info["cuda_device"] = f"unknown ({exc})"


def collect_info() -> dict[str, Any]:
    """Versions, backends, threading, caches, CPU facts and the GPU: ``nblosses info --json``."""
    import numpy as np

    import nblosses

    info: dict[str, Any] = {
        "nblosses": nblosses.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "numba": _version("numba"),
        "llvmlite": _version("llvmlite"),
        "scipy": _version("scipy"),
        "torch": _version("torch"),
        "cupy": _version("cupy"),
    }
    info.update(cpu_facts())
    info["backends"] = _backends()
    info["available_backends"] = [n for n, s in info["backends"].items() if s == "available"]
    if "cpu" in info["available_backends"]:
        _threads(info)
    if "cuda" in info["available_backends"]:
        _cuda_device(info)
    return info

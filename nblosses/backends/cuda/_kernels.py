"""Catalogue of the CUDA kernels: template instantiations, their names and launch shapes.

Pure Python (no CuPy, no device), so that the instantiation lists, the configuration choices and
the NVRTC compile check can be tested anywhere. Every name a kernel module asks the loader for
is built by a function here, and :func:`instantiations` lists, per source file and element type,
exactly the names those functions can produce (the RawModule's ``name_expressions``).

Layout choices (all sizes in elements of the row's type):

- **cached rows** (``inner == 1``, row in registers): a group of ``G`` threads per row, ``NV``
  vectors of ``VEC`` elements per thread. ``G <= 32``: part of a warp, ``ROW_BLOCK / G`` rows per
  block; ``G > 32``: the block. Capacity ``G * NV * VEC``: 32768 for float32 and the half types,
  4096 for float64 with 16-byte vectors; 8192 (float64: 4096) with scalar access. The
  cross-entropy rows of the half types may instead be kept packed (``PACKED_NV`` vectors per
  thread in groups of ``PACKED_GS``): same capacity, smaller blocks, more rows per SM.
- **looped rows**: rows too long for registers (``G = 512``, online max/sum then a write pass),
  and the softmax backward / probability-target cross-entropy at every length.
- **cols** (``inner > 1``): one thread per position, walking ``C`` with stride ``inner``.
- **elementwise**: flat grid-stride loops.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

#: dtype name -> CUDA element type. bfloat16 CuPy arrays exist with CuPy >= 14.2 and ml_dtypes
#: (``cupy.from_dlpack`` of a torch bfloat16 tensor gives one): they reach the bf16 instantiations.
CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
ITEMSIZE = {"__half": 2, "__nv_bfloat16": 2, "float": 4, "double": 8}

VEC_BYTES = 16  #: bytes per vector access
ROW_BLOCK = 128  #: threads per block when several rows share a block (G <= 32)
COL_BLOCK = 256  #: threads per block of the cols, elementwise and prep kernels
LONG_ROW_G = 512  #: threads per row (and block) of the looped kernels for long rows
MAX_NV = 8  #: vectors per thread of the cached kernels
#: Elements per thread the cached kernels keep in registers (as float or double).
MAX_ELEMS = {"__half": 32, "__nv_bfloat16": 32, "float": 32, "double": 8}
#: Largest group of the cached kernels (float64 at 1024 threads would spill under 64 registers).
MAX_CACHED_G = {"__half": 1024, "__nv_bfloat16": 1024, "float": 1024, "double": 512}
#: Blocks per SM the grid-stride kernels launch at most: enough for full occupancy.
THREADS_PER_SM = 2048

#: Every source file: the built-in ones, then those an op's host module adds with
#: :func:`register` (when the backend imports it).
SOURCES = [
    "softmax.cu",
    "softmax_backward.cu",
    "cross_entropy.cu",
    "cross_entropy_probs.cu",
    "nll.cu",
    "binary.cu",
    "linear_ce.cu",
]
#: Element types of the linear cross-entropy kernels (half inputs are computed in float32).
LCE_CTYPES = ("float", "double")
#: Threads per block of ``lce_stats`` (one block per row).
LCE_STATS_BLOCK = 256


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def vec_width(ctype: str) -> int:
    """Elements per 16-byte vector."""
    return VEC_BYTES // ITEMSIZE[ctype]


def vec_choices(ctype: str) -> tuple[int, ...]:
    """The VEC values instantiated: the 16-byte width and scalar access."""
    return (vec_width(ctype), 1)


def ctype_of(dtype_name: str) -> str:
    try:
        return CTYPES[dtype_name]
    except KeyError:
        raise TypeError(f"backend 'cuda' has no kernels for dtype {dtype_name}") from None


def name(kernel: str, ctype: str, *params: int) -> str:
    """A template instantiation's name expression, e.g. ``softmax_cached<float, 4, 32, 8, 128>``."""
    return f"{kernel}<{', '.join([ctype, *map(str, params)])}>"


# ----------------------------------------------------------------------------- configurations
def nv_max(ctype: str, vec: int) -> int:
    return max(1, min(MAX_NV, MAX_ELEMS[ctype] // vec))


#: Packed half-precision rows (cross-entropy only): groups of these sizes may hold up to
#: ``PACKED_NV`` 16-byte vectors per thread as loaded (``NBL_CE_PACKED`` in ``_common.cu``),
#: so that a row takes a smaller block: 4 blocks of 256 or 2 of 512 threads resident per SM
#: (64 registers) instead of one 1024-thread block.
PACKED_GS = (256, 512)
PACKED_NV = 8


def cached_config(nvec: int, ctype: str, vec: int,
                  packed: bool = False) -> tuple[int, int, int] | None:
    """``(G, NV, BLOCK)`` of the register-cached row kernels for rows of ``nvec`` vectors, or
    ``None`` when the row does not fit (then the looped kernel runs).

    ``packed``: the kernel can keep half-precision rows packed (``ce_cached``): for the half
    types with 16-byte vectors, the smallest group of ``PACKED_GS`` holding the row in
    ``PACKED_NV`` vectors per thread replaces a larger one. Which rows fit is unchanged.
    """
    cfg = _plain_cached_config(nvec, ctype, vec)
    if cfg is None or not packed or ITEMSIZE[ctype] != 2 or vec == 1:
        return cfg
    for g in PACKED_GS:
        nv = next_pow2(math.ceil(nvec / g))
        if g < cfg[0] and nv <= PACKED_NV:
            return g, nv, g
    return cfg


def _plain_cached_config(nvec: int, ctype: str, vec: int) -> tuple[int, int, int] | None:
    if nvec < 1:
        return None
    top = nv_max(ctype, vec)
    if nvec <= 32:
        return next_pow2(nvec), 1, ROW_BLOCK
    if nvec <= 32 * top:
        return 32, next_pow2(math.ceil(nvec / 32)), ROW_BLOCK
    for g in (128, 256, 512, 1024):
        if g > MAX_CACHED_G[ctype]:
            break
        nv = next_pow2(math.ceil(nvec / g))
        if nv <= top:
            return g, nv, g
    return None


@functools.cache
def cached_configs(ctype: str, vec: int,
                   packed: bool = False) -> tuple[tuple[int, int, int], ...]:
    """Every configuration :func:`cached_config` can return for this type, width and
    ``packed``."""
    top = nv_max(ctype, vec)
    out = set()
    for nvec in range(1, MAX_CACHED_G[ctype] * top + 1):
        cfg = cached_config(nvec, ctype, vec, packed)
        if cfg is not None:
            out.add(cfg)
    return tuple(sorted(out))


def looped_config(nvec: int) -> tuple[int, int]:
    """``(G, BLOCK)`` of the looped row kernels (softmax backward, probability targets)."""
    if nvec <= 32 * 8:
        g = min(32, next_pow2(math.ceil(nvec / 4)))
        return g, ROW_BLOCK
    if nvec <= 256 * 8:
        return 256, 256
    return LONG_ROW_G, LONG_ROW_G


LOOPED_GS = ((1, ROW_BLOCK), (2, ROW_BLOCK), (4, ROW_BLOCK), (8, ROW_BLOCK), (16, ROW_BLOCK),
             (32, ROW_BLOCK), (256, 256), (LONG_ROW_G, LONG_ROW_G))
assert LONG_ROW_G > 256


def rows_per_block(g: int, block: int) -> int:
    return block // g


# ----------------------------------------------------------------------------- name builders
def softmax_cached(ct, vec, g, nv, block):
    return name("softmax_cached", ct, vec, g, nv, block)


def softmax_looped(ct, vec):
    return name("softmax_looped", ct, vec, LONG_ROW_G, LONG_ROW_G)


def softmax_split(kernel, ct, vec):
    """``softmax_split_stats`` or ``softmax_split_write``."""
    return name(kernel, ct, vec, LONG_ROW_G)


#: Vectors per thread and split at least (each block streams U loads per thread several times).
SPLIT_MIN_VECS_PER_THREAD = 4


def split_count(nrows: int, nvec: int, sm_count: int) -> int:
    """Blocks per row for long rows (looped path): enough for one full wave of resident blocks
    (two per SM) when the rows alone are too few, each chunk at least
    ``SPLIT_MIN_VECS_PER_THREAD * LONG_ROW_G`` vectors; 1 = no split (the looped kernel)."""
    wave = 2 * sm_count
    if nrows >= wave:
        return 1
    by_len = nvec // (SPLIT_MIN_VECS_PER_THREAD * LONG_ROW_G)
    return max(1, min(-(-wave // nrows), by_len))


def split_chunks(nvec: int, nsplit: int) -> tuple[int, int]:
    """``(nsplit, chunk_vec)`` for rows of ``nvec`` vectors split about ``nsplit`` ways: chunks
    of equal size, none empty."""
    chunk = -(-nvec // nsplit)
    return -(-nvec // chunk), chunk


def softmax_cols(ct):
    return name("softmax_cols", ct)


def lse_rows(ct, vec, g, block):
    return name("lse_rows", ct, vec, g, block)


def lse_cols(ct):
    return name("lse_cols", ct)


def softmax_bwd_rows(ct, vec, g, block):
    return name("softmax_bwd_rows", ct, vec, g, block)


def softmax_bwd_cols(ct):
    return name("softmax_bwd_cols", ct)


def ce_cached(ct, vec, g, nv, block, ext=0):
    return name("ce_cached", ct, ext, vec, g, nv, block)


def ce_looped(ct, vec, ext=0):
    return name("ce_looped", ct, ext, vec, LONG_ROW_G, LONG_ROW_G)


def ce_cols(ct, ext=0):
    return name("ce_cols", ct, ext)


def ce_split(kernel, ct, vec, ext=0):
    """``ce_split_stats`` or ``ce_split_finish``."""
    return name(kernel, ct, ext, vec, LONG_ROW_G)


CE_SPLIT_KERNELS = ("ce_split_stats", "ce_split_finish")


def probs_rows(ct, vec, g, block, ext=0):
    return name("probs_rows", ct, ext, vec, g, block)


def probs_cols(ct, ext=0):
    return name("probs_cols", ct, ext)


def nll_fused(ct):
    return name("nll_fused", ct)


def class_prep(ct):
    return name("class_prep", ct)


def elementwise(kernel, ct, vec):
    """``sigmoid_fwd``, ``sigmoid_bwd``, ``bce_fwd``, ``bce_logits_fwd``."""
    return name(kernel, ct, vec)


def lce(kernel, ct):
    """``lce_stats``, ``lce_grad`` or ``lce_col_sums`` (linear cross-entropy blocks)."""
    return name(kernel, ct, LCE_STATS_BLOCK) if kernel == "lce_stats" else name(kernel, ct)


LCE_KERNELS = ("lce_stats", "lce_grad", "lce_col_sums")
SPLIT_KERNELS = ("softmax_split_stats", "softmax_split_write")
ELEMENTWISE = ("sigmoid_fwd", "sigmoid_bwd", "bce_fwd", "bce_logits_fwd")
#: EXT template values of the cross-entropy kernels: 0 = plain, 1 = z_loss / softcap / lse_out.
EXTS = (0, 1)


def instantiations(source: str, ctype: str) -> list[str]:
    """The name expressions of ``source`` compiled for element type ``ctype``."""
    return list(_instantiations(source, ctype))


@functools.cache
def _instantiations(source: str, ctype: str) -> tuple[str, ...]:
    vecs = vec_choices(ctype)
    if source == "softmax.cu":
        names = [softmax_cached(ctype, v, *cfg) for v in vecs for cfg in cached_configs(ctype, v)]
        names += [softmax_looped(ctype, v) for v in vecs]
        names += [softmax_split(k, ctype, v) for k in SPLIT_KERNELS for v in vecs]
        names.append(softmax_cols(ctype))
        names += [lse_rows(ctype, v, g, b) for v in vecs for g, b in LOOPED_GS]
        names.append(lse_cols(ctype))
    elif source == "softmax_backward.cu":
        names = [softmax_bwd_rows(ctype, v, g, b) for v in vecs for g, b in LOOPED_GS]
        names.append(softmax_bwd_cols(ctype))
    elif source == "cross_entropy.cu":
        names = [ce_cached(ctype, v, *cfg, ext) for ext in EXTS for v in vecs
                 for cfg in cached_configs(ctype, v, packed=True)]
        names += [ce_looped(ctype, v, ext) for ext in EXTS for v in vecs]
        names += [ce_split(k, ctype, v, ext) for k in CE_SPLIT_KERNELS for ext in EXTS
                  for v in vecs]
        names += [ce_cols(ctype, ext) for ext in EXTS]
        names.append(class_prep(ctype))
    elif source == "cross_entropy_probs.cu":
        names = [probs_rows(ctype, v, g, b, ext) for ext in EXTS for v in vecs
                 for g, b in LOOPED_GS]
        names += [probs_cols(ctype, ext) for ext in EXTS]
    elif source == "nll.cu":
        names = [nll_fused(ctype), class_prep(ctype)]
    elif source == "binary.cu":
        names = [elementwise(k, ctype, v) for k in ELEMENTWISE for v in vecs]
    elif source == "linear_ce.cu":
        names = [lce(k, ctype) for k in LCE_KERNELS] if ctype in LCE_CTYPES else []
    elif source in _REGISTERED:
        names = list(_REGISTERED[source].instantiations(ctype))
    else:
        raise KeyError(source)
    return tuple(names)


# ----------------------------------------------------------------------------- parameter lists
# One table gives every kernel family's parameter list: the loader turns it into a macro
# ``NBL_PARAMS_<FAMILY>`` prepended to each source (the kernels are declared as
# ``kernel(NBL_PARAMS_CE)``), and :func:`pack` builds a launch's argument tuple from keywords in
# the same order, with the scalar types the C++ side expects. Adding, removing or reordering a
# parameter is one edit here; a keyword that is missing or unknown fails on the host.
#
# Types: ``T`` is the element type of the instantiation; pointers are passed as arrays or as
# 64-bit addresses (``None`` = null); ``i64`` -> int64, ``int`` -> int32, ``double`` -> float64.

#: The last parameters of every loss kernel: the single-launch reduction (per-block partials,
#: last-block-done counter, 0-d output), the ``mean`` scalars of the prep kernel and the device
#: error record (see ``finish_loss`` in ``_common.cu``).
REDUCE_PARAMS = (
    ("part", "double* __restrict__"),  # 2 doubles per block: loss, denominator
    ("counter", "unsigned int*"),  # blocks done; the last block resets it to 0
    ("out", "T* __restrict__"),  # 0-d reduced loss (null for reduction="none")
    ("rmode", "int"),  # 0: loss / div; 1: loss / denominator (scal[0] if scal else summed)
    ("div", "double"),
    ("scal", "const double* __restrict__"),  # [D, g / D, W] from class_prep, or null
    ("err", "long long*"),  # device error record (bad class index), or null
)

#: Options of the cross-entropy kernels (instantiations with EXT = 1 only read them).
EXT_PARAMS = (
    ("z_loss", "double"),
    ("softcap", "double"),
    ("lse_out", "T* __restrict__"),
)

PARAMS: dict[str, tuple[tuple[str, str], ...]] = {
    "softmax_rows": (("x", "const T* __restrict__"), ("y", "T* __restrict__"), ("nrows", "i64"),
                     ("C", "i64"), ("log_mode", "int")),
    "softmax_split": (("x", "const T* __restrict__"), ("y", "T* __restrict__"), ("C", "i64"),
                      ("log_mode", "int"), ("nsplit", "i64"), ("chunk_vec", "i64"),
                      ("stats", "double* __restrict__")),
    "softmax_cols": (("x", "const T* __restrict__"), ("y", "T* __restrict__"), ("outer", "i64"),
                     ("C", "i64"), ("inner", "i64"), ("log_mode", "int")),
    # logsumexp of each slice of (outer, C, inner), written as double
    "lse": (("x", "const T* __restrict__"), ("out", "double* __restrict__"), ("outer", "i64"),
            ("C", "i64"), ("inner", "i64")),
    "softmax_bwd": (("g", "const T* __restrict__"), ("y", "const T* __restrict__"),
                    ("gx", "T* __restrict__"), ("outer", "i64"), ("C", "i64"), ("inner", "i64"),
                    ("log_mode", "int")),
    "ce": (("x", "const T*"), ("t", "const long long* __restrict__"), ("nrows", "i64"),
           ("C", "i64"), ("inner", "i64"), ("w", "const T* __restrict__"), ("wsum", "double"),
           ("ignore", "i64"), ("eps", "double"), ("want_grad", "int"),
           ("g_rows", "const T* __restrict__"), ("g_scalar", "double"), ("gx", "T*"),
           ("loss_out", "T* __restrict__"), *EXT_PARAMS, *REDUCE_PARAMS),
    "ce_split": (("x", "const T*"), ("t", "const long long* __restrict__"), ("nrows", "i64"),
                 ("C", "i64"), ("w", "const T* __restrict__"), ("wsum", "double"),
                 ("ignore", "i64"), ("eps", "double"), ("want_grad", "int"),
                 ("g_rows", "const T* __restrict__"), ("g_scalar", "double"), ("gx", "T*"),
                 ("loss_out", "T* __restrict__"), *EXT_PARAMS, ("nsplit", "i64"),
                 ("chunk_vec", "i64"), ("stats", "double* __restrict__"), *REDUCE_PARAMS),
    "probs": (("x", "const T*"), ("p", "const T* __restrict__"), ("nrows", "i64"), ("C", "i64"),
              ("inner", "i64"), ("w", "const T* __restrict__"), ("eps", "double"),
              ("want_grad", "int"), ("g_rows", "const T* __restrict__"), ("g_scalar", "double"),
              ("gx", "T*"), ("loss_out", "T* __restrict__"), *EXT_PARAMS, *REDUCE_PARAMS),
    "nll": (("x", "const T*"), ("t", "const long long* __restrict__"), ("nrows", "i64"),
            ("C", "i64"), ("inner", "i64"), ("w", "const T* __restrict__"), ("ignore", "i64"),
            ("want_loss", "int"), ("want_grad", "int"), ("g_rows", "const T* __restrict__"),
            ("g_scalar", "double"), ("gx", "T*"), ("loss_out", "T* __restrict__"),
            *REDUCE_PARAMS),
    "class_prep": (("t", "const long long* __restrict__"), ("npos", "i64"), ("C", "i64"),
                   ("ignore", "i64"), ("w", "const T* __restrict__"), ("nw", "i64"),
                   ("g", "double"), ("part", "double* __restrict__"),
                   ("counter", "unsigned int*"), ("scal", "double* __restrict__")),
    "ew1": (("x", "const T* __restrict__"), ("y", "T* __restrict__"), ("n", "i64")),
    "ew2": (("g", "const T* __restrict__"), ("y", "const T* __restrict__"),
            ("gx", "T* __restrict__"), ("n", "i64")),
    "bce": (("x", "const T* __restrict__"), ("y", "const T* __restrict__"),
            ("w", "const T* __restrict__"), ("pw", "const T* __restrict__"), ("n", "i64"),
            ("g_rows", "const T* __restrict__"), ("g_scalar", "double"),
            ("gx", "T* __restrict__"), ("loss_out", "T* __restrict__"), *REDUCE_PARAMS),
    # linear cross-entropy, one (rows, cols) logits block z at vocabulary offset c0 (the row
    # statistics m, s, xt, sa, sb and coefficients coef, b, a are float64 per block row)
    "lce_stats": (("z", "T* __restrict__"), ("rows", "i64"), ("cols", "i64"),
                  ("bias", "const T* __restrict__"), ("cap", "double"),
                  ("t", "const long long* __restrict__"), ("c0", "i64"),
                  ("w", "const T* __restrict__"), ("smoothing", "int"),
                  ("y", "const T* __restrict__"), ("ldy", "i64"), ("keep", "double"),
                  ("spread", "double"), ("m", "double* __restrict__"),
                  ("s", "double* __restrict__"), ("xt", "double* __restrict__"),
                  ("sa", "double* __restrict__"), ("sb", "double* __restrict__"),
                  ("row0", "i64"), ("n_classes", "i64"), ("ignore", "i64"),
                  ("err", "long long*")),
    "lce_grad": (("z", "T* __restrict__"), ("rows", "i64"), ("cols", "i64"),
                 ("bias", "const T* __restrict__"), ("cap", "double"), ("raw", "int"),
                 ("t", "const long long* __restrict__"), ("c0", "i64"), ("ignore", "i64"),
                 ("w", "const T* __restrict__"), ("y", "const T* __restrict__"), ("ldy", "i64"),
                 ("keep", "double"), ("spread", "double"), ("m", "const double* __restrict__"),
                 ("coef", "const double* __restrict__"), ("b", "const double* __restrict__"),
                 ("a", "const double* __restrict__")),
    "lce_col_sums": (("z", "const T* __restrict__"), ("rows", "i64"), ("cols", "i64"),
                     ("out", "T* __restrict__")),
}

#: Kernel (template name) -> parameter family.
FAMILY = {
    "softmax_cached": "softmax_rows", "softmax_looped": "softmax_rows",
    "softmax_cols": "softmax_cols",
    "softmax_split_stats": "softmax_split", "softmax_split_write": "softmax_split",
    "lse_rows": "lse", "lse_cols": "lse",
    "softmax_bwd_rows": "softmax_bwd", "softmax_bwd_cols": "softmax_bwd",
    "ce_cached": "ce", "ce_looped": "ce", "ce_cols": "ce",
    "ce_split_stats": "ce_split", "ce_split_finish": "ce_split",
    "probs_rows": "probs", "probs_cols": "probs",
    "nll_fused": "nll", "class_prep": "class_prep",
    "sigmoid_fwd": "ew1", "sigmoid_bwd": "ew2", "bce_fwd": "bce", "bce_logits_fwd": "bce",
    "lce_stats": "lce_stats", "lce_grad": "lce_grad", "lce_col_sums": "lce_col_sums",
}

_CORE_FAMILY = dict(FAMILY)
_SCALAR_CTYPES = {"i64": "long long", "int": "int", "double": "double"}
#: The families of the built-in sources (every source's prelude defines them).
CORE_FAMILIES = tuple(PARAMS)


# ----------------------------------------------------------------------------- registration
@dataclass(frozen=True)
class Source:
    """The catalogue of a source file that an op adds without editing this module.

    Parameters
    ----------
    filename : str
        The ``.cu`` file beside this module.
    params : dict
        Its kernel families' parameter lists (as :data:`PARAMS`).
    kernels : dict
        Its kernel templates -> family (as :data:`FAMILY`).
    instantiations : callable
        ``instantiations(ctype) -> names``: every name expression the host module may ask
        for, for one element type (empty for types the source does not serve).
    """

    filename: str
    params: dict[str, tuple[tuple[str, str], ...]]
    kernels: dict[str, str]
    instantiations: Callable[[str], tuple[str, ...] | list[str]]


_REGISTERED: dict[str, Source] = {}


def register(source: Source) -> Source:
    """Add an op's source to the catalogue (its host module calls this at import); the
    loader, :func:`pack` and the NVRTC checks then know it as they know the built-in ones."""
    clash = (set(source.params) & set(CORE_FAMILIES)) | (set(source.kernels) & set(_CORE_FAMILY))
    if clash:
        raise ValueError(f"{source.filename}: names already used by the built-in sources: "
                         f"{sorted(clash)}")
    _REGISTERED[source.filename] = source
    if source.filename not in SOURCES:
        SOURCES.append(source.filename)
    PARAMS.update(source.params)
    FAMILY.update(source.kernels)
    _instantiations.cache_clear()
    _packer.cache_clear()
    return source


def c_params(family: str) -> str:
    """The C++ parameter list of ``family`` (the body of its ``NBL_PARAMS_*`` macro)."""
    return ", ".join(f"{_SCALAR_CTYPES.get(ty, ty)} {nm}" for nm, ty in PARAMS[family])


def params_prelude(filename: str | None = None) -> str:
    """``#define NBL_PARAMS_<FAMILY> ...`` for the built-in families and, for a registered
    ``filename``, its own (``None``: every family known); prepended to the source."""
    if filename is None:
        families: tuple[str, ...] = tuple(PARAMS)
    else:
        own = _REGISTERED[filename].params if filename in _REGISTERED else {}
        families = (*CORE_FAMILIES, *own)
    return "".join(f"#define NBL_PARAMS_{fam.upper()} {c_params(fam)}\n" for fam in families)


def param_kinds(family: str) -> tuple[str, ...]:
    """``"ptr"``, ``"i64"``, ``"int"`` or ``"double"`` per parameter of ``family``."""
    return tuple("ptr" if "*" in ty else ty for _, ty in PARAMS[family])


@functools.cache
def _packer(family: str):
    import numpy as np

    null = np.uint64(0)
    conv = {"i64": np.int64, "int": np.int32, "double": np.float64}
    names = tuple(nm for nm, _ in PARAMS[family])
    kinds = param_kinds(family)
    fns = tuple((lambda a: null if a is None else a) if k == "ptr" else conv[k] for k in kinds)
    return names, fns


def pack(family: str, **args) -> tuple:
    """Launch arguments of a ``family`` kernel, in the table's order (every name required).

    Raises ``TypeError`` naming the missing or unknown parameters.
    """
    names, fns = _packer(family)
    if len(args) != len(names) or not all(n in args for n in names):
        missing = [n for n in names if n not in args]
        extra = [n for n in args if n not in names]
        raise TypeError(f"{family} kernel: missing {missing}, unknown {extra}")
    return tuple(f(args[n]) for n, f in zip(names, fns))

"""CUDA backend checks that need no GPU, plus device path tests that skip without one.

Without a device (CI): every CUDA source is compiled by NVRTC for every element type and every
template instantiation the Python side can ask for, with an explicit
``--gpu-architecture=compute_90``; the backend's registration is checked; and every kernel
launch the Python glue makes (over a matrix of shapes, dtypes and options, with fake device
arrays) is checked against the compiled kernel's parameter list and launch bounds.

Needs ``cupy-cuda12x`` and ``nvidia-cuda-nvrtc-cu12`` (skips cleanly without them) and
``nvidia-cuda-runtime-cu12`` for the half-precision headers (fails without them: CI installs it).

With a device: the ``cuda``-marked tests at the end run each kernel path (cached / looped / cols,
vector / scalar access, in-place gradients, reductions) against the CPU backend.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
try:
    nvrtc.getVersion()
except Exception as exc:  # libnvrtc not installed
    pytest.skip(f"NVRTC is not available: {exc}", allow_module_level=True)

import nblosses  # noqa: E402
import nblosses.backends.cpu  # noqa: E402
import nblosses.backends.cuda  # noqa: E402
from nblosses import _registry as R  # noqa: E402
from nblosses.backends.cuda import _kernels as K  # noqa: E402
from nblosses.backends.cuda import _loader as L  # noqa: E402

CTYPES = ("__half", "__nv_bfloat16", "float", "double")
OPS = ("softmax", "log_softmax", "softmax_backward", "log_softmax_backward", "sigmoid",
       "sigmoid_backward", "nll_loss", "cross_entropy", "cross_entropy_probs",
       "binary_cross_entropy", "binary_cross_entropy_with_logits")
#: Optimised (runtime-equivalent) compiles for these types; debug (-G) compiles for all.
OPT_CTYPES = CTYPES if os.environ.get("NBLOSSES_NVRTC_ALL_TYPES") else ("float",)

_COMPILED: dict = {}


def compiled(src: str, ct: str, debug: bool):
    key = (src, ct, debug)
    if key not in _COMPILED:
        _COMPILED[key] = L.nvrtc_compile(src, ct, "compute_90", ("-G",) if debug else ())
    return _COMPILED[key]


def _entries(ptx: str) -> set[str]:
    return set(re.findall(r"\.entry\s+(\S+?)\s*\(", ptx))


# ----------------------------------------------------------------------------- NVRTC
def test_half_headers_found():
    assert L.include_dirs(), (
        "cuda_fp16.h / cuda_bf16.h not found: pip install nvidia-cuda-runtime-cu12 "
        "(or set NBLOSSES_CUDA_INCLUDE)")


@pytest.mark.parametrize("ct", CTYPES)
@pytest.mark.parametrize("src", K.SOURCES)
def test_nvrtc_compiles_every_instantiation(src, ct):
    """Front end and code generation of every instantiation (-G: fast, no optimiser)."""
    ptx, lowered = compiled(src, ct, debug=True)
    names = K.instantiations(src, ct)
    assert len(names) == len(set(names))
    assert set(lowered) == set(names)
    missing = [n for n in names if lowered[n] not in _entries(ptx)]
    assert not missing


@pytest.mark.parametrize("ct", OPT_CTYPES)
@pytest.mark.parametrize("src", K.SOURCES)
def test_nvrtc_compiles_optimised(src, ct):
    """The optimised compile, as CuPy's RawModule runs it (minus the device's -arch)."""
    ptx, lowered = compiled(src, ct, debug=False)
    assert set(lowered) == set(K.instantiations(src, ct))
    assert all(v in _entries(ptx) for v in lowered.values())


def _softmax_row_name(ct: str) -> tuple[str, str]:
    vec = K.vec_width(ct)
    return "softmax.cu", K.softmax_cached(ct, vec, 32, K.nv_max(ct, vec), K.ROW_BLOCK)


def _packed_ce_name(ct: str) -> tuple[str, str]:
    """The largest packed half-precision CE row (512 threads x 64 elements)."""
    return "cross_entropy.cu", K.ce_cached(ct, K.vec_width(ct), 512, K.PACKED_NV, 512)


@pytest.mark.parametrize("ct,ld,which", [
    ("float", r"v4\.f32", _softmax_row_name), ("__half", r"v4\.(u32|b32)", _softmax_row_name),
    ("double", r"v2\.f64", _softmax_row_name), ("__half", r"v4\.(u32|b32)", _packed_ce_name),
    ("__nv_bfloat16", r"v4\.(u32|b32)", _packed_ce_name)])
def test_vector_instantiations_use_16_byte_loads(ct, ld, which):
    src, name = which(ct)
    assert name in K.instantiations(src, ct)
    prog = nvrtc.createProgram(L.source_for(src, ct), src, [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        nvrtc.compileProgram(prog, ["--gpu-architecture=compute_90", *L.options_for(ct),
                                    "-ftz=true"])
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(prog)
    assert re.search(r"ld\.global(\.nc)?\." + ld, ptx)
    assert re.search(r"st\.global\." + ld, ptx)


def ptxas_usage(src: str, ct: str, names: list[str]) -> dict[str, tuple[int, int]]:
    """``{name: (registers, spill store bytes)}`` from NVRTC's ptxas report for sm_90 (ptxas
    runs inside NVRTC: no device needed)."""
    prog = nvrtc.createProgram(L.source_for(src, ct), src, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        nvrtc.compileProgram(prog, ["--gpu-architecture=sm_90", *L.options_for(ct), "-ftz=true",
                                    "--ptxas-options=-v"])
        log = nvrtc.getProgramLog(prog)
        log = log.decode() if isinstance(log, bytes) else log
        lowered = {nvrtc.getLoweredName(prog, n): n for n in names}
    finally:
        nvrtc.destroyProgram(prog)
    out: dict[str, list[int]] = {}
    entry = props = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            entry = m.group(1)
            out[lowered[entry]] = [0, 0]
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and entry and props == entry:
            out[lowered[entry]][1] = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and entry:
            out[lowered[entry]][0] = int(m.group(1))
    return {k: (r, sp) for k, (r, sp) in out.items()}


@pytest.mark.parametrize("ct", ["__half", "float"])
def test_looped_kernels_keep_half_occupancy_without_spills(ct):
    """The looped row kernels (and the vector probability-target rows) run 1024 threads per SM
    (50% occupancy): a 64-register budget, met without spilling on the default (non-EXT)
    paths."""
    checks = {"softmax.cu": [K.softmax_looped(ct, v) for v in K.vec_choices(ct)],
              "cross_entropy.cu": [K.ce_looped(ct, v) for v in K.vec_choices(ct)]
              + [K.ce_split(k, ct, v, ext) for k in K.CE_SPLIT_KERNELS for v in K.vec_choices(ct)
                 for ext in K.EXTS],
              "softmax_backward.cu": [K.softmax_bwd_rows(ct, v, K.LONG_ROW_G, K.LONG_ROW_G)
                                      for v in K.vec_choices(ct)],
              # float probability targets with 16-byte vectors: every group size
              "cross_entropy_probs.cu": [K.probs_rows(ct, K.vec_width(ct), g, b)
                                         for g, b in K.LOOPED_GS if ct == "float"]}
    for src, names in checks.items():
        if not names:
            continue
        usage = ptxas_usage(src, ct, names)
        assert set(usage) == set(names)
        for n, (regs, spill) in usage.items():
            assert regs <= 64 and spill == 0, (n, regs, spill)
    # register-cached float CE rows with a minimum of blocks per SM (NBL_CACHED_MIN_BLOCKS)
    if ct == "float":
        bounded = {K.ce_cached(ct, 4, 32, 8, 128): (128, 5),
                   K.ce_cached(ct, 4, 128, 8, 128): (128, 5),
                   K.ce_cached(ct, 4, 128, 4, 128): (128, 8),
                   K.ce_cached(ct, 4, 256, 8, 256): (256, 3)}
        usage = ptxas_usage("cross_entropy.cu", ct, list(bounded))
        for n, (block, blocks) in bounded.items():
            regs, spill = usage[n]
            assert regs * block * blocks <= 65536 and spill == 0, (n, regs, spill)


def packed_configs(ct: str) -> list[tuple[int, int, int]]:
    """The cross-entropy configurations that keep half-precision rows packed (more than 32
    elements per thread)."""
    vec = K.vec_width(ct)
    return [cfg for cfg in K.cached_configs(ct, vec, packed=True) if cfg[1] * vec > 32]


@pytest.mark.parametrize("ct", ["__half", "__nv_bfloat16"])
def test_packed_half_rows_keep_half_occupancy_without_spills(ct):
    """Packed half-precision CE rows (256 or 512 threads): 1024 threads per SM resident (50%
    occupancy, 4 or 2 rows in flight per SM instead of one 1024-thread row), so at most 64
    registers, and no spills on the default (non-EXT) path."""
    cfgs = packed_configs(ct)
    assert {g for g, _, _ in cfgs} == set(K.PACKED_GS)
    names = {K.ce_cached(ct, K.vec_width(ct), *cfg): cfg[2] for cfg in cfgs}
    usage = ptxas_usage("cross_entropy.cu", ct, list(names))
    assert set(usage) == set(names)
    for n, block in names.items():
        regs, spill = usage[n]
        assert regs * K.THREADS_PER_SM // 2 <= 65536 and block < 1024 and spill == 0, \
            (n, regs, spill)


@pytest.mark.parametrize("ct", ["__half", "__nv_bfloat16", "float", "double"])
@pytest.mark.parametrize("C", [8192, 16384, 32000, 32768, 40000])
def test_packed_configuration_choice(ct, C):
    """Cross-entropy rows of the half types take the smallest packed group that holds them;
    softmax and float / double rows keep the plain table; which rows fit is unchanged."""
    vec = K.vec_width(ct)
    plain = K.cached_config(C // vec, ct, vec)
    packed = K.cached_config(C // vec, ct, vec, packed=True)
    assert (plain is None) == (packed is None)
    assert K.cached_config(C // vec, ct, 1, packed=True) == K.cached_config(C // vec, ct, 1)
    if ct in ("float", "double") or plain is None:
        assert packed == plain
        return
    want = {8192: (256, 4, 256), 16384: (256, 8, 256), 32000: (512, 8, 512),
            32768: (512, 8, 512)}[C]
    assert packed == want and packed[0] <= plain[0]


def test_sources_have_no_host_macros():
    for src in ("_common.cu", *K.SOURCES):
        text = L.read_source(src)
        code = "\n".join(line.split("//")[0] for line in text.splitlines())
        for macro in ("INFINITY", "NAN", "HUGE_VAL", "FLT_MAX", "#include"):
            assert macro not in code, (src, macro)


# ----------------------------------------------------------------------------- registration
def test_import_nblosses_does_not_import_cupy():
    code = "import sys, nblosses; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_op_has_a_cuda_kernel_with_the_cpu_signature():
    import nblosses.backends.cpu
    import nblosses.backends.cuda

    be = nblosses.backends.cuda.runtime(R.lookup("cuda"))
    assert be.xp is cupy and be.asarray is cupy.asarray
    assert set(be.native_dtypes) >= {"float16", "float32", "float64"}
    for op in OPS:
        fn = be.kernels.get(op)
        assert callable(fn), op
        assert fn.__module__.startswith("nblosses.backends.cuda"), op
        cpu = nblosses.backends.cpu.KERNELS[op]
        cpu = inspect.unwrap(cpu)
        ours = list(inspect.signature(fn).parameters)
        theirs = list(inspect.signature(cpu).parameters)
        # the cross-entropy options (keyword, defaulted) may land on one backend first
        assert ours[:len(theirs)] == theirs, op
        assert set(ours[len(theirs):]) <= {"z_loss", "softcap", "lse_out"}, op


def test_configurations_are_instantiated():
    for ct in CTYPES:
        softmax_names = set(K.instantiations("softmax.cu", ct))
        ce_names = set(K.instantiations("cross_entropy.cu", ct))
        bwd_names = set(K.instantiations("softmax_backward.cu", ct))
        probs_names = set(K.instantiations("cross_entropy_probs.cu", ct))
        for vec in K.vec_choices(ct):
            for nvec in list(range(1, 600)) + [1000, 1023, 1024, 1025, 4096, 8000, 8192, 8193,
                                                16384, 32768, 40000, 10 ** 6]:
                cfg = K.cached_config(nvec, ct, vec)
                ce_cfg = K.cached_config(nvec, ct, vec, packed=True)
                if cfg is None:
                    assert ce_cfg is None
                    assert K.softmax_looped(ct, vec) in softmax_names
                    assert K.ce_looped(ct, vec) in ce_names
                else:
                    for (g, nv, block), top in ((cfg, K.MAX_ELEMS[ct]),
                                                (ce_cfg, K.PACKED_NV * vec)):
                        assert g * nv >= nvec and ((g <= 32 and block == K.ROW_BLOCK)
                                                   or block == g)
                        assert nv * vec <= top
                    assert K.softmax_cached(ct, vec, *cfg) in softmax_names
                    assert K.ce_cached(ct, vec, *ce_cfg) in ce_names
                g, block = K.looped_config(nvec)
                assert K.softmax_bwd_rows(ct, vec, g, block) in bwd_names
                assert K.probs_rows(ct, vec, g, block) in probs_names
    # capacity of the register-cached rows (elements)
    assert K.cached_config(32000 // 4, "float", 4) == (1024, 8, 1024)
    assert K.cached_config(32768 // 8, "__half", 8) is not None
    assert K.cached_config(128256 // 8, "__half", 8) is None


def test_split_count():
    """Long rows are split only when the rows alone leave SMs idle, into chunks of at least
    SPLIT_MIN_VECS_PER_THREAD vectors per thread."""
    per = K.SPLIT_MIN_VECS_PER_THREAD * K.LONG_ROW_G
    assert K.split_count(264, 10 ** 6, 132) == 1  # a full wave of rows: the looped kernel
    assert K.split_count(1, 10 ** 6, 132) == 264
    assert K.split_count(64, 10 ** 6, 132) == 5
    assert K.split_count(1, 3 * per, 132) == 3
    assert K.split_count(2, per - 1, 132) == 1
    for nvec, want in ((10, 3), (9, 3), (7, 3), (8000, 3)):
        nsplit, chunk = K.split_chunks(nvec, want)
        assert (nsplit - 1) * chunk < nvec <= nsplit * chunk and nsplit <= want
    for nrows in (1, 3, 50, 200):
        for nvec in (per, 10 * per, 10 ** 5):
            k = K.split_count(nrows, nvec, 132)
            assert k == 1 or (nvec // k >= per and nrows * k <= 2 * 132 + nrows)


# ----------------------------------------------------------------------------- launch arguments
class FakeArray(np.ndarray):
    """A host array that looks enough like a CuPy array for the launch glue."""

    @property
    def data(self):
        arr = self
        return types.SimpleNamespace(ptr=arr.__array_interface__["data"][0],
                                     memset_async=lambda value, size: LAUNCHES.append(
                                         ("memset", arr.__array_interface__["data"][0], size)))

    @property
    def device(self):
        return contextlib.nullcontext()

    def sum(self, *args, **kwargs):
        return np.asarray(np.ndarray.sum(np.asarray(self), *args, **kwargs)).view(FakeArray)


def fa(a) -> FakeArray:
    return np.ascontiguousarray(a).view(FakeArray)


FAKE_STREAM = types.SimpleNamespace(ptr=0, is_capturing=lambda: False)
FAKE_CUPY = types.SimpleNamespace(
    float64=np.float64,
    empty_like=lambda a, dtype=None: np.empty_like(np.asarray(a), dtype=dtype).view(FakeArray),
    empty=lambda shape, dtype=np.float64: np.empty(shape, dtype).view(FakeArray),
    zeros=lambda shape, dtype=np.float64: np.zeros(shape, dtype).view(FakeArray),
    full=lambda shape, value, dtype=np.float64: np.full(shape, value, dtype).view(FakeArray),
    cuda=types.SimpleNamespace(get_current_stream=lambda: FAKE_STREAM),
)
#: Fake scratch addresses (16-byte aligned, never dereferenced on the host).
FAKE_SCRATCH = types.SimpleNamespace(part=np.uint64(1 << 20), scal=np.uint64((1 << 20) + 4096),
                                     counter=np.uint64((1 << 20) + 8192))
SCRATCH_PARAMS = ("part", "counter", "scal")
LAUNCHES: list = []
C_NAMES = {"float16": "__half", "float32": "float", "float64": "double", "int64": "long long"}
#: kernels without a BLOCK template parameter and the block size their launch bounds fix
FIXED_BLOCKS = {"softmax_cols": 256, "softmax_bwd_cols": 256, "ce_cols": 256, "probs_cols": 256,
                "nll_fused": 256, "class_prep": 256, "sigmoid_fwd": 256, "sigmoid_bwd": 256,
                "bce_fwd": 256, "bce_logits_fwd": 256, "lce_grad": 256, "lce_col_sums": 256}


@pytest.fixture
def fake_device(monkeypatch):
    from nblosses.backends.cuda import _device_errors as E
    from nblosses.backends.cuda import _scratch as S
    from nblosses.backends.cuda import binary_losses, class_losses, softmax

    for mod in (softmax, class_losses, binary_losses):
        monkeypatch.setattr(mod, "cupy", FAKE_CUPY)
    monkeypatch.setattr(L, "sm_count", lambda: 132)
    monkeypatch.setattr(S, "scratch", lambda stream, sm: FAKE_SCRATCH)
    record_array = fa(np.zeros(E.RECORD_WORDS, np.int64))
    monkeypatch.setattr(E, "record_for_launch", lambda stream: record_array)
    monkeypatch.setattr(E, "after_launch", lambda stream: LAUNCHES.append(("poll",)))

    def record(src, dtype, name, grid, block, args):
        LAUNCHES.append((src, dtype, name, grid, block, args))

    monkeypatch.setattr(L, "launch", record)
    LAUNCHES.clear()
    yield types.SimpleNamespace(softmax=softmax, class_losses=class_losses,
                                binary_losses=binary_losses)
    LAUNCHES.clear()


#: arguments the row kernels access with 16-byte vectors (elementwise kernels: every array)
VECTOR_ARGS = {"softmax_cached": ("x", "y"), "softmax_looped": ("x", "y"),
               "softmax_bwd_rows": ("g", "y", "gx"), "ce_cached": ("x", "gx"),
               "ce_looped": ("x", "gx"), "probs_rows": ("x", "p", "gx")}
_DEMANGLED: dict[str, list[str] | None] = {}


def _param_types(src: str, ct: str, name: str) -> list[str]:
    """C++ parameter types of the instantiation (demangled), or PTX param kinds."""
    ptx, lowered = compiled(src, ct, debug=True)
    mangled = lowered[name]
    if mangled not in _DEMANGLED:
        filt = shutil.which("c++filt")
        if filt:
            out = subprocess.run([filt], input=mangled, capture_output=True, text=True).stdout
            inside = out.strip()[out.strip().index("(") + 1:-1]
            _DEMANGLED[mangled] = [p.strip() for p in _split_params(inside)]
        else:
            body = ptx[ptx.index(".entry " + mangled):]
            body = body[:body.index(")")]
            _DEMANGLED[mangled] = ["ptx:" + k for k in re.findall(r"\.param\s+\.(\w+)", body)]
    return _DEMANGLED[mangled]


def _split_params(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return out


def _check_arg(param: str, arg, where: str):
    if param.startswith("ptx:"):
        kind = param[4:]
        if kind == "f64":
            assert type(arg) is np.float64, where
        elif kind in ("u32", "s32", "b32"):
            assert type(arg) is np.int32, where
        else:
            assert type(arg) in (np.int64, np.uint64) or isinstance(arg, np.ndarray), where
        return
    if param.endswith("*"):
        if isinstance(arg, np.uint64):  # null, or a scratch address
            assert arg == 0 or where.split()[-1] in SCRATCH_PARAMS, where
            return
        assert isinstance(arg, FakeArray), f"{where}: {param} <- {type(arg).__name__}"
        # linear cross-entropy's probability block: rows of stride ldy, contiguous columns
        row_strided = where.startswith("lce_") and where.endswith(" y")
        assert arg.flags.c_contiguous or (row_strided and arg.strides[-1] == arg.itemsize), where
        base = param[:-1].replace("const", "").strip()
        assert C_NAMES[arg.dtype.name] == base, f"{where}: {param} <- {arg.dtype}"
    elif param == "long long":
        assert type(arg) is np.int64, f"{where}: {param} <- {type(arg).__name__}"
    elif param == "int":
        assert type(arg) is np.int32, f"{where}: {param} <- {type(arg).__name__}"
    elif param == "double":
        assert type(arg) is np.float64, f"{where}: {param} <- {type(arg).__name__}"
    else:
        raise AssertionError(f"{where}: unexpected parameter type {param}")


def check_launches(expect_min: int = 1):
    launches = [x for x in LAUNCHES if x[0] not in ("memset", "poll")]
    assert len(launches) >= expect_min
    for src, dtype, name, grid, block, args in launches:
        ct = K.ctype_of(dtype.name)
        assert name in K.instantiations(src, ct), name
        params = _param_types(src, ct, name)
        kernel = name.split("<")[0]
        names = [n for n, _ in K.PARAMS[K.FAMILY[kernel]]]
        assert len(params) == len(args) == len(names), f"{name}: {len(args)} arguments for {params}"
        for i, (p, a) in enumerate(zip(params, args)):
            _check_arg(p, a, f"{name} argument {i} {names[i]}")
        if kernel in FIXED_BLOCKS:
            bound = FIXED_BLOCKS[kernel]
        else:  # the BLOCK template parameter (__launch_bounds__) comes last
            bound = int(name.rstrip(">").split(",")[-1])
        assert block == bound, f"{name} launched with {block} threads"
        assert 1 <= grid <= 132 * (K.THREADS_PER_SM // block) or grid == 1, (name, grid)
        if f"{ct}, {K.vec_width(ct)}" in name:  # vector instantiation: aligned pointers
            for i in ([names.index(v) for v in VECTOR_ARGS[kernel]] if kernel in VECTOR_ARGS
                      else range(len(args))):
                a = args[i]
                if isinstance(a, FakeArray) and a.dtype == dtype:
                    assert a.data.ptr % 16 == 0, (name, i)


def _unaligned(shape, dtype):
    """A C-contiguous array whose data pointer is not 16-byte aligned."""
    n = math.prod(shape)
    base = np.zeros(n + 1, dtype)
    return base[1:].reshape(shape).view(FakeArray)


ROW_SHAPES = [(5, 1, 1), (7, 3, 1), (64, 16, 1), (3, 1000, 1), (2, 1001, 1), (2, 5000, 1),
              (2, 32000, 1), (1, 70000, 1), (2, 3, 5), (3, 4, 2)]
DTYPES = (np.float16, np.float32, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_family_launches(fake_device, dtype):
    sm = fake_device.softmax
    for shape in ROW_SHAPES:
        for make in (lambda s: fa(np.random.rand(*s).astype(dtype)),
                     lambda s: _unaligned(s, dtype)):
            x = make(shape)
            for op in (sm.softmax, sm.log_softmax):
                y = op(x)
                assert y.shape == x.shape and y.dtype == x.dtype
            for op in (sm.softmax_backward, sm.log_softmax_backward):
                assert op(make(shape), x).shape == x.shape
            flat = x.reshape(-1)
            assert sm.sigmoid(flat).shape == flat.shape
            assert sm.sigmoid_backward(make(shape).reshape(-1), flat).shape == flat.shape
    check_launches(len(ROW_SHAPES) * 2 * 6)
    kernels = {x[2].split("<")[0] for x in LAUNCHES if len(x) > 2}
    assert {"softmax_split_stats", "softmax_split_write"} <= kernels
    # empty inputs launch nothing
    LAUNCHES.clear()
    assert sm.softmax(fa(np.zeros((0, 3, 1), dtype))).shape == (0, 3, 1)
    assert sm.sigmoid(fa(np.zeros(0, dtype))).shape == (0,)
    assert not LAUNCHES


CLASS_SHAPES = [(4, 10, 1), (3, 1000, 1), (2, 32000, 1), (2, 70001, 1), (3, 5, 7), (2, 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_class_loss_launches(fake_device, dtype):
    cl = fake_device.class_losses
    rng = np.random.default_rng(0)
    for n, C, inner in CLASS_SHAPES:
        x = fa(rng.standard_normal((n, C, inner)).astype(dtype))
        t = rng.integers(0, C, (n, inner)).astype(np.int64)
        t.reshape(-1)[0] = -100
        t = fa(t)
        p = fa(rng.random((n, C, inner)).astype(dtype))
        w = fa(rng.random(C).astype(dtype))
        for reduction in ("none", "mean", "sum"):
            for want_grad in (False, True):
                g = (fa(np.ones((n, inner), dtype)) if reduction == "none" else 2.0) \
                    if want_grad else None
                for weight in (None, w):
                    for eps in (0.0, 0.1):
                        for buf in ((None, x) if want_grad else (None,)):
                            kw = dict(reduction=reduction, want_grad=want_grad, grad_output=g,
                                      grad_buffer=buf)
                            loss, grad = cl.cross_entropy(x, t, weight, ignore_index=-100,
                                                          label_smoothing=eps, **kw)
                            _check_loss(loss, grad, reduction, want_grad, (n, inner), x)
                            loss, grad = cl.cross_entropy_probs(x, p, weight, label_smoothing=eps,
                                                                **kw)
                            _check_loss(loss, grad, reduction, want_grad, (n, inner), x)
                        loss, grad = cl.nll_loss(x, t, weight, ignore_index=-100,
                                                 reduction=reduction, want_grad=want_grad,
                                                 grad_output=g, grad_buffer=None)
                        _check_loss(loss, grad, reduction, want_grad, (n, inner), x)
        # unaligned logits: scalar access
        xu = _unaligned((n, C, inner), dtype)
        cl.cross_entropy(xu, t, None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                         want_grad=True, grad_output=1.0, grad_buffer=None)
    check_launches(100)
    # half-precision rows of 32000: the packed 512-thread CE kernel (softmax keeps 1024 x 32)
    ce_rows = {(x[2], x[4]) for x in LAUNCHES if len(x) > 4 and x[2].startswith("ce_cached")}
    packed = (K.ce_cached("__half", 8, 512, K.PACKED_NV, 512), 512)
    assert (packed in ce_rows) == (dtype == np.float16), ce_rows
    # nll with a gradient zero-fills it on the stream before scattering
    assert any(x[0] == "memset" for x in LAUNCHES)
    # empty inputs: no kernel, NaN mean
    LAUNCHES.clear()
    loss, grad = cl.cross_entropy(fa(np.zeros((0, 3, 1), dtype)), fa(np.zeros((0, 1), np.int64)),
                                  None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                                  want_grad=True, grad_output=1.0, grad_buffer=None)
    assert loss.shape == () and np.isnan(loss) and grad.shape == (0, 3, 1)
    assert not [x for x in LAUNCHES if x[0] != "memset"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_option_launches(fake_device, dtype):
    """z_loss / softcap / lse_out run the EXT instantiations; the defaults the plain ones."""
    cl = fake_device.class_losses
    rng = np.random.default_rng(5)
    for n, C, inner in CLASS_SHAPES:
        x = fa(rng.standard_normal((n, C, inner)).astype(dtype))
        t = fa(rng.integers(0, C, (n, inner)).astype(np.int64))
        p = fa(rng.random((n, C, inner)).astype(dtype))
        for reduction in ("none", "mean", "sum"):
            g = fa(np.ones((n, inner), dtype)) if reduction == "none" else 1.0
            for opts in (dict(z_loss=1e-4), dict(softcap=30.0),
                         dict(lse_out=fa(np.zeros((n, inner), dtype)))):
                LAUNCHES.clear()
                kw = dict(label_smoothing=0.1, reduction=reduction, want_grad=True,
                          grad_output=g, grad_buffer=None, **opts)
                loss, grad = cl.cross_entropy(x, t, None, ignore_index=-100, **kw)
                _check_loss(loss, grad, reduction, True, (n, inner), x)
                loss, grad = cl.cross_entropy_probs(x, p, None, **kw)
                _check_loss(loss, grad, reduction, True, (n, inner), x)
                names = [x[2] for x in LAUNCHES if len(x) > 2 and x[0] != "memset"]
                mains = [nm for nm in names if nm.split("<")[0] != "class_prep"]
                # one CE launch (two for split rows) and one probability-target launch
                assert len(mains) in (2, 3) and all(
                    f"{K.CTYPES[np.dtype(dtype).name]}, 1" in nm for nm in mains), mains
                check_launches(2)


def test_few_long_rows_split_for_cross_entropy(fake_device):
    """Few long rows take the split kernels: statistics, then combine + loss + gradient, the
    reduction and the error record on the second launch only."""
    cl = fake_device.class_losses
    x = fa(np.random.default_rng(7).standard_normal((2, 70000, 1)).astype(np.float32))
    t = fa(np.array([[5], [69999]], np.int64))
    LAUNCHES.clear()
    cl.cross_entropy(x, t, None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                     want_grad=False, grad_output=None, grad_buffer=None)
    launches = [x for x in LAUNCHES if len(x) > 2]
    assert [x[2].split("<")[0] for x in launches] == ["ce_split_stats", "ce_split_finish"]
    names = [n for n, _ in K.PARAMS["ce_split"]]
    stats_args, finish_args = (dict(zip(names, x[5])) for x in launches)
    nsplit = int(stats_args["nsplit"])
    assert nsplit == K.split_count(2, 70000 // 4, 132) > 1
    assert launches[0][3] == launches[1][3] == 2 * nsplit
    assert int(stats_args["chunk_vec"]) * nsplit >= 70000 // 4
    assert stats_args["out"] == 0 and stats_args["err"] == 0
    assert isinstance(finish_args["out"], FakeArray) and isinstance(finish_args["err"], FakeArray)
    check_launches(2)


def test_one_launch_per_reduced_call(fake_device):
    """Reduced losses finish inside the loss kernel; the prep kernel runs only when needed."""
    cl = fake_device.class_losses
    x = fa(np.random.default_rng(6).standard_normal((64, 100, 1)).astype(np.float32))
    t = fa(np.arange(64, dtype=np.int64) % 100)
    w = fa(np.ones(100, np.float32))

    def kernels(**kw):
        LAUNCHES.clear()
        cl.cross_entropy(x, t, kw.pop("weight", None), ignore_index=-100, grad_buffer=None,
                         **kw)
        return [x[2].split("<")[0] for x in LAUNCHES if len(x) > 2 and x[0] != "memset"]

    fwd = dict(want_grad=False, grad_output=None, label_smoothing=0.0)
    grad = dict(want_grad=True, grad_output=1.0, label_smoothing=0.0)
    assert kernels(reduction="mean", **fwd) == ["ce_cached"]
    assert kernels(reduction="sum", **grad) == ["ce_cached"]
    assert kernels(reduction="mean", **grad) == ["class_prep", "ce_cached"]
    assert kernels(reduction="sum", weight=w, **dict(fwd, label_smoothing=0.1)) == [
        "class_prep", "ce_cached"]
    assert ("poll",) in LAUNCHES  # the error record's copy-back is queued after the launch


def test_pack_follows_the_parameter_table():
    names = [n for n, _ in K.PARAMS["ew1"]]
    assert names == ["x", "y", "n"]
    args = K.pack("ew1", n=3, y=None, x=None)
    assert args == (np.uint64(0), np.uint64(0), np.int64(3)) and type(args[2]) is np.int64
    with pytest.raises(TypeError, match="missing"):
        K.pack("ew1", x=None, y=None)
    with pytest.raises(TypeError, match="unknown"):
        K.pack("ew1", x=None, y=None, n=1, m=2)
    prelude = K.params_prelude()
    for fam in K.PARAMS:
        assert f"#define NBL_PARAMS_{fam.upper()} " in prelude
    assert set(K.FAMILY.values()) == set(K.PARAMS)
    for src in K.SOURCES:  # every kernel is declared with its family's macro
        text = L.read_source(src)
        for kernel, fam in K.FAMILY.items():
            if re.search(rf"\b{kernel}\(", text):
                assert re.search(rf"\b{kernel}\(NBL_PARAMS_{fam.upper()}\)", text), kernel


def test_bce_keeps_float32_subnormals():
    """float <-> double conversions of BCE's log path must not flush (CuPy passes -ftz=true)."""
    ptx, lowered = compiled("binary.cu", "float", debug=False)
    name = lowered[K.elementwise("bce_fwd", "float", 1)]
    body = ptx[ptx.index(".entry " + name):]
    body = body[:body.index("\n}\n")]
    assert re.search(r"cvt\.f64\.f32", body)
    assert not re.search(r"cvt\.ftz\.f64\.f32", body)
    assert not re.search(r"cvt\.rn\.ftz\.f32\.f64", body)


def _check_loss(loss, grad, reduction, want_grad, loss_shape, x):
    if reduction == "none":
        assert loss.shape == loss_shape and loss.dtype == x.dtype
    else:
        assert loss.shape == () and loss.dtype == x.dtype
    if want_grad:
        assert grad.shape == x.shape and grad.dtype == x.dtype
    else:
        assert grad is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_loss_launches(fake_device, dtype):
    bl = fake_device.binary_losses
    rng = np.random.default_rng(1)
    for n in (1, 7, 1000, 4099):
        for make in (lambda a: fa(a), lambda a: _copy_unaligned(a)):
            x = make(rng.random(n).astype(dtype))
            y = make(rng.random(n).astype(dtype))
            w = make(rng.random(n).astype(dtype))
            for reduction in ("none", "mean", "sum"):
                for want_grad in (False, True):
                    g = (make(np.ones(n, dtype)) if reduction == "none" else 0.5) \
                        if want_grad else None
                    for weight in (None, w):
                        loss, grad = bl.binary_cross_entropy(x, y, weight, reduction=reduction,
                                                             want_grad=want_grad, grad_output=g)
                        _check_loss(loss, grad, reduction, want_grad, (n,), x)
                        loss, grad = bl.binary_cross_entropy_with_logits(
                            x, y, weight, w, reduction=reduction, want_grad=want_grad,
                            grad_output=g)
                        _check_loss(loss, grad, reduction, want_grad, (n,), x)
    check_launches(100)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_bce_passes_the_error_record(fake_device, reduction):
    """binary_cross_entropy hands its kernel the error record and queues the copy-back after
    the launch; the logits variant checks nothing."""
    bl = fake_device.binary_losses
    x = fa(np.full(10, 0.5, np.float32))
    names = [n for n, _ in K.PARAMS["bce"]]
    for fn, checked in ((bl.binary_cross_entropy, True),
                        (bl.binary_cross_entropy_with_logits, False)):
        LAUNCHES.clear()
        extra = () if checked else (None,)
        fn(x, x, None, *extra, reduction=reduction, want_grad=True,
           grad_output=fa(np.ones(10, np.float32)) if reduction == "none" else 1.0)
        (launch,) = [x for x in LAUNCHES if x[0] == "binary.cu"]
        err = launch[5][names.index("err")]
        assert isinstance(err, FakeArray) == checked and (checked or err == 0)
        assert (LAUNCHES[-1] == ("poll",)) == checked
        check_launches(1)


def test_bce_probability_check_in_ptx():
    """The BCE kernel records bad inputs through an out-of-line call (the loop keeps its
    registers) and the logits kernel never records."""
    ptx, lowered = compiled("binary.cu", "float", debug=False)

    def body(kernel):
        name = lowered[K.elementwise(kernel, "float", 4)]
        b = ptx[ptx.index(".entry " + name):]
        return b[:b.index("\n}\n")]

    assert re.search(r"call(\.uni)?\s.*record_bad_probability", body("bce_fwd"), re.S)
    assert "record_bad_probability" not in body("bce_logits_fwd")
    assert "atom.global.cas.b64" in ptx


def _fake_xp():
    """NumPy standing in for CuPy in the linear cross-entropy driver: arrays it makes are
    FakeArrays (launch arguments), arithmetic runs on the host (the kernels do not run)."""
    def wrap(fn):
        def f(*a, **k):
            r = fn(*a, **k)
            return r.view(FakeArray) if isinstance(r, np.ndarray) else r
        return f

    names = ("empty", "zeros", "ones", "where", "log", "asarray", "full")
    return types.SimpleNamespace(float64=np.float64, float32=np.float32,
                                 cuda=FAKE_CUPY.cuda, **{n: wrap(getattr(np, n)) for n in names})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # host algebra on statistics never filled
def test_linear_ce_launches(fake_device, monkeypatch, dtype, probs, reduction):
    """Every linear cross-entropy launch matches its kernel's parameter table; the class-index
    record goes to lce_stats with the row offset and the copy-back is queued; the ``mean``
    denominator and the summed class weights are never read back (0-d arrays)."""
    from nblosses.backends import _linear_ce as G
    from nblosses.backends.cuda import linear_ce

    xp = _fake_xp()
    monkeypatch.setattr(linear_ce, "cupy", xp)
    monkeypatch.setattr(linear_ce._CudaLinearCE, "xp", xp)
    monkeypatch.setattr(linear_ce._CudaLinearCE, "gemm",
                        lambda self, a, b, c, beta: c.__setitem__(..., a @ b + beta * c))
    reads = []
    monkeypatch.setattr(G, "mean_of", lambda xp_, total, denom: reads.append(denom) or total)
    rng = np.random.default_rng(3)
    n, d, v = 40, 8, 50
    x = fa(rng.standard_normal((n, d)).astype(dtype))
    w2 = fa(rng.standard_normal((v, d)).astype(dtype))
    bias, weight = fa(rng.random(v).astype(dtype)), fa(rng.random(v).astype(dtype))
    target = fa(rng.random((n, v)).astype(dtype)) if probs else fa(rng.integers(0, v, n))
    g = fa(np.ones(n, dtype)) if reduction == "none" else 1.0
    loss, lse, grads = linear_ce.linear_cross_entropy(
        x, w2, bias, target, weight, ignore_index=-100, label_smoothing=0.1,
        reduction=reduction, z_loss=1e-4, softcap=30.0, want_grad=True, grad_output=g,
        want_lse=True, chunk_rows=16, chunk_classes=20)
    assert [a.shape for a in grads] == [(n, d), (v, d), (v,)]
    assert lse.shape == (n,) and loss.shape == ((n,) if reduction == "none" else ())
    check_launches(3 * 3 * 3)
    stats = [a for src, _, nm, _, _, a in (x for x in LAUNCHES if x[0] == "linear_ce.cu")
             if nm.startswith("lce_stats")]
    names = [nm for nm, _ in K.PARAMS["lce_stats"]]
    row0 = sorted({int(a[names.index("row0")]) for a in stats})
    assert row0 == [0, 16, 32]
    if probs:  # the probability block is a strided view: its row stride is ldy
        for a in stats:
            y = a[names.index("y")]
            assert int(a[names.index("ldy")]) * y.itemsize == y.strides[0]
    errs = [a[names.index("err")] for a in stats]
    assert all(isinstance(e, FakeArray) != probs for e in errs)
    assert (LAUNCHES[-1] == ("poll",)) != probs
    if reduction == "mean":
        assert len(reads) == 1 and (probs or isinstance(reads[0], np.ndarray))


def _copy_unaligned(a):
    u = _unaligned(a.shape, a.dtype)
    u[...] = a
    return u


# ----------------------------------------------------------------------------- on a device
def _has_device() -> bool:
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


needs_device = pytest.mark.skipif(not _has_device(), reason="no CUDA device")
TOL = {np.float16: (3e-3, 3e-3), np.float32: (2e-5, 2e-6), np.float64: (1e-11, 1e-13)}


def _close(got, want, dtype, what):
    rtol, atol = TOL[dtype]
    got = cupy.asnumpy(got).astype(np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, np.abs(want).max(
        initial=0.0)), equal_nan=True, err_msg=what)


PATH_SHAPES = [(6, 1), (9, 3), (64, 16), (16, 100), (8, 1000), (4, 1001), (3, 4097), (2, 32000),
               (2, 40000), (1, 70001), (3, 5, 7)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PATH_SHAPES)
@pytest.mark.cuda
@needs_device
def test_device_softmax_paths(shape, dtype):
    from nblosses import functional as F

    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    x.reshape(-1)[0] = -np.inf
    gx = rng.standard_normal(shape).astype(dtype)
    for op in ("softmax", "log_softmax"):
        y_cpu = getattr(F, op)(x, dim=1, backend="cpu")
        y_gpu = getattr(F, op)(cupy.asarray(x), dim=1, backend="cuda")
        _close(y_gpu, y_cpu, dtype, f"{op} {shape}")
        b = op + "_backward"
        _close(getattr(F, b)(cupy.asarray(gx), y_gpu, dim=1, backend="cuda"),
               getattr(F, b)(gx, y_cpu, dim=1, backend="cpu"), dtype, f"{b} {shape}")
    special = np.array([[np.nan, 1.0, 2.0], [np.inf, 0.0, 1.0], [-np.inf] * 3,
                        [-np.inf, 1.0, 2.0]], dtype)
    for op in ("softmax", "log_softmax"):
        _close(getattr(F, op)(cupy.asarray(special), dim=1, backend="cuda"),
               getattr(F, op)(special, dim=1, backend="cpu"), dtype, f"{op} special")
    xs = x[..., 1:]
    _close(F.sigmoid(cupy.asarray(xs), backend="cuda"), F.sigmoid(xs, backend="cpu"), dtype,
           "sigmoid")



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 10), (16, 1000), (4, 1001), (4, 16000), (2, 32000),
                                   (2, 70001), (3, 6, 5)])  # 16000, 32000: packed fp16 rows
@pytest.mark.cuda
@needs_device
def test_device_class_loss_paths(shape, dtype):
    from nblosses import functional as F

    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)
    C = shape[1]
    tshape = (shape[0],) + shape[2:]
    t = rng.integers(0, C, tshape)
    t.reshape(-1)[0] = -100
    w = (rng.random(C) + 0.5).astype(dtype)
    p = rng.random(shape).astype(dtype)
    p /= p.sum(axis=1, keepdims=True)
    for reduction in ("mean", "sum", "none"):
        for weight in (None, w):
            for eps in (0.0, 0.1):
                args = dict(reduction=reduction, label_smoothing=eps, return_grad=True)
                for target in (t, p):
                    want = F.cross_entropy(x, target, weight, backend="cpu", **args)
                    got = F.cross_entropy(cupy.asarray(x), cupy.asarray(target),
                                          None if weight is None else cupy.asarray(weight),
                                          backend="cuda", **args)
                    what = f"ce {shape} {reduction} w={weight is not None} eps={eps}"
                    if reduction != "none":
                        assert isinstance(got[0], cupy.ndarray) and got[0].shape == ()
                    _close(got[0], want[0], dtype, what + " loss")
                    _close(got[1], want[1], dtype, what + " grad")
                    if target is t:  # ignored positions: gradient exactly 0
                        assert not cupy.asnumpy(got[1]).reshape(shape[0], C, -1)[0, :, 0].any()
            logp = F.log_softmax(x, dim=1, backend="cpu")
            want = F.nll_loss(logp, t, weight, reduction=reduction, return_grad=True,
                              backend="cpu")
            got = F.nll_loss(cupy.asarray(logp), cupy.asarray(t),
                             None if weight is None else cupy.asarray(weight),
                             reduction=reduction, return_grad=True, backend="cuda")
            _close(got[0], want[0], dtype, f"nll {shape} {reduction} loss")
            _close(got[1], want[1], dtype, f"nll {shape} {reduction} grad")
    # in place: the gradient overwrites the logits
    xg = cupy.asarray(x)
    loss, g = F.cross_entropy(xg, cupy.asarray(t), return_grad=True, grad_buffer=xg,
                              backend="cuda")
    want = F.cross_entropy(x, t, return_grad=True, backend="cpu")
    assert g is xg
    _close(loss, want[0], dtype, "in-place loss")
    _close(xg, want[1], dtype, "in-place grad")
    # deterministic reductions
    a = F.cross_entropy(cupy.asarray(x), cupy.asarray(t), backend="cuda")
    b = F.cross_entropy(cupy.asarray(x), cupy.asarray(t), backend="cuda")
    assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.cuda
@needs_device
def test_device_binary_loss_paths(dtype):
    from nblosses import functional as F

    rng = np.random.default_rng(4)
    for shape in [(7,), (64, 33), (1000, 17)]:
        x = rng.random(shape).astype(dtype)
        x.reshape(-1)[0] = 0.0
        y = rng.random(shape).astype(dtype)
        w = rng.random(shape[-1:]).astype(dtype)
        for reduction in ("mean", "sum", "none"):
            for weight in (None, w):
                kw = dict(reduction=reduction, return_grad=True)
                cw = None if weight is None else cupy.asarray(weight)
                want = F.binary_cross_entropy(x, y, weight, backend="cpu", **kw)
                got = F.binary_cross_entropy(cupy.asarray(x), cupy.asarray(y), cw,
                                             backend="cuda", **kw)
                _close(got[0], want[0], dtype, f"bce {shape} {reduction} loss")
                _close(got[1], want[1], dtype, f"bce {shape} {reduction} grad")
                z = (x - 0.5) * 20
                want = F.binary_cross_entropy_with_logits(z, y, weight, pos_weight=w,
                                                          backend="cpu", **kw)
                got = F.binary_cross_entropy_with_logits(cupy.asarray(z), cupy.asarray(y), cw,
                                                         pos_weight=cupy.asarray(w),
                                                         backend="cuda", **kw)
                _close(got[0], want[0], dtype, f"bcel {shape} {reduction} loss")
                _close(got[1], want[1], dtype, f"bcel {shape} {reduction} grad")



@pytest.mark.parametrize("dtype,bad,shown", [(np.float32, 1.5, "1.5"), (np.float32, -0.25,
                                                                          "-0.25"),
                                              (np.float64, np.nan, "nan"),
                                              (np.float16, 2.0, "2.0")])
@pytest.mark.cuda
@needs_device
def test_device_bce_bad_probability_is_deferred(dtype, bad, shown):
    """An input outside [0, 1]: NaN loss and gradient at its position, ValueError naming the
    value and position at the next poll (once), nothing read on the host by the call."""
    from nblosses.backends.cuda import _device_errors, binary_losses

    _device_errors.synchronize()
    n = 5000
    xh = np.random.default_rng(9).random(n).astype(dtype)
    xh[4321] = bad
    x = cupy.asarray(xh)
    y = cupy.asarray(np.full(n, 0.5, dtype))
    loss, g = binary_losses.binary_cross_entropy(x, y, None, reduction="none", want_grad=True,
                                                 grad_output=cupy.ones(n, dtype))
    cupy.cuda.get_current_stream().synchronize()
    assert bool(cupy.isnan(loss[4321])) and int(cupy.isnan(loss).sum()) == 1
    assert bool(cupy.isnan(g[4321])) and int(cupy.isnan(g).sum()) == 1
    msg = rf"between 0 and 1 \(found {shown} at position 4321\)"
    with pytest.raises(ValueError, match=msg):
        _device_errors.poll_errors()
    _device_errors.poll_errors()  # once only
    loss, _ = binary_losses.binary_cross_entropy(x, y, None, reduction="mean", want_grad=False,
                                                 grad_output=None)
    with pytest.raises(ValueError, match=msg):
        _device_errors.synchronize()
    assert bool(cupy.isnan(loss))


@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("chunks", [(None, None), (16, 20)])
@pytest.mark.cuda
@needs_device
def test_device_linear_ce_matches_cpu(probs, chunks):
    """linear_cross_entropy's CUDA kernel against the CPU kernel (float64, every option), in one
    block and in row x vocabulary chunks; then a bad class index: NaN row, IndexError later."""
    from nblosses.backends.cpu import linear_ce as cpu
    from nblosses.backends.cuda import _device_errors
    from nblosses.backends.cuda import linear_ce as cu

    _device_errors.synchronize()
    rng = np.random.default_rng(11)
    n, d, v = 40, 8, 50
    x, w2 = rng.standard_normal((n, d)), rng.standard_normal((v, d))
    bias, weight = rng.random(v), rng.random(v) + 0.5
    target = rng.random((n, v)) if probs else rng.integers(0, v, n)
    if not probs:
        target[3] = -100
    kw = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, want_grad=True,
              want_lse=True, chunk_rows=chunks[0], chunk_classes=chunks[1])
    for reduction in ("mean", "none"):
        g = np.ones(n) if reduction == "none" else 0.5
        want = cpu.linear_cross_entropy(x, w2, bias, target, weight, reduction=reduction,
                                        grad_output=g, **kw)
        dev = [cupy.asarray(a) for a in (x, w2, bias, target, weight)]
        got = cu.linear_cross_entropy(*dev, reduction=reduction, grad_output=(
            cupy.asarray(g) if reduction == "none" else g), **kw)
        for gi, wi, what in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2]),
                                ("loss", "lse", "gx", "gw", "gb")):
            _close(gi, wi, np.float64, f"linear ce {reduction} {what}")
    if probs:
        return
    bad = cupy.asarray(target)
    bad[5] = v + 2
    loss, _, _ = cu.linear_cross_entropy(*dev[:3], bad, dev[4], reduction="none",
                                         grad_output=cupy.ones(n), **kw)
    assert bool(cupy.isnan(loss[5])) and int(cupy.isnan(loss).sum()) == 1
    with pytest.raises(IndexError, match=rf"Target {v + 2} is out of bounds"):
        _device_errors.synchronize()


def _ce_kernel(x, t, weight=None, **kw):
    from nblosses.backends.cuda import class_losses

    args = dict(ignore_index=-100, label_smoothing=0.0, reduction="mean", want_grad=True,
                grad_output=1.0, grad_buffer=None)
    args.update(kw)
    return class_losses.cross_entropy(x, t, weight, **args)


@pytest.mark.cuda
@needs_device
def test_device_cross_entropy_graph_capture_and_replay():
    """cross_entropy with a gradient buffer is captured by CuPy's stream capture and replayed:
    no host synchronisation, no device-to-host copy inside the call."""
    from nblosses.backends.cuda import _device_errors

    rng = np.random.default_rng(7)
    n, C = 64, 1000
    xs = [rng.standard_normal((n, C, 1)).astype(np.float32) for _ in range(3)]
    t_host = rng.integers(0, C, (n, 1))
    t_host[0] = -100
    x = cupy.asarray(xs[0])
    t = cupy.asarray(t_host)
    gbuf = cupy.empty_like(x)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        _ce_kernel(x, t, grad_buffer=gbuf)  # compile, scratch and error record before capture
        stream.synchronize()
        stream.begin_capture()
        _device_errors.poll_errors()  # the front end's per-call poll: a no-op under capture
        loss, g = _ce_kernel(x, t, grad_buffer=gbuf)
        graph = stream.end_capture()
    assert g is gbuf
    for xh in xs[1:]:
        x.set(xh)
        graph.launch(stream=stream)
        stream.synchronize()
        want = nblosses.functional.cross_entropy(xh[..., 0], t_host[:, 0], return_grad=True,
                                                 backend="cpu")
        _close(loss, want[0], np.float32, "graph loss")
        _close(gbuf[..., 0], want[1], np.float32, "graph grad")
    _device_errors.synchronize()


@pytest.mark.parametrize("shape", [(8, 10, 1), (4, 40000, 1), (3, 7, 5)])
@pytest.mark.cuda
@needs_device
def test_device_bad_target_is_deferred(shape):
    """A class index outside [0, C): NaN loss and gradient at its position, IndexError at the
    next poll once the device is done (and at synchronize), raised once."""
    from nblosses.backends.cuda import _device_errors, class_losses

    _device_errors.synchronize()
    n, C, inner = shape
    rng = np.random.default_rng(8)
    x = cupy.asarray(rng.standard_normal(shape).astype(np.float32))
    t_host = rng.integers(0, C, (n, inner))
    t_host[1, 0] = C + 5
    t = cupy.asarray(t_host)
    loss, g = _ce_kernel(x, t, reduction="none")
    cupy.cuda.get_current_stream().synchronize()
    assert bool(cupy.isnan(loss[1, 0])) and int(cupy.isnan(loss).sum()) == 1
    assert bool(cupy.isnan(g[1, :, 0]).all()) and int(cupy.isnan(g).sum()) == C
    with pytest.raises(IndexError, match=rf"Target {C + 5} is out of bounds"):
        _device_errors.poll_errors()
    _device_errors.poll_errors()  # once only
    loss, _ = class_losses.nll_loss(x, t, None, ignore_index=-100, reduction="mean",
                                    want_grad=True, grad_output=1.0, grad_buffer=None)
    with pytest.raises(IndexError, match=rf"Target {C + 5} is out of bounds"):
        _device_errors.synchronize()
    assert bool(cupy.isnan(loss))
    _device_errors.synchronize()


def _torch_reference(x, t, weight, eps, reduction, z, cap, probs):
    torch = pytest.importorskip("torch")
    from helpers import ce_options_composite

    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    tt = torch.tensor(t) if not probs else torch.tensor(t, dtype=torch.float64)
    loss, lse = ce_options_composite(xt, tt, w, label_smoothing=eps, reduction=reduction,
                                     z_loss=z, softcap=cap)
    loss.backward(torch.ones_like(loss))
    return loss.detach().numpy(), xt.grad.numpy(), lse.detach().numpy()


@pytest.mark.parametrize("shape", [(16, 10, 1), (8, 1000, 1), (4, 40000, 1), (3, 6, 5)])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.cuda
@needs_device
def test_device_cross_entropy_options(shape, probs):
    """z_loss, softcap and lse_out against torch composites in float64 (the contract's
    reference), for every kernel path, reduction, weights and label smoothing."""
    from nblosses.backends.cuda import class_losses

    rng = np.random.default_rng(9)
    n, C, inner = shape
    x = (rng.standard_normal(shape) * 4).astype(np.float64)
    if probs:
        t = rng.random(shape)
        t /= t.sum(axis=1, keepdims=True)
    else:
        t = rng.integers(0, C, (n, inner))
        t[0, 0] = -100
    w = rng.random(C) + 0.5
    for reduction in ("mean", "sum", "none"):
        for weight in (None, w):
            for eps, z, cap in ((0.0, 1e-3, 0.0), (0.1, 0.0, 5.0), (0.1, 2e-3, 3.0)):
                lse = cupy.empty((n, inner), np.float64)
                kw = dict(label_smoothing=eps, reduction=reduction, want_grad=True,
                          grad_output=(cupy.ones((n, inner)) if reduction == "none" else 1.0),
                          grad_buffer=None, z_loss=z, softcap=cap, lse_out=lse)
                cw = None if weight is None else cupy.asarray(weight)
                if probs:
                    loss, g = class_losses.cross_entropy_probs(cupy.asarray(x), cupy.asarray(t),
                                                               cw, **kw)
                else:
                    loss, g = class_losses.cross_entropy(cupy.asarray(x), cupy.asarray(t), cw,
                                                         ignore_index=-100, **kw)
                want = _torch_reference(x, t, weight, eps, reduction, z, cap, probs)
                what = f"{shape} probs={probs} {reduction} w={weight is not None} {eps, z, cap}"
                _close(loss, want[0], np.float64, what + " loss")
                _close(g, want[1], np.float64, what + " grad")
                _close(lse, want[2], np.float64, what + " lse")

#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU where torch, cupy and numba are preinstalled and
# nothing can be downloaded:
#   1. install nblosses in place (pip -e, no dependencies, no build isolation; else PYTHONPATH),
#   2. compile every CUDA kernel into CuPy's on-disk cache, in parallel processes
#      (python -m nblosses.backends.cuda._warm: a module, so the spawned workers can start),
#   3. the `cuda`-marked tests (the cuda parametrisation of every parity test, tests/conftest.py,
#      plus the device tests of tests/kernels/test_*cuda*.py; `-m cuda` overrides the fast tier's
#      `-m 'not slow'`, so slow cuda tests run too): with pytest-xdist when installed,
#      else the collected test ids dealt round robin to JOBS pytest processes (one file holds
#      40% of them: per-file processes would not fit),
#   4. benchmark nblosses cuda against torch cuda (scripts/gpu_bench.py --quick: one shape per
#      benchmark case of the op specs, float32 and bfloat16; the full grid needs more than the
#      budget: run scripts/gpu_bench.py alone).
# Budget: about 8 minutes on an H200 with 16 cores (BUDGET seconds, default 470); the non-cuda
# half (CPU only, covered by CI) runs only with FULL=1.
# Usage: bash scripts/gpu_check.sh   (PYTHON=... JOBS=... FULL=1 to override)
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET=${BUDGET:-470}
NCPU=$(nproc 2>/dev/null || echo 8)
JOBS=${JOBS:-$(( NCPU < 8 ? NCPU : 8 ))}
status=0
step() { printf '\n=== %s (%s, %ss elapsed)\n' "$1" "$(date +%T)" "$SECONDS"; }
record() { local s=$1 what=$2; [ "$s" = 124 ] && echo "$what: timed out"; [ "$s" != 0 ] && [ "$status" = 0 ] && status=$s; return 0; }
left() { echo $(( BUDGET - SECONDS > 10 ? BUDGET - SECONDS : 10 )); }

step "device and packages"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "
import cupy, numba, numpy, torch
print('cupy', cupy.__version__, '| numba', numba.__version__, '| numpy', numpy.__version__,
      '| torch', torch.__version__, 'cuda', torch.version.cuda)
print('device:', cupy.cuda.runtime.getDeviceProperties(0)['name'],
      '| torch sees cuda:', torch.cuda.is_available())
" || exit 1

step "install nblosses (editable, no deps, no build isolation)"
if ! "$PY" -m pip install --no-deps --no-build-isolation -q -e . ; then
    echo "pip install failed: using PYTHONPATH"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import nblosses; print('nblosses', nblosses.__version__, 'from', nblosses.__file__); \
print('available backends:', nblosses.available_backends())" || exit 1

step "compile the CUDA kernels into CuPy's cache ($NCPU processes)"
timeout 150 "$PY" -m nblosses.backends.cuda._warm --jobs "$NCPU" \
    || echo "warm-up failed or timed out: kernels compile on first use instead"

step "test suite, cuda half (-m cuda)"
T=$(( $(left) - 120 )); [ "$T" -lt 60 ] && T=60   # keep ~2 minutes for the benchmark
if "$PY" -c "import xdist" 2>/dev/null; then
    timeout "$T" "$PY" -m pytest -q -ra -p no:cacheprovider -m cuda -n "$JOBS" tests
    record $? "cuda tests"
else
    echo "pytest-xdist not installed: the cuda test ids dealt round robin to $JOBS pytest processes"
    logs=$(mktemp -d)
    "$PY" -m pytest --collect-only -q -p no:cacheprovider -m cuda tests 2>/dev/null \
        | grep '::' > "$logs/ids"
    echo "$(wc -l < "$logs/ids") cuda tests"
    split -n "r/$JOBS" "$logs/ids" "$logs/shard."
    for f in "$logs"/shard.*; do
        ( xargs -a "$f" -d '\n' timeout "$T" "$PY" -m pytest -q -ra -p no:cacheprovider -m cuda \
              > "$f.log" 2>&1; echo $? > "$f.rc" ) &
    done
    wait
    for rc in "$logs"/shard.*.rc; do
        f=${rc%.rc}; s=$(cat "$rc")
        printf '%-10s %s\n' "$(basename "$f")" "$(tail -n 1 "$f.log")"
        # xargs exits 123 when pytest failed or timed out
        if [ "$s" != 0 ]; then grep -E '^(FAILED|ERROR)' "$f.log" | head -n 20; record "$s" "$(basename "$f")"; fi
    done
fi

step "benchmark against torch"
timeout "$(left)" "$PY" scripts/gpu_bench.py --quick --iters 10
record $? "benchmark"

if [ "${FULL:-0}" = 1 ]; then
    step "test suite, the rest (-m 'not cuda')"
    "$PY" -m pytest -q -ra -p no:cacheprovider -m "not cuda" tests
    record $? "non-cuda tests"
else
    echo "non-cuda half skipped (CPU only; CI runs it): FULL=1 runs it"
fi

step "done (exit $status)"
exit "$status"

#!/usr/bin/env bash
# Everything a GPU machine should run, in one call, from the repository root:
#
#   OUT=/path/to/results bash benchmarks/gpu_session.sh
#
# 1. install  pip install --no-deps --no-build-isolation -e .   (PyTorch, Triton, pytest come
#             with the machine; nothing else is installed)
# 2. tests    the whole suite, CUDA tensors included             -> $OUT/tests.log, $OUT/junit.xml
# 3. bench    python -m benchmarks.run --out $OUT                 -> $OUT/bench.log and the runner's
#             <gpu>-<date>.json / .md / .png
# plus $OUT/env.txt (GPU, driver, versions). That is 7 files, all directly under $OUT.
#
# Every step runs under `timeout` and the script goes on after a failing step; it exits non-zero
# if any step failed. The defaults fit a 10-minute call; override them by environment:
#   STEPS="install tests bench"   which steps to run, in that order
#   INSTALL_TIMEOUT=90 TESTS_TIMEOUT=210 BENCH_TIMEOUT=270   seconds per step
#   BENCH_BUDGET=<BENCH_TIMEOUT - 50>   the runner starts no new case after this (headline cases
#                                       of every op run first, so a short budget covers all ops)
#   BENCH_ARGS="--quick"                extra arguments for the runner (e.g. --ops attention)
#   PYTEST_WORKERS=8                    parallel test workers when pytest-xdist is installed
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
STEPS="${STEPS:-install tests bench}"
INSTALL_TIMEOUT="${INSTALL_TIMEOUT:-90}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-210}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-270}"
BENCH_BUDGET="${BENCH_BUDGET:-$((BENCH_TIMEOUT > 100 ? BENCH_TIMEOUT - 50 : BENCH_TIMEOUT / 2))}"
BENCH_ARGS="${BENCH_ARGS:-}"
PYTEST_WORKERS="${PYTEST_WORKERS:-8}"
PYTHON="${PYTHON:-python}"

declare -A STATUS=()
failed=0

step() {  # step NAME SECONDS LOGFILE COMMAND...: run under timeout, log, remember the status
    local name="$1" seconds="$2" log="$3"
    shift 3
    echo "== $name (at most ${seconds}s): $*"
    local start=$SECONDS
    timeout -k 15 "$seconds" "$@" >"$log" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        STATUS[$name]="ok (${took}s)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        STATUS[$name]="timed out after ${seconds}s"
        failed=1
    else
        STATUS[$name]="failed, exit $rc (${took}s)"
        failed=1
    fi
    echo "   $name: ${STATUS[$name]}; last lines of $log:"
    tail -n 15 "$log" | sed 's/^/   | /'
}

{
    echo "date: $(date -Is)"
    nvidia-smi 2>&1 || echo "nvidia-smi: not found"
    "$PYTHON" - <<'EOF' 2>&1
import importlib, platform
import torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("triton", "pytest", "pytest_benchmark", "xdist", "transformers", "flash_attn",
             "liger_kernel", "apex", "matplotlib"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "installed"))
    except Exception as err:
        print(name, "not importable:", type(err).__name__)
EOF
    echo "nproc $(nproc)"
} >"$OUT/env.txt" 2>&1

for name in $STEPS; do
    case "$name" in
        install)
            step install "$INSTALL_TIMEOUT" "$OUT/install.log" \
                "$PYTHON" -m pip install --no-deps --no-build-isolation -e . ;;
        tests)
            workers=()
            if "$PYTHON" -c "import xdist" >/dev/null 2>&1; then
                workers=(-n "$PYTEST_WORKERS")
            fi
            step tests "$TESTS_TIMEOUT" "$OUT/tests.log" \
                "$PYTHON" -m pytest -q "${workers[@]}" --junitxml="$OUT/junit.xml" -p no:cacheprovider ;;
        bench)
            # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
            step bench "$BENCH_TIMEOUT" "$OUT/bench.log" \
                "$PYTHON" -u -m benchmarks.run --out "$OUT" --budget "$BENCH_BUDGET" $BENCH_ARGS ;;
        *)
            echo "unknown step $name (known: install tests bench)"
            failed=1 ;;
    esac
done

echo "== summary"
for name in $STEPS; do
    echo "   $name: ${STATUS[$name]:-not run}"
done
grep -E "^[0-9]+ (passed|failed)|passed|failed" "$OUT/tests.log" 2>/dev/null | tail -n 1 | sed 's/^/   tests: /'
ls -l "$OUT"
exit "$failed"

#!/usr/bin/env bash
# Everything a GPU machine should run, from the repository root, on a 16-core H100/H200
# (benchmarks/README.md gives the exact calls): in one call of at most 9.5 minutes, which with one
# machine start fits a lent GPU's 15 minutes of device time, or in two calls of at most 6 minutes,
# which fit only if the machine stays warm between them (it goes back after 30 s idle):
#
#   OUT=/path/to/results CALL=all bash benchmarks/gpu_session.sh  # every step, shorter timeouts
#   OUT=/path/to/results CALL=1 bash benchmarks/gpu_session.sh    # install, precompile, tests
#   OUT=/path/to/results CALL=2 bash benchmarks/gpu_session.sh    # install, config sweep, benchmarks
#
# 1. install     pip install --no-deps --no-build-isolation -e .  (PyTorch, Triton, pytest come with
#                the machine; nothing else is installed), then fastdl.kernels imported to prove it
# 2. precompile  python -m benchmarks.compile_report: every kernel's covering set of launches for
#                sm_90a, compiled by a process pool into the Triton cache    -> $OUT/compile-sm_90a.json
# 3. tests       the CUDA tests only (-m cuda), configs pinned (FASTDL_AUTOTUNE=first), one worker per
#                core, all compiling into the one cache; a file that fails to import is reported and the
#                others run (--continue-on-collection-errors); a test that hangs fails after 120 s
#                (pytest-timeout), and at the step's timeout pytest is interrupted (SIGINT), so it
#                still writes junit.xml and names the failures
# 4. sweep       the attention CUDA tests once per other config index (FASTDL_AUTOTUNE=1..3)
# 5. bench       python -m benchmarks.run, kernels forward and forward+backward -> the runner's
#                <gpu>-<date>.json/.md/.png in $OUT
# 6. models      the BERT and ViT training steps after them                  -> $OUT/models/
# A lent machine returns at most 8 files of 16 MiB (64 MiB together), so the logs (one per step,
# env.txt with GPU, driver and versions, junit.xml) come back as one archive, $OUT/logs.tgz, and
# Triton's cache as $OUT/triton-cache.tgz.0, .1, ... (see below).
#
# Triton's cache is $TRITON_CACHE_DIR (default /tmp/fastdl-triton-cache, kept while the machine
# stays warm). Its kernel binaries and metadata -- all a later compile needs to hit -- come back
# oldest first (the precompiled launches before the tests' own) in at most CACHE_PARTS parts of
# 15 MiB; CACHE_IN=<folder with those parts> restores them into the same TRITON_CACHE_DIR (Triton's
# cache records absolute paths), so a second call on a fresh machine does not compile them again.
# It holds no PTX, which compile_report reads for every kernel, so call 2 does not precompile.
# Every step runs under `timeout` and the script goes on after a failing step; it exits non-zero
# if any step failed. With CALL=all no step runs past TOTAL seconds (570) less the 40 s that packing
# the logs and the cache takes: a step is cut short, or skipped, to fit. Override by environment:
#   STEPS="install tests"   which steps to run, in that order (default: those of CALL, else all)
#   INSTALL_TIMEOUT=30 PRECOMPILE_TIMEOUT=90 TESTS_TIMEOUT=240 SWEEP_TIMEOUT=90
#   BENCH_TIMEOUT=180 MODELS_TIMEOUT=60   seconds per step (call 1: 360 s, call 2: 360 s at most;
#                                       CALL=all: 30, 60, 195, 55, 145, 45, 530 s at most)
#   TOTAL=570                           CALL=all: seconds the whole script may take (else none)
#   PRECOMPILE_ARGS="--cover"           compile_report arguments (drop --cover for every launch)
#   BENCH_BUDGET=<bench's timeout - 40> the runner starts no new case after this
#   BENCH_ARGS=""                       extra arguments for the runner (CALL=all: "--quick")
#   MODELS_ARGS=""                      extra arguments for the models' run (CALL=all: "--quick
#                                       --no-compile": compiling BERT-base alone outlasts the step)
#   PYTEST_WORKERS=16                   parallel test workers (each compiles into the shared cache)
#   CACHE_OUT=1 CACHE_PARTS=3           pack Triton's cache into $OUT (call 2: CACHE_OUT=0), parts
#                                       (CALL=all: 1, so that all its files are at most 8)
#   WHEELS=.whl                         pure-Python peers to put on the path (see below)
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
case "${CALL:-}" in
    1) DEFAULT_STEPS="install precompile tests" ;;
    2) DEFAULT_STEPS="install sweep bench models" ;;
    *) DEFAULT_STEPS="install precompile tests sweep bench models" ;;
esac
STEPS="${STEPS:-$DEFAULT_STEPS}"
if [ "${CALL:-}" = all ]; then  # one call: every step, in 530 s
    set -- 30 60 195 55 145 45
    TOTAL="${TOTAL:-570}"
    CACHE_PARTS="${CACHE_PARTS:-1}"
    BENCH_ARGS="${BENCH_ARGS---quick}"
    MODELS_ARGS="${MODELS_ARGS---quick --no-compile}"
else
    set -- 30 90 240 90 180 60
fi
# Steps end by DEADLINE, RESERVE seconds before TOTAL, which the logs' and cache's archives take.
RESERVE=40
DEADLINE=$((SECONDS + ${TOTAL:-1000000} - RESERVE))
INSTALL_TIMEOUT="${INSTALL_TIMEOUT:-$1}"
PRECOMPILE_TIMEOUT="${PRECOMPILE_TIMEOUT:-$2}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-$3}"
SWEEP_TIMEOUT="${SWEEP_TIMEOUT:-$4}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-$5}"
MODELS_TIMEOUT="${MODELS_TIMEOUT:-$6}"
PRECOMPILE_ARGS="${PRECOMPILE_ARGS:---cover}"
BENCH_ARGS="${BENCH_ARGS:-}"
MODELS_ARGS="${MODELS_ARGS:-}"
CACHE_OUT="${CACHE_OUT:-$([ "${CALL:-}" = 2 ] && echo 0 || echo 1)}"
CACHE_PARTS="${CACHE_PARTS:-3}"
PYTEST_WORKERS="${PYTEST_WORKERS:-$(nproc)}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"  # the machines' python3 holds PyTorch
LOGS="$OUT/logs"
mkdir -p "$LOGS"
# Triton's cache lives outside $OUT (thousands of small files) and travels as archive parts;
# CACHE_IN names the folder holding an earlier call's parts.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/fastdl-triton-cache}"
mkdir -p "$TRITON_CACHE_DIR"
if [ -n "${CACHE_IN:-}" ]; then
    if compgen -G "$CACHE_IN/triton-cache.tgz.*" >/dev/null; then
        # The last part may end inside a kernel's files: tar restores everything before the cut
        # and complains about the end, which is expected.
        cat "$CACHE_IN"/triton-cache.tgz.* | tar xzf - -C "$TRITON_CACHE_DIR" 2>/dev/null  # parts 0-9
        # tar leaves the file it was cut in half-written: drop any group file that is not whole
        # JSON, so that Triton sees a miss there rather than failing to read it.
        "$PYTHON" - "$TRITON_CACHE_DIR" <<'EOF'
import json, pathlib, sys
for group in pathlib.Path(sys.argv[1]).glob("*/__grp__*"):
    try:
        json.loads(group.read_text())["child_paths"]
    except (ValueError, KeyError, TypeError):
        group.unlink()
EOF
        echo "== Triton cache restored from $CACHE_IN: $(find "$TRITON_CACHE_DIR" -name '__grp__*' | wc -l) kernels"
    else
        echo "== CACHE_IN=$CACHE_IN holds no triton-cache.tgz.* parts; compiling from scratch"
    fi
fi

pack_cache() {  # Triton's cache into $OUT/triton-cache.tgz.N, binaries and metadata only
    rm -f "$OUT"/triton-cache.tgz.*
    # Oldest kernels first; within a kernel its group file last, so that a cut archive leaves a
    # kernel either whole or missing (a cache miss), never a group naming a binary that is not there.
    (cd "$TRITON_CACHE_DIR" && ls -tr | while read -r entry; do
        [ -d "$entry" ] || continue
        # (*.so: Triton 3.6's compiled launcher for the kernel's signature, else built again by gcc)
        find "$entry" -type f \( -name '*.cubin' -o -name '*.json' -o -name '*.txt' -o -name '*.so' \) \
            ! -name '__grp__*'
        find "$entry" -type f -name '__grp__*'
    done | tar czf - -T -) | head -c $((CACHE_PARTS * 15 * 1024 * 1024 + 1)) | split -b 15M -d -a 1 - "$OUT/triton-cache.tgz."
    # (head stops the compression once the parts are full; one byte more tells that it was cut)
    local part kept=0 cut=0
    for part in "$OUT"/triton-cache.tgz.*; do
        if [ "${part##*.}" -lt "$CACHE_PARTS" ]; then kept=$((kept + 1)); else rm -f "$part"; cut=1; fi
    done
    echo "   Triton cache: $kept part(s) of at most 15 MiB in \$OUT$([ "$cut" = 1 ] && echo ", cut there (CACHE_PARTS=$CACHE_PARTS): the newest kernels compile again")"
}
# Pure-Python peers the machine lacks (Liger-Kernel) travel as wheels in $WHEELS (default .whl,
# ignored by git; benchmarks/README.md gives the download): installed into a private folder on the
# Python path, never into the machine's environment.
WHEELS="${WHEELS:-$PWD/.whl}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE="${SITE:-/tmp/fastdl-site}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl >"$LOGS/wheels.log" 2>&1 \
        && rm -f "$LOGS/wheels.log" && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" \
        && echo "== wheels from $WHEELS on the path: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')" \
        || echo "== wheels from $WHEELS failed to install (see logs/wheels.log); peers missing"
fi
# Kernel ops first, forward and forward+backward; the model training steps after them.
KERNEL_OPS="attention layer_norm rms_norm dropout_add_layer_norm batch_norm dropout embedding bert_embeddings
    linear_cross_entropy"
MODEL_OPS="bert_train vit_train"

declare -A STATUS=()
failed=0

allowed() {  # allowed SECONDS: SECONDS, or less where the deadline comes first (0 when past it)
    local left=$((DEADLINE - SECONDS))
    echo $(( $1 < left ? $1 : (left > 0 ? left : 0) ))
}

step() {  # step NAME SECONDS LOGFILE COMMAND...: run under timeout, log, remember the status
    local name="$1" seconds="$2" log="$3"
    shift 3
    if [ "$seconds" -lt 5 ]; then
        STATUS[$name]="skipped: only ${seconds}s allowed (its timeout, or what is left before the deadline)"
        failed=1
        echo "== $name: ${STATUS[$name]}"
        return
    fi
    echo "== $name (at most ${seconds}s): $*"
    local start=$SECONDS
    # pytest on SIGINT still writes its summary and junit.xml; the runner writes its files on SIGTERM
    local signal=TERM
    [ "$name" = tests ] || [ "$name" = sweep ] && signal=INT
    timeout -s "$signal" -k 10 "$seconds" "$@" >"$log" 2>&1
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
for name in ("triton", "pytest", "pytest_benchmark", "xdist", "pytest_timeout", "expecttest", "transformers",
             "flash_attn", "liger_kernel", "apex", "matplotlib"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "installed"))
    except Exception as err:
        print(name, "not importable:", type(err).__name__)
EOF
    echo "nproc $(nproc)"
} >"$LOGS/env.txt" 2>&1

pytest_args=()  # for the tests and the sweep
if "$PYTHON" -c "import xdist" >/dev/null 2>&1; then
    pytest_args=(-n "$PYTEST_WORKERS")
fi
if "$PYTHON" -c "import pytest_timeout" >/dev/null 2>&1; then
    pytest_args+=(--timeout=120)  # a hung kernel fails its test instead of the step
fi

for name in $STEPS; do
    case "$name" in
        install)
            # no registry there: --no-index; the import proves fastdl.kernels (package-dir) resolves
            step install "$(allowed "$INSTALL_TIMEOUT")" "$LOGS/install.log" bash -c '
                "$0" -m pip install --no-index --disable-pip-version-check --no-deps --no-build-isolation -e . &&
                "$0" -c "import fastdl.kernels.utils"' "$PYTHON" ;;
        precompile)
            # shellcheck disable=SC2086  # PRECOMPILE_ARGS is a list of words
            step precompile "$(allowed "$PRECOMPILE_TIMEOUT")" "$LOGS/precompile.log" \
                "$PYTHON" -m benchmarks.compile_report --targets sm_90a --jobs "$(nproc)" --quiet \
                $PRECOMPILE_ARGS --out "$OUT/compile-sm_90a.json" ;;
        tests)
            step tests "$(allowed "$TESTS_TIMEOUT")" "$LOGS/tests.log" env FASTDL_AUTOTUNE=first \
                "$PYTHON" -m pytest -q -rfE -m cuda "${pytest_args[@]}" --continue-on-collection-errors \
                --junitxml="$LOGS/junit.xml" -p no:cacheprovider ;;
        sweep)
            step sweep "$(allowed "$SWEEP_TIMEOUT")" "$LOGS/sweep.log" bash -c '
                status=0
                for i in 1 2 3; do
                    echo "== FASTDL_AUTOTUNE=$i"
                    FASTDL_AUTOTUNE=$i "$0" -m pytest -q -rfE -m cuda "${@}" -p no:cacheprovider --continue-on-collection-errors \
                        tests/kernels/test_attention.py -k "forward_backward or head_dims or mask" || status=1
                done
                exit $status' "$PYTHON" "${pytest_args[@]}" ;;
        bench)
            seconds=$(allowed "$BENCH_TIMEOUT")
            budget="${BENCH_BUDGET:-$((seconds > 80 ? seconds - 40 : seconds / 2))}"
            # shellcheck disable=SC2086  # BENCH_ARGS and KERNEL_OPS are lists of words
            step bench "$seconds" "$LOGS/bench.log" \
                "$PYTHON" -u -m benchmarks.run --out "$OUT" --budget "$budget" --ops $KERNEL_OPS $BENCH_ARGS ;;
        models)
            seconds=$(allowed "$MODELS_TIMEOUT")
            # shellcheck disable=SC2086
            step models "$seconds" "$LOGS/models.log" \
                "$PYTHON" -u -m benchmarks.run --out "$OUT/models" --budget "$((seconds * 2 / 3))" \
                --ops $MODEL_OPS --no-plot $MODELS_ARGS ;;
        *)
            echo "unknown step $name (known: install precompile tests sweep bench models)"
            failed=1 ;;
    esac
done

echo "== summary"
for name in $STEPS; do
    echo "   $name: ${STATUS[$name]:-not run}"
done
grep -E "^[0-9]+ (passed|failed)|passed|failed" "$LOGS/tests.log" 2>/dev/null | tail -n 1 | sed 's/^/   tests: /'
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
[ "$CACHE_OUT" = 1 ] && pack_cache
ls -l "$OUT"
exit "$failed"

"""benchmarks/gpu_session.sh on a CPU, with a stand-in for Python that records what it is asked to
run: the two calls must return what a lent machine can bring back (at most 8 files, 16 MiB each),
carry Triton's cache from call 1 to a fresh machine's call 2, and put travelling wheels on the path.
"""

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"

# Python as the script calls it: `-` (the environment probe), `-c` (is xdist there), `-m pip`,
# `-m benchmarks.compile_report`, `-m pytest`, `-u -m benchmarks.run`. Each call is appended to
# $CALLS; the compile report and the tests leave a kernel in Triton's cache as Triton does (a folder
# with its binary, PTX, metadata and a group file listing them); the runner writes its results.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$* | PYTHONPATH=${PYTHONPATH:-}" >> "$CALLS"
[ "${1:-}" = -u ] && shift
kernel() {  # kernel NAME BYTES: one cache entry
    local dir="$TRITON_CACHE_DIR/$1"
    mkdir -p "$dir"
    head -c "$2" /dev/urandom > "$dir/k.cubin"
    echo ptx > "$dir/k.ptx"
    echo '{"name": "k"}' > "$dir/k.json"
    echo "{\"child_paths\": {\"k.cubin\": \"$dir/k.cubin\"}}" > "$dir/__grp__k.json"
    sleep 1  # distinct modification times: the archive keeps the oldest kernels first
}
case "${1:-} ${2:-}" in
    "- ") cat > /dev/null; echo "python 3.12 (stand-in)" ;;
    "- "*) exec python3 "$@" ;;  # the restored cache's check: real Python
    "-c "*) exit 0 ;;
    "-m pip")
        for arg in "$@"; do [ "$prev" = --target ] && mkdir -p "$arg"; prev="$arg"; done ;;
    "-m benchmarks.compile_report")
        for arg in "$@"; do [ "$prev" = --out ] && echo '{}' > "$arg"; prev="$arg"; done
        kernel precompiled "${KERNEL_BYTES:-1000}" ;;
    "-m pytest")
        sleep "${PYTEST_SLEEP:-0}"
        kernel "tested-$FASTDL_AUTOTUNE" "${KERNEL_BYTES:-1000}"; echo "3 passed in 1.0s" ;;
    "-m benchmarks.run")
        for arg in "$@"; do
            if [ "$prev" = --out ]; then
                mkdir -p "$arg" && echo '{}' > "$arg/gpu.json" && echo x > "$arg/gpu.md"
                [[ " $* " == *" --no-plot "* ]] || echo png > "$arg/gpu.png"
            fi
            prev="$arg"
        done ;;
    *) echo "unexpected call: $*" >&2; exit 3 ;;
esac
"""


@pytest.fixture
def session(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"

    def run(call: int | str, out: Path, cache: Path, rc: int = 0, **env) -> tuple[str, list[str]]:
        calls.write_text("")
        full = dict(os.environ, PYTHON=str(fake), CALLS=str(calls), OUT=str(out), CALL=str(call),
                    TRITON_CACHE_DIR=str(cache), PYTEST_WORKERS="2", WHEELS=str(tmp_path / "no-wheels"))
        full.update(env)
        done = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=120)
        assert done.returncode == rc, done.stdout + done.stderr
        return done.stdout, calls.read_text().splitlines()

    return run


def _returned(out: Path) -> list[str]:
    """The files a lent machine brings back from $OUT (no deeper than $OUT/a/b/file)."""
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert all(f.count("/") <= 2 for f in files), files
    assert len(files) <= 8 and all((out / f).stat().st_size <= 16 * 2**20 for f in files), files
    return files


def test_two_calls_return_what_a_lent_machine_can_and_carry_the_cache(session, tmp_path):
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    stdout, calls = session(1, out1, tmp_path / "cache1")
    assert "install: ok" in stdout and "precompile: ok" in stdout and "tests: ok" in stdout
    assert _returned(out1) == ["compile-sm_90a.json", "logs.tgz", "triton-cache.tgz.0"]
    with tarfile.open(out1 / "logs.tgz") as logs:
        names = set(logs.getnames())
    assert {"logs/env.txt", "logs/install.log", "logs/precompile.log", "logs/tests.log"} <= names
    assert any("-m pytest -q -rfE -m cuda -n 2" in c for c in calls)
    with tarfile.open(out1 / "triton-cache.tgz.0") as cache:
        members = [m for m in cache.getnames() if "." in Path(m).name]
    # binaries and metadata only, the older kernel first, each kernel's group file after its files
    assert [Path(m).name for m in members] == ["k.cubin", "k.json", "__grp__k.json"] * 2 or \
        [Path(m).name for m in members] == ["k.json", "k.cubin", "__grp__k.json"] * 2, members
    assert [Path(m).parent.name for m in members[::3]] == ["precompiled", "tested-first"]

    # Call 2 on a fresh machine: an empty cache folder, call 1's parts carried in.
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "peer-1.0-py3-none-any.whl").write_bytes(b"stand-in")
    stdout, calls = session(2, out2, tmp_path / "cache2", CACHE_IN=str(out1), WHEELS=str(tmp_path / "wheels"),
                            SITE=str(tmp_path / "site"))
    assert "restored" in stdout and "2 kernels" in stdout, stdout
    for kernel in ("precompiled", "tested-first"):
        restored = tmp_path / "cache2" / kernel
        assert sorted(p.name for p in restored.iterdir()) == ["__grp__k.json", "k.cubin", "k.json"]
        assert (restored / "k.cubin").read_bytes() == (tmp_path / "cache1" / kernel / "k.cubin").read_bytes()
    assert "sweep: ok" in stdout and "bench: ok" in stdout and "models: ok" in stdout
    assert _returned(out2) == ["gpu.json", "gpu.md", "gpu.png", "logs.tgz",
                               "models/gpu.json", "models/gpu.md"]
    pip = [c for c in calls if c.startswith("-m pip install -q --no-index")]
    assert len(pip) == 1 and "peer-1.0-py3-none-any.whl" in pip[0], calls
    runs = [c for c in calls if "benchmarks.run" in c]
    assert len(runs) == 2 and all(f"PYTHONPATH={tmp_path / 'site'}" in c for c in runs), runs


def test_a_cache_cut_at_the_parts_limit_restores_whole_kernels_only(session, tmp_path):
    """Two 10 MiB kernels make two parts; with one part kept, the first kernel comes back whole and
    the second without its group file (a cache miss for Triton, not a broken entry). A group file
    that is not whole JSON (as where tar was cut inside one) is dropped on restore."""
    out = tmp_path / "out"
    (tmp_path / "cache1" / "torn").mkdir(parents=True)
    (tmp_path / "cache1" / "torn" / "k.cubin").write_bytes(b"binary")
    (tmp_path / "cache1" / "torn" / "__grp__k.json").write_text('{"child_paths": {"k.cu')
    stdout, _ = session(1, out, tmp_path / "cache1", KERNEL_BYTES=str(10 * 2**20), CACHE_PARTS="1")
    assert "cut there (CACHE_PARTS=1)" in stdout, stdout
    assert _returned(out) == ["compile-sm_90a.json", "logs.tgz", "triton-cache.tgz.0"]
    fresh = tmp_path / "cache2"
    session(2, tmp_path / "out2", fresh, CACHE_IN=str(out), STEPS="install")
    assert (fresh / "precompiled" / "__grp__k.json").exists()
    assert (fresh / "torn" / "k.cubin").exists() and not (fresh / "torn" / "__grp__k.json").exists()
    assert (fresh / "precompiled" / "k.cubin").stat().st_size == 10 * 2**20
    assert not (fresh / "tested-first" / "__grp__k.json").exists()


def test_one_call_runs_every_step_within_a_ten_minute_call(session, tmp_path):
    """Every step, their limits within the call's 570 s less 40 for packing, and what comes back
    at most 8 files although the cache would fill four parts (five kernels of 12 MiB)."""
    out = tmp_path / "out"
    stdout, calls = session("all", out, tmp_path / "cache", KERNEL_BYTES=str(12 * 2**20))
    limits = [int(line.split("at most ")[1].split("s)")[0]) for line in stdout.splitlines()
              if line.startswith("== ") and "(at most " in line]
    assert len(limits) == 6 and sum(limits) <= 530, stdout
    for step in ("install", "precompile", "tests", "sweep", "bench", "models"):
        assert f"{step}: ok" in stdout, stdout
    runs = [c for c in calls if "benchmarks.run" in c]
    assert len(runs) == 2 and "--quick" in runs[0] and "--quick --no-compile" in runs[1], runs
    assert "linear_cross_entropy" in runs[0]
    assert _returned(out) == ["compile-sm_90a.json", "gpu.json", "gpu.md", "gpu.png", "logs.tgz",
                              "models/gpu.json", "models/gpu.md", "triton-cache.tgz.0"]
    assert any("import fastdl.kernels.utils" in c for c in calls), calls


def test_one_call_cuts_its_steps_to_the_call_s_total(session, tmp_path):
    """TOTAL=55 leaves 15 s before the 40 s of packing: the tests, which hang, are cut at the
    deadline, the steps after them are skipped (the script fails), and the archives come back."""
    out = tmp_path / "out"
    stdout, _ = session("all", out, tmp_path / "cache", rc=1, TOTAL="55", PYTEST_SLEEP="60")
    tests = next(line for line in stdout.splitlines() if line.startswith("== tests"))
    assert int(tests.split("at most ")[1].split("s)")[0]) <= 15, stdout
    assert "tests: timed out" in stdout, stdout
    for step in ("sweep", "bench", "models"):
        assert f"{step}: skipped" in stdout, stdout
    assert "logs.tgz" in _returned(out)

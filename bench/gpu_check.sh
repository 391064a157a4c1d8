#!/usr/bin/env bash
# One prepared check on a bare GPU machine with no network (CuPy, NumPy, SciPy, h5py,
# matplotlib and pytest preinstalled; the wheels for what it lacks carried along in
# bench/wheels/cpXY/, made beforehand by bench/fetch_wheels.sh):
#
#   bench/gpu_check.sh                  # on the GPU machine, from the checkout's root
#   bench/gpu_check.sh --cpu-rehearsal  # here: the same install into a fresh venv, the
#                                       # same steps on the CPU, the bench cut short
#
# Steps, each under `timeout` within a total budget ($GPU_CHECK_BUDGET_S, default 480 s;
# a step never starts with less than 10 s left, so the script ends before 9 minutes):
#   1. the device: nvidia-smi, Python, CuPy, what pip has installed
#   2. install: the project's missing dependencies from the wheel folder and the checkout
#      (editable), `pip install --no-index --find-links`, never replacing what is
#      installed (the machine's CuPy, NumPy ...: pinned by a constraints file);
#      where that fails, the checkout runs from PYTHONPATH
#   3. the backend the machine gets (auto's device check) and imports
#   4. python -m pytest -m gpu (the tests that need a CUDA device)
#   5. the feature, calibration and replay tests with GPUSMD_BACKEND=gpu
#   6. python bench/run.py --backend gpu --no-tests (recipes R1-R3)
#   7. gpusmd demo --backend gpu (services with GPU workers, checked against the
#      in-process replay)
# Where CuPy cannot run a kernel (step 3), the check stops there.
# Everything goes to $OUT (at most 8 files: summary.md, gpu_check.log, device.txt,
# tests-marked-*.txt, tests-backend-*.txt, demo-*.txt, recipes-*.md / .json) and, on a
# GPU, to bench/results/ (gpu-check.md, recipes-gpu.*). The summary is rewritten after
# every step: a check stopped half way keeps what it measured. Exit status 0 when every
# step is ok.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=gpu
[ "${1:-}" = "--cpu-rehearsal" ] && MODE=cpu
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-$([ $MODE = gpu ] && echo 480 || echo 170)}
OUT=${OUT:-$(mktemp -d /tmp/gpusmd-check-out.XXXXXX)}
WORK=$(mktemp -d /tmp/gpusmd-check-work.XXXXXX)
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.md
ROWS=$WORK/rows.md
: > "$ROWS"
exec > >(tee -a "$LOG") 2>&1

PYTAG=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/bench/wheels/$PYTAG}
# pip: this folder only, no index, no configuration of the machine's
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
       PIP_NO_INPUT=1 PIP_NO_CACHE_DIR=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_REQUIRE_VIRTUALENV
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
unset GPUSMD_BACKEND

cleanup() {
    [ "$MODE" = cpu ] && rm -rf "$WORK"
    return 0
}
trap cleanup EXIT

elapsed() { echo $(( $(date +%s) - START )); }

write_summary() {
    {
        echo "# gpusmd GPU check ($([ $MODE = gpu ] && echo "on the device" || echo "CPU rehearsal"))"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(hostname), $(elapsed) s of a ${BUDGET} s budget;" \
             "\`bench/gpu_check.sh${1:+ $1}\`, commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
        echo
        echo "Device: ${DEVICE:-none found}"
        echo
        echo "| step | status | seconds | last line |"
        echo "| --- | --- | --- | --- |"
        cat "$ROWS"
        if [ -s "$WORK/device.txt" ]; then
            echo
            echo '```'
            head -c 20000 "$WORK/device.txt"
            echo '```'
        fi
    } > "$SUMMARY"
    if [ "$MODE" = gpu ]; then
        mkdir -p "$ROOT/bench/results" && cp "$SUMMARY" "$ROOT/bench/results/gpu-check.md"
    fi
}

# step NAME MAX_SECONDS OUTPUT_FILE|- COMMAND...: runs COMMAND under timeout, its output
# to the log (and to OUTPUT_FILE), and adds a row to the summary
step() {
    local name=$1 max=$2 file=$3
    shift 3
    local left=$(( BUDGET - $(elapsed) - 5 ))
    local limit=$(( max < left ? max : left ))
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: skipped, ${left} s left of the budget"
        echo "| $name | skipped: out of time | | |" >> "$ROWS"
        FAILS=$((FAILS + 1))
        write_summary "$ARGS"
        return 1
    fi
    echo "=== $name (at most ${limit} s): $*"
    local t0 rc out
    t0=$(date +%s)
    out=${file/#-/$WORK/step.txt}
    if declare -F "$1" >/dev/null; then     # a function of this script: in a child bash
        timeout -k 5 "$limit" bash -c '"$@"' _ "$@" 2>&1 | tee "$out"
    else
        timeout -k 5 "$limit" "$@" 2>&1 | tee "$out"
    fi
    rc=${PIPESTATUS[0]}
    local status="ok"
    case $rc in
        0) ;;
        124|137) status="STOPPED at its ${limit} s limit" ;;
        *) status="FAILED (status $rc)" ;;
    esac
    [ "$rc" = 0 ] || FAILS=$((FAILS + 1))
    local last
    last=$(grep -v '^\s*$' "$out" | tail -n 1 | cut -c1-200 | tr '|' '/')
    echo "| $name | $status | $(( $(date +%s) - t0 )) | ${last} |" >> "$ROWS"
    echo "=== $name: $status after $(( $(date +%s) - t0 )) s"
    write_summary "$ARGS"
    return "$rc"
}
ARGS=${1:-}
FAILS=0

# ---- 1. the device ------------------------------------------------------------------
if [ "$MODE" = cpu ]; then
    python3 -m venv "$WORK/venv" || { echo "cannot make a venv"; exit 1; }
    PY=$WORK/venv/bin/python
else
    PY=$(command -v python3)
fi
device_report() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    else
        echo "no nvidia-smi on this machine"
    fi
    echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
    echo "wheel folder: $WHEELS ($(ls "$WHEELS" 2>/dev/null | wc -l) wheels)"
    "$PY" -m pip list --format=freeze 2>/dev/null \
        | grep -i -E '^(cupy|numpy|scipy|h5py|hdf5plugin|pyzmq|msgpack|pyyaml|tqdm|matplotlib|pytest|setuptools|nvidia-cuda-nvrtc|psana|pyfai)'
}
export PY WHEELS WORK ROOT
export -f device_report
step "device" 30 "$WORK/device.txt" device_report
cp "$WORK/device.txt" "$OUT/device.txt"
DEVICE=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
         | head -n 1)
DEVICE=${DEVICE:-$([ $MODE = gpu ] && echo "none: nvidia-smi finds no GPU" || echo "no GPU (CPU rehearsal)")}
write_summary "$ARGS"

# ---- 2. install ---------------------------------------------------------------------
install_project() {
    [ -d "$WHEELS" ] || { echo "no wheel folder $WHEELS (bench/fetch_wheels.sh makes it)"; return 1; }
    "$PY" -m pip list --format=freeze 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' > "$WORK/installed.txt"
    # the project's dependencies (and pytest) that are not installed, and whether the
    # wheel folder has them; an installed one is kept whatever its version
    "$PY" - "$WHEELS" > "$WORK/missing.txt" <<'EOF' || return 1
import importlib.metadata as md, os, re, sys
try:
    import tomllib
except ModuleNotFoundError:
    tomllib = None
folder = sys.argv[1]
norm = lambda n: re.sub(r"[-_.]+", "_", n).lower()
wheels = {norm(f.split("-")[0]) for f in os.listdir(folder) if f.endswith(".whl")}
if tomllib:
    deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
else:   # Python 3.10: the dependency list read by hand
    text = open("pyproject.toml").read()
    deps = re.findall(r'^\s*"([^"]+)"', text.split("dependencies = [", 1)[1].split("]", 1)[0], re.M)
for req in deps + ["pytest>=7"]:
    name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
    try:
        print(f"# have {name} {md.version(name)}", file=sys.stderr)
    except md.PackageNotFoundError:
        print(("install " if norm(name) in wheels else "absent ") + req)
EOF
    local install=() line
    while read -r line; do
        case $line in
            install\ *) install+=("${line#install }") ;;
            absent\ *) echo "not installed, and no wheel for it in $WHEELS: ${line#absent }" ;;
        esac
    done < "$WORK/missing.txt"
    if [ ${#install[@]} -gt 0 ]; then
        echo "installing from $WHEELS: ${install[*]}"
        "$PY" -m pip install --no-compile --no-index --find-links "$WHEELS" -c "$WORK/installed.txt" \
            "${install[@]}" || return 1
    fi
    "$PY" -m pip install --no-compile --no-index --find-links "$WHEELS" --no-deps -e "$ROOT" \
        || "$PY" -m pip install --no-compile --no-index --no-deps --no-build-isolation -e "$ROOT" \
        || return 1     # (the second: with the machine's own setuptools)
    # nothing that was installed before was replaced
    "$PY" -m pip list --format=freeze 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' > "$WORK/after.txt"
    local replaced
    replaced=$(comm -23 <(sort "$WORK/installed.txt") <(sort "$WORK/after.txt") | grep -v -i '^gpusmd==')
    [ -z "$replaced" ] || { echo "REPLACED by the install: $replaced"; return 1; }
    echo "installed: gpusmd (editable) from $ROOT, without network"
}
export -f install_project
if ! step "install" 120 - install_project; then
    # the checkout runs as it is, its missing dependencies beside it
    echo "the editable install failed: running the checkout from PYTHONPATH"
    mkdir -p "$WORK/site"
    for w in "$WHEELS"/pyzmq-*.whl; do
        [ -e "$w" ] && "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$w"
    done
    export PYTHONPATH=$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi
BIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
if [ -x "$BIN/gpusmd" ] && [ -z "${PYTHONPATH:-}" ]; then GPUSMD=("$BIN/gpusmd"); else GPUSMD=("$PY" -m gpusmd); fi

# ---- 3. the backend this machine gets -------------------------------------------------
backend_report() {
    "$PY" - <<'EOF'
import warnings
import gpusmd, zmq, h5py, yaml, msgpack, tqdm, scipy, numpy
from gpusmd.backend import driver_cuda_major, get_backend, probe_gpu
print(f"gpusmd from {gpusmd.__file__}; numpy {numpy.__version__}, h5py {h5py.__version__}, "
      f"pyzmq {zmq.__version__}")
cupy, why, devices = probe_gpu()
print(f"driver CUDA major: {driver_cuda_major()}; CuPy: "
      + (f"{cupy.__version__}, {devices} device(s), the probe kernel ran" if cupy else why))
with warnings.catch_warnings():
    warnings.simplefilter("always")
    print(f"backend auto -> {get_backend('auto').name}")
EOF
}
export -f backend_report
step "imports and backend" 60 "$WORK/backend.txt" backend_report
cat "$WORK/backend.txt" >> "$OUT/device.txt"
if [ "$MODE" = gpu ] && ! grep -q "backend auto -> gpu" "$WORK/backend.txt"; then
    # nothing below can pass without a usable GPU: give the machine back early
    echo "| GPU tests, bench, demo | skipped: CuPy cannot run kernels here (imports and backend) | | |" >> "$ROWS"
    FAILS=$((FAILS + 1))
    write_summary "$ARGS"
    cat "$SUMMARY"
    exec >&- 2>&-
    sleep 0.5
    exit 1
fi

# ---- 4, 5. tests ----------------------------------------------------------------------
BACKEND_TESTS=()
if [ "$MODE" = gpu ]; then
    TESTS="features_basic roi azimuthal droplets sparsify all_functions calibration
           fused_calibration common_mode replay backend_choice"
else    # the rehearsal: the same command on two quick files
    TESTS="roi backend_choice"
fi
for t in $TESTS; do
    [ -f "tests/test_$t.py" ] && BACKEND_TESTS+=("tests/test_$t.py")
done
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider --continue-on-collection-errors)
if ! "$PY" -c "import psana" >/dev/null 2>&1; then   # the tests that import psana need it
    for f in $(grep -l -E '^(import|from) psana' tests/*.py); do PYTEST+=("--ignore=$f"); done
    echo "psana is not installed: ${PYTEST[*]:8}"
fi
step "pytest -m gpu" 120 "$OUT/tests-marked-$MODE.txt" "${PYTEST[@]}" -m gpu tests
step "tests with GPUSMD_BACKEND=$MODE" 150 "$OUT/tests-backend-$MODE.txt" \
    env GPUSMD_BACKEND=$MODE "${PYTEST[@]}" "${BACKEND_TESTS[@]}"

# ---- 6. the benchmark -----------------------------------------------------------------
if [ "$MODE" = gpu ]; then
    rm -f bench/results/recipes-gpu.md bench/results/recipes-gpu.json   # none from before
    step "bench/run.py --backend gpu" 240 - "$PY" bench/run.py --backend gpu --no-tests \
        --workdir "$WORK/bench"
    RESULTS=$ROOT/bench/results
else    # one small recipe, its tables kept out of bench/results
    RESULTS=$WORK/results
    step "bench/run.py --backend cpu (R3, 4 events)" 60 - env GPUSMD_BENCH_RESULTS="$RESULTS" \
        "$PY" bench/run.py --backend cpu --no-tests --recipes R3 --events 4 --workdir "$WORK/bench"
fi
for f in "$RESULTS/recipes-$MODE.md" "$RESULTS/recipes-$MODE.json"; do
    [ -f "$f" ] && cp "$f" "$OUT/"
done

# ---- 7. the demo ----------------------------------------------------------------------
step "gpusmd demo --backend $MODE" 90 "$OUT/demo-$MODE.txt" \
    "${GPUSMD[@]}" demo --backend "$MODE" --outdir "$WORK/demo"

write_summary "$ARGS"
echo
cat "$SUMMARY" | sed -n '1,/^```/p' | grep -v '^```'
echo "gpu_check: $(elapsed) s, $FAILS step(s) not ok; results in $OUT$([ $MODE = gpu ] && echo " and bench/results/")"
exec >&- 2>&-     # the log's tee ends before the script does
sleep 0.5
[ "$FAILS" = 0 ]

#!/usr/bin/env bash
# Downloads the wheels that bench/gpu_check.sh installs on a machine without network,
# into bench/wheels/cpXY/ (ignored by git), for one Python version:
#
#   bench/fetch_wheels.sh                  # CPython 3.12, manylinux x86_64: the packages a
#                                          # GPU machine with CuPy, NumPy, SciPy, h5py,
#                                          # matplotlib and pytest lacks (pyzmq ...)
#   bench/fetch_wheels.sh --all            # this machine's python3: every dependency of
#                                          # the project, pytest and setuptools (the CPU
#                                          # rehearsal, bench/gpu_check.sh --cpu-rehearsal)
#   bench/fetch_wheels.sh --python 3.12 --all --with pyFAI   # more packages (and theirs)
#
# The GPU set is downloaded without dependencies (the machine has them; pip on it is
# never allowed to replace what is installed); --all resolves everything for the
# version. Prints the folder and its size: carry it to the device with the checkout
# (its working tree travels, at most 64 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=
ALL=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PYVER="$2"; shift 2 ;;
        --all) ALL=1; shift ;;
        --with) EXTRA+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "fetch_wheels.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
NATIVE=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
# the GPU set is for 3.12 unless told; --all is for this machine's python3 unless told
[ -n "$PYVER" ] || { [ "$ALL" = 1 ] && PYVER=$NATIVE || PYVER=3.12; }
TAG="cp${PYVER/./}"
DEST=${WHEELS_DIR:-bench/wheels/$TAG}
mkdir -p "$DEST"

PLATFORM=()
if [ "$PYVER" != "$NATIVE" ] || [ "$(uname -m)" != x86_64 ]; then
    PLATFORM=(--python-version "$PYVER" --implementation cp --abi "$TAG" --abi abi3 --abi none
              --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux_2_24_x86_64 --platform manylinux_2_26_x86_64
              --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64
              --platform manylinux1_x86_64 --platform any)
fi

# what a GPU machine of the kind bench/gpu_check.sh is for lacks (its image has CuPy,
# NumPy, SciPy, h5py, matplotlib, PyYAML, tqdm, msgpack and pytest): pyzmq for the
# services, plotly (and its narwhals) for the monitor's page, setuptools >= 64 to
# install the checkout, and small insurance wheels
GPU_SET=(pyzmq plotly narwhals packaging "setuptools>=70.1" msgpack PyYAML tqdm)

if [ "$ALL" = 1 ]; then
    mapfile -t DEPS < <(python3 - <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"]))
EOF
)
    python3 -m pip download -q --only-binary=:all: "${PLATFORM[@]}" -d "$DEST" \
        "${DEPS[@]}" "pytest>=7" "setuptools>=70.1" "${EXTRA[@]}"
else
    python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DEST" \
        "${GPU_SET[@]}" "${EXTRA[@]}"
fi
echo "$DEST: $(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1)"

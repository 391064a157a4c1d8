"""Loading, compiling and launching the CUDA kernels of ``kernels/*.cu`` (DESIGN §11).

Three ways to run the same source:

- on a GPU: :func:`get_function` compiles a kernel file with ``cupy.RawModule`` and
  returns one of its functions; :func:`calibrate_gpu` is the calibration launch.
- compiled only: :func:`compile_ptx` runs NVRTC (CuPy's bindings, no device needed),
  so CI fails on a kernel that does not compile.
- on the host: :func:`host_module` compiles the file as C++20 with g++ against
  ``kernels/cuda_host.h`` into a cached shared library with one launcher per
  ``extern "C" __global__`` function, so CI runs every kernel on the CPU and compares
  it with its NumPy reference. Blocks run one after another; the threads of a block run
  one after another, or as std::threads meeting at a barrier when the source
  synchronises (``__syncthreads``, warp shuffles and votes).

The kernels live in the package data ``gpusmd.kernels`` (the repository's ``kernels/``
folder, also used directly from a source checkout run without installing, e.g.
``PYTHONPATH=. python -m gpusmd ...``).

The modules of this package, whose public names are all importable from here
(``from gpusmd import cuda; cuda.X``):

- :mod:`.compile`: finding the kernel sources, NVRTC, loading with CuPy
- :mod:`.host`: the host build (g++, ctypes launchers)
- :mod:`._launch`: helpers the GPU launchers share (multiprocessor count, event chunks)
- the launchers, one module per kernel file: :mod:`.calibrate` (calibrate.cu and
  calibrate_cm.cu), :mod:`.common_mode` (common_mode.cu), :mod:`.cspad` (cm_cspad.cu),
  :mod:`.histogram` (histogram.cu), :mod:`.projection` (projection.cu), :mod:`.sums`
  (run_sums.cu), :mod:`.spectrum` (spectrum.cu)
"""
from .compile import (
    NVRTC_STD, kernel_dir, kernel_names, kernel_source, compile_ptx, get_function,
)
from .host import (
    HOST_HEADER, HOST_CXXFLAGS, KernelParam, parse_kernels, HostModule, host_module,
)
from ._launch import CM_MAX_GRID_Y
from .calibrate import (
    CALIBRATE_BLOCK, calibrate_gpu, calibrate_host, CM_SEGMENT_MAX, calibrate_rows, CM_TILE,
    CM_COLUMN_MAX, COLUMNS_BLOCK, columns_fit, columns_gain, apply_gain,
)
from .common_mode import (
    CM_SORT_MAX, CM_MAX_SIZE, CM_BLOCK, CM_BLOCK_HUGE, CM_HUGE, CM_HOST_BLOCK,
    group_correct_gpu, group_correct_host,
)
from .sums import RUN_SUMS_MAX, RUN_SUMS_BLOCK, run_sums
from .projection import (
    PROJECT_BLOCK, PJ_LO, PJ_HI, PJ_SINGLE, PJ_MEAN, PJ_MASK, project_gpu, project_host,
)
from .histogram import (
    HIST_BLOCK, HIST_LO, HIST_HI, HIST_LANES, HIST_SLICE, HIST_MAX_GRID_Y, HistPlan,
    hist_plan, histogram_compiled, histogram_numpy, histogram_gpu, histogram_host,
)
from .cspad import (
    CSPAD_SEG_SHAPE, CSPAD_BLOCK, CSPAD_HOST_BLOCK, CSPAD_MODE5_BLOCK, CSPAD_MAX_SLOTS,
    CSPAD_INT_MAX, pairwise_depth, cspad_common_mode_gpu, cspad_common_mode_host,
)
from .spectrum import SPECTRUM_BLOCK, SPECTRUM_MAX_BINS, spectrum_gpu, spectrum_host

__all__ = [
    "NVRTC_STD", "kernel_dir", "kernel_names", "kernel_source", "compile_ptx",
    "get_function", "HOST_HEADER", "HOST_CXXFLAGS", "KernelParam", "parse_kernels",
    "HostModule", "host_module", "CM_MAX_GRID_Y", "CALIBRATE_BLOCK", "calibrate_gpu",
    "calibrate_host", "CM_SEGMENT_MAX", "calibrate_rows", "CM_TILE", "CM_COLUMN_MAX",
    "COLUMNS_BLOCK", "columns_fit", "columns_gain", "apply_gain", "CM_SORT_MAX",
    "CM_MAX_SIZE", "CM_BLOCK", "CM_BLOCK_HUGE", "CM_HUGE", "CM_HOST_BLOCK",
    "group_correct_gpu", "group_correct_host", "RUN_SUMS_MAX", "RUN_SUMS_BLOCK", "run_sums",
    "PROJECT_BLOCK", "PJ_LO", "PJ_HI", "PJ_SINGLE", "PJ_MEAN", "PJ_MASK", "project_gpu",
    "project_host", "HIST_BLOCK", "HIST_LO", "HIST_HI", "HIST_LANES", "HIST_SLICE",
    "HIST_MAX_GRID_Y", "HistPlan", "hist_plan", "histogram_compiled", "histogram_numpy", "histogram_gpu",
    "histogram_host", "CSPAD_SEG_SHAPE", "CSPAD_BLOCK", "CSPAD_HOST_BLOCK",
    "CSPAD_MODE5_BLOCK", "CSPAD_MAX_SLOTS", "CSPAD_INT_MAX", "pairwise_depth",
    "cspad_common_mode_gpu", "cspad_common_mode_host", "SPECTRUM_BLOCK",
    "SPECTRUM_MAX_BINS", "spectrum_gpu", "spectrum_host",
]

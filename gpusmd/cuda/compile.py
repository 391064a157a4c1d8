"""NVRTC compilation and CuPy loading of the kernels of ``kernels/*.cu`` (DESIGN §11).

Finding the sources (:func:`kernel_dir`, :func:`kernel_names`, :func:`kernel_source`);
compiling them with NVRTC, no device needed (:func:`compile_ptx`: CI fails on a kernel
that does not compile); on a GPU, :func:`get_function` compiles a kernel file with
``cupy.RawModule`` (cached per device) and returns one of its functions.

The kernels live in the package data ``gpusmd.kernels`` (the repository's ``kernels/``
folder, also used directly from a source checkout run without installing, e.g.
``PYTHONPATH=. python -m gpusmd ...``).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os
from pathlib import Path

from ..errors import GpusmdError

NVRTC_STD = "-std=c++17"


# ---- finding the sources ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def kernel_dir() -> Path:
    """The folder holding the kernel sources (package data, or the checkout's kernels/)."""
    try:
        folder = importlib.resources.files("gpusmd.kernels")
        if isinstance(folder, Path) and folder.is_dir():
            return folder
    except ModuleNotFoundError:
        pass
    folder = Path(__file__).resolve().parents[2] / "kernels"   # gpusmd/cuda/ -> checkout
    if not folder.is_dir():
        raise GpusmdError(f"kernel sources not found: neither package data gpusmd.kernels "
                          f"nor {folder} exists")
    return folder


def kernel_names() -> list[str]:
    """Names of every kernel file, ``kernels/<name>.cu``."""
    return sorted(p.stem for p in kernel_dir().glob("*.cu"))


def _source_path(name: str | os.PathLike) -> Path:
    """kernels/<name>.cu for a kernel name, or the file itself for a path."""
    text = os.fspath(name)
    if isinstance(name, os.PathLike) or os.sep in text or "/" in text:
        path = Path(text).resolve()
    else:   # a kernel name, with or without .cu
        path = kernel_dir() / (text if text.endswith(".cu") else f"{text}.cu")
    if not path.is_file():
        known = ", ".join(kernel_names())
        raise GpusmdError(f"kernel source {path} not found (kernels: {known})")
    return path


def kernel_source(name: str | os.PathLike) -> str:
    """The CUDA C source of kernels/<name>.cu (or of a .cu file given by path)."""
    return _source_path(name).read_text()


def _headers_digest(*folders: Path) -> str:
    """Hash of the headers a kernel may include (cuda_host.h, gain_decode.h, ...)."""
    h = hashlib.sha256()
    for folder in dict.fromkeys(folders):
        for p in sorted([*folder.glob("*.h"), *folder.glob("*.cuh")]):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


# ---- NVRTC ---------------------------------------------------------------------------------
def compile_ptx(name: str | os.PathLike, arch: str = "compute_80", *, source: str | None = None,
                options: tuple[str, ...] = ()) -> str:
    """Compile a kernel file with NVRTC and return its PTX; needs no GPU.

    ``name`` is a kernel name or a path to a .cu file; ``source`` replaces the file's
    text (the file name is then only used in messages and for includes). Raises
    GpusmdError with the NVRTC log on failure."""
    if source is None:
        path = _source_path(name)
        source = path.read_text()
    else:
        text = os.fspath(name)
        path = Path(text if text.endswith(".cu") else f"{text}.cu")
        if not path.is_absolute():
            path = kernel_dir() / path
    try:
        from cupy.cuda import nvrtc
    except Exception as e:  # no CuPy at all
        from ..backend import nvrtc_hint
        raise GpusmdError(f"compiling {path.name} needs CuPy's NVRTC bindings "
                          f"({nvrtc_hint()}): {e}") from None
    opts = [f"-arch={arch}", NVRTC_STD, f"-I{kernel_dir()}", *options]
    if path.parent != kernel_dir():
        opts.append(f"-I{path.parent}")
    try:
        prog = nvrtc.createProgram(source, path.name, [], [])
    except Exception as e:  # NVRTC library missing or unloadable
        from ..backend import nvrtc_hint
        raise GpusmdError(f"{path.name}: NVRTC is not usable here ({nvrtc_hint()}): {e}") from None
    try:
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog)
            raise GpusmdError(f"{path}: NVRTC compilation failed ({e}):\n{log}") from None
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


# ---- GPU (CuPy) ----------------------------------------------------------------------------
def _cupy():
    try:
        import cupy
    except Exception as e:
        from ..backend import install_hint
        raise GpusmdError(f"the GPU backend needs CuPy ({install_hint()}): {e}") from None
    return cupy


@functools.lru_cache(maxsize=None)
def _raw_module(name: str, device: int):
    cupy = _cupy()
    kdir = kernel_dir()
    # CuPy's compile cache is keyed by the source text, not by included headers: add
    # the headers' hash so that an edited header recompiles
    code = kernel_source(name) + f"\n// gpusmd headers {_headers_digest(kdir)}\n"
    return cupy.RawModule(code=code, options=(NVRTC_STD, f"-I{kdir}"), backend="nvrtc")


def get_function(name: str, function: str):
    """``cupy.RawModule(...).get_function(function)`` for kernels/<name>.cu, cached per
    device."""
    cupy = _cupy()
    return _raw_module(name, cupy.cuda.Device().id).get_function(function)

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
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GpusmdError

HOST_HEADER = "cuda_host.h"
NVRTC_STD = "-std=c++17"
HOST_CXXFLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC", "-pthread")
CALIBRATE_BLOCK = 256


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
    folder = Path(__file__).resolve().parent.parent / "kernels"
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
        from .backend import nvrtc_hint
        raise GpusmdError(f"compiling {path.name} needs CuPy's NVRTC bindings "
                          f"({nvrtc_hint()}): {e}") from None
    opts = [f"-arch={arch}", NVRTC_STD, f"-I{kernel_dir()}", *options]
    if path.parent != kernel_dir():
        opts.append(f"-I{path.parent}")
    try:
        prog = nvrtc.createProgram(source, path.name, [], [])
    except Exception as e:  # NVRTC library missing or unloadable
        from .backend import nvrtc_hint
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
        from .backend import install_hint
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


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    cupy = _cupy()
    return int(cupy.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])


def _calibrate_args(xp, raw_flat, control_bits, lut, family: int):
    """Checked, contiguous kernel arguments: (raw uint16, cb uint8, lut float32, B, npix,
    signed_raw)."""
    raw = xp.asarray(raw_flat)
    if raw.ndim == 1:
        raw = raw[None, :]
    if raw.ndim != 2:
        raise GpusmdError(f"calibrate: raw must be (B, npix), got shape {raw.shape}")
    if raw.dtype == np.int16:
        signed_raw = 1
    elif raw.dtype == np.uint16:
        signed_raw = 0
    else:
        raise GpusmdError(f"calibrate: raw must be uint16 or int16, got {raw.dtype}")
    raw = xp.ascontiguousarray(raw).view(xp.uint16)
    nbatch, npix = raw.shape
    lut = xp.ascontiguousarray(xp.asarray(lut, dtype=xp.float32))
    if (lut.data.ptr if xp is not np else lut.ctypes.data) % 8:
        lut = lut.copy()    # the kernel reads float2 pairs
    if lut.shape[-1] != 2 or npix == 0 or lut.size % (2 * npix):
        raise GpusmdError(f"calibrate: lut shape {lut.shape} does not fit {npix} pixels "
                          "(expected (rows, npix, 2))")
    family = int(family)
    if family not in (0, 1, 2):
        raise GpusmdError(f"calibrate: unknown detector family code {family}")
    rows = lut.size // (2 * npix)
    need = {0: 1, 1: 3, 2: 8}[family]       # gain ranges (+ the epix10k's no-range row)
    if rows != need:
        raise GpusmdError(f"calibrate: lut has {rows} rows, family {family} needs {need}")
    if control_bits is None:
        if family == 2:
            raise GpusmdError("calibrate: epix10k needs the pixel control bits")
        cb = xp.zeros(1, dtype=xp.uint8)
    else:
        cb = xp.ascontiguousarray(xp.asarray(control_bits).reshape(-1)).astype(xp.uint8, copy=False)
        if family == 2 and cb.size != npix:
            raise GpusmdError(f"calibrate: {cb.size} control bits for {npix} pixels")
    return raw, cb, lut, nbatch, npix, signed_raw, family


def calibrate_gpu(raw_flat, control_bits, lut, family: int):
    """The calibration kernel on the current CuPy device.

    raw_flat: (B, npix) uint16 or int16; control_bits: (npix,) uint8 or None; lut:
    (lut_rows, npix, 2) float32 (calibrate.build_lut); family: FAMILY_* code. Returns
    (B, npix) float32."""
    cupy = _cupy()
    raw, cb, lut, nbatch, npix, signed_raw, family = _calibrate_args(
        cupy, raw_flat, control_bits, lut, family)
    out = cupy.empty((nbatch, npix), dtype=cupy.float32)
    n = nbatch * npix
    if n == 0:
        return out
    blocks = min(-(-n // CALIBRATE_BLOCK), 32 * _sm_count(cupy.cuda.Device().id))
    get_function("calibrate", "calibrate")(
        (blocks,), (CALIBRATE_BLOCK,),
        (raw, cb, lut, out, np.int64(npix), np.int64(n), np.int32(family), np.int32(signed_raw)))
    return out


def calibrate_host(raw_flat, control_bits, lut, family: int, blocks: int | None = None):
    """The same calibration kernel, run on the CPU through the host build (tests)."""
    raw, cb, lut, nbatch, npix, signed_raw, family = _calibrate_args(
        np, raw_flat, control_bits, lut, family)
    out = np.empty((nbatch, npix), dtype=np.float32)
    n = nbatch * npix
    if n:
        blocks = blocks or -(-n // CALIBRATE_BLOCK)
        host_module("calibrate").launch("calibrate", blocks, CALIBRATE_BLOCK,
                                        raw, cb, lut, out, npix, n, family, signed_raw)
    return out


# ---- host build (g++) ----------------------------------------------------------------------
_CTYPES_SCALARS = {
    "bool": ctypes.c_bool,
    "char": ctypes.c_char, "signed char": ctypes.c_byte, "unsigned char": ctypes.c_ubyte,
    "short": ctypes.c_short, "unsigned short": ctypes.c_ushort,
    "int": ctypes.c_int, "unsigned": ctypes.c_uint,
    "long": ctypes.c_long, "unsigned long": ctypes.c_ulong,
    "long long": ctypes.c_longlong, "unsigned long long": ctypes.c_ulonglong,
    "int8_t": ctypes.c_int8, "uint8_t": ctypes.c_uint8, "int16_t": ctypes.c_int16,
    "uint16_t": ctypes.c_uint16, "int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32,
    "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64,
    "size_t": ctypes.c_size_t, "ptrdiff_t": ctypes.c_ssize_t,
    "float": ctypes.c_float, "double": ctypes.c_double,
}
# element type of a pointer parameter -> (numpy kind class, itemsize) it accepts
_POINTEES = {
    "float": ("f", 4), "float2": ("f", 4), "float3": ("f", 4), "float4": ("f", 4),
    "double": ("f", 8), "double2": ("f", 8),
    "char": ("i", 1), "signed char": ("i", 1), "unsigned char": ("i", 1), "bool": ("i", 1),
    "short": ("i", 2), "unsigned short": ("i", 2), "int": ("i", 4), "unsigned": ("i", 4),
    "long long": ("i", 8), "unsigned long long": ("i", 8),
    "int2": ("i", 4), "uint2": ("i", 4), "int4": ("i", 4), "uint4": ("i", 4),
    "ushort2": ("i", 2), "uchar4": ("i", 1),
    "int8_t": ("i", 1), "uint8_t": ("i", 1), "int16_t": ("i", 2), "uint16_t": ("i", 2),
    "int32_t": ("i", 4), "uint32_t": ("i", 4), "int64_t": ("i", 8), "uint64_t": ("i", 8),
}
_SYNC_RE = re.compile(r"\b(__syncthreads\w*|__syncwarp|__shfl\w*_sync|__ballot_sync|__any_sync"
                      r"|__all_sync|__activemask)\s*\(")
_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
                        r"void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)")
_DYN_SHARED_RE = re.compile(r"extern\s+__shared__\s+(?:(?:__align__|alignas)\s*\(\s*\w+\s*\)\s*)?"
                            r"([A-Za-z_][\w\s]*?)\s+(\w+)\s*\[\s*\]\s*;")
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _strip_comments(src: str) -> str:
    """Source without comments (string literals kept), same line count."""
    def repl(m):
        s = m.group(0)
        return s if s[0] == '"' else ("\n" * s.count("\n") or " ")
    return re.sub(r'"(?:\\.|[^"\\\n])*"|//[^\n]*|/\*.*?\*/', repl, src, flags=re.S)


def _normalise_type(text: str) -> tuple[str, bool]:
    """C parameter type -> (base type without qualifiers, is_pointer)."""
    pointer = "*" in text or "[" in text
    words = [w for w in re.findall(r"[A-Za-z_]\w*", text)
             if w not in ("const", "volatile", "__restrict__", "__restrict", "restrict",
                          "struct", "std")]
    if words[:1] == ["signed"] and len(words) > 1 and words[1] != "char":
        words = words[1:]
    base = " ".join(words)
    base = {"unsigned int": "unsigned", "long int": "long", "unsigned long int": "unsigned long",
            "long long int": "long long", "unsigned long long int": "unsigned long long",
            "short int": "short", "unsigned short int": "unsigned short",
            "signed char": "signed char"}.get(base, base)
    return base, pointer


@dataclass(frozen=True)
class KernelParam:
    decl: str        # as written in the source
    name: str
    base: str        # element / scalar type without qualifiers
    pointer: bool

    @property
    def ctype(self):
        if self.pointer:
            return ctypes.c_void_p
        try:
            return _CTYPES_SCALARS[self.base]
        except KeyError:
            raise GpusmdError(f"host launcher: parameter {self.decl!r} of type {self.base!r} "
                              "is not supported (use pointers or built-in scalars)") from None


def parse_kernels(source: str) -> dict[str, list[KernelParam]]:
    """The ``extern "C" __global__ void name(params)`` functions of a source, in order."""
    kernels = {}
    for m in _KERNEL_RE.finditer(_strip_comments(source)):
        params = []
        body = " ".join(m.group(2).split())
        if body and body != "void":
            for decl in body.split(","):
                decl = decl.strip()
                pm = re.search(r"([A-Za-z_]\w*)\s*(\[\s*\])?$", decl)
                if not pm or pm.start() == 0:
                    raise GpusmdError(f"host launcher: cannot parse parameter {decl!r} of "
                                      f"kernel {m.group(1)}")
                base, pointer = _normalise_type(decl[:pm.start()] + (pm.group(2) or ""))
                params.append(KernelParam(decl, pm.group(1), base, pointer))
        kernels[m.group(1)] = params
    return kernels


def _local_includes(path: Path, include_dirs: list[Path], seen: set[Path]) -> str:
    """Comment-free text of a source and of the local headers it includes (recursively),
    cuda_host.h left out: what decides whether the kernels synchronise."""
    text = _strip_comments(path.read_text())
    parts = [text]
    for inc in _INCLUDE_RE.findall(text):
        if inc == HOST_HEADER:
            continue
        for folder in [path.parent, *include_dirs]:
            cand = (folder / inc).resolve()
            if cand.is_file():
                if cand not in seen:
                    seen.add(cand)
                    parts.append(_local_includes(cand, include_dirs, seen))
                break
    return "\n".join(parts)


def _cache_dir() -> Path:
    base = os.environ.get("GPUSMD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpusmd")
    folder = Path(base) / "host"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    folder = Path(tempfile.gettempdir()) / f"gpusmd-{os.getuid() if hasattr(os, 'getuid') else 0}" / "host"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.lru_cache(maxsize=None)
def _compiler() -> tuple[str, str]:
    cxx = os.environ.get("CXX", "g++")
    exe = shutil.which(cxx)
    if exe is None:
        raise GpusmdError(f"the host build of the kernels needs a C++20 compiler: {cxx!r} not "
                          "found (install g++ or set CXX)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return exe, version


def _launcher_source(path: Path, source: str, kernels: dict[str, list[KernelParam]],
                     threaded: bool) -> str:
    """The C++ translation unit of a host build: header, source, launchers."""
    body = _DYN_SHARED_RE.sub(
        lambda m: f"{m.group(1)}* const {m.group(2)} = "
                  f"static_cast<{m.group(1)}*>(::gpusmd_host::dynamic_shared);", source)
    lines = [f"// generated by gpusmd.cuda.host_module from {path}",
             f'#include "{HOST_HEADER}"',
             f'#line 1 "{path}"',
             body,
             "",
             '#line 1 "gpusmd-host-launchers"',
             'extern "C" const char* gpusmd_host_last_error() '
             "{ return gpusmd_host::last_error.c_str(); }"]
    for name, params in kernels.items():
        decls = "".join(f", {p.decl}" for p in params)
        args = ", ".join(p.name for p in params)
        lines += [
            f'extern "C" void host_launch_{name}(unsigned gpusmd_gx, unsigned gpusmd_gy, '
            f"unsigned gpusmd_gz, unsigned gpusmd_bx, unsigned gpusmd_by, unsigned gpusmd_bz, "
            f"size_t gpusmd_shmem{decls})",
            "{",
            "    ::gpusmd_host::launch(dim3(gpusmd_gx, gpusmd_gy, gpusmd_gz), "
            "dim3(gpusmd_bx, gpusmd_by, gpusmd_bz), gpusmd_shmem, "
            f"{'true' if threaded else 'false'}, [&]() {{ {name}({args}); }});",
            "}"]
    return "\n".join(lines) + "\n"


def _dims(value, what: str) -> tuple[int, int, int]:
    dims = (value,) if np.isscalar(value) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(int(d) != d or d < 1 for d in dims):
        raise GpusmdError(f"host launch: {what} must be 1 to 3 positive integers, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


class HostModule:
    """A kernel file built for the host: ``launch(function, grid, block, *args)``."""

    def __init__(self, source_path: Path, library: Path, kernels: dict[str, list[KernelParam]],
                 threaded: bool):
        self.source_path = source_path
        self.library = library
        self.kernels = kernels
        self.threaded = threaded
        self._lib = ctypes.CDLL(str(library))
        self._lib.gpusmd_host_last_error.restype = ctypes.c_char_p
        self._lib.gpusmd_host_last_error.argtypes = []
        self._funcs = {}

    @property
    def functions(self) -> list[str]:
        return list(self.kernels)

    def _function(self, name: str):
        if name not in self._funcs:
            if name not in self.kernels:
                raise GpusmdError(f"{self.source_path.name}: no kernel {name!r} "
                                  f"(kernels: {', '.join(self.kernels)})")
            fn = getattr(self._lib, f"host_launch_{name}")
            fn.restype = None
            fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_size_t] + [p.ctype for p in self.kernels[name]]
            self._funcs[name] = fn
        return self._funcs[name]

    def _convert(self, function: str, param: KernelParam, value):
        where = f"{self.source_path.name}:{function}({param.name})"
        if param.pointer:
            if value is None:
                return None
            if not isinstance(value, np.ndarray):
                raise GpusmdError(f"{where}: pointer parameter needs a NumPy array, "
                                  f"got {type(value).__name__}")
            if not value.flags.c_contiguous:
                raise GpusmdError(f"{where}: array must be C-contiguous")
            want = _POINTEES.get(param.base)
            if want is not None:
                kind = "f" if value.dtype.kind == "f" else ("i" if value.dtype.kind in "iub" else "?")
                if (kind, value.dtype.itemsize) != want:
                    raise GpusmdError(f"{where}: {param.base}* does not take a {value.dtype} array")
            return value.ctypes.data
        if isinstance(value, np.ndarray) and value.ndim > 0:
            raise GpusmdError(f"{where}: scalar parameter given an array")
        ctype = param.ctype
        if ctype in (ctypes.c_float, ctypes.c_double):
            return float(value)
        if ctype is ctypes.c_char:
            return bytes([int(value) & 0xFF])
        if ctype is ctypes.c_bool:
            return bool(value)
        if isinstance(value, (float, np.floating)) and value != int(value):
            raise GpusmdError(f"{where}: integer parameter given {value!r}")
        ivalue = int(value)
        bits = 8 * ctypes.sizeof(ctype)
        signed = ctype(-1).value == -1
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if not lo <= ivalue <= hi:
            raise GpusmdError(f"{where}: {ivalue} does not fit {param.base}")
        return ivalue

    def launch(self, function: str, grid, block, *args, shared_mem: int = 0):
        """Run ``function`` over grid x block (ints or 1-3 tuples) on the CPU. Arrays go
        to pointer parameters (C-contiguous, checked against the element type), Python
        numbers to scalar parameters (converted to the declared type)."""
        fn = self._function(function)
        params = self.kernels[function]
        if len(args) != len(params):
            raise GpusmdError(f"{self.source_path.name}:{function} takes {len(params)} "
                              f"arguments, got {len(args)}")
        g, b = _dims(grid, "grid"), _dims(block, "block")
        if b[0] * b[1] * b[2] > 1024:
            raise GpusmdError(f"host launch: {b[0] * b[1] * b[2]} threads per block > 1024")
        if max(g[1], g[2]) > 65535:                  # CUDA's gridDim.y / gridDim.z limit
            raise GpusmdError(f"host launch: grid {g} beyond 65535 in y or z")
        converted = [self._convert(function, p, a) for p, a in zip(params, args)]
        fn(*g, *b, int(shared_mem), *converted)
        error = self._lib.gpusmd_host_last_error()
        if error:
            raise GpusmdError(f"{self.source_path.name}:{function}: host launch failed: "
                              f"{error.decode(errors='replace')}")


_host_modules: dict[tuple, HostModule] = {}
_host_lock = threading.Lock()


def host_module(name: str | os.PathLike, threaded: bool | None = None) -> HostModule:
    """Build kernels/<name>.cu (or the .cu file at a path) for the host and load it.

    The shared library is cached in $GPUSMD_CACHE (default ~/.cache/gpusmd)/host, keyed
    by a hash of the generated source, the headers, the compiler and its flags.
    ``threaded`` forces (True) or forbids (False) running a block's threads as
    std::threads; by default they are when the source or its local headers use
    __syncthreads / __syncwarp / warp shuffles or votes."""
    path = _source_path(name)
    kdir = kernel_dir()
    include_dirs = list(dict.fromkeys([path.parent, kdir]))
    source = path.read_text()
    if threaded is None:
        threaded = bool(_SYNC_RE.search(_local_includes(path, include_dirs, set())))
    kernels = parse_kernels(source)
    if not kernels:
        raise GpusmdError(f"{path}: no extern \"C\" __global__ kernels found")
    cxx, version = _compiler()
    unit = _launcher_source(path, source, kernels, threaded)
    flags = [*HOST_CXXFLAGS, *(f"-I{d}" for d in include_dirs)]
    digest = hashlib.sha256("\0".join([unit, _headers_digest(*include_dirs), cxx, version,
                                       *flags]).encode()).hexdigest()[:24]
    key = (str(path), digest)
    with _host_lock:
        if key in _host_modules:
            return _host_modules[key]
        cache = _cache_dir()
        library = cache / f"{path.stem}-{digest}.so"
        if not library.exists():
            _build(cxx, flags, unit, path, library, cache)
        module = HostModule(path, library, kernels, threaded)
        _host_modules[key] = module
        return module


def _build(cxx: str, flags: list[str], unit: str, path: Path, library: Path, cache: Path):
    """Compile in a private temporary folder, then move the library into place
    atomically (parallel test processes may build the same one)."""
    work = Path(tempfile.mkdtemp(prefix=f"{path.stem}-", dir=cache))
    try:
        cpp = work / f"{path.stem}_host.cpp"
        cpp.write_text(unit)
        tmp_lib = work / library.name
        proc = subprocess.run([cxx, *flags, "-o", str(tmp_lib), str(cpp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            log = proc.stderr.strip()
            if len(log) > 8000:
                log = log[:8000] + "\n..."
            raise GpusmdError(f"{path}: host build with {Path(cxx).name} failed:\n{log}")
        os.replace(tmp_lib, library)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- common mode per group (kernels/common_mode.cu) -------------------------------------------
CM_SORT_MAX = 1024       # kernels/common_mode.cu: groups up to this size are sorted in shared memory
CM_MAX_SIZE = 1 << 24    # kernels/common_mode.cu: largest group
CM_BLOCK = 256           # threads per block for large groups (radix select) ...
CM_BLOCK_HUGE = 1024     # ... and for groups over CM_HUGE pixels (whole frames): the
                         # kernel's __launch_bounds__ (CM_BLOCK_MAX)
CM_HUGE = 65536
CM_MAX_GRID_Y = 65535    # events per launch (gridDim.y)
CM_HOST_BLOCK = 64       # host build: fewer std::threads per block (results do not depend on it)
_CM_STATS = {"median": 0, "mean": 1}
_CM_APPLY = {"good": 0, "all": 1}
_cm_checked: dict = {}   # id(groups.starts) -> (starts, npix bound it was checked for)
_cm_device_starts: dict = {}


def _event_chunks(nbatch: int):
    """The events of a batch by launches: (slice, count), at most CM_MAX_GRID_Y events each
    (gridDim.y)."""
    for b0 in range(0, nbatch, CM_MAX_GRID_Y):
        b1 = min(nbatch, b0 + CM_MAX_GRID_Y)
        yield slice(b0, b1), b1 - b0


def _cm_block(size: int) -> int:
    """Threads per block for a group size: half the padded sort for small groups (one
    compare-exchange per thread and step), at least a warp; CM_BLOCK for radix-select
    groups, CM_BLOCK_HUGE for whole frames (one block per group and event)."""
    if size > CM_HUGE:
        return CM_BLOCK_HUGE
    if size > CM_SORT_MAX:
        return CM_BLOCK
    n = 1 << max(0, int(size) - 1).bit_length()
    return max(32, min(CM_BLOCK, n // 2))


def _cm_starts_host(groups) -> np.ndarray:
    starts = groups.starts
    if not isinstance(starts, np.ndarray) and hasattr(starts, "get"):
        starts = starts.get()
    return np.ascontiguousarray(np.asarray(starts), dtype=np.int64)


def _cm_check_groups(groups, npix: int) -> tuple[int, int, int, int, int, int]:
    """(ngroups, size, n_outer, outer_stride, n_inner, inner_stride) after checking that
    every pixel of every group lies in [0, npix) (once per groups and npix)."""
    n_outer, n_inner = int(groups.n_outer), int(groups.n_inner)
    outer, inner = int(groups.outer_stride), int(groups.inner_stride)
    size = n_outer * n_inner
    if n_outer < 1 or n_inner < 1:
        raise GpusmdError(f"group_correct: empty groups ({n_outer} x {n_inner})")
    if size > CM_MAX_SIZE:
        raise GpusmdError(f"group_correct: groups of {size} pixels, the kernel takes at most "
                          f"{CM_MAX_SIZE}")
    starts = groups.starts
    ngroups = len(starts)
    if n_outer >= 1 << 31 or n_inner >= 1 << 31 or ngroups >= 1 << 31:
        raise GpusmdError("group_correct: group counts must fit 32 bits")
    key = id(starts)
    seen = _cm_checked.get(key)
    if seen is None or seen[0] is not starts or seen[1] != npix:
        host = _cm_starts_host(groups)
        if ngroups:
            lo = min(0, (n_outer - 1) * outer) + min(0, (n_inner - 1) * inner)
            hi = max(0, (n_outer - 1) * outer) + max(0, (n_inner - 1) * inner)
            if int(host.min()) + lo < 0 or int(host.max()) + hi >= npix:
                raise GpusmdError(f"group_correct: groups {groups.name!r} reach pixels outside "
                                  f"[0, {npix})")
        if len(_cm_checked) > 64:
            _cm_checked.clear()
        _cm_checked[key] = (starts, npix)
    return ngroups, size, n_outer, outer, n_inner, inner


def _cm_args(xp, adu, good, groups, rule):
    """Checked kernel arguments (arrays, then the scalars after ``starts``)."""
    if not isinstance(adu, xp.ndarray) or adu.ndim != 2 or adu.dtype != np.float32:
        raise GpusmdError("group_correct: adu must be a (B, npix) float32 array, got "
                          f"{getattr(adu, 'dtype', type(adu).__name__)} "
                          f"{getattr(adu, 'shape', '')}")
    if not adu.flags.c_contiguous:
        raise GpusmdError("group_correct: adu must be C-contiguous (it is corrected in place)")
    good = xp.asarray(good)
    if good.shape != adu.shape:
        raise GpusmdError(f"group_correct: good {good.shape} does not match adu {adu.shape}")
    if good.dtype == np.bool_:
        good = xp.ascontiguousarray(good).view(xp.uint8)
    elif good.dtype == np.uint8:
        good = xp.ascontiguousarray(good)
    else:
        raise GpusmdError(f"group_correct: good must be bool or uint8, got {good.dtype}")
    npix = int(adu.shape[1])
    ngroups, size, n_outer, outer, n_inner, inner = _cm_check_groups(groups, npix)
    stat, *rest = _cm_rule_scalars(rule, size)
    scalars = (n_outer, outer, n_inner, inner, npix, ngroups, stat, *rest)
    return good, ngroups, size, scalars


def _cm_rule_scalars(rule, size: int) -> tuple:
    """(stat, lo, hi, min_count, min_fraction, max_abs, inclusive, apply_all) of a Rule,
    checked, for groups of ``size`` pixels."""
    if rule.stat not in _CM_STATS:
        raise GpusmdError(f"group_correct: unknown statistic {rule.stat!r} (median, mean)")
    if rule.apply_to not in _CM_APPLY:
        raise GpusmdError(f"group_correct: unknown apply_to {rule.apply_to!r} (good, all)")
    min_count = max(1, min(int(rule.min_count), size + 1))
    return (_CM_STATS[rule.stat], float(rule.lo), float(rule.hi), min_count,
            float(rule.min_fraction), float(rule.max_abs), int(bool(rule.inclusive)),
            _CM_APPLY[rule.apply_to])


def _cm_starts_device(cupy, groups):
    key = (id(groups.starts), cupy.cuda.Device().id)
    hit = _cm_device_starts.get(key)
    if hit is None or hit[0] is not groups.starts:
        if len(_cm_device_starts) > 64:
            _cm_device_starts.clear()
        hit = (groups.starts, cupy.asarray(_cm_starts_host(groups)))
        _cm_device_starts[key] = hit
    return hit[1]


def group_correct_gpu(adu, good, groups, rule, block: int | None = None):
    """The common-mode kernel on the current CuPy device, same contract as
    :func:`gpusmd.calib.common_mode.group_correct`: corrects adu (B, npix) float32 in
    place, group by group (groups must not overlap); good (B, npix) bool or uint8.
    Returns (cm (B, ngroups) float32, 0 where skipped; applied (B, ngroups) bool)."""
    cupy = _cupy()
    good, ngroups, size, scalars = _cm_args(cupy, adu, good, groups, rule)
    nbatch = adu.shape[0]
    cm = cupy.zeros((nbatch, ngroups), dtype=cupy.float32)
    applied = cupy.zeros((nbatch, ngroups), dtype=cupy.uint8)
    if nbatch == 0 or ngroups == 0:
        return cm, applied.view(cupy.bool_)
    starts = _cm_starts_device(cupy, groups)
    (n_outer, outer, n_inner, inner, npix, _, stat, lo, hi, min_count, min_fraction, max_abs,
     inclusive, apply_all) = scalars
    kernel = get_function("common_mode", "group_correct")
    threads = int(block or _cm_block(size))
    for b, count in _event_chunks(nbatch):
        kernel((ngroups, count), (threads,),
               (adu[b], good[b], starts, np.int32(n_outer), np.int64(outer),
                np.int32(n_inner), np.int64(inner), np.int64(npix), np.int32(ngroups),
                np.int32(stat), np.float32(lo), np.float32(hi), np.int32(min_count),
                np.float64(min_fraction), np.float32(max_abs), np.int32(inclusive),
                np.int32(apply_all), cm[b], applied[b]))
    return cm, applied.view(cupy.bool_)


def group_correct_host(adu, good, groups, rule, block: int | None = None):
    """The same common-mode kernel run on the CPU through the host build (tests); NumPy
    arrays, same contract and results as :func:`group_correct_gpu`."""
    good, ngroups, size, scalars = _cm_args(np, adu, good, groups, rule)
    nbatch = adu.shape[0]
    cm = np.zeros((nbatch, ngroups), dtype=np.float32)
    applied = np.zeros((nbatch, ngroups), dtype=np.uint8)
    if nbatch and ngroups:
        starts = _cm_starts_host(groups)
        threads = int(block or min(CM_HOST_BLOCK, _cm_block(size)))
        host_module("common_mode").launch("group_correct", (ngroups, nbatch), threads,
                                          adu, good, starts,
                                          *scalars, cm, applied)
    return cm, applied.view(np.bool_)


# ---- calibration fused with the common mode (kernels/calibrate_cm.cu) ------------------------
CM_SEGMENT_MAX = 256     # kernels/calibrate_cm.cu: longest row segment


def _median_rule_scalars(rule, size: int, kernel: str) -> tuple:
    """_cm_rule_scalars without the statistic, for the fused passes (median only)."""
    stat, *scalars = _cm_rule_scalars(rule, size)
    if stat != _CM_STATS["median"]:
        raise GpusmdError(f"{kernel}: the fused pass takes the median only")
    return tuple(scalars)


def _segment_block(seg_len: int) -> int:
    """Threads per (segment, event) block: one compare-exchange each per sort step."""
    n = 1 << max(0, int(seg_len) - 1).bit_length()
    return max(32, min(CM_BLOCK, n // 2))


def _rows_args(xp, raw_flat, control_bits, lut, family: int, seg_len: int, rule):
    raw, cb, lut, nbatch, npix, signed_raw, family = _calibrate_args(
        xp, raw_flat, control_bits, lut, family)
    seg_len = int(seg_len)
    if not 1 <= seg_len <= CM_SEGMENT_MAX or npix % seg_len:
        raise GpusmdError(f"calibrate_rows: segments of {seg_len} pixels do not tile a frame of "
                          f"{npix} (at most {CM_SEGMENT_MAX} pixels each)")
    scalars = _median_rule_scalars(rule, seg_len, "calibrate_rows")
    return raw, cb, lut, nbatch, npix, signed_raw, family, npix // seg_len, scalars


def calibrate_rows(raw_flat, control_bits, lut, family: int, seg_len: int, vote_ranges: int,
                   rule, correct: bool, finish: bool, host: bool = False, vote_mask=None):
    """Decode + pedestal (+ the median of each run of ``seg_len`` pixels, with ``correct``)
    (+ mask / gain, with ``finish``) in one pass over the raw frames (B, npix), on the
    current CuPy device or (``host``) through the host build. vote_mask (npix,): the
    unmasked pixels, which vote whatever their gain (None: the pixels whose mask / gain
    is not 0). Returns (out (B, npix) float32, calibrated with finish else ADU; good
    (B, npix) bool voting flags, None with finish; cm (B, nseg) float32; applied (B, nseg)
    bool)."""
    xp = np if host else _cupy()
    raw, cb, lut, nbatch, npix, signed_raw, family, nseg, scalars = _rows_args(
        xp, raw_flat, control_bits, lut, family, seg_len, rule)
    use_vote_mask = vote_mask is not None
    if use_vote_mask:
        vote_mask = xp.ascontiguousarray(xp.asarray(vote_mask).reshape(-1) != 0).view(xp.uint8)
        if vote_mask.size != npix:
            raise GpusmdError(f"calibrate_rows: vote_mask of {vote_mask.size} pixels, frames "
                              f"of {npix}")
    else:
        vote_mask = xp.zeros(1, xp.uint8)
    out = xp.empty((nbatch, npix), dtype=xp.float32)
    good = xp.empty((nbatch, npix) if not finish else (1,), dtype=xp.uint8)
    cm = xp.zeros((nbatch, nseg), dtype=xp.float32)
    applied = xp.zeros((nbatch, nseg), dtype=xp.uint8)
    lo, hi, min_count, min_fraction, max_abs, inclusive, apply_all = scalars
    if nbatch:
        threads = _segment_block(seg_len)
        if host:
            host_module("calibrate_cm").launch(
                "calibrate_rows", (nseg, nbatch), min(CM_HOST_BLOCK, threads), raw, cb, lut,
                npix, int(seg_len), nseg, family, signed_raw, int(vote_ranges), vote_mask,
                int(use_vote_mask), int(correct),
                *scalars, int(finish), out, good, cm, applied)
        else:
            kernel = get_function("calibrate_cm", "calibrate_rows")
            for b, count in _event_chunks(nbatch):
                kernel((nseg, count), (threads,),
                       (raw[b], cb, lut, np.int64(npix), np.int32(seg_len), np.int32(nseg),
                        np.int32(family), np.int32(signed_raw), np.int32(vote_ranges),
                        vote_mask, np.int32(use_vote_mask), np.int32(bool(correct)), np.float32(lo), np.float32(hi),
                        np.int32(min_count), np.float64(min_fraction), np.float32(max_abs),
                        np.int32(inclusive), np.int32(apply_all), np.int32(bool(finish)),
                        out[b], good if finish else good[b], cm[b], applied[b]))
    return (out, None if finish else good.view(xp.bool_), cm, applied.view(xp.bool_))


CM_TILE = 16             # kernels/calibrate_cm.cu: adjacent columns per columns_gain block
CM_COLUMN_MAX = 512      # kernels/calibrate_cm.cu: longest half-panel column
COLUMNS_BLOCK = 256


def columns_fit(seg_shape) -> bool:
    """Whether columns_gain takes a detector of this (nseg, rows, cols) shape."""
    _, rows, cols = seg_shape
    return rows % 2 == 0 and 1 <= rows // 2 <= CM_COLUMN_MAX and cols % CM_TILE == 0


def columns_gain(adu, good, raw_flat, control_bits, lut, family: int, seg_shape, rule,
                 host: bool = False):
    """The half-panel column pass of mode 7 fused with the gain (kernels/calibrate_cm.cu):
    adu (B, npix) float32 ADU -> calibrated, in place; good (B, npix) voting flags. Same
    contract as group_correct over half_columns followed by apply_gain; returns (cm, applied)
    (B, nseg * 2 * cols)."""
    xp = np if host else _cupy()
    raw, cb, lut, nbatch, npix, _, family = _calibrate_args(xp, raw_flat, control_bits, lut,
                                                           family)
    nseg, rows, cols = (int(v) for v in seg_shape)
    if not columns_fit(seg_shape) or nseg * rows * cols != npix:
        raise GpusmdError(f"columns_gain: segments {tuple(seg_shape)} do not fit {npix} pixels "
                          f"(even rows, half columns of at most {CM_COLUMN_MAX}, columns a "
                          f"multiple of {CM_TILE})")
    if adu.shape != raw.shape or adu.dtype != np.float32 or not adu.flags.c_contiguous:
        raise GpusmdError(f"columns_gain: adu must be C-contiguous float32 {raw.shape}")
    good = xp.ascontiguousarray(good).view(xp.uint8)
    if good.shape != raw.shape:
        raise GpusmdError(f"columns_gain: good {good.shape} does not match {raw.shape}")
    scalars = _median_rule_scalars(rule, rows // 2, "columns_gain")
    ngroups = nseg * 2 * cols
    cm = xp.zeros((nbatch, ngroups), dtype=xp.float32)
    applied = xp.zeros((nbatch, ngroups), dtype=xp.uint8)
    tiles = nseg * 2 * (cols // CM_TILE)
    if nbatch:
        args = (nseg, rows, cols, family, *scalars)
        if host:
            host_module("calibrate_cm").launch("columns_gain", (tiles, nbatch),
                                               min(CM_HOST_BLOCK, COLUMNS_BLOCK), adu, good,
                                               raw, cb, lut, *args, cm, applied)
        else:
            lo, hi, min_count, min_fraction, max_abs, inclusive, apply_all = scalars
            kernel = get_function("calibrate_cm", "columns_gain")
            for b, count in _event_chunks(nbatch):
                kernel((tiles, count), (COLUMNS_BLOCK,),
                       (adu[b], good[b], raw[b], cb, lut, np.int32(nseg),
                        np.int32(rows), np.int32(cols), np.int32(family), np.float32(lo),
                        np.float32(hi), np.int32(min_count), np.float64(min_fraction),
                        np.float32(max_abs), np.int32(inclusive), np.int32(apply_all),
                        cm[b], applied[b]))
    return cm, applied.view(xp.bool_)


def apply_gain(raw_flat, control_bits, lut, family: int, data, host: bool = False):
    """data (B, npix) float32 ADU *= mask / gain of each pixel's gain range (decoded from
    the raw frames again), in place, on the device or (``host``) through the host build."""
    xp = np if host else _cupy()
    raw, cb, lut, nbatch, npix, _, family = _calibrate_args(xp, raw_flat, control_bits, lut,
                                                           family)
    if data.shape != raw.shape or data.dtype != np.float32 or not data.flags.c_contiguous:
        raise GpusmdError(f"apply_gain: data must be C-contiguous float32 {raw.shape}")
    n = nbatch * npix
    if n == 0:
        return data
    if host:
        host_module("calibrate_cm").launch("apply_gain", -(-n // CALIBRATE_BLOCK),
                                           CALIBRATE_BLOCK, raw, cb, lut, data, npix, n, family)
    else:
        blocks = min(-(-n // CALIBRATE_BLOCK), 32 * _sm_count(xp.cuda.Device().id))
        get_function("calibrate_cm", "apply_gain")(
            (blocks,), (CALIBRATE_BLOCK,),
            (raw, cb, lut, data, np.int64(npix), np.int64(n), np.int32(family)))
    return data


# ---- per-run sum images (kernels/run_sums.cu) --------------------------------------------------
RUN_SUMS_MAX = 8         # kernels/run_sums.cu: sums added per launch
RUN_SUMS_BLOCK = 256


def run_sums(calib, sum_keys, acc, host: bool = False):
    """Add a batch (B, *shape) of calibrated frames to the accumulators ``acc``
    (gpusmd.features.sums.Accumulators, on the backend) in one read of the batch per
    RUN_SUMS_MAX sums, on the current CuPy device or (``host``) through the host build."""
    from .features.sums import sum_kind
    xp = np if host else _cupy()
    flat = xp.ascontiguousarray(calib, dtype=xp.float32).reshape(len(calib), -1)
    nbatch, npix = flat.shape
    sums = acc.stack.reshape(len(sum_keys), npix)
    maxima = acc.maxima.reshape(npix) if acc.maxima is not None else xp.zeros(1, xp.float32)
    has_max = int(acc.maxima is not None)
    if npix == 0 or not (sum_keys or has_max):
        return
    kinds = [sum_kind(key) for key in sum_keys] or [(0, 0.0)]
    for k0 in range(0, max(1, len(sum_keys)), RUN_SUMS_MAX):
        chunk = kinds[k0:k0 + RUN_SUMS_MAX]
        nsums = min(len(sum_keys) - k0, RUN_SUMS_MAX)   # 0: only the maxima
        kind = xp.asarray([c[0] for c in chunk], dtype=xp.int32)
        thr = xp.asarray([c[1] for c in chunk], dtype=xp.float32)
        rows = sums[k0:k0 + nsums] if nsums else xp.zeros((1, npix), xp.float64)
        first_max = has_max if k0 == 0 else 0
        blocks = -(-npix // RUN_SUMS_BLOCK)
        if host:
            host_module("run_sums").launch("run_sums", blocks, RUN_SUMS_BLOCK, flat, nbatch,
                                           npix, nsums, kind, thr, rows, first_max, maxima)
        else:
            blocks = min(blocks, 32 * _sm_count(xp.cuda.Device().id))
            get_function("run_sums", "run_sums")(
                (blocks,), (RUN_SUMS_BLOCK,),
                (flat, np.int64(nbatch), np.int64(npix), np.int32(nsums), kind, thr, rows,
                 np.int32(first_max), maxima))


# ---- projection (kernels/projection.cu) ---------------------------------------------------
PROJECT_BLOCK = 256
PJ_LO, PJ_HI, PJ_SINGLE, PJ_MEAN, PJ_MASK = 1, 2, 4, 8, 16


def _project_args(xp, data, axis: int, mask, inv_count, lo, hi, single_photon, mean):
    """(data, mask, inv_count, out shape, (nbatch, outer, len, inner), lo, hi, flags)."""
    data = xp.ascontiguousarray(xp.asarray(data, dtype=xp.float32))
    if data.ndim < 2:
        raise GpusmdError(f"project: data must be (B, ...), got shape {data.shape}")
    shape = data.shape[1:]
    if not 0 <= axis < len(shape):
        raise GpusmdError(f"project: axis {axis} is not an axis of {shape}")
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    out_shape = (data.shape[0], *shape[:axis], *shape[axis + 1:])
    has_mask = mask is not None
    if has_mask:
        mask = xp.ascontiguousarray(xp.asarray(mask, dtype=xp.float32))
        if mask.shape != shape:
            raise GpusmdError(f"project: mask shape {mask.shape} is not the input's {shape}")
    else:
        mask = xp.zeros(1, xp.float32)          # not read: no PJ_MASK flag
    if mean:
        inv_count = xp.ascontiguousarray(xp.asarray(inv_count, dtype=xp.float64))
        if inv_count.size != outer * inner:
            raise GpusmdError(f"project: inv_count has {inv_count.size} elements, "
                              f"the output {outer * inner}")
    else:
        inv_count = xp.zeros(1, xp.float64)
    flags = ((PJ_LO if lo is not None else 0) | (PJ_HI if hi is not None else 0)
             | (PJ_SINGLE if single_photon else 0) | (PJ_MEAN if mean else 0)
             | (PJ_MASK if has_mask else 0))
    lo = 0.0 if lo is None else float(lo)
    hi = 0.0 if hi is None else float(hi)
    dims = (data.shape[0], outer, shape[axis], inner)
    return data, mask, inv_count, out_shape, dims, lo, hi, flags


def project_gpu(data, axis: int, mask=None, inv_count=None, lo=None, hi=None,
                single_photon=False, mean=False):
    """The projection kernel on the current CuPy device: data (B, *shape) float32 summed
    (mean: times inv_count, (shape without axis) float64) over ``axis`` of one event's
    shape, after thresholds / single photon / mask (shape float32 or None). Returns
    (B, *shape without axis) float32."""
    cupy = _cupy()
    data, mask, inv_count, out_shape, dims, lo, hi, flags = _project_args(
        cupy, data, axis, mask, inv_count, lo, hi, single_photon, mean)
    out = cupy.empty(out_shape, dtype=cupy.float32)
    n = dims[0] * dims[1] * dims[3]
    if n:
        blocks = min(-(-n // PROJECT_BLOCK), 32 * _sm_count(cupy.cuda.Device().id))
        get_function("projection", "project")(
            (blocks,), (PROJECT_BLOCK,),
            (data, mask, inv_count, out, *(np.int64(d) for d in dims),
             np.float32(lo), np.float32(hi), np.int32(flags)))
    return out


def project_host(data, axis: int, mask=None, inv_count=None, lo=None, hi=None,
                 single_photon=False, mean=False, blocks: int | None = None):
    """The same projection kernel run on the CPU through the host build (tests)."""
    data, mask, inv_count, out_shape, dims, lo, hi, flags = _project_args(
        np, data, axis, mask, inv_count, lo, hi, single_photon, mean)
    out = np.empty(out_shape, dtype=np.float32)
    n = dims[0] * dims[1] * dims[3]
    if n:
        blocks = blocks or -(-n // PROJECT_BLOCK)
        host_module("projection").launch("project", blocks, PROJECT_BLOCK, data, mask,
                                         inv_count, out, *dims, lo, hi, flags)
    return out


# ---- weighted histogram (kernels/histogram.cu) ----------------------------------------------
HIST_BLOCK = 256
HIST_LO, HIST_HI = 1, 2
HIST_LANES = 32                    # slices interleaved over a chunk of a bin's entries ...
HIST_SLICE = 32                    # ... each of up to this many entries
HIST_MAX_GRID_Y = 65535            # events per launch


@dataclass(frozen=True)
class HistPlan:
    """The fixed summation order of a per-event weighted histogram (kernels/histogram.cu):
    the counted pixels sorted by bin (pixels ascending within a bin), each bin's entries
    cut into chunks of lanes x slice_len, a chunk into ``lanes`` interleaved slices
    (entries start, start + lanes, ... below stop). Arrays on the host (NumPy);
    :meth:`to` copies the kernels' to another array module."""
    npix: int
    nbins: int
    lanes: int
    perm: object            # (nent,) int32: pixel of each entry
    wsorted: object         # (nent,) float32: its weight
    slice_start: object     # (nslices,) int32: first entry of each slice
    slice_stop: object      # (nslices,) int32: end of its chunk
    bin_slices: object      # (nbins + 1,) int32: first slice of each bin
    weight: object          # (npix,) float32, 0 where not counted
    slice_of_pixel: object  # (npix,) int64, nslices where not counted
    bin_of_slice: object    # (nslices,) int64

    @property
    def nslices(self) -> int:
        return len(self.bin_of_slice)

    def to(self, xp) -> "HistPlan":
        """The plan for the kernels with their arrays in module ``xp`` (8 bytes per counted
        pixel; the NumPy path's per-pixel arrays are left out)."""
        return HistPlan(self.npix, self.nbins, self.lanes, *(xp.asarray(a) for a in (
            self.perm, self.wsorted, self.slice_start, self.slice_stop, self.bin_slices)),
            None, None, self.bin_of_slice)


def hist_plan(bins, weight, nbins: int, slice_len: int = HIST_SLICE,
              lanes: int = HIST_LANES) -> HistPlan:
    """The plan for bins (*shape) int (-1 or >= nbins: not counted) and weight (*shape)."""
    bins = np.asarray(bins).ravel().astype(np.int64)
    weight = np.asarray(weight, dtype=np.float32).ravel()
    if bins.size != weight.size:
        raise GpusmdError(f"histogram: bins ({bins.size}) and weight ({weight.size}) must have "
                          f"one value per pixel")
    nbins = int(nbins)
    counted = np.flatnonzero((bins >= 0) & (bins < nbins))
    perm = counted[np.argsort(bins[counted], kind="stable")]
    size = lanes * slice_len
    if len(perm) > 2 ** 31 - 1 - size:          # int32 entry indices in the kernel
        raise GpusmdError(f"histogram: {len(perm)} pixels are too many")
    per_bin = np.bincount(bins[perm], minlength=nbins)
    first_entry = np.concatenate([[0], np.cumsum(per_bin)])
    chunks_per_bin = -(-per_bin // size)
    chunk_bin = np.repeat(np.arange(nbins), chunks_per_bin)
    chunk_rank = np.arange(len(chunk_bin)) - np.repeat(np.cumsum(chunks_per_bin) - chunks_per_bin,
                                                       chunks_per_bin)
    chunk_base = first_entry[chunk_bin] + chunk_rank * size
    chunk_end = np.minimum(chunk_base + size, first_entry[chunk_bin + 1])
    slice_start = (chunk_base[:, None] + np.arange(lanes)[None, :]).ravel()
    chunk_of_entry = np.repeat(np.arange(len(chunk_bin)), chunk_end - chunk_base)
    slice_of_pixel = np.full(bins.size, len(chunk_bin) * lanes, np.int64)
    slice_of_pixel[perm] = (chunk_of_entry * lanes
                            + (np.arange(len(perm)) - chunk_base[chunk_of_entry]) % lanes)
    counted_weight = np.zeros_like(weight)
    counted_weight[perm] = weight[perm]
    return HistPlan(int(bins.size), nbins, int(lanes), perm.astype(np.int32), weight[perm],
                    slice_start.astype(np.int32), np.repeat(chunk_end, lanes).astype(np.int32),
                    np.concatenate([[0], np.cumsum(chunks_per_bin * lanes)]).astype(np.int32),
                    counted_weight, slice_of_pixel, np.repeat(chunk_bin, lanes).astype(np.int64))


def histogram_numpy(data, plan: HistPlan, lo=None, hi=None):
    """The kernels' sums with NumPy, bit for bit: the same float32 products added in the
    same order (np.bincount adds one after another, so in pixel order, which is each
    slice's entry order)."""
    data = np.asarray(data, dtype=np.float32).reshape(len(data), -1)
    if lo is not None:
        data = np.where(data < lo, np.float32(0), data)
    if hi is not None:
        data = np.where(data > hi, np.float32(0), data)
    out = np.empty((data.shape[0], plan.nbins))
    for b, values in enumerate(data * plan.weight[None, :]):
        partial = np.bincount(plan.slice_of_pixel, weights=values, minlength=plan.nslices + 1)
        out[b] = np.bincount(plan.bin_of_slice, weights=partial[:plan.nslices],
                             minlength=plan.nbins)
    return out


def _hist_args(xp, data, plan: HistPlan, lo, hi):
    """(data (B, npix) f32, plan arrays in xp, npix, lo, hi, flags)."""
    data = xp.asarray(data, dtype=xp.float32)
    data = xp.ascontiguousarray(data.reshape(data.shape[0], -1))
    if data.shape[1] != plan.npix:
        raise GpusmdError(f"histogram: frames of {data.shape[1]} pixels, the plan's "
                          f"have {plan.npix}")
    if data.shape[0] > HIST_MAX_GRID_Y:
        raise GpusmdError(f"histogram: {data.shape[0]} events > {HIST_MAX_GRID_Y} per launch")
    arrays = [xp.ascontiguousarray(xp.asarray(getattr(plan, k))) for k in
              ("perm", "wsorted", "slice_start", "slice_stop", "bin_slices")]
    flags = (HIST_LO if lo is not None else 0) | (HIST_HI if hi is not None else 0)
    lo = 0.0 if lo is None else float(lo)
    hi = 0.0 if hi is None else float(hi)
    return data, arrays, plan.npix, lo, hi, flags


def histogram_gpu(data, plan: HistPlan, lo=None, hi=None):
    """Per-event weighted histogram on the current CuPy device: data (B, *shape) float32;
    values below lo / above hi count as 0. Returns (B, nbins) float64 sums of value *
    weight per bin, equal bit for bit to :func:`histogram_numpy` (pass a plan already
    on the device, ``plan.to(cupy)``, to skip the copies)."""
    cupy = _cupy()
    data, (perm, wsorted, start, stop, bin_slices), npix, lo, hi, flags = _hist_args(
        cupy, data, plan, lo, hi)
    batch, nslices, nbins = data.shape[0], plan.nslices, plan.nbins
    out = cupy.zeros((batch, nbins), dtype=cupy.float64)
    if batch and nslices:
        partial = cupy.empty((batch, nslices), dtype=cupy.float64)
        per_event = max(1, (32 * _sm_count(cupy.cuda.Device().id)) // batch)
        get_function("histogram", "hist_slices")(
            (min(-(-nslices // HIST_BLOCK), per_event), batch), (HIST_BLOCK,),
            (data, perm, wsorted, start, stop, partial, np.int64(npix), np.int32(nslices),
             np.int32(plan.lanes), np.float32(lo), np.float32(hi), np.int32(flags)))
        get_function("histogram", "hist_bins")(
            (min(-(-nbins // HIST_BLOCK), per_event), batch), (HIST_BLOCK,),
            (partial, bin_slices, out, np.int32(nslices), np.int32(nbins)))
    return out


def histogram_host(data, plan: HistPlan, lo=None, hi=None, blocks: int = 4, block: int = 64):
    """The same kernels run on the CPU through the host build (tests); any ``blocks`` and
    ``block`` give the same result."""
    data, (perm, wsorted, start, stop, bin_slices), npix, lo, hi, flags = _hist_args(
        np, data, plan, lo, hi)
    batch, nslices, nbins = data.shape[0], plan.nslices, plan.nbins
    out = np.zeros((batch, nbins), dtype=np.float64)
    if batch and nslices:
        partial = np.empty((batch, nslices), dtype=np.float64)
        module = host_module("histogram")
        module.launch("hist_slices", (blocks, batch), block, data, perm, wsorted, start, stop,
                      partial, npix, nslices, plan.lanes, lo, hi, flags)
        module.launch("hist_bins", (blocks, batch), block, partial, bin_slices, out, nslices,
                      nbins)
    return out


# ---- CsPad common mode, modes 1 and 5 (kernels/cm_cspad.cu) --------------------------------
CSPAD_SEG_SHAPE = (185, 388)  # kernels/cm_cspad.cu reads the unbonded pixels of a 2x1
CSPAD_BLOCK = 256             # threads per (segment, event) block, mode 1
CSPAD_HOST_BLOCK = 64         # host build: fewer std::threads (results do not depend on it)
CSPAD_MODE5_BLOCK = 32        # mode 5: one thread per segment
CSPAD_MAX_SLOTS = 2048        # kernels/cm_cspad.cu: leaves of the pairwise tree
CSPAD_INT_MAX = 2 ** 31 - 1


@functools.lru_cache(maxsize=None)
def pairwise_depth(n: int) -> int:
    """Depth of NumPy's pairwise-summation tree of n elements (leaves of <= 128)."""
    if n <= 128:
        return 0
    n2 = n // 2
    n2 -= n2 % 8
    return 1 + max(pairwise_depth(n2), pairwise_depth(n - n2))


def _cspad_args(xp, adu, good, nseg: int, mode: int):
    """Checked arguments: (adu contiguous float32 (B, npix), good uint8 or None, good
    event stride, segpix, depth)."""
    if mode not in (1, 5):
        raise GpusmdError(f"cspad common mode: mode must be 1 or 5, got {mode}")
    if not isinstance(adu, xp.ndarray) or adu.ndim != 2 or adu.dtype != np.float32:
        raise GpusmdError("cspad common mode: adu must be a (B, npix) float32 array, got "
                          f"{getattr(adu, 'dtype', type(adu).__name__)} "
                          f"{getattr(adu, 'shape', '')}")
    nseg = int(nseg)
    segpix = CSPAD_SEG_SHAPE[0] * CSPAD_SEG_SHAPE[1]
    if nseg < 1 or adu.shape[1] != nseg * segpix:
        raise GpusmdError(f"cspad common mode: {adu.shape[1]} pixels are not {nseg} segments "
                          f"of {CSPAD_SEG_SHAPE[0]} x {CSPAD_SEG_SHAPE[1]}")
    adu = xp.ascontiguousarray(adu)
    depth = pairwise_depth(segpix)
    if (1 << depth) > CSPAD_MAX_SLOTS:
        raise GpusmdError(f"cspad common mode: pairwise tree of depth {depth} is too deep")
    stride = 0
    if mode == 1:
        good = xp.asarray(good)
        if good.ndim == 1:
            good = good[None, :]
        if good.ndim != 2 or good.shape[1] != adu.shape[1] or good.shape[0] not in (1, adu.shape[0]):
            raise GpusmdError(f"cspad common mode: good {good.shape} does not match adu "
                              f"{adu.shape}")
        good = xp.ascontiguousarray(good.astype(bool, copy=False)).view(xp.uint8)
        stride = adu.shape[1] if good.shape[0] > 1 else 0
    else:
        good = None
    return adu, good, stride, segpix, depth


def _cspad_pars(mode, mean_max, rms_max, thresh, fallback):
    return (float(mean_max), float(rms_max), max(1, min(int(thresh), CSPAD_INT_MAX)),
            int(bool(fallback)))


def cspad_common_mode_gpu(adu, good, nseg: int, mode: int, mean_max: float,
                          rms_max: float = float("inf"), thresh: int = 100,
                          fallback: bool = True, block: int | None = None):
    """The CsPad common-mode kernels (kernels/cm_cspad.cu) on the current CuPy device.

    adu (B, nseg * 185 * 388) float32 (not modified); good (B, npix) or (npix,) bool /
    uint8 (mode 1 only). Mode 1: cmpars (1, mean_max, rms_max, thresh > 0, fallback);
    mode 5: mean_max is maxcorr. Returns (cm (B, nseg) float64, 0 where not applied;
    flag (B, nseg) uint8: 0 none, 1 the peak (mode 1), 2 the unbonded mean (mode 5 or
    the fallback)), as :mod:`gpusmd.calib.cm_cspad` computes them: subtract
    cm.astype(float32) from each segment."""
    cupy = _cupy()
    adu, good, stride, segpix, depth = _cspad_args(cupy, adu, good, nseg, mode)
    nbatch = adu.shape[0]
    cm = cupy.zeros((nbatch, nseg), dtype=cupy.float64)
    flag = cupy.zeros((nbatch, nseg), dtype=cupy.uint8)
    if nbatch == 0:
        return cm, flag
    mean_max, rms_max, thresh, fallback = _cspad_pars(mode, mean_max, rms_max, thresh, fallback)
    for b, count in _event_chunks(nbatch):
        if mode == 5:
            get_function("cm_cspad", "cspad_mode5")(
                (-(-nseg // CSPAD_MODE5_BLOCK), count), (CSPAD_MODE5_BLOCK,),
                (adu[b], np.int32(nseg), np.int32(segpix), np.float64(mean_max),
                 cm[b], flag[b]))
        else:
            g = good[b] if stride else good
            get_function("cm_cspad", "cspad_mode1")(
                (nseg, count), (int(block or CSPAD_BLOCK),),
                (adu[b], g, np.int64(stride), np.int32(nseg), np.int32(segpix),
                 np.float64(mean_max), np.float64(rms_max), np.int32(thresh),
                 np.int32(fallback), np.int32(depth), cm[b], flag[b]))
    return cm, flag


def cspad_common_mode_host(adu, good, nseg: int, mode: int, mean_max: float,
                           rms_max: float = float("inf"), thresh: int = 100,
                           fallback: bool = True, block: int | None = None):
    """The same CsPad kernels run on the CPU through the host build (tests); NumPy
    arrays, same contract and results as :func:`cspad_common_mode_gpu`."""
    adu, good, stride, segpix, depth = _cspad_args(np, adu, good, nseg, mode)
    nbatch = adu.shape[0]
    cm = np.zeros((nbatch, nseg), dtype=np.float64)
    flag = np.zeros((nbatch, nseg), dtype=np.uint8)
    if nbatch == 0:
        return cm, flag
    mean_max, rms_max, thresh, fallback = _cspad_pars(mode, mean_max, rms_max, thresh, fallback)
    module = host_module("cm_cspad")
    if mode == 5:
        module.launch("cspad_mode5", (-(-nseg // CSPAD_MODE5_BLOCK), nbatch), CSPAD_MODE5_BLOCK,
                      adu, nseg, segpix, mean_max, cm, flag)
    else:
        module.launch("cspad_mode1", (nseg, nbatch), int(block or CSPAD_HOST_BLOCK),
                      adu, good, stride, nseg, segpix, mean_max, rms_max, thresh, fallback,
                      depth, cm, flag)
    return cm, flag


# ---- spectrum (kernels/spectrum.cu) ---------------------------------------------------------
SPECTRUM_BLOCK = 256
SPECTRUM_MAX_BINS = 12288          # shared memory: 4 bytes a bin, 48 KB


def _spectrum_args(xp, data, pixels, edges):
    data = xp.ascontiguousarray(xp.asarray(data, dtype=xp.float32).reshape(len(data), -1))
    edges = xp.ascontiguousarray(xp.asarray(edges, dtype=xp.float64))
    nbins = int(edges.size) - 1
    if not 1 <= nbins <= SPECTRUM_MAX_BINS:
        raise GpusmdError(f"spectrum: {nbins} bins (1 to {SPECTRUM_MAX_BINS} on the GPU)")
    if pixels is not None:
        pixels = xp.ascontiguousarray(xp.asarray(pixels, dtype=xp.int64))
    npix = data.shape[1] if pixels is None else int(pixels.size)
    return data, pixels, npix, edges, nbins


def spectrum_gpu(data, edges, pixels=None):
    """(B, nbins) int32 counts of each event's values (of the given flat pixels, or all)
    in numpy.histogram's bins, on the current CuPy device."""
    cupy = _cupy()
    data, pixels, npix, edges, nbins = _spectrum_args(cupy, data, pixels, edges)
    out = cupy.zeros((data.shape[0], nbins), dtype=cupy.uint32)
    if npix:
        blocks = min(-(-npix // SPECTRUM_BLOCK), 64)
        kernel = get_function("spectrum", "spectrum_counts")
        for b, count in _event_chunks(data.shape[0]):
            kernel((blocks, count), (SPECTRUM_BLOCK,),
                   (data[b], pixels if pixels is not None else 0, np.int64(data.shape[1]),
                    np.int64(npix), edges, np.int32(nbins), out[b]), shared_mem=4 * nbins)
    return out.astype(cupy.int32)


def spectrum_host(data, edges, pixels=None, blocks: int = 3, block: int = 32):
    """The same kernel on the CPU through the host build (tests)."""
    data, pixels, npix, edges, nbins = _spectrum_args(np, data, pixels, edges)
    out = np.zeros((data.shape[0], nbins), dtype=np.uint32)
    if npix:
        module = host_module("spectrum")
        for b, count in _event_chunks(data.shape[0]):
            module.launch("spectrum_counts", (blocks, count), block, data[b], pixels,
                          data.shape[1], npix, edges, nbins, out[b], shared_mem=4 * nbins)
    return out.astype(np.int32)

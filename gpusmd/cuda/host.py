"""The host build: the kernels of ``kernels/*.cu`` run on the CPU (DESIGN §11).

:func:`host_module` compiles a kernel file as C++20 with g++ against
``kernels/cuda_host.h`` into a cached shared library with one launcher per
``extern "C" __global__`` function (:func:`parse_kernels` reads their parameters), so CI
runs every kernel on the CPU and compares it with its NumPy reference. Blocks run one
after another; the threads of a block run one after another, or as std::threads meeting
at a barrier when the source synchronises (``__syncthreads``, warp shuffles and votes).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GpusmdError
from .compile import _headers_digest, _source_path, kernel_dir

HOST_HEADER = "cuda_host.h"
HOST_CXXFLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC", "-pthread")


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

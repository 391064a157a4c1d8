"""gpusmd's calibration constants in psana's form (LCLS psana2), both ways, exact.

psana holds a detector's constants as ``det.calibconst`` (``run._calib_const[detname]``):
a dict mapping a calibration type ("ctype") to ``(array, metadata)``. The mapping:

    gpusmd field          psana ctype     dtype    shape
    pedestal (+ offset)   pedestals       float32  (ngain, *raw_shape); raw_shape if ngain == 1
    rms                   pixel_rms       float32  as pedestals
    gain (ADU per keV)    pixel_gain      float32  as pedestals
    status                pixel_status    uint64   as pedestals
    mask                  pixel_mask      uint8    raw_shape (no gain axis)

- A Jungfrau's offset folds into the pedestals: psana's calibration subtracts
  ``pedestals`` (the Jungfrau one adds ``pixel_offset`` when there is one, the others have
  no offset). The float32 sum is the one gpusmd's calibration subtracts, so calibrated
  values are the same bit for bit; read back, ``offset`` is 0 and ``pedestal`` is
  pedestal + offset. The other families' offsets are left out, as both calibrations
  leave them out (gpusmd.calib.calibrate). A psana ``pixel_offset`` is read into
  ``offset`` for Jungfraus (the only detector whose psana calibration uses it) and
  ignored for the others.
- ``pixel_mask`` has the raw shape: 1 where the gpusmd mask is non-zero in every gain
  range (what gpusmd's calibration uses). psana applies it only when the detector is made
  with ``calib=True`` (``run.Detector(name, calib=True)``); by default psana's mask is
  made from ``pixel_status`` alone (and ``status_extra`` where there is one).
- psana masks a pixel where any status bit is set (``status & (2**64 - 1) > 0``), merged
  over gain ranges 0-4 (epix10ka: FH, FM, FL, AHL_H, AML_M; the AHL_L, AML_L copies of
  gpusmd's dark processing carry the FL status) or all three (Jungfrau). It casts the
  status to uint64 itself, so the stored dtype does not change the mask; uint64 is the
  dtype of psana's database. gpusmd keeps status as float32: exact up to 2**24, and a
  non-zero status stays non-zero. A psana ``status_extra`` is OR'ed into every gain range.

Read back (gpusmd -> psana -> gpusmd), pedestal (+ offset), rms, gain and status are the
same arrays and the mask is the same where it is 0 or 1 alike in every gain range (what
``gpusmd dark`` writes). Missing psana ctypes read as: rms 1, gain 1 (psana's factor
without pixel_gain), status 0, mask 1; pedestals must be there.

The file form is the one psana's ``cdb add -f FILE -c CTYPE`` deposits into the
calibration database: one psana NDArrIO text file ``<ctype>.data`` per ctype (values
written with 9 significant digits, which read back as the same float32) or a ``.npy``
file, and a JSON sidecar ``gpusmd-psana.json`` with the detector, experiment, run range,
each ctype's metadata and the ``cdb add`` command for each file.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .. import __version__
from ..detectors import DETECTORS, DetectorModel, get_detector
from ..errors import ConfigError, ConstantsError, RawFileError
from ..io.output import check_new_output, written_whole
from .calibrate import OFFSET_FAMILIES
from .constants import FIELDS, RUN_ANY, Constants

FORMAT = "gpusmd-psana-constants"
FORMAT_VERSION = 1
SIDECAR = "gpusmd-psana.json"
CTYPES = ("pedestals", "pixel_rms", "pixel_gain", "pixel_status", "pixel_mask")
DTYPES = {"pedestals": np.float32, "pixel_rms": np.float32, "pixel_gain": np.float32,
          "pixel_status": np.uint64, "pixel_mask": np.uint8}
TEXT_FORMATS = {"pedestals": "%.9g", "pixel_rms": "%.9g", "pixel_gain": "%.9g",
                "pixel_status": "%d", "pixel_mask": "%d"}
FILE_FORMATS = ("data", "npy")
EXTENSIONS = (".data", ".txt", ".npy")
OFFLINE_ENV = "GPUSMD_OFFLINE"                # set (not 0/empty): never contact the database
TIMEOUT_ENV = "GPUSMD_CALIB_DB_TIMEOUT"       # seconds to reach the database (default 5)
DEFAULT_TIMEOUT_S = 5.0
PSANA_OFFSET_FAMILIES = OFFSET_FAMILIES       # psana's calibration adds pixel_offset, as ours


# ---- shapes ---------------------------------------------------------------------------
def psana_shape(model: DetectorModel, ctype: str = "pedestals") -> tuple[int, ...]:
    """The shape psana holds a ctype in for a detector model."""
    if ctype in ("pixel_mask", "status_extra") or model.ngain == 1:
        return tuple(model.shape)
    return (model.ngain, *model.shape)


def guess_model(shape) -> DetectorModel:
    """The detector model whose psana pedestals have this shape (a 2-D shape that is no
    detector's is a camera)."""
    shape = tuple(int(s) for s in shape)
    for model in DETECTORS.values():
        if shape in (psana_shape(model), (model.ngain, *model.shape)):
            return model
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) == 2:
        return get_detector("camera", shape)
    raise ConstantsError(f"pedestals of shape {shape} are no known detector's; "
                         f"give the detector type")


def _model(model) -> DetectorModel | None:
    if model is None or isinstance(model, DetectorModel):
        return model
    try:
        return get_detector(str(model))
    except ConfigError as e:
        raise ConstantsError(str(e)) from None


# ---- gpusmd -> psana ------------------------------------------------------------------
def _check_constants(constants: Constants, detname: str):
    expected = (constants.model.ngain, *constants.model.shape)
    for name in FIELDS:
        shape = np.shape(getattr(constants, name))
        if shape != expected:
            raise ConstantsError(f"{detname}: {name} has shape {shape}, expected {expected} "
                                 f"for a {constants.model.type}")


def _run_end(run_max: int):
    return "end" if run_max == RUN_ANY else str(int(run_max))


def to_psana(constants: Constants, detname: str, experiment: str = "", run: int | None = None,
             time_sec: int | None = None) -> dict[str, tuple[np.ndarray, dict]]:
    """``{ctype: (array, metadata)}`` as psana holds it in ``run._calib_const[detname]``.

    run: the first run the constants are valid for (default ``constants.run_min``); the
    last is ``constants.run_max`` (metadata ``run_end``, "end" when open)."""
    _check_constants(constants, detname)
    model = constants.model
    shape = psana_shape(model)
    run = int(constants.run_min if run is None else run)
    time_sec = int(time.time() if time_sec is None else time_sec)
    ped = np.asarray(constants.pedestal, np.float32)
    if model.family in PSANA_OFFSET_FAMILIES:
        ped = ped + np.asarray(constants.offset, np.float32)
    arrays = {
        "pedestals": ped.reshape(shape),
        "pixel_rms": np.asarray(constants.rms, np.float32).reshape(shape),
        "pixel_gain": np.asarray(constants.gain, np.float32).reshape(shape),
        "pixel_status": np.asarray(constants.status).astype(np.uint64).reshape(shape),
        "pixel_mask": (np.asarray(constants.mask) != 0).all(axis=0).astype(np.uint8),
    }
    extpars = json.dumps({"content": "gpusmd constants", "gpusmd_type": model.type,
                          "gpusmd_source": constants.source,
                          "offset_folded": model.family in PSANA_OFFSET_FAMILIES})
    out = {}
    for ctype in CTYPES:
        a = np.ascontiguousarray(arrays[ctype], DTYPES[ctype])
        meta = {
            "experiment": experiment, "run": run, "run_beg": run,
            "run_end": _run_end(constants.run_max), "run_orig": run,
            "detector": detname, "detname": detname, "longname": detname,
            "shortname": detname, "dettype": model.family, "ctype": ctype, "dtype": "ndarray",
            "time_sec": time_sec,
            "time_stamp": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time_sec)),
            "version": f"gpusmd-{__version__}",
            "comment": f"gpusmd {model.type} constants" + (
                f" from {constants.source}" if constants.source else ""),
            "extpars": extpars,
            "data_type": "ndarray", "data_dtype": str(a.dtype), "data_size": str(a.size),
            "data_ndim": str(a.ndim), "data_shape": str(a.shape),
        }
        out[ctype] = (a, meta)
    return out


# ---- psana -> gpusmd ------------------------------------------------------------------
def _array(calibconst, ctype):
    entry = calibconst.get(ctype)
    if entry is None:
        return None
    a = entry[0] if isinstance(entry, (tuple, list)) else entry
    return None if a is None else np.asarray(a)


def _per_gain(a, model: DetectorModel, ctype: str, where: str) -> np.ndarray:
    """A psana per-gain array as (ngain, *shape)."""
    full = (model.ngain, *model.shape)
    if a.shape == full:
        return a
    if model.ngain == 1 and a.shape == tuple(model.shape):
        return a.reshape(full)
    raise ConstantsError(f"{where}{ctype} has shape {a.shape}, expected "
                         f"{psana_shape(model, ctype)} for a {model.type}")


def _per_pixel(a, model: DetectorModel, ctype: str, where: str) -> np.ndarray:
    """A psana array of the raw shape (or per gain) as (ngain, *shape)."""
    full = (model.ngain, *model.shape)
    if a.shape in (tuple(model.shape), (1, *model.shape)):
        return np.broadcast_to(a.reshape(model.shape), full)
    if a.shape == full:
        return a
    raise ConstantsError(f"{where}{ctype} has shape {a.shape}, expected "
                         f"{tuple(model.shape)} for a {model.type}")


def _meta(calibconst, ctype="pedestals") -> dict:
    entry = calibconst.get(ctype)
    if isinstance(entry, (tuple, list)) and len(entry) > 1 and isinstance(entry[1], dict):
        return entry[1]
    return {}


def _int(value, default: int) -> int:
    """An int from psana metadata (run numbers are ints or strings; "end" is open)."""
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else default


def from_psana(calibconst: dict, model=None, where: str = "") -> Constants:
    """Constants from psana's ``{ctype: (array, metadata)}`` (``det.calibconst``).

    model: a DetectorModel or type name; default: guessed from the pedestals' shape.
    where: a prefix for error messages (a file or run and the detector)."""
    if where and not where.endswith(" "):
        where += " "
    ped = _array(calibconst, "pedestals")
    if ped is None:
        raise ConstantsError(f"{where}has no pedestals (has: "
                             f"{', '.join(sorted(calibconst)) or 'nothing'})")
    model = _model(model) or guess_model(ped.shape)
    full = (model.ngain, *model.shape)
    pedestal = _per_gain(ped, model, "pedestals", where).astype(np.float32)
    offset = np.zeros(full, np.float32)
    offs = _array(calibconst, "pixel_offset")
    if offs is not None and model.family in PSANA_OFFSET_FAMILIES:
        offset = _per_gain(offs, model, "pixel_offset", where).astype(np.float32)

    def per_gain(ctype, default):
        a = _array(calibconst, ctype)
        if a is None:
            return np.full(full, default, np.float32)
        return _per_gain(a, model, ctype, where).astype(np.float32)

    rms = per_gain("pixel_rms", 1.0)
    gain = per_gain("pixel_gain", 1.0)
    status = _array(calibconst, "pixel_status")
    status = (np.zeros(full, np.uint64) if status is None else
              _per_gain(status, model, "pixel_status", where).astype(np.uint64))
    extra = _array(calibconst, "status_extra")
    if extra is not None:
        status = status | _per_pixel(extra, model, "status_extra", where).astype(np.uint64)
    mask = _array(calibconst, "pixel_mask")
    mask = (np.ones(full, np.float32) if mask is None else       # psana reads it as uint8
            _per_pixel(mask, model, "pixel_mask", where).astype(np.uint8).astype(np.float32))
    meta = _meta(calibconst)
    run_min = _int(meta.get("run_beg"), _int(meta.get("run"), 0))
    run_max = _int(meta.get("run_end"), RUN_ANY)
    source = "psana"
    if meta.get("experiment"):
        source += f" {meta['experiment']}"
    if meta.get("detector"):
        source += f" {meta['detector']}"
    attrs = {k: str(meta[k]) for k in ("experiment", "version") if meta.get(k)}
    attrs = {f"psana_{k}": v for k, v in attrs.items()}
    return Constants(model, pedestal=pedestal, rms=rms, gain=gain, offset=offset,
                     status=status.astype(np.float32), mask=np.ascontiguousarray(mask),
                     run_min=run_min, run_max=run_max, source=source, attrs=attrs)


# ---- the file form --------------------------------------------------------------------
def _files_in(directory: Path) -> dict[str, Path]:
    """ctype -> file for the psana constants files in a directory."""
    found = {}
    for p in sorted(directory.iterdir()):
        if p.suffix in EXTENSIONS and p.is_file():
            if p.stem in found:
                raise ConstantsError(f"{directory}: two files for {p.stem} "
                                     f"({found[p.stem].name}, {p.name})")
            found[p.stem] = p
    return found


def write_psana_dir(calibconst: dict, directory, detname: str | None = None,
                    fmt: str = "data", force: bool = False) -> list[Path]:
    """Write psana's constants as files ``cdb add`` takes, one per ctype, and the sidecar.

    fmt: "data" (psana's NDArrIO text) or "npy". A directory that already holds psana
    constants files or a sidecar is refused unless ``force`` (then those are replaced)."""
    from psana.pscalib.calib.NDArrIO import save_txt
    if fmt not in FILE_FORMATS:
        raise ConstantsError(f"unknown file format {fmt!r}; known: {', '.join(FILE_FORMATS)}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConstantsError(f"{directory}: exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    old = [*(_files_in(directory).values()), *([directory / SIDECAR] if
                                               (directory / SIDECAR).exists() else [])]
    if old and not force:
        raise ConstantsError(f"{directory}: already holds psana constants "
                             f"({', '.join(p.name for p in old)}); use --force to replace them")
    for p in old:
        p.unlink()
    meta0 = _meta(calibconst)
    detname = detname or meta0.get("detector", "")
    experiment, run = meta0.get("experiment", ""), _int(meta0.get("run"), 0)
    run_end = str(meta0.get("run_end", "end"))
    written, files, cdb = [], {}, []
    for ctype, entry in calibconst.items():
        a = _array(calibconst, ctype)
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "uif":
            continue                       # geometry text and the like: not ours to write
        a = np.ascontiguousarray(a)
        path = directory / f"{ctype}.{fmt}"
        meta = _meta(calibconst, ctype)
        with written_whole(path) as part:           # whole or absent
            if fmt == "npy":
                with open(part, "wb") as f:
                    np.save(f, a)
            else:
                cmts = (f"TITLE       {ctype} of {detname} (gpusmd {__version__})",
                        f"EXPERIMENT  {experiment}", f"DETECTOR    {detname}",
                        f"CALIB_TYPE  {ctype}")
                with open(part, "w") as f:      # its header names the file, not the part
                    save_txt(_Named(f, str(path)), a.copy(), cmts=cmts,
                             fmt=TEXT_FORMATS.get(ctype, "%.9g" if a.dtype.kind == "f" else "%d"))
        written.append(path)
        files[ctype] = {"file": path.name, "dtype": str(a.dtype), "shape": list(a.shape),
                        "metadata": {k: v for k, v in meta.items()
                                     if isinstance(v, (str, int, float, bool))}}
        cmd = f"cdb add -e {experiment or 'EXPERIMENT'} -d {detname} -c {ctype} -r {run}"
        if run_end != "end":
            cmd += f" -R {run_end}"
        cdb.append(f"{cmd} -f {path.name}")
    sidecar = {"format": FORMAT, "format_version": FORMAT_VERSION, "detector": detname,
               "experiment": experiment, "run": run, "run_end": run_end,
               "ctypes": files, "cdb_add": cdb}
    meta_ext = meta0.get("extpars")
    try:
        ext = json.loads(meta_ext) if isinstance(meta_ext, str) else {}
    except ValueError:
        ext = {}
    if ext.get("gpusmd_type"):
        sidecar["type"] = ext["gpusmd_type"]
    with written_whole(directory / SIDECAR) as part:
        part.write_text(json.dumps(sidecar, indent=1) + "\n")
    return [*written, directory / SIDECAR]


class _Named:
    """An open text file that a writer taking a file name (psana's save_txt, which puts
    the name in its header) writes to, under the name ``name``."""

    def __init__(self, f, name: str):
        self.f, self.name = f, name

    def write(self, text):
        return self.f.write(text)

    def __str__(self):
        return self.name


def _load_file(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    from psana.pscalib.calib.NDArrIO import load_txt
    return load_txt(str(path))


def sidecar_of(directory) -> dict:
    """The JSON sidecar of a directory of psana constants files ({} if there is none)."""
    side_path = Path(directory) / SIDECAR
    if not side_path.exists():
        return {}
    try:
        sidecar = json.loads(side_path.read_text())
    except (OSError, ValueError) as e:
        raise ConstantsError(f"{side_path}: not readable JSON ({e})") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise ConstantsError(f"{side_path}: not a {FORMAT} sidecar")
    return sidecar


def read_psana_dir(directory) -> tuple[dict, dict]:
    """(calibconst, sidecar) from a directory of psana constants files (the sidecar is
    optional: without it each file's ctype is its name)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConstantsError(f"{directory}: no such directory of psana constants")
    side_path = directory / SIDECAR
    sidecar = sidecar_of(directory)
    listed = sidecar.get("ctypes", {})
    if listed:
        files = {}
        for ctype, info in listed.items():
            p = directory / info.get("file", "")
            if not p.is_file():
                raise ConstantsError(f"{side_path}: lists {info.get('file')!r} for {ctype}, "
                                     f"which is not in {directory}")
            files[ctype] = p
    else:
        files = _files_in(directory)
    if not files:
        raise ConstantsError(f"{directory}: no psana constants files "
                             f"({', '.join('*' + e for e in EXTENSIONS)})")
    calibconst = {}
    for ctype, p in files.items():
        try:
            a = _load_file(p)
        except (OSError, ValueError) as e:
            raise ConstantsError(f"{p}: not a psana constants file ({e})") from None
        meta = dict(listed.get(ctype, {}).get("metadata", {}))
        meta.setdefault("ctype", ctype)
        for key in ("experiment", "detector", "run", "run_end"):
            if key in sidecar:
                meta.setdefault(key, sidecar[key])
        calibconst[ctype] = (a, meta)
    return calibconst, sidecar


def from_psana_dir(directory, model=None) -> tuple[str, Constants]:
    """(detector name, Constants) from a directory ``write_psana_dir`` (or psana) wrote;
    model: default the sidecar's gpusmd type, else guessed from the pedestals' shape."""
    calibconst, sidecar = read_psana_dir(directory)
    det = sidecar.get("detector", "")
    model = model or sidecar.get("type")
    return det, from_psana(calibconst, model, where=f"{directory}:")


# ---- psana's own database -------------------------------------------------------------
def _unreachable(source, detname, why: str) -> ConstantsError:
    return ConstantsError(f"{source}: constants of detector {detname!r}: the calibration "
                          f"database could not be reached ({why})")


def datasource_kwargs(source) -> dict:
    """DataSource arguments of a source: an XTC2 file or directory, or
    "exp=EXP:run=N[:dir=DIR]" (gpusmd's psana sources, ``gpusmd.io.psana_run``)."""
    from ..io.psana_run import datasource_kwargs as kwargs_of
    try:
        return kwargs_of(source)
    except RawFileError as e:
        raise ConstantsError(str(e)) from None


def calib_db_url() -> str:
    """The URL psana reads its constants from (psana's default, or $LCLS_CALIB_HTTP)."""
    from psana.pscalib.calib import CalibConstants as cc
    return cc.URL


def probe_db(url: str, timeout: float) -> str | None:
    """None if a TCP connection to the database's host opens within ``timeout`` seconds,
    else why not (name look-up included: it runs in a thread that is not waited for)."""
    u = urlparse(url)
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    if not host:
        return f"no host in {url!r}"
    result = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}:{port}: {e.strerror or e}")

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"{host}:{port}: no answer in {timeout:g} s"


def from_run(source, detname: str, model=None, timeout: float | None = None,
             url: str | None = None) -> Constants:
    """The constants psana itself takes for a detector of a run: opens psana's DataSource
    (constants loaded from the calibration database) and converts ``det.calibconst``.

    source: an XTC2 file or directory, or "exp=EXP:run=N[:dir=DIR]". Before psana is
    asked, the database's host must answer within ``timeout`` seconds (default
    $GPUSMD_CALIB_DB_TIMEOUT or 5; psana's own requests wait up to 180 s); with
    $GPUSMD_OFFLINE set it is not contacted at all. Either way failing: a ConstantsError
    naming the source and the detector."""
    kwargs = datasource_kwargs(source)
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise _unreachable(source, detname, f"${OFFLINE_ENV} is set")
    if timeout is None:
        try:
            timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        except ValueError:
            raise ConstantsError(f"${TIMEOUT_ENV} must be seconds, got "
                                 f"{os.environ[TIMEOUT_ENV]!r}") from None
    url = url or calib_db_url()
    why = probe_db(url, timeout)
    if why is not None:
        raise _unreachable(source, detname, why)
    import requests
    from psana import DataSource
    try:
        ds = DataSource(**kwargs)
        run = next(ds.runs())
        names = list(getattr(run, "detnames", []) or [])
        if names and detname not in names:
            raise ConstantsError(f"{source}: no detector {detname!r} "
                                 f"(has: {', '.join(sorted(names))})")
        det = run.Detector(detname)
        calibconst = dict(det.calibconst or {})
        expt = run.expt
    except requests.exceptions.RequestException as e:
        raise _unreachable(source, detname, f"{urlparse(url).hostname}: "
                                            f"{type(e).__name__}") from None
    except SystemExit:                   # psana exits on a 503 from the database
        raise _unreachable(source, detname, "the service is unavailable") from None
    except ConstantsError:
        raise
    except Exception as e:
        raise ConstantsError(f"{source}: psana could not open the run for detector "
                             f"{detname!r}: {type(e).__name__}: {e}") from None
    if not calibconst:
        if not expt:
            raise ConstantsError(f"{source}: the run names no experiment, so psana looks up "
                                 f"no constants for detector {detname!r}")
        raise ConstantsError(f"{source}: the calibration database has no constants for "
                             f"detector {detname!r} in {expt}")
    constants = from_psana(calibconst, model, where=f"{source}: detector {detname!r}:")
    constants.source = f"psana {source} {detname}"
    return constants


# ---- files of the command line --------------------------------------------------------
def save_constants(constants: Constants, path, detname: str, force: bool = False) -> Path:
    """Write a gpusmd constants file holding one detector, all at once (a file that exists
    is replaced only with ``force``)."""
    path = check_new_output(path, force)
    with written_whole(path) as part:
        constants.save(part, detname, mode="w")
    return path


def detector_in(path, detname: str | None = None) -> str:
    """The detector of a gpusmd constants file: ``detname``, or its only one."""
    if detname:
        return detname
    from ..io.h5 import open_h5
    with open_h5(path, "constants file", ConstantsError) as f:
        names = [k for k in f if hasattr(f[k], "keys")]
    if len(names) != 1:
        raise ConstantsError(f"{path}: holds constants of {len(names)} detectors "
                             f"({', '.join(names) or 'none'}); give --detector")
    return names[0]

"""The GPU side of a run: how much device memory a detector needs, and the overlapped
host -> device path for raw batches (DESIGN §2: pinned host buffers, two CUDA streams,
the copy of batch k+1 overlapping the compute of batch k).

Everything here is written against a small device abstraction (``CupyDevice``), so that
the ordering logic runs on the CPU in tests with a fake device; the memory arithmetic is
pure Python.

Memory model of one DetectorProcessor on the GPU (B events per batch, n pixels, r raw
bytes per pixel); every figure is an estimate of what the CuPy memory pool holds at the
peak of a batch:

=====================  =========================================================
raw_batches            2 x B x n x r        raw frames (never floats), double-buffered
calibrated             B x n x 4            the calibrated batch, float32
workspace              B x n x 4            one float32 batch of temporaries (ADC
                                            values in the split path, feature scratch)
common_mode_work       B x n x 9            adu float32 + scale float32 + good bool
                                            (common-mode path only)
droplets               B x n x d            droplet finding and photon placement:
                                            d = 18 + o x 288 at occupancy o (pixels in
                                            droplets, photons per pixel; default 0.05),
                                            features.droplet.droplet_bytes_per_pixel
lut                    rows x n x 8         (pedestal, mask / gain) float2; rows: the
                                            gain ranges (+ 1 for epix10k: no range)
control_bits           n                    epix10k per-pixel control bits, uint8
common_mode_tables     nstate x n x 9 + 4n  switch tables (ped float32, scale float32,
                                            good bool per raw switch state) + rms
feature_maps           f x n x 16           per-run maps of f pixel-binned functions
                                            (azimuthal: int64 + int32 bin, float32
                                            correction)
sums                   s x n x 8            per-run sum images (float64)
reserve                256 MiB              CUDA libraries, kernels, pool slack
=====================  =========================================================

Pinned host memory (2 x B x n x r) is reported beside it, not counted in the GPU total.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .calib.calibrate import lut_rows
from .detectors import DETECTORS, DetectorModel, get_detector
from .errors import GpusmdError
from .features.droplet import droplet_bytes_per_pixel

GiB, MiB = 2 ** 30, 2 ** 20
RESERVE_BYTES = 256 * MiB
DEFAULT_FUNCTIONS = 2          # pixel-binned functions assumed by default (e.g. 2 azav)
DEFAULT_SUMS = 2               # sum images assumed by default (e.g. calib, calib_max)
DEFAULT_DROPLET_OCCUPANCY = 0.05   # droplets allowed for: 5% of the pixels, 0.05 photons

# the device entries of a report, in the order they are printed
DEVICE_KEYS = ("raw_batches", "calibrated", "workspace", "common_mode_work", "droplets", "lut",
               "control_bits", "common_mode_tables", "feature_maps", "sums", "reserve")
DESCRIPTIONS = {
    "raw_batches": "raw batches on the device (x2, double-buffered)",
    "calibrated": "calibrated batch, float32",
    "workspace": "temporaries, one float32 batch",
    "common_mode_work": "common-mode working arrays (adu, scale, good)",
    "droplets": "droplet labels and records, photon placement",
    "lut": "calibration look-up table (rows, npix, 2) float32",
    "control_bits": "epix10k control bits",
    "common_mode_tables": "switch tables (3 x nstate x npix) + rms",
    "feature_maps": "features' per-run maps",
    "sums": "sum images, float64",
    "reserve": "CUDA libraries, kernels, memory-pool slack",
}


# ---- memory arithmetic ---------------------------------------------------------------------

def _switch_states(model: DetectorModel) -> int:
    return {"jungfrau": 4, "epix10k": 2}.get(model.family, 1)


def memory_report(model: DetectorModel, batch_size: int, n_functions_hint: int = DEFAULT_FUNCTIONS,
                  n_sums: int = DEFAULT_SUMS, common_mode: bool = True,
                  reserve_bytes: int = RESERVE_BYTES,
                  droplet_occupancy: float | None = DEFAULT_DROPLET_OCCUPANCY) -> dict:
    """The GPU memory (bytes) one DetectorProcessor needs for ``model`` at ``batch_size``:
    one entry per item of the module docstring's table, ``total`` (the device entries),
    ``per_event`` and ``fixed`` (total = fixed + batch_size x per_event), and
    ``pinned_host`` (host memory, not in the total). ``droplet_occupancy`` None: no
    droplet function."""
    if batch_size < 0:
        raise ValueError(f"batch size must be >= 0, got {batch_size}")
    B, n = int(batch_size), model.npix
    raw = np.dtype(model.dtype).itemsize
    per_event = {
        "raw_batches": 2 * n * raw,
        "calibrated": 4 * n,
        "workspace": 4 * n,
        "common_mode_work": 9 * n if common_mode else 0,
        "droplets": 0 if droplet_occupancy is None else
        int(np.ceil(n * droplet_bytes_per_pixel(droplet_occupancy))),
    }
    fixed = {
        "lut": lut_rows(model) * n * 2 * 4,
        "control_bits": n if model.family == "epix10k" else 0,
        "common_mode_tables": (_switch_states(model) * n * 9 + 4 * n) if common_mode else 0,
        "feature_maps": int(n_functions_hint) * n * 16,
        "sums": int(n_sums) * n * 8,
        "reserve": int(reserve_bytes),
    }
    report = {"detector": model.type, "batch_size": B, "npix": n}
    report.update({k: B * v for k, v in per_event.items()})
    report.update(fixed)
    report["per_event"] = sum(per_event.values())
    report["fixed"] = sum(fixed.values())
    report["total"] = sum(report[k] for k in DEVICE_KEYS)
    report["pinned_host"] = 2 * B * n * raw
    return report


def _models(model) -> list[DetectorModel]:
    return [model] if isinstance(model, DetectorModel) else list(model)


def _total(models, batch_size, **kw) -> int:
    return sum(memory_report(m, batch_size, **kw)["total"] for m in models)


def largest_batch(model, free_bytes: int, **kw) -> int:
    """The largest batch size whose total fits in ``free_bytes`` (0 when not even one
    event fits). ``model``: one DetectorModel or several (processed side by side)."""
    models = _models(model)
    fixed = _total(models, 0, **kw)
    per_event = _total(models, 1, **kw) - fixed
    if free_bytes < fixed + per_event:
        return 0
    return int((free_bytes - fixed) // per_event)


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _fmt_pair(need: float, free: float) -> tuple[str, str]:
    """Need and free, with enough digits that they do not print alike."""
    a, b = fmt_bytes(need), fmt_bytes(free)
    if a == b:
        a, b = f"{need / GiB:.3f} GiB", f"{free / GiB:.3f} GiB"
    return a, b


def check_fits(model, batch_size: int, free_bytes: int, **kw) -> dict:
    """Raise GpusmdError when ``batch_size`` events of ``model`` (one DetectorModel or
    several) do not fit in ``free_bytes`` of GPU memory; the message names the
    detector(s), the batch size, the need, the free memory and the largest batch that
    fits. Returns the (summed) report when it fits."""
    models = _models(model)
    need = _total(models, batch_size, **kw)
    names = " + ".join(m.type for m in models)
    if need <= free_bytes:
        reports = [memory_report(m, batch_size, **kw) for m in models]
        return {k: sum(r[k] for r in reports) for k in (*DEVICE_KEYS, "total", "per_event",
                                                         "fixed", "pinned_host")}
    a, b = _fmt_pair(need, free_bytes)
    best = largest_batch(models, free_bytes, **kw)
    if best == 0:
        one = fmt_bytes(_total(models, 1, **kw))
        advice = (f"not even a batch of 1 fits ({one}); free GPU memory (other processes?) "
                  f"or use --backend cpu")
    else:
        advice = f"use --batch-size {best} or less"
    raise GpusmdError(f"{names}, batch {batch_size}: needs {a} of GPU memory, {b} free; {advice}")


def format_report(report: dict) -> str:
    lines = [f"{report['detector']}, batch {report['batch_size']} ({report['npix']} pixels):"]
    for key in DEVICE_KEYS:
        if report[key]:
            lines.append(f"  {DESCRIPTIONS[key]:<52} {fmt_bytes(report[key]):>10}")
    lines.append(f"  {'total GPU memory':<52} {fmt_bytes(report['total']):>10}")
    lines.append(f"  {'pinned host memory (2 raw batches)':<52} "
                 f"{fmt_bytes(report['pinned_host']):>10}")
    return "\n".join(lines)


def device_free_bytes() -> int | None:
    """Free memory of the current CUDA device (plus what CuPy's pool holds free), or
    None without a device."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return None
        free, _ = cupy.cuda.runtime.memGetInfo()
        return int(free + cupy.get_default_memory_pool().free_bytes())
    except Exception:  # noqa: BLE001 -- no CuPy, no driver, no device: "unknown"
        return None


# ---- `gpusmd memory` -----------------------------------------------------------------------

def add_memory_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--detector", required=True,
                   help=f"detector type ({', '.join([*DETECTORS, 'camera'])})")
    p.add_argument("--shape", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"),
                   help="camera shape")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--functions", type=int, default=DEFAULT_FUNCTIONS,
                   help="pixel-binned functions (azimuthal integrations) to allow for")
    p.add_argument("--sums", type=int, default=DEFAULT_SUMS, help="sum images")
    p.add_argument("--no-common-mode", action="store_true",
                   help="no common-mode correction (the fused calibration only)")
    p.add_argument("--droplet-occupancy", type=float, default=DEFAULT_DROPLET_OCCUPANCY,
                   help="the fraction of pixels in droplets (and photons a pixel) to allow "
                        "for (default %(default)s)")
    p.add_argument("--no-droplets", action="store_true", help="no droplet function")
    p.add_argument("--free-gib", type=float, default=None,
                   help="free GPU memory to check against (default: ask the device)")
    return p


def cmd_memory(args) -> int:
    model = get_detector(args.detector, args.shape)
    if args.batch_size < 1:
        raise GpusmdError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0 <= args.droplet_occupancy <= 1:
        raise GpusmdError(f"--droplet-occupancy must be in [0, 1], got {args.droplet_occupancy}")
    kw = {"n_functions_hint": args.functions, "n_sums": args.sums,
          "common_mode": not args.no_common_mode,
          "droplet_occupancy": None if args.no_droplets else args.droplet_occupancy}
    print(format_report(memory_report(model, args.batch_size, **kw)))
    free = int(args.free_gib * GiB) if args.free_gib is not None else device_free_bytes()
    if free is None:
        print("no CUDA device here: pass --free-gib to check a batch size against a card")
        return 0
    check_fits(model, args.batch_size, free, **kw)
    print(f"fits: {fmt_bytes(free)} free; the largest batch that fits is "
          f"{largest_batch(model, free, **kw)}")
    return 0


def main_memory(argv=None) -> int:
    """`python -m gpusmd.gpu_pipeline --detector epix10k2M --batch-size 64`."""
    p = add_memory_arguments(argparse.ArgumentParser(
        prog="gpusmd memory", description="GPU memory one detector needs at a batch size"))
    args = p.parse_args(argv)
    try:
        return cmd_memory(args)
    except GpusmdError as e:
        print(f"gpusmd: error: {e}", file=sys.stderr)
        return 2


# ---- the device abstraction ------------------------------------------------------------------

class CupyDevice:
    """What DeviceBatches needs from CUDA, through CuPy. Tests substitute a fake with
    the same methods."""

    def __init__(self):
        import cupy
        import cupyx
        self.cupy, self.cupyx = cupy, cupyx
        self.xp = cupy

    def empty_pinned(self, shape, dtype):
        return self.cupyx.empty_pinned(shape, dtype)

    def empty(self, shape, dtype):
        return self.cupy.empty(shape, dtype)

    def new_stream(self):
        # non-blocking: no implicit synchronisation with the legacy default stream, on
        # which the processing usually runs; otherwise the copies would not overlap it
        return self.cupy.cuda.Stream(non_blocking=True)

    def current_stream(self):
        return self.cupy.cuda.get_current_stream()

    def record(self, stream):
        return stream.record(self.cupy.cuda.Event(disable_timing=True))

    def copy_h2d_async(self, dst, src, stream):
        """dst (device, C-contiguous) <- src (pinned host, C-contiguous), on stream."""
        assert dst.flags.c_contiguous and src.flags.c_contiguous and dst.nbytes == src.nbytes
        if src.nbytes:
            dst.data.copy_from_host_async(src.ctypes.data, src.nbytes, stream)

    def synchronize(self):
        self.cupy.cuda.Device().synchronize()


class DeviceBatches:
    """Two pinned host buffers, two device buffers of the raw batch shape and two copy
    streams: ``put(k, host)`` stages batch k in pinned buffer k % 2 and starts its
    host -> device copy on stream k % 2; ``get(k)`` makes the compute (current) stream
    wait for that copy and returns the device array (valid until ``put(k + 2)``);
    ``release(k)`` records that the compute stream is done with it, which the copy of
    batch k + 2 into the same buffer waits for. Raw frames cross the bus in their own
    dtype, never as floats.

    Buffers are allocated at the first ``put`` for ``capacity`` events of the frames'
    shape and dtype (again if a batch differs in shape or dtype, or is larger)."""

    def __init__(self, capacity: int, device=None):
        self.capacity = int(capacity)
        self.device = device if device is not None else CupyDevice()
        self.streams = [self.device.new_stream(), self.device.new_stream()]
        self._keys = [None, None]           # (event shape, dtype, capacity) of slot j
        self.pinned, self.dev = [None, None], [None, None]
        self.copied = [None, None]          # event: the H2D copy into slot j is done
        self.released = [None, None]        # event: the compute stream is done with slot j
        self.batch = [None, None]           # which batch slot j holds
        self.held = [False, False]          # handed out by get, not yet released
        self.size = [0, 0]

    def _ensure(self, j: int, host):
        """Slot j's buffers fit ``host``; only slot j is reallocated (the other may hold
        the batch being processed)."""
        key = self._keys[j]
        if key is None or key[:2] != (host.shape[1:], host.dtype) or len(host) > key[2]:
            if key is not None:
                self.device.synchronize()   # nothing may still read or write the old ones
            self.capacity = max(self.capacity, len(host))
            shape = (self.capacity, *host.shape[1:])
            self.pinned[j] = self.device.empty_pinned(shape, host.dtype)
            self.dev[j] = self.device.empty(shape, host.dtype)
            self.copied[j] = self.released[j] = None
            self._keys[j] = (host.shape[1:], host.dtype, self.capacity)

    def put(self, k: int, host) -> None:
        """Stage batch k: an array (B, *shape), or a list of B frames written one by one
        straight into the pinned buffer (no stacked copy first); then its async copy."""
        j = k % 2
        if self.held[j]:
            raise RuntimeError(f"put({k}): batch {self.batch[j]} in slot {j} not released")
        if not isinstance(host, np.ndarray):
            if not len(host):
                raise ValueError(f"put({k}): no frames")
            first = np.asarray(host[0])
            # a stand-in with the stacked batch's shape and dtype, without its memory
            self._ensure(j, np.broadcast_to(np.empty((), first.dtype), (len(host), *first.shape)))
        else:
            self._ensure(j, host)
        b = len(host)
        if self.copied[j] is not None:      # the pinned buffer's previous copy has left
            self.copied[j].synchronize()
        if isinstance(host, np.ndarray):
            np.copyto(self.pinned[j][:b], host, casting="no")
        else:
            for i, frame in enumerate(host):
                np.copyto(self.pinned[j][i], frame, casting="no")
        stream = self.streams[j]
        if self.released[j] is not None:    # the compute stream is done with the buffer
            stream.wait_event(self.released[j])
        self.device.copy_h2d_async(self.dev[j][:b], self.pinned[j][:b], stream)
        self.copied[j] = self.device.record(stream)
        self.batch[j], self.size[j] = k, b

    def get(self, k: int):
        j = k % 2
        if self.batch[j] != k:
            raise RuntimeError(f"get({k}): slot {j} holds batch {self.batch[j]}")
        self.device.current_stream().wait_event(self.copied[j])
        self.held[j] = True
        return self.dev[j][:self.size[j]]

    def release(self, k: int) -> None:
        j = k % 2
        if self.batch[j] == k and self.held[j]:
            self.released[j] = self.device.record(self.device.current_stream())
            self.held[j] = False

    def close(self):
        self.device.synchronize()
        self.pinned, self.dev, self._keys = [None, None], [None, None], [None, None]
        self.batch, self.held = [None, None], [False, False]


# ---- the loop -----------------------------------------------------------------------------

def batch_ranges(n_events: int, batch_size: int) -> list[tuple[int, int]]:
    if batch_size < 1:
        raise GpusmdError(f"batch size must be at least 1, got {batch_size}")
    return [(a, min(n_events, a + batch_size)) for a in range(0, n_events, batch_size)]


def _out_of_memory(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError"


def run_batches(procs: Mapping, reader: Callable, n_events: int, batch_size: int, backend,
                consume: Callable, device=None, read_ahead: bool = True) -> int:
    """Feed every batch [start, stop) of events to ``consume(start, stop, frames)``, in
    order, once; frames = {det: raw (stop - start, *shape)} read with
    ``reader(det, start, stop)`` for each detector of ``procs``. Returns the number of
    batches. See :func:`stream_batches`."""
    dets = list(procs)
    items = (((a, b), {det: reader(det, a, b) for det in dets})
             for a, b in batch_ranges(n_events, batch_size))
    return stream_batches(procs, items, batch_size, backend,
                          lambda key, frames: consume(key[0], key[1], frames), device, read_ahead)


def stream_batches(procs: Mapping, items: Iterable, batch_size: int, backend, consume: Callable,
                   device=None, read_ahead: bool = True) -> int:
    """Feed every ``(key, frames)`` of ``items`` (frames = {det: raw (B, *shape)}, B <=
    ``batch_size``, for each detector of ``procs``) to ``consume(key, frames)``, in order,
    once. Returns the number of batches.

    On the CPU backend (and no ``device``) this is the plain loop. On the GPU, frames
    are device arrays: item k + 1 is read (in a thread, with ``read_ahead``) and its
    host -> device copy started before item k is consumed, so the copy overlaps item k's
    compute. The device arrays are reused: ``consume`` must not keep references to them
    past its return (calibrated data are new arrays)."""
    if batch_size < 1:
        raise GpusmdError(f"batch size must be at least 1, got {batch_size}")
    dets = list(procs)
    items = iter(items)
    if device is None and not backend.is_gpu:
        n = 0
        for key, frames in items:
            consume(key, frames)
            n += 1
        return n
    end = object()
    first = next(items, end)
    if first is end:
        return 0
    device = device if device is not None else CupyDevice()
    slots = {det: DeviceBatches(batch_size, device) for det in dets}
    pool = ThreadPoolExecutor(1, thread_name_prefix="gpusmd-read") if read_ahead else None
    pending = None
    n = 0
    try:
        device.synchronize()             # constants uploaded on other streams are in place
        key = first[0]
        for det in dets:
            slots[det].put(0, first[1][det])
        del first
        if pool is not None:
            pending = pool.submit(next, items, end)
        k = 0
        while True:
            nxt = pending.result() if pool is not None else next(items, end)
            pending = None
            if nxt is not end:           # item k + 1: read, onto the bus
                if pool is not None:
                    pending = pool.submit(next, items, end)
                for det in dets:
                    slots[det].put(k + 1, nxt[1][det])
            frames = {det: slots[det].get(k) for det in dets}
            consume(key, frames)
            n += 1
            del frames
            for det in dets:
                slots[det].release(k)
            if nxt is end:
                break
            key = nxt[0]
            del nxt
            k += 1
    except Exception as e:
        if _out_of_memory(e):            # CuPy's OutOfMemoryError: say which batch fits
            raise _memory_error(procs, batch_size, e) from e
        raise
    finally:
        if pending is not None:
            pending.cancel()
        if pool is not None:
            pool.shutdown(wait=True)
        for s in slots.values():
            s.close()
    return n


def _memory_error(procs, batch_size, e) -> GpusmdError:
    """A CuPy OutOfMemoryError during a batch, as a one-line error with a batch size."""
    models = [p.model for p in procs.values()]
    names = " + ".join(m.type for m in models)
    try:
        import cupy
        _, total = cupy.cuda.runtime.memGetInfo()
    except Exception:  # noqa: BLE001 -- the advice then goes without the card's size
        total = None
    msg = f"{names}, batch {batch_size}: out of GPU memory ({e})"
    if batch_size <= 1:
        return GpusmdError(msg + "; use --backend cpu or a card with more memory")
    best = batch_size // 2
    droplets = any(f.kind in ("droplet", "droplet2photons") for p in procs.values()
                   for f in getattr(p, "features", ()))
    kw = {} if droplets else {"droplet_occupancy": None}
    if total:
        best = max(1, min(best, largest_batch(models, int(total * 0.9), **kw)))
        msg += (f"; estimated need {fmt_bytes(_total(models, batch_size, **kw))} "
                f"of the card's {fmt_bytes(total)}")
    return GpusmdError(msg + f"; use --batch-size {best} or less")


if __name__ == "__main__":
    sys.exit(main_memory())

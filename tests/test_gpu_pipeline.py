"""The GPU memory arithmetic, and the overlapped host -> device loop: its ordering logic
on the CPU through a fake device whose copies only happen when something waits for
them, and (with a device) the real CUDA path."""
import re

import numpy as np
import pytest

from gpusmd.backend import Backend
from gpusmd.detectors import DETECTORS, get_detector
from gpusmd.errors import GpusmdError
from gpusmd.gpu_pipeline import (DeviceBatches, batch_ranges, check_fits, largest_batch,
                                 main_memory, memory_report, run_batches,
                                 stream_batches)

from conftest import gpu_available

GiB, MiB = 2 ** 30, 2 ** 20
CPU = Backend("cpu", np)


# ---- memory ----------------------------------------------------------------------------

def hand(npix, ngain, nstate, B, raw=2, funcs=2, sums=2, cm=True, cb=0):
    """The module docstring's table, written out."""
    per_event = 2 * raw + 4 + 4 + (9 if cm else 0)
    fixed = ngain * 8 + cb + ((9 * nstate + 4) if cm else 0) + 16 * funcs + 8 * sums
    # droplets, at the default occupancy (5% of the pixels, 0.05 photons a pixel)
    droplets = int(np.ceil(npix * (18 + 0.05 * (128 + 160))))
    return B * (per_event * npix + droplets) + fixed * npix + 256 * MiB


@pytest.mark.parametrize("B", [1, 16, 64])
def test_memory_epix10k2m(B):
    n = 16 * 352 * 384
    r = memory_report(DETECTORS["epix10k2M"], B)
    assert r["npix"] == n
    assert r["raw_batches"] == 2 * B * n * 2
    assert r["calibrated"] == B * n * 4
    assert r["common_mode_work"] == B * n * 9
    assert r["lut"] == 8 * n * 2 * 4            # 7 gain ranges + the no-range row
    assert r["control_bits"] == n
    assert r["common_mode_tables"] == 2 * n * 9 + 4 * n
    assert r["feature_maps"] == 2 * n * 16
    assert r["pinned_host"] == 2 * B * n * 2
    assert r["total"] == hand(n, 8, 2, B, cb=1)
    assert r["total"] == r["fixed"] + B * r["per_event"]


@pytest.mark.parametrize("B", [1, 8, 32])
def test_memory_jungfrau4m(B):
    n = 8 * 512 * 1024
    r = memory_report(DETECTORS["jungfrau4M"], B, n_functions_hint=1, n_sums=3)
    assert r["total"] == hand(n, 3, 4, B, funcs=1, sums=3)
    assert r["control_bits"] == 0
    plain = memory_report(DETECTORS["jungfrau4M"], B, common_mode=False)
    assert plain["common_mode_work"] == plain["common_mode_tables"] == 0
    assert plain["total"] == hand(n, 3, 4, B, cm=False)
    if B == 32:      # 32 x 53.4 B + 104 B per pixel, 4 Mpixel, + 256 MiB: 7.33 GiB
        assert f"{r['total'] / GiB:.2f}" == "7.33"


def test_memory_cspad_raw_dtype():
    r = memory_report(DETECTORS["cspad"], 4)
    assert r["raw_batches"] == 2 * 4 * 32 * 185 * 388 * 2        # int16 raw
    assert r["total"] == hand(32 * 185 * 388, 1, 1, 4)


def test_check_fits_message():
    model = DETECTORS["epix10k2M"]
    need = memory_report(model, 64)["total"]
    free = 2 * GiB
    assert need > free
    best = largest_batch(model, free)
    assert memory_report(model, best)["total"] <= free < memory_report(model, best + 1)["total"]
    with pytest.raises(GpusmdError) as e:
        check_fits(model, 64, free)
    msg = str(e.value)
    assert msg.startswith("epix10k2M, batch 64: needs ")
    assert f"{need / GiB:.1f} GiB of GPU memory" in msg
    assert "2.0 GiB free" in msg
    assert msg.endswith(f"use --batch-size {best} or less")
    report = check_fits(model, best, free)                         # fits: no error
    assert report["total"] <= free


def test_check_fits_nothing_fits_and_several_detectors():
    with pytest.raises(GpusmdError, match="not even a batch of 1 fits.*--backend cpu"):
        check_fits(DETECTORS["jungfrau4M"], 8, 300 * MiB)
    both = [DETECTORS["epix10k2M"], DETECTORS["jungfrau4M"]]
    free = 8 * GiB
    best = largest_batch(both, free)
    assert best < largest_batch(DETECTORS["epix10k2M"], free)
    with pytest.raises(GpusmdError, match=rf"^epix10k2M \+ jungfrau4M, batch 64: .*"
                                          rf"--batch-size {best} or less$"):
        check_fits(both, 64, free)


def test_memory_cli(capsys):
    assert main_memory(["--detector", "epix10k2M", "--batch-size", "64", "--free-gib", "2"]) == 2
    out, err = capsys.readouterr()
    assert "total GPU memory" in out and "epix10k2M, batch 64: needs" in err
    assert main_memory(["--detector", "camera", "--shape", "512", "512", "--batch-size", "8",
                        "--free-gib", "4"]) == 0
    assert "fits" in capsys.readouterr().out
    # without droplets the droplet line goes and the total drops by its bytes
    main_memory(["--detector", "jungfrau4M", "--batch-size", "32", "--free-gib", "100"])
    with_drops = capsys.readouterr().out
    main_memory(["--detector", "jungfrau4M", "--batch-size", "32", "--free-gib", "100",
                 "--no-droplets"])
    without = capsys.readouterr().out
    assert "droplet labels" in with_drops and "droplet labels" not in without
    total = [float(re.search(r"total GPU memory +([\d.]+) GiB", o)[1]) for o in (with_drops, without)]
    drops = float(re.search(r"photon placement +([\d.]+) GiB", with_drops)[1])
    assert abs(total[0] - total[1] - drops) < 0.15
    assert main_memory(["--detector", "camera", "--shape", "8", "8",
                        "--droplet-occupancy", "2"]) == 2


# ---- a fake device: copies are queued on their stream and run only when waited for -------

class FakeEvent:
    def __init__(self, stream, upto):
        self.stream, self.upto = stream, upto

    def synchronize(self):
        self.stream.run(self.upto)


class FakeStream:
    def __init__(self, log, name):
        self.ops, self.done, self.log, self.name = [], 0, log, name

    def enqueue(self, op):
        self.ops.append(op)

    def run(self, upto):
        while self.done < upto:
            self.ops[self.done]()
            self.done += 1

    def wait_event(self, event):
        # later work on this stream starts after the event: make it happen now
        event.synchronize()
        self.log.append(("wait", self.name, event.stream.name, event.upto))


class FakeDevice:
    """numpy 'device' memory; copies are deferred until an event on their stream is
    waited for, so a missing wait shows as stale data, an early overwrite of a pinned
    buffer as wrong data."""
    xp = np

    def __init__(self):
        self.log = []
        self.compute = FakeStream(self.log, "compute")
        self.streams = []

    @property
    def n_streams(self):
        return len(self.streams)

    def empty_pinned(self, shape, dtype):
        return np.full(shape, 13, dtype)                 # poison

    def empty(self, shape, dtype):
        return np.full(shape, 7, dtype)                  # poison

    def new_stream(self):
        self.streams.append(FakeStream(self.log, f"copy{len(self.streams) + 1}"))
        return self.streams[-1]

    def current_stream(self):
        return self.compute

    def record(self, stream):
        return FakeEvent(stream, len(stream.ops))

    def copy_h2d_async(self, dst, src, stream):
        assert dst.shape == src.shape and dst.dtype == src.dtype
        snapshot = src.copy()

        def copy():
            # the host must not touch a pinned buffer while a copy from it is pending
            np.testing.assert_array_equal(src, snapshot, "pinned buffer overwritten early")
            dst[...] = src
        stream.enqueue(copy)
        self.log.append(("copy", stream.name, int(src.reshape(len(src), -1)[0, 0])
                         if src.size else None))

    def synchronize(self):
        for s in self.streams:
            s.run(len(s.ops))


def frames_of(det, a, b, shape=(3, 4), dtype=np.uint16):
    """Distinct content per event and detector: event e, pixel p -> 1000 e + p (+ det)."""
    base = np.arange(a, b)[:, None] * 1000 + np.arange(int(np.prod(shape)))[None, :]
    return (base + (0 if det == "a" else 500)).astype(dtype).reshape(b - a, *shape)


@pytest.mark.parametrize("n,B", [(10, 3), (9, 3), (1, 4), (4, 4), (0, 2), (7, 1)])
@pytest.mark.parametrize("read_ahead", [True, False])
def test_run_batches_fake_device(n, B, read_ahead):
    procs = {"a": None, "b": None}
    seen = []

    def consume(a, b, frames):
        for det, raw in frames.items():
            np.testing.assert_array_equal(raw, frames_of(det, a, b))
        seen.append((a, b))

    dev = FakeDevice()
    nb = run_batches(procs, frames_of, n, B, CPU, consume, device=dev, read_ahead=read_ahead)
    assert seen == batch_ranges(n, B) and nb == len(seen)
    assert sum(b - a for a, b in seen) == n
    assert dev.n_streams == (4 if n else 0)           # two copy streams per detector


def test_out_of_memory_becomes_one_line():
    class OutOfMemoryError(MemoryError):          # what CuPy raises, by name
        pass

    class Proc:
        model = DETECTORS["epix10k2M"]

    def consume(a, b, frames):
        raise OutOfMemoryError("Out of memory allocating 553,648,128 bytes")

    with pytest.raises(GpusmdError, match=r"^epix10k2M, batch 64: out of GPU memory .*"
                                          r"use --batch-size \d+ or less$"):
        run_batches({"e": Proc()}, lambda det, a, b: np.zeros((b - a, 2), np.uint16), 100, 64,
                    CPU, consume, device=FakeDevice())
    with pytest.raises(ValueError):                  # other errors pass through
        run_batches({"e": Proc()}, lambda det, a, b: np.zeros((b - a, 2), np.uint16), 100, 64,
                    CPU, lambda a, b, f: int("x"), device=FakeDevice())


def test_run_batches_cpu_is_the_plain_loop():
    calls = []

    def reader(det, a, b):
        calls.append(("read", a))
        return frames_of(det, a, b)

    def consume(a, b, frames):
        calls.append(("consume", a))
        assert all(isinstance(f, np.ndarray) for f in frames.values())

    run_batches({"a": None}, reader, 7, 3, CPU, consume)
    assert calls == [("read", 0), ("consume", 0), ("read", 3), ("consume", 3),
                     ("read", 6), ("consume", 6)]


def test_copy_overlaps_compute_order():
    """Batch k+1's copy is started before batch k is consumed."""
    dev = FakeDevice()
    order = []

    def reader(det, a, b):
        order.append(("read", a))
        return frames_of(det, a, b)

    def consume(a, b, frames):
        order.append(("consume", a))
        dev.compute.enqueue(lambda: None)            # the batch's kernels

    run_batches({"a": None}, reader, 12, 3, CPU, consume, device=dev, read_ahead=False)
    assert order == [("read", 0), ("read", 3), ("consume", 0), ("read", 6), ("consume", 3),
                     ("read", 9), ("consume", 6), ("consume", 9)]
    copies = [e for e in dev.log if e[0] == "copy"]
    assert [c[2] for c in copies] == [0, 3000, 6000, 9000]
    assert [c[1] for c in copies] == ["copy1", "copy2", "copy1", "copy2"]   # alternating
    # the copy of batch k + 2 into a device buffer waits for the compute of batch k (k + 1
    # compute ops), and the compute of batch k for its own copy
    log = [e for e in dev.log if e[0] in ("copy", "wait")]
    assert log == [("copy", "copy1", 0),
                   ("copy", "copy2", 3000), ("wait", "compute", "copy1", 1),
                   ("wait", "copy1", "compute", 1), ("copy", "copy1", 6000),
                   ("wait", "compute", "copy2", 1),
                   ("wait", "copy2", "compute", 2), ("copy", "copy2", 9000),
                   ("wait", "compute", "copy1", 2),
                   ("wait", "compute", "copy2", 2)]


def test_device_batches_contract():
    dev = FakeDevice()
    db = DeviceBatches(4, dev)
    db.put(0, frames_of("a", 0, 4))
    db.put(1, frames_of("a", 4, 8))
    x0 = db.get(0)
    np.testing.assert_array_equal(x0, frames_of("a", 0, 4))
    with pytest.raises(RuntimeError, match="not released"):
        db.put(2, frames_of("a", 8, 12))             # batch 0 still in use
    db.release(0)
    db.put(2, frames_of("a", 8, 10))                 # a short last batch
    with pytest.raises(RuntimeError, match="holds batch 2"):
        db.get(0)
    np.testing.assert_array_equal(db.get(1), frames_of("a", 4, 8))
    db.release(1)
    np.testing.assert_array_equal(db.get(2), frames_of("a", 8, 10))
    db.release(2)
    db.put(3, frames_of("a", 0, 6, dtype=np.int16))  # new dtype, larger: new buffers
    np.testing.assert_array_equal(db.get(3), frames_of("a", 0, 6, dtype=np.int16))
    db.release(3)
    db.put(4, frames_of("a", 0, 7))                  # slot 0 grows; slot 1 keeps batch 3
    np.testing.assert_array_equal(db.get(3), frames_of("a", 0, 6, dtype=np.int16))
    np.testing.assert_array_equal(db.get(4), frames_of("a", 0, 7))
    db.close()
    # a batch skipped before use: its pending copy leaves before the pinned buffer is reused
    db = DeviceBatches(2, FakeDevice())
    for k in range(3):
        db.put(k, frames_of("a", 2 * k, 2 * k + 2))
    np.testing.assert_array_equal(db.get(2), frames_of("a", 4, 6))
    db.close()


def test_run_batches_with_processors(simulated, tmp_path):
    """The pipelined loop with real processors (CPU backend, fake device) gives the same
    columns as the plain loop, though the raw buffers are reused between batches."""
    from gpusmd.config import load_config
    from gpusmd.io.raw import RawRun
    from gpusmd.replay import build_processors, process_batch
    from gpusmd.runinfo import RunInfo
    data = simulated("epix100", n_events=20)
    (tmp_path / "run.yaml").write_text(
        "detectors:\n  epix100:\n    common_mode: [7, 3, 100, 10]\n"
        "    functions:\n      - {kind: roi, bounds: [[10, 100], [20, 200]]}\n"
        "    sums: [calib]\n")
    config = load_config(tmp_path / "run.yaml")

    def reduce(device):
        with RawRun(data) as run:
            procs = build_processors(config, RunInfo.from_run(run), CPU)
            cols = []
            stream_batches(procs, ((b, b.frames) for b in run.batches(6)), 6, CPU,
                           lambda b, frames: cols.append(
                               process_batch(procs, b, [], config, frames)),
                           device=device)
            return cols, procs["epix100"].run_sums()["calib"]

    outs = {"plain": reduce(None), "fake": reduce(FakeDevice())}
    (plain, sum_p), (fake, sum_f) = outs["plain"], outs["fake"]
    assert len(plain) == len(fake) == 4
    for p, f in zip(plain, fake):
        assert p.keys() == f.keys()
        for key in p:
            np.testing.assert_array_equal(p[key], f[key], err_msg=key)
    np.testing.assert_array_equal(sum_p, sum_f)


# ---- on a device ---------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a CUDA device")
def test_device_batches_cuda():
    import cupy
    model = get_detector("jungfrau1M")
    rng = np.random.default_rng()
    n, B = 11, 4
    data = rng.integers(0, 2 ** 16, (n, *model.shape), dtype=np.uint16)
    seen = []

    def consume(a, b, frames):
        raw = frames["j"]
        assert isinstance(raw, cupy.ndarray) and raw.dtype == cupy.uint16
        # some compute on the current stream while the next copy runs
        s = int((raw.astype(cupy.float32) * 2).sum(dtype=cupy.float64).get())
        np.testing.assert_array_equal(cupy.asnumpy(raw), data[a:b])
        assert s == 2 * int(data[a:b].sum(dtype=np.int64))
        seen.append((a, b))

    gpu = Backend("gpu", cupy)
    run_batches({"j": None}, lambda det, a, b: data[a:b], n, B, gpu, consume)
    assert seen == batch_ranges(n, B)

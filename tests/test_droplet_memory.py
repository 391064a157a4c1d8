"""The GPU memory model's droplet bytes hold what the droplet path allocates: the CPU
path's numpy allocations (tracemalloc) at the peak of one batch, for the droplet finder's
options and droplet2photons, standalone and chained."""
import tracemalloc

import numpy as np
import pytest

from gpusmd.backend import get_backend
from gpusmd.config import Where
from gpusmd.detectors import get_detector
from gpusmd.features.droplet import Droplet, droplet_bytes_per_pixel
from gpusmd.features.photons import Droplet2Photons
from gpusmd.gpu_pipeline import DEFAULT_DROPLET_OCCUPANCY, memory_report

CPU = get_backend("cpu")
W = Where("test.yaml", "droplet")
MODEL = get_detector("camera", (256, 384))
MASKS = {"cmask": np.ones(MODEL.shape, np.uint8)}
B = 4


def frames(occupancy, seed=0):
    """Unit noise and ``occupancy`` of the pixels lit with 0.5 to 5 photons of 10 ADU."""
    rng = np.random.default_rng(seed)
    f = rng.normal(0, 1, (B, *MODEL.shape)).astype(np.float32)
    lit = rng.random(f.shape) < occupancy
    f[lit] += rng.uniform(5, 50, lit.sum()).astype(np.float32)
    return f


def peak_bytes(fn, *args):
    fn(*args)                                   # warm: lazy imports, caches
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn(*args)
        return tracemalloc.get_traced_memory()[1] - base, out
    finally:
        tracemalloc.stop()


P = {"useRms": False, "threshold": 5, "thresholdLow": 3}


def chained(f):
    parent = Droplet("droplet", P, MODEL, MASKS, CPU, W)
    child = Droplet2Photons("d2p", {"aduspphot": 10}, MODEL, MASKS, CPU, W,
                            input_shape=parent.output_shape)

    def both(frames_):
        parent.process(frames_)
        return child.process(parent.child_data)
    return both


@pytest.mark.parametrize("occupancy", [0.002, 0.02, 0.1])
@pytest.mark.parametrize("which", ["droplet", "relabel false", "joinBrightest",
                                   "droplet2photons", "chained"])
def test_model_holds_what_the_droplet_path_allocates(which, occupancy):
    f = frames(occupancy)
    make = {
        "droplet": lambda: Droplet("d", P, MODEL, MASKS, CPU, W).process,
        "relabel false": lambda: Droplet("d", {**P, "relabel": False}, MODEL, MASKS, CPU,
                                         W).process,
        "joinBrightest": lambda: Droplet("d", {**P, "relabel": False, "joinBrightest": True},
                                         MODEL, MASKS, CPU, W).process,
        "droplet2photons": lambda: Droplet2Photons("d", {**P, "aduspphot": 10}, MODEL, MASKS,
                                                   CPU, W).process,
        "chained": lambda: chained(f),
    }[which]()
    used, out = peak_bytes(make, f)
    # the occupancy the model is asked for: pixels in droplets, photons per pixel
    finder = Droplet("d", P, MODEL, MASKS, CPU, W).finder
    in_droplets = float((finder(f)[1] > 0).mean())
    photons = float(out["nPhotons"].sum()) / f.size if "nPhotons" in out else 0.0
    model = droplet_bytes_per_pixel(max(in_droplets, photons)) * f.size
    assert used <= model, f"{used / f.size:.1f} B/pixel used, {model / f.size:.1f} modelled"


def test_memory_report_counts_the_droplets():
    model = get_detector("jungfrau05M")
    r = memory_report(model, 8)
    per_event = np.ceil(model.npix * droplet_bytes_per_pixel(DEFAULT_DROPLET_OCCUPANCY))
    assert r["droplets"] == 8 * int(per_event)
    none = memory_report(model, 8, droplet_occupancy=None)
    assert none["droplets"] == 0
    assert r["total"] - none["total"] == r["droplets"]
    assert r["total"] == r["fixed"] + 8 * r["per_event"]

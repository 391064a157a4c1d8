"""Feature benchmarks per core (CPU backend), each beside its reference in the same run.

    python bench/features.py [--events 16]

1. Azimuthal integration, 500 q bins, polarization and solid-angle corrections, on a
   frame of epix10k2M size (a flat 1408 x 1536 detector, 2.16 Mpixel), against pyFAI's
   integrate1d on the same frame and geometry (method no splitting / CSR / cython, the
   fastest pyFAI engine without pixel splitting; OMP_NUM_THREADS=1 for one core). The
   per-run set-up (maps, bin indices; pyFAI's CSR matrix) is done before the clock.
2. Droplets + droplet2photons + photons on calibrated epix100 frames of a simulated run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")      # one core for pyFAI's OpenMP loops too
os.environ.setdefault("GPUSMD_THREADS", "1")       # and for gpusmd's CPU engine

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results  # noqa: E402

from gpusmd.backend import get_backend  # noqa: E402
from gpusmd.config import Where, load_config  # noqa: E402
from gpusmd.detectors import get_detector  # noqa: E402
from gpusmd.features.azimuthal import AzimuthalIntegration, image_origin, smalldata_to_pyfai  # noqa: E402

CPU = get_backend("cpu")


def rate(fn, n_events: int, repeat: int = 3) -> float:
    best = min(_timed(fn) for _ in range(repeat))
    return n_events / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_azav(n_events: int):
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator
    model = get_detector("camera", (1408, 1536))
    center, dist, ebeam = (2000.0, -3000.0), 80.0, 9.5
    masks = {"cmask": np.ones(model.shape, np.uint8)}
    probe = AzimuthalIntegration("azav", {"center": list(center), "dis_to_sam": dist,
                                          "eBeam": ebeam, "qbin": 0.01}, model, masks, CPU,
                                 Where("bench"))
    q = probe.q_map[np.isfinite(probe.q_map)]
    edges = np.linspace(q.min(), q.max() * (1 + 1e-6), 501).tolist()
    params = {"center": list(center), "dis_to_sam": dist, "eBeam": ebeam, "qedges": edges,
              "polarization": True, "solidangle": True, "Pplane": 1.0}
    azav = AzimuthalIntegration("azav", params, model, masks, CPU, Where("bench"))
    rng = np.random.default_rng(0)
    frames = rng.gamma(2.0, 5.0, (n_events, *model.shape)).astype(np.float32)
    azav.process(frames[:1])
    ours = rate(lambda: azav.process(frames), n_events)

    x, y, _ = model.coords_um()
    p = model.pixel_size_um
    geo = smalldata_to_pyfai(center, dist, 0, 0, ebeam, image_origin(x, y, p, p), 1.0)
    ai = AzimuthalIntegrator(dist=geo["dist"], poni1=geo["poni1"], poni2=geo["poni2"],
                             rot1=geo["rot1"], rot2=geo["rot2"], rot3=geo["rot3"],
                             detector=Detector(p * 1e-6, p * 1e-6, max_shape=model.shape),
                             wavelength=geo["wavelength"])
    kw = dict(npt=500, unit="q_A^-1", correctSolidAngle=True,
              polarization_factor=geo["polarization_factor"], method=("no", "csr", "cython"),
              radial_range=(edges[0], edges[-1]))
    ai.integrate1d(frames[0], **kw)                     # builds the CSR matrix once
    theirs = rate(lambda: [ai.integrate1d(f, **kw) for f in frames], n_events)
    ref = ai.integrate1d(frames[0], **kw)
    mine = azav.process(frames[:1])["azav"][0, 0]
    busy = azav.counts[0] > 50
    worst = float(np.nanmax(np.abs(mine[busy] / ref.intensity[busy] - 1)))
    return ours, theirs, worst


def bench_droplets(n_events: int, workdir: Path):
    from gpusmd.calib.dark import process_dark
    from gpusmd.processor import DetectorProcessor
    from gpusmd.io.raw import RawRun
    from gpusmd.simulate import simulate_run
    workdir.mkdir(parents=True, exist_ok=True)
    simulate_run(workdir / "dark.h5", "epix100", n_events=10, dark=True, run=1)
    simulate_run(workdir / "run.h5", "epix100", n_events=n_events, run=2, bragg_spots=0.0)
    process_dark(workdir / "dark.h5", workdir / "constants.h5", force=True)
    (workdir / "run.yaml").write_text(textwrap.dedent("""\
        detectors:
          epix100:
            calib: constants.h5
            common_mode: 46
            functions:
              - {kind: droplet, threshold: 5, thresholdLow: 3, thresADU: 50}
              - {kind: droplet2photons, threshold: 5, thresholdLow: 3, thresADU: 50, aduspphot: 150}
              - {kind: photons, ADU_per_photon: 150}
        """))
    cfg = load_config(workdir / "run.yaml").detectors["epix100"]
    with RawRun(workdir / "run.h5") as run:
        raw = run.read("epix100", 0, n_events)
        proc = DetectorProcessor(cfg, run.detectors["epix100"], CPU, run.run)
    proc.process(raw[:2])
    calib = proc.calibrator(raw)
    features = lambda: [f.process(calib) for f in proc.features]  # noqa: E731
    return rate(features, n_events), rate(lambda: proc.process(raw), n_events)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    columns = ["work", "implementation", "events/s per core", "ratio"]
    ours, theirs, worst = bench_azav(args.events)
    rows = [["azimuthal integration, 2.16 Mpixel, 500 q bins, pol + solid angle",
             "pyFAI integrate1d (no split, CSR, cython, 1 thread)", f"{theirs:.1f}", "1.0"],
            ["", f"gpusmd CPU backend ({CPU.label})", f"{ours:.1f}", f"{ours / theirs:.2f}"]]
    drop, chain = bench_droplets(args.events * 4, args.workdir or Path(tempfile.mkdtemp()))
    rows += [["epix100: droplet + droplet2photons + photons", "gpusmd CPU backend, features",
              f"{drop:.1f}", ""],
             ["", f"with calibration and common mode 46 ({CPU.label})", f"{chain:.1f}", ""]]
    print_table(columns, rows)
    md = write_results("features-cpu", "Feature throughput per core (CPU)", columns, rows,
                       notes=f"`python bench/features.py --events {args.events}`; best of 3. "
                       f"On this random frame gpusmd and pyFAI differ by at most {worst:.1e} "
                       "(relative) on bins with more than 50 pixels: gpusmd returns the mean of "
                       "I / (pol x solid angle) per bin (smalldata), pyFAI sum(I) / sum(pol x "
                       "solid angle); on smooth images (tests/test_azimuthal.py) they agree to "
                       "1e-5.")
    print(f"wrote {md}")


if __name__ == "__main__":
    main()

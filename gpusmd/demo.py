"""The demo: simulate a dark and a data run, derive constants, reduce the run through the
live services (publish -> ingest -> 2 workers -> sink, on loopback), check the result
against the in-process replay, summarise and plot. Run again in the same folder, it
replaces the files it wrote there."""
from __future__ import annotations

import textwrap
from pathlib import Path

import h5py
import numpy as np

from .backend import get_backend
from .config import load_config
from .detectors import get_detector


# pixels below this are noise (and the uncorrected common mode): a third of a 9.5 keV photon
THRESHOLD_KEV = 3.0


def demo_config(model, constants: Path) -> str:
    """Two ROIs (one panel, and the corner of it nearest the beam), thresholds, an
    azimuthal integration about the beam (the simulated ring's centre, x = y = 0), sums."""
    nseg, rows, cols = model.seg_shape
    seg = [[0, 1]] if model.segmented else []
    panel = seg + [[0, rows], [0, cols]]
    corner = seg + [[rows // 2, rows], [cols // 2, cols]]
    return textwrap.dedent(f"""\
        experiment: demo
        batch_size: 16
        detectors:
          {model.type}:
            calib: {constants.name}
            common_mode: 0
            functions:
              - {{kind: roi, name: ROI_0, bounds: {panel}, thresADU: [{THRESHOLD_KEV}, null]}}
              - {{kind: roi, name: ROI_1, bounds: {corner}, thresADU: [{THRESHOLD_KEV}, null]}}
              - {{kind: azav, name: azav, center: [0, 0], dis_to_sam: 100, qbin: 0.01}}
            sums: [calib, calib_max, calib_nhits1]
        """)


def run_demo(outdir, detector="epix10kquad", n_events=100, backend=None, n_dark=10,
             plots=True, n_workers=2):
    """``backend``: cpu, gpu or auto; None: ``$GPUSMD_BACKEND``, else auto."""
    from .calib.dark import process_dark
    from .io.compare import diff_files
    from .replay import replay
    from .services.run import replay_via_services
    from .simulate import simulate_run

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    model = get_detector(detector)
    print(f"[1/5] simulating a dark run and a data run of {n_events} events ({detector})")
    dark = simulate_run(outdir / "dark.h5", detector=detector, n_events=n_dark, dark=True, run=1)
    raw = simulate_run(outdir / "run.h5", detector=detector, n_events=n_events, run=2)
    print("[2/5] dark processing -> constants.h5")
    consts = process_dark(dark, outdir / "constants.h5", force=True)[detector]
    print(f"      {int((consts.status != 0).any(axis=0).sum())} of {model.npix} pixels flagged")
    (outdir / "run.yaml").write_text(demo_config(model, Path("constants.h5")))
    config = load_config(outdir / "run.yaml")
    backend = get_backend(backend)
    print(f"[3/5] publish -> ingest -> {n_workers} workers ({backend.name}) -> sink -> run_smd.h5")
    (outdir / "run_smd.h5").unlink(missing_ok=True)     # the sink never replaces a file
    summary = replay_via_services(raw, outdir / "run.yaml", outdir / "run_smd.h5", n_workers,
                                  backend.name, log_dir=outdir / "logs")
    print("[4/5] the same run in one process -> run_inprocess.h5")
    reference = replay(raw, config, outdir / "run_inprocess.h5", backend, progress=False,
                       force=True)
    print("[5/5] summary")
    report = summarize(summary.output, raw, detector)
    differences = diff_files(summary.output, reference.output)
    report["services vs in-process"] = ("identical, dataset by dataset" if not differences
                                        else f"{len(differences)} differences: {differences[:3]}")
    report["in-process replay"] = f"{reference.events_per_s:.1f} events/s"
    if plots:
        from .beamtime.plot import plot_small_data
        pictures = plot_small_data(summary.output, outdir / "plots", outdir / "demo.png",
                                   force=True)
        report["pictures (gpusmd plot)"] = (f"{pictures[0]} (all four); "
                                            f"{', '.join(p.name for p in pictures[1:])} in "
                                            f"{pictures[1].parent}")
    print(f"      {summary.n_events} events through the services in {summary.seconds:.1f} s "
          f"(start-up included), {len(reference.datasets)} datasets")
    for key, value in report.items():
        print(f"      {key}: {value}")
    print(f"      to watch a run live: gpusmd up --config {outdir / 'run.yaml'} --monitor, open "
          f"http://127.0.0.1:8080, and in another shell "
          f"gpusmd publish {raw} --config {outdir / 'run.yaml'}")
    return summary, report


def summarize(smd_path, raw_path, det) -> dict:
    """Compare the reduced ROI_0 sums with the simulator's deposited energy."""
    with h5py.File(smd_path, "r") as f, h5py.File(raw_path, "r") as r:
        roi_sum = f[f"{det}/ROI_0_sum"][()]
        bounds = f[f"UserDataCfg/{det}/ROI_0__bounds"][()]
        ipm = f["ipm2/sum"][()] if "ipm2/sum" in f else None
        truth = r[f"truth/{det}"]
        shape = r[f"{det}/raw"].shape[1:]
        ev, pix, kev = (truth[k][()] for k in ("deposit_event", "deposit_pixel", "deposit_keV"))
    idx = np.unravel_index(pix, shape)
    inside = np.ones(len(pix), bool)
    for axis, (lo, hi) in enumerate(bounds):
        inside &= (idx[axis] >= lo) & (idx[axis] < hi)
    true_sum = np.bincount(ev[inside], weights=kev[inside], minlength=len(roi_sum))
    report = {f"ROI_0 mean sum above {THRESHOLD_KEV} keV":
              f"{roi_sum.mean():.1f} keV (simulated deposit {true_sum.mean():.1f} keV)"}
    if ipm is not None and np.std(ipm) > 0 and np.std(roi_sum) > 0:
        report["corr(ROI_0_sum, ipm2/sum)"] = f"{np.corrcoef(roi_sum, ipm)[0, 1]:.3f}"
    return report

"""Calibration + common mode per core (CPU backend) beside psana-style NumPy.

    python bench/common_mode.py [--events 16] [--psana-events 2]

R1-like: epix10k2M with code 85 (mode 7, rows + columns); R2-like: Jungfrau 4M with
code 7 (mode 7, rows + columns). gpusmd: the calibration tables, then the group medians
of all groups of a batch at once (one process, one core). psana style: per event the
gain look-up, then per panel a loop of np.median over the good pixels of each group
(bench/psana_style.py). Both start from the same raw frames and constants, and their
results are compared before the rates are reported."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results  # noqa: E402
from psana_style import calibrate_event, cm_mode7_event  # noqa: E402

from gpusmd.backend import get_backend  # noqa: E402
from gpusmd.calib.calibrate import Calibrator  # noqa: E402
from gpusmd.calib.common_mode import CM_GAIN_RANGES, CommonMode, resolve  # noqa: E402
from gpusmd.calib.dark import process_dark  # noqa: E402
from gpusmd.calib.masks import pixel_masks  # noqa: E402
from gpusmd.io.raw import RawRun  # noqa: E402
from gpusmd.simulate import simulate_run  # noqa: E402

CASES = [("epix10k2M", 85), ("jungfrau4M", 7)]
BATCH = 8


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=16)
    p.add_argument("--psana-events", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    base = args.workdir or Path(tempfile.mkdtemp(prefix="gpusmd-cm-"))
    columns = ["detector", "code", "implementation", "events/s per core", "ratio"]
    rows = []
    for det, code in CASES:
        d = base / det
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "run.h5").exists():
            simulate_run(d / "dark.h5", det, n_events=5, dark=True, run=1)
            simulate_run(d / "run.h5", det, n_events=args.events, run=2)
        consts = process_dark(d / "dark.h5", d / "constants.h5", force=True)[det]
        with RawRun(d / "run.h5") as run:
            model = run.detectors[det]
            raw = run.read(det, 0, args.events)
            cb = run.control_bits(det, 0)
        cmpars = resolve(model.family, code)
        mask = pixel_masks(model, consts)["cmask"]
        cal = Calibrator(model, consts, mask, get_backend("cpu"), "divide", CM_GAIN_RANGES[model.family])
        cal.set_control_bits(0, cb)
        cm = CommonMode(model, cmpars)

        def ours(frames):
            adu, scale, good = cal.split(frames)
            cm(adu, good)
            return (adu * scale).reshape(frames.shape)

        ours(raw[:BATCH])                                   # tables built once per run
        t0 = time.perf_counter()
        out = np.concatenate([ours(raw[i:i + BATCH]) for i in range(0, len(raw), BATCH)])
        rate = len(raw) / (time.perf_counter() - t0)

        gain_index = model.gain_index(raw[:args.psana_events], cb)
        allowed = np.isin(gain_index, CM_GAIN_RANGES[model.family]) & (mask != 0)
        t0 = time.perf_counter()
        ref = []
        for e in range(args.psana_events):
            adu, factor = calibrate_event(raw[e], gain_index[e], consts.pedestal, consts.gain, mask)
            adu = cm_mode7_event(adu, allowed[e], model.family, *cmpars[1:4])
            ref.append(adu * factor)
        psana_rate = args.psana_events / (time.perf_counter() - t0)
        worst = float(np.max(np.abs(np.stack(ref) - out[:args.psana_events])))
        assert worst < 1e-3, f"{det}: gpusmd and psana-style differ by {worst}"
        rows.append([det, code, "psana-style NumPy (per-group loops)", f"{psana_rate:.2f}", "1.0"])
        rows.append([det, code, "gpusmd NumPy backend", f"{rate:.2f}", f"{rate / psana_rate:.1f}"])
        print_table(columns, rows)
    md = write_results("common-mode-cpu", "Calibration + common mode, events/s per core (CPU)",
                       columns, rows, notes=f"`python bench/common_mode.py --events {args.events} "
                       f"--psana-events {args.psana_events}`; both implementations agree to 1e-3 "
                       "keV on every pixel of the events compared.")
    print(f"wrote {md}")


if __name__ == "__main__":
    main()

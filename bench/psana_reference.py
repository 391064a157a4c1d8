"""psana2's own code as the reference: gpusmd's CPU backend beside psana on the same
frames, in the same run, in one process.

    python bench/psana_reference.py [--events N] [--repeat R] [--jungfrau jungfrau4M]

The data: a simulated dark run and data run of each detector, the constants of the dark
(gpusmd dark), the data run written as an LCLS-II XTC2 file (gpusmd.io.xtc2) that psana
reads with its real detector classes, and gpusmd's constants given to psana
(gpusmd.calib.psana_constants.to_psana, injected in the run as its calibconst).

Calibration: psana's det.raw.calib(evt, cmpars=...) per event (its time alone, the
events already read; the first event, where psana builds its caches, left out) beside
gpusmd's calibration (DetectorProcessor.calibrate, mask status: the pixels psana masks)
of the same raw frames in batches of 1 and of 8 (the per-run tables built before the
clock starts). epix10k2M: common mode off and (7,3,100,10) = gpusmd 85; Jungfrau:
psana's Python calibration (cversion=0) with common mode off and (7,3,10,10) = gpusmd 7,
and psana's default C++ calibration (cversion=3), which applies no common mode. Before
any rate is reported, gpusmd's calibrated first event is checked equal, bit for bit, to
psana's (for cversion 3: gpusmd's without common mode, the work psana does).

Reading: psana's loop over run.events() calling det.raw.raw(evt) on the XTC2 file,
beside gpusmd's replay of the same file end to end (calibration + common mode 85 + one
ROI + a sum image, written to an output file) and of its HDF5 twin; and the same work
done with psana (det.raw.calib with (7,3,100,10), the ROI sum and a running sum image
in NumPy), the way an event loop written with psana does it. Per event after the first
(psana) or after the first batch (gpusmd, a clock on each batch of the replay), and for
the whole run, from opening it.

Best of R repeats for each, the repeats interleaved (psana, gpusmd, psana, gpusmd, ...)
so that the machine's noise hits both alike. Results: bench/results/psana-reference-cpu.
{json,md}. bench/run.py takes its psana reference rows from the functions here.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results  # noqa: E402

from gpusmd.backend import get_backend  # noqa: E402
from gpusmd.calib.constants import Constants  # noqa: E402
from gpusmd.calib.dark import process_dark  # noqa: E402
from gpusmd.calib.psana_constants import to_psana  # noqa: E402
from gpusmd.config import load_config  # noqa: E402
from gpusmd.cpu_engine import THREADS_VAR  # noqa: E402
from gpusmd.io.source import open_run  # noqa: E402
from gpusmd.io.xtc2 import write_xtc2  # noqa: E402
from gpusmd.replay import build_processors, replay  # noqa: E402
from gpusmd.runinfo import RunInfo  # noqa: E402
from gpusmd.simulate import simulate_run  # noqa: E402

CPU = get_backend("cpu")
BATCHES = (1, 8)
REPLAY_BATCH = 8
# (label, psana det.raw.calib keywords, the gpusmd common mode doing psana's work (its
# first event must equal psana's bit for bit), the gpusmd common modes timed beside it).
# psana's Jungfrau calib defaults to its C++ version 3, which applies no common mode
# whatever cmpars asks: its row against gpusmd's common mode 7 is not the same work.
PSANA_CALIB = {"epix10k": {"cmpars": (7, 3, 100, 10)},              # = gpusmd 85
               "jungfrau": {"cmpars": (7, 3, 10, 10), "cversion": 0}}    # = gpusmd 7
EPIX_CASES = [("calibration, no common mode", {"cmpars": None}, 0, (0,)),
              ("calibration + common mode (7,3,100,10) = 85", PSANA_CALIB["epix10k"], 85, (85,))]
JUNGFRAU_CASES = [("calibration, no common mode, cversion 0", {"cmpars": None, "cversion": 0}, 0, (0,)),
                  ("calibration + common mode (7,3,10,10) = 7, cversion 0",
                   PSANA_CALIB["jungfrau"], 7, (7,)),
                  ("calibration, psana default cversion 3 (C++) asked for cmpars (7,3,10,10)",
                   {"cmpars": (7, 3, 10, 10)}, 0, (0, 7))]


# ---- the data --------------------------------------------------------------------------
def make_twins(d: Path, det: str, n_events: int, seed: int = 5) -> Path:
    """dark.h5, constants.h5, run.h5 and its XTC2 twin run.xtc2 in d (reused when present)."""
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "run.xtc2").exists():
        simulate_run(d / "dark.h5", det, n_events=4, dark=True, seed=seed, run=1)
        process_dark(d / "dark.h5", d / "constants.h5")
        simulate_run(d / "run.h5", det, n_events=n_events, seed=seed, run=2)
        write_xtc2(d / "run.h5", d / "run.xtc2")
    return d


def psana_detector(xtc2, constants_path, det: str):
    """(psana run, psana detector) of an XTC2 file, with gpusmd's constants as its
    calibration constants."""
    from psana import DataSource
    ds = DataSource(files=str(xtc2), skip_calib_load="all")
    run = next(ds.runs())
    run._calib_const[det] = to_psana(Constants.load(constants_path, det), det, "sim", run.runnum)
    run.dsparms.calibconst = run._calib_const
    return run, run.Detector(det)


# ---- psana -------------------------------------------------------------------------------
def psana_calib_pass(xtc2, constants_path, det: str, max_events: int | None = None, **kwargs):
    """One pass of psana's det.raw.calib(evt, **kwargs) over the run (a fresh detector:
    psana caches its keywords at the first call). Returns (seconds per frame, frames
    timed, the first event's calibrated frame). Only the calib calls are timed, the
    first event (psana's caches built there) left out."""
    run, pdet = psana_detector(xtc2, constants_path, det)
    seconds, n, first = 0.0, 0, None
    for i, evt in enumerate(run.events()):
        if max_events is not None and i >= max_events:
            break
        t0 = time.perf_counter()
        out = pdet.raw.calib(evt, **kwargs)
        dt = time.perf_counter() - t0
        if first is None:
            first = np.array(out, copy=True)        # cversion 3 reuses its output buffer
        else:
            seconds += dt
            n += 1
    if n == 0:
        raise ValueError("psana_calib_pass needs at least 2 events")
    return seconds / n, n, first


def psana_read_pass(xtc2, det: str):
    """psana reading the run: run.events() with det.raw.raw(evt); seconds per event from
    the end of the first event to the last."""
    from psana import DataSource
    run = next(DataSource(files=str(xtc2), skip_calib_load="all").runs())
    pdet = run.Detector(det)
    n, t0 = 0, None
    for evt in run.events():
        pdet.raw.raw(evt)
        if t0 is None:
            t0 = time.perf_counter()
        else:
            n += 1
    return (time.perf_counter() - t0) / n


def psana_event_loop_pass(xtc2, constants_path, det: str, roi, cmpars):
    """The replay's work done with psana: per event det.raw.calib with common mode, the
    ROI sum and a running sum image (NumPy); seconds per event after the first."""
    run, pdet = psana_detector(xtc2, constants_path, det)
    total, sums, n, t0 = None, [], 0, None
    for evt in run.events():
        calib = pdet.raw.calib(evt, cmpars=cmpars)
        sums.append(float(calib[roi].sum()))
        total = calib.astype(np.float64) if total is None else total + calib
        if t0 is None:
            t0 = time.perf_counter()
        else:
            n += 1
    return (time.perf_counter() - t0) / n


# ---- gpusmd ------------------------------------------------------------------------------
def calib_config(d: Path, det: str, common_mode: int):
    """A config with only the calibration: common mode, mask status (psana's)."""
    path = d / f"calib-{common_mode}.yaml"
    path.write_text(f"detectors:\n  {det}:\n    calib: constants.h5\n"
                    f"    common_mode: {common_mode}\n    mask: status\n")
    return load_config(path)


def read_frames(source, det: str, max_events: int | None = None):
    """(raw frames (N, *shape), configuration step) of a run, read with gpusmd."""
    with open_run(source, [det]) as run:
        batches = list(run.batches(1 << 20, max_events, detectors=[det], one_step=True))
    return np.concatenate([b.frames[det] for b in batches]), int(batches[0].steps[det][0])


def gpusmd_processor(d: Path, det: str, common_mode: int, source=None):
    """The processor of a calibration-only config (its per-run tables are built by its
    first calibration)."""
    config = calib_config(d, det, common_mode)
    with open_run(source or d / "run.xtc2", [det]) as run:
        proc = build_processors(config, RunInfo.from_run(run, detectors=[det]), CPU)[det]
    return proc


def gpusmd_calib_pass(proc, frames, step: int, batch: int) -> float:
    """gpusmd's calibration of the frames in batches; seconds per frame."""
    proc.calibrate(frames[:batch], step)                    # per-run tables, once
    t0 = time.perf_counter()
    for i in range(0, len(frames), batch):
        proc.calibrate(frames[i:i + batch], step)
    return (time.perf_counter() - t0) / len(frames)


def gpusmd_first_calib(proc, frames, step: int, batch: int) -> np.ndarray:
    return np.asarray(proc.calibrate(frames[:batch], step)[0])[0]


def roi_bounds(model):
    nseg, rows, cols = model.seg_shape
    return [[1, 2], [rows // 4, rows // 2], [cols // 4, 3 * cols // 4]]


def replay_config(d: Path, det: str, model, batch: int):
    b = roi_bounds(model)
    path = d / "replay.yaml"
    path.write_text(textwrap.dedent(f"""\
        batch_size: {batch}
        detectors:
          {det}:
            calib: constants.h5
            common_mode: 85
            functions:
              - {{kind: roi, name: ROI_0, bounds: {b}}}
            sums: [calib]
        """))
    return load_config(path), tuple(slice(*r) for r in b)


def gpusmd_replay_pass(source, config, out: Path):
    """gpusmd's replay end to end into out (replaced). Returns (seconds per event after
    the first batch: from the end of the first batch's processing to the end of the
    last's, reading included; seconds per event of the whole replay() call)."""
    import gpusmd.replay as replay_module
    inner, marks = replay_module.process_batch, []

    def clocked(procs, batch, *args, **kwargs):
        result = inner(procs, batch, *args, **kwargs)
        marks.append((time.perf_counter(), len(batch)))
        return result

    out.unlink(missing_ok=True)
    replay_module.process_batch = clocked
    try:
        t0 = time.perf_counter()
        summary = replay(source, config, out, backend=CPU, progress=False)
        whole = time.perf_counter() - t0
    finally:
        replay_module.process_batch = inner
    after_first = sum(n for _, n in marks[1:])
    if not after_first:
        raise ValueError("the replay rows need more than one batch of events")
    return (marks[-1][0] - marks[0][0]) / after_first, whole / summary.n_events


# ---- the table -----------------------------------------------------------------------------
def rate(seconds_per_frame: float) -> str:
    return f"{1 / seconds_per_frame:.1f}"


def calibration_rows(d: Path, det: str, cases, frames, step, repeat: int, log=print,
                     batches=BATCHES, max_events=None):
    """For each case: psana's det.raw.calib and gpusmd at each batch size, best of
    `repeat` interleaved passes (psana, gpusmd, psana, gpusmd, ...); gpusmd's first event
    checked equal to psana's, bit for bit, first. A gpusmd common mode timed for an
    earlier case is not timed again: its rows take that case's numbers."""
    rows, measured = [], {}
    for label, kwargs, same, modes in cases:
        procs = {cm: gpusmd_processor(d, det, cm) for cm in {same, *modes}}
        best_p = float("inf")
        best_g = {(cm, b): float("inf") for cm in modes for b in batches
                  if (cm, b) not in measured}
        for r in range(repeat):
            s, _, first = psana_calib_pass(d / "run.xtc2", d / "constants.h5", det, max_events,
                                           **kwargs)
            best_p = min(best_p, s)
            if r == 0:
                check_first(procs[same], frames, step, first, f"{det} {label}", batches)
            for cm, b in best_g:
                best_g[cm, b] = min(best_g[cm, b], gpusmd_calib_pass(procs[cm], frames, step, b))
        measured.update(best_g)
        call = f"psana det.raw.calib({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
        for cm in modes:
            for b in batches:
                g = measured[cm, b]
                if cm == same:
                    note = (f"{call}; gpusmd common_mode {cm}, mask status, batch {b}; first "
                            "event bit-identical to psana's")
                else:
                    note = (f"{call}; gpusmd common_mode {cm}, batch {b}, as timed above; NOT "
                            "THE SAME WORK: psana applies no common mode (its output is "
                            f"bit-identical to gpusmd's common_mode {same})")
                vs = f", vs gpusmd common mode {cm}" if len(modes) > 1 else ""
                rows.append([f"{det} {label}{vs}, gpusmd batch {b}", rate(best_p), rate(g),
                             f"{best_p / g:.2f}", note])
        log(f"{det} {label}: psana {rate(best_p)} ev/s, gpusmd "
            + ", ".join(f"cm {cm} batch {b} {rate(measured[cm, b])}" for cm in modes
                        for b in batches), flush=True)
    return rows


def check_first(proc, frames, step, first, label: str, batches=BATCHES):
    """gpusmd's first event (at each batch size) equals psana's, bit for bit."""
    for b in batches:
        ours = gpusmd_first_calib(proc, frames, step, b)
        theirs = np.asarray(first).reshape(ours.shape)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), \
            f"{label}: gpusmd (batch {b}) and psana differ on the first event, by up to " \
            f"{np.max(np.abs(ours.astype(np.float64) - theirs)):.3g}"


def timed_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def reading_rows(d: Path, det: str, model, n_events: int, repeat: int, batch: int = REPLAY_BATCH,
                 log=print):
    """psana reading the XTC2 file and psana's event loop doing the replay's work, beside
    gpusmd's replay of the XTC2 file and of its HDF5 twin: per event after the first
    (psana) and after the first batch (gpusmd, whose first batch carries the per-run
    tables), and for the whole run (from opening it to the output closed)."""
    if n_events <= batch:
        raise ValueError(f"the replay rows need more than {batch} events")
    config, roi = replay_config(d, det, model, batch)
    xtc2, consts, cmpars = d / "run.xtc2", d / "constants.h5", PSANA_CALIB["epix10k"]["cmpars"]
    best = {}

    def keep(key, seconds):
        best[key] = min(best.get(key, float("inf")), seconds)

    for _ in range(repeat):
        keep("read", psana_read_pass(xtc2, det))
        for src in ("xtc2", "h5"):
            steady, whole = gpusmd_replay_pass(d / f"run.{src}", config, d / f"out-{src}.h5")
            keep(f"{src} steady", steady)
            keep(f"{src} whole", whole)
        loop = {}
        whole = timed_call(lambda: loop.update(s=psana_event_loop_pass(xtc2, consts, det, roi, cmpars)))
        keep("loop steady", loop["s"])
        keep("loop whole", whole / n_events)
    work = "calibration + common mode 85 + 1 ROI + sum image"
    replay_note = (f"gpusmd: replay() of the file (batch {batch}), output written, per event "
                   "after the first batch (reading, processing, writing)")

    def row(stage, p, g, note):
        return [f"{det} {stage}", rate(best[p]), rate(best[g]), f"{best[p] / best[g]:.2f}", note]

    rows = [row("reading XTC2 vs gpusmd replay of it", "read", "xtc2 steady",
                f"psana: run.events() + det.raw.raw(evt) only, after the first event; "
                f"{replay_note}, {work}; NOT THE SAME WORK (psana only reads)"),
            row("reading XTC2 vs gpusmd replay of the HDF5 twin", "read", "h5 steady",
                "as above, gpusmd reading the raw HDF5 file; NOT THE SAME WORK"),
            row(f"event loop, {work}", "loop steady", "xtc2 steady",
                f"psana: run.events() + det.raw.calib(cmpars=(7,3,100,10)) + ROI sum + running "
                f"sum (NumPy), after the first event; {replay_note}, XTC2"),
            row(f"event loop, {work}, whole run", "loop whole", "xtc2 whole",
                f"{n_events} events, from opening the run: psana DataSource + the loop above; "
                "gpusmd replay() of the XTC2 file, its per-run costs (tables, constants "
                "written to /UserDataCfg, run sums) included"),
            row(f"event loop, {work}, whole run, HDF5 twin", "loop whole", "h5 whole",
                "as above, gpusmd reading the raw HDF5 file")]
    log(f"{det} reading: " + ", ".join(f"{k} {rate(v)}" for k, v in best.items()), flush=True)
    return rows


def psana_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("psana")
    except PackageNotFoundError:
        return "?"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=16, help="events per run")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repeats, best kept")
    p.add_argument("--jungfrau", default="jungfrau4M", choices=("jungfrau4M", "jungfrau1M"))
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="gpusmd's threads on its CPU engine (default 1: per core, as psana)")
    args = p.parse_args()
    os.environ[THREADS_VAR] = str(args.threads)      # read at gpusmd's first calibration
    if args.events <= REPLAY_BATCH:
        sys.exit(f"bench/psana_reference.py: --events must be more than {REPLAY_BATCH}")
    base = args.workdir or Path(tempfile.mkdtemp(prefix="gpusmd-psana-ref-"))
    t_start = time.perf_counter()
    columns = ["stage", "psana events/s", "gpusmd events/s", "ratio gpusmd / psana", "notes"]
    rows = []
    for det, cases in (("epix10k2M", EPIX_CASES), (args.jungfrau, JUNGFRAU_CASES)):
        d = make_twins(base / det, det, args.events)
        frames, step = read_frames(d / "run.xtc2", det)
        rows += calibration_rows(d, det, cases, frames, step, args.repeat)
        if det == "epix10k2M":
            with open_run(d / "run.h5") as run:
                model = run.detectors[det]
            rows += reading_rows(d, det, model, args.events, args.repeat)
        del frames
    print_table(columns, rows)
    md = write_results(
        "psana-reference-cpu", f"gpusmd (CPU backend, one process, {CPU.label}) against "
        "psana2 itself (one process)", columns, rows,
        notes=f"`python bench/psana_reference.py --events {args.events} --repeat {args.repeat}"
              f"{'' if args.threads == 1 else f' --threads {args.threads}'}"
              f"{'' if args.jungfrau == 'jungfrau4M' else ' --jungfrau ' + args.jungfrau}`; "
              f"psana {psana_version()}, OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS')}. {args.events} simulated events per run; "
              f"best of {args.repeat} interleaved repeats. Calibration: the events already "
              "read, only the calibration timed on both sides; psana's first event (where it "
              "builds its caches) left out, gpusmd's per-run tables built before the clock "
              "starts. Replay: see the rows' notes. Ratio > 1: gpusmd faster. "
              f"Whole benchmark: {time.perf_counter() - t_start:.0f} s.",
        extra={"events": args.events, "repeat": args.repeat, "gpusmd_engine": CPU.label,
               "psana_version": psana_version()})
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
